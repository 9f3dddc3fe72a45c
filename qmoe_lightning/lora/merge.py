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

from qmoe_lightning.models.checkpoint import parse_size, save_hf_checkpoint

from .apply import has_lora, is_adapter_key, lora_modules
from .experts import LoRAGroupedExperts
from .linear import LoRALinear


def merged_tensor(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """Merged value of `module.<param_name>` if it is an adapted base weight, else None."""
    if isinstance(module, LoRALinear) and param_name == "weight":
        return module.merged_weight()
    if isinstance(module, LoRAGroupedExperts):
        if param_name == "gate_and_up_projs" and module.gate_and_up_lora_A is not None:
            return module.merged_weights_one("gate_up")
        if param_name == "down_projs" and module.down_lora_A is not None:
            return module.merged_weights_one("down")
    return None


class _MergedStateDict(Mapping):
    """Read-only view of `model.state_dict()` with merged weights and no adapter keys; values computed on access."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._base = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
        self._lora = lora_modules(model)

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self._base[key]
        owner, _, pname = key.rpartition(".")
        module = self._lora.get(owner)
        merged = merged_tensor(module, pname) if module is not None else None
        return value if merged is None else merged

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def save_merged_pretrained(model: nn.Module, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` with its adapters merged as a Hugging Face directory (atomic); the model is left unchanged."""
    if not has_lora(model):
        return model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    with torch.no_grad():
        return save_hf_checkpoint(model, Path(out_dir), parse_size(max_shard_size), state_dict=_MergedStateDict(model))


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
    if hasattr(model, "lora_config"):
        del model.lora_config
    return count
