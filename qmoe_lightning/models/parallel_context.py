"""What a model is told about how it was parallelised: `ParallelContext`, in one declared field (`MoeCausalLM.parallel`),
and the row split its forward calls (`WholeRow`, the single-device one).

`parallel.parallelize_model` writes the context once and returns it; the model's forward reads two things from it
(how rows are split over ranks, and the vision policy), and checkpoints, exports, loaders and clipping read the
layout through the expert modules' dispatchers (`parallel/expert_parallel.py`). None: a model on one device. This
file issues no collective and imports nothing from `parallel/`: the context holds handles, the collectives live in
the objects `parallel/` puts into it.

Row split (context parallelism): the forward computes what needs the whole row (embeddings, vision, positions, label
shift) and then asks `rows.split` for this rank's part; every layer runs on it, and the few places that cross a
slice's end ask `rows` again (the aux loss's row sums, the MTP block's shifted inputs and targets, the first hidden
state after the slice). `WholeRow` answers as a single device does; `parallel.context_parallel.ContextParallelRows`
splits each row into contiguous slices over a cp group (the layer kernels of a split row: `context_parallel.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .packing import SequenceInfo


class RowSplit(Protocol):
    """How a packed row is divided among the ranks that share it (see the module doc)."""

    size: int  # ranks sharing a row (1: whole rows)
    # the ranks sharing each row (`parallel.context_parallel.ContextParallelGroup`: size, rank, all_reduce_sum,
    # gather_rows), for what is summed or gathered outside the forward (evaluation, statistics); None: whole rows
    group: object | None

    def split(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, info: SequenceInfo,
              targets: torch.Tensor | None, deepstack, min_slice: int):
        """The whole row's (inputs_embeds (B, T, H), position_ids (3, B, T), info, targets (B, T), deepstack) ->
        this rank's part of each."""

    def local(self, info: SequenceInfo, x: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
        """A tensor of the whole row (token dimension `dim`) -> this rank's part, in the layout of `info` (what
        `split` returned)."""

    def row_sums(self, x: torch.Tensor) -> torch.Tensor | None:
        """`x` summed over the ranks sharing the row (no gradient); None for whole rows."""

    def hidden_after(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, H): the hidden state of the token after this rank's last one (zeros after the row's end)."""


class WholeRow:
    """Every rank holds whole rows: the single-device split."""

    size = 1
    group = None

    def split(self, inputs_embeds, position_ids, info, targets, deepstack, min_slice: int):
        return inputs_embeds, position_ids, info, targets, deepstack

    def local(self, info, x, dim: int, fill=0):
        return x

    def row_sums(self, x: torch.Tensor) -> None:
        return None

    def hidden_after(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(1, hidden.shape[-1])


WHOLE_ROW = WholeRow()


@dataclass(frozen=True)
class ParallelContext:
    """How `parallel.parallelize_model` laid the model out (read-only once set)."""

    mesh: object | None = None  # the training DeviceMesh ("replicate", "efsdp", "ep"; flattened "dp_shard", ...)
    ep_size: int = 1  # ranks an MoE layer's experts are spread over
    fsdp: bool = False  # parameters sharded by FSDP2 (DTensors)
    rows: RowSplit = WHOLE_ROW  # how rows are split over ranks (context parallelism), and the group that shares them
    # every rank runs the vision tower once per forward, on a placeholder without images: sharded parameters are
    # gathered by collectives that every rank must issue in the same order (`VisionLanguageMoe`)
    always_run_vision: bool = False

