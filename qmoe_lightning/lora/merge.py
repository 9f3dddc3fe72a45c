"""Merging LoRA adapters into the base weights, for the merged Hugging Face export (`hf_export/`).

Two ways, by purpose:
- `save_merged_pretrained(model, out_dir)`: non-destructive. Writes the same export as `model.save_pretrained`
  (official fused layout, config, companion files, atomic rename) with `W + (alpha/r) B A` in place of each adapted
  weight and without adapter keys, while the model keeps training. Merged tensors are produced lazily, one at a
  time, as the writer walks the state dict, so the peak extra memory is one merged tensor (plus the shard being
  written), never a second copy of the experts. Works on a model without adapters too (plain save).
- `merge_lora_(model)`: destructive, in place: every LoRA module is replaced by its plain module holding the merged
  weight (adapters dropped). For the end of training or for inference.

Numerics: merges are accumulated in fp32 when the base is 16-bit and cast once (one rounding per weight).

The merged view is handed to `save_hf_checkpoint(..., state_dict=...)`, which walks it once, tensor by tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from qmoe_lightning.models.checkpoint import CheckpointSource, parse_size, save_hf_checkpoint

from .apply import has_lora, is_adapter_key, lora_modules
from .experts import LoRAGroupedExperts, merge_expert_weights
from .linear import LoRALinear, merge_linear_weight


def _merged(module: nn.Module, param_name: str, get) -> torch.Tensor | None:
    """Merged value of `module.<param_name>` from the tensors `get(<param name in module>)` returns (the module's
    own, or gathered full copies of sharded ones), or None if it is not an adapted base weight."""
    if isinstance(module, LoRALinear) and param_name == "weight":
        return merge_linear_weight(get("weight"), get("lora_A"), get("lora_B"), module.scaling)
    if isinstance(module, LoRAGroupedExperts):
        adapted = module.adapter_pairs()
        for proj, base, prefix in (("gate_up", "gate_and_up_projs", "gate_and_up_lora"),
                                   ("down", "down_projs", "down_lora")):
            if param_name == base and proj in adapted:
                return merge_expert_weights(get(base), get(f"{prefix}_A"), get(f"{prefix}_B"), module.scaling)
    return None


class MergedStateDict(Mapping):
    """Read-only view of `model.state_dict()` with merged weights and no adapter keys; values computed on access
    (the merged export and `qmoe_lightning.generation.transformers_model` read the model through it).

    `fetch(key)`: how a state-dict tensor is read (default: as the model holds it). For a sharded model pass
    `parallel.state.full_tensor_fetcher(model)`: then every access is a collective and every rank must walk the
    view in the same order (`drain`)."""

    def __init__(self, model: nn.Module, fetch=None):
        self._model = model
        state = model.state_dict()
        self._keys = [k for k in state if not is_adapter_key(k)]
        self._fetch = fetch or state.__getitem__
        self._lora = lora_modules(model)

    def __getitem__(self, key: str) -> torch.Tensor:
        owner, _, pname = key.rpartition(".")
        module = self._lora.get(owner)
        if module is not None:
            merged = _merged(module, pname, lambda name: self._fetch(f"{owner}.{name}" if owner else name))
            if merged is not None:
                return merged
        return self._fetch(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def drain(self) -> None:
        """Read every value and drop it: what the non-writing ranks do while rank 0 writes (same collectives)."""
        for key in self._keys:
            self[key]


def save_merged_pretrained(model: nn.Module, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                           fetch=None, write: bool = True, source: CheckpointSource | None = None) -> Path | None:
    """Write `model` with its adapters merged as a Hugging Face directory (atomic); the model is left unchanged.
    source: the checkpoint the base weights came from (companion files, passthrough tensors; see checkpoint.py).

    Sharded (FSDP2 / expert-parallel) models: call on EVERY rank with `fetch=full_tensor_fetcher(model)` and
    `write=(rank == 0)`: tensors are gathered one at a time (bounded memory: one full tensor plus the shard being
    written) and only rank 0 writes."""
    with torch.no_grad():
        view = MergedStateDict(model, fetch) if fetch is not None or has_lora(model) else None
        if not write:
            if view is not None:
                view.drain()
            return None
        if source is None:  # a model used alone: what its from_pretrained recorded
            source = model.checkpoint_source  # declared by HFCheckpointMixin, which every native model is
        return save_hf_checkpoint(model, Path(out_dir), parse_size(max_shard_size), state_dict=view, source=source)


def merge_lora_(model: nn.Module) -> int:
    """Merge every adapter into its base weight and put the plain module back (in place). Returns modules merged."""
    count = 0
    with torch.no_grad():
        for name, module in list(lora_modules(model).items()):
            if isinstance(module, LoRALinear):
                plain = module.to_base(module.merged_weight())
            else:
                plain = module.to_base(module.merged_weights())
            plain.train(module.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
            count += 1
    return count
