"""`GlobalSums`: named float64 sums that cross the ranks in one all-reduce and are read back by name.

The step's loss normalisation and the evaluation metrics each need several sums over all ranks (target tokens, CE,
per-depth MTP sums, (L, E) expert counts, ...). One collective per quantity would cost a round trip each; packing
them by hand into one tensor read back at computed offsets (`sums[5 + 2 * depths:]`) breaks silently when a field
is added. Here each field keeps its name and shape; the flat order is the insertion order, so every rank packs the
same layout as long as it adds the same fields (they do: the fields depend on the model and the config only).

float64: counts stay exact integers up to 2**53, and the CE sums of a step add without fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GlobalSums:
    def __init__(self, device: torch.device | str, **fields) -> None:
        """fields: name -> a number or a tensor (any shape), stored as float64 on `device`."""
        self.device = torch.device(device)
        self._fields: dict[str, torch.Tensor] = {}
        for name, value in fields.items():
            self.add(name, value)

    def add(self, name: str, value, shape: tuple[int, ...] | None = None) -> None:
        """Add a field; `shape` broadcasts a scalar (a window without any micro-batch sums to 0 of that shape)."""
        if name in self._fields:
            raise KeyError(f"field {name!r} is already in these sums")
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        self._fields[name] = t.expand(shape).clone() if shape is not None else t.clone()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def value(self, name: str) -> float:
        """A scalar field as a Python float."""
        return float(self._fields[name].item())

    def __add__(self, other: GlobalSums) -> GlobalSums:
        if list(self._fields) != list(other._fields):
            raise ValueError(f"sums with different fields: {list(self._fields)} vs {list(other._fields)}")
        out = GlobalSums(self.device)
        out._fields = {k: v + other._fields[k] for k, v in self._fields.items()}
        return out

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> GlobalSums:
        """One call of `reduce` (e.g. `lambda t: strategy.reduce(t, reduce_op="sum")`) on every field, flattened in
        insertion order; the result has the same fields and shapes."""
        flat = reduce(torch.cat([v.reshape(-1) for v in self._fields.values()]))
        out, offset = GlobalSums(self.device), 0
        for name, v in self._fields.items():
            out._fields[name] = flat[offset:offset + v.numel()].reshape(v.shape)
            offset += v.numel()
        return out
