"""The vocabulary of state-dict adapters (HF checkpoint <-> native tensors), shared by every model family.

A conversion from HF is a list of `Assignment`s (a native key, optionally an expert index and a column slice, and the
tensor to copy there), or a `Skip` saying why a checkpoint key is knowingly not loaded. Loaders (`checkpoint.py`,
`parallel/loading.py`) only speak this vocabulary; the family's adapter knows the names and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    native_key: str
    tensor: torch.Tensor
    expert: int | None = None  # write into [expert] of the native tensor
    cols: slice | None = None  # and into these columns (last dim)

    @property
    def slot(self) -> str:
        return f"{self.native_key}[{self.expert},{self.cols}]" if self.expert is not None else self.native_key


@dataclass
class Skip:
    reason: str  # "mtp" (kept aside), "vision" (text-only model), "ignorable"
