"""`PackedBatch`: the one contract for a packed micro-batch, from the DataModule through the LightningModule into the
models.

A packed row has batch dimension 1 and holds several documents one after another; `cu_seqlens` says where each
starts, so attention, the Gated DeltaNet conv taps and its recurrent state restart at every document (packing.py).
Shapes (T = row length, N = documents, the tail padding counted as one more):

    input_ids            (1, T) long
    labels               (1, T) long, unshifted (HF convention), -100 = no target; the first label of every
                         document is -100 so no target crosses a boundary after the shift; None: no loss
    position_ids         (3, 1, T) mRoPE (t, h, w), restarting per document; None: computed by the model
    cu_seqlens           (N + 1,) int32 document starts, 0 first and T last
    max_seqlen           longest document
    attention_mask       (1, T) 1 real token, 0 tail padding (left out of the aux loss and the expert load)
    mm_token_type_ids    (1, T) 0 text, 1 image, 2 video
    pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw: as transformers' processor gives them
    num_label_tokens     targets in the row; num_documents: real documents (padding excluded)
    documents            the documents' indices into their split, in row order

Lightning moves it to the device as a dataclass. Read access by key (`batch["input_ids"]`, `batch.get(...)`,
`{**batch}`) stays for code written against the dict form; `PackedBatch.from_dict` makes one from such a dict and
refuses keys the contract does not have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    attention_mask: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    num_label_tokens: int = 0
    num_documents: int = 1
    documents: list[int] = field(default_factory=list)

    # what a model's forward takes (transformers' names); the rest is bookkeeping
    MODEL_INPUTS: ClassVar[tuple[str, ...]] = (
        "input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", "attention_mask", "mm_token_type_ids",
        "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def model_inputs(self) -> dict:
        """The forward's keyword arguments, None ones left out."""
        values = vars(self)
        return {k: values[k] for k in self.MODEL_INPUTS if values[k] is not None}

    @property
    def real_tokens(self) -> int:
        """Tokens before the tail padding."""
        if self.cu_seqlens is not None and self.num_documents < self.cu_seqlens.numel():
            return int(self.cu_seqlens[self.num_documents])
        return int(self.input_ids.numel())

    @classmethod
    def from_dict(cls, data: dict) -> PackedBatch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError(f"a packed micro-batch has no {unknown}; its keys are {sorted(names)}")
        return cls(**data)

    # dict-style access: the fields only (an attribute set beside them, e.g. the loader's `decode_skips`, is not a key)
    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def items(self):
        values = vars(self)
        return [(k, values[k]) for k in self.keys()]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return vars(self)[key]

    def __setitem__(self, key: str, value) -> None:
        if key not in self.keys():
            raise KeyError(f"a packed micro-batch has no {key!r}")
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return vars(self)[key] if key in self.keys() else default
