"""AdamW with decoupled weight decay groups and a linear-warmup + cosine-decay learning-rate schedule.

Notable choices:
- Weight decay applies to matrices only (>= 2-D: linear weights, the 3-D grouped expert weights, embeddings);
  norms, biases and the Gated DeltaNet `A_log` / `dt_bias` vectors are never decayed (decaying a log-decay rate
  or a norm gain towards 0 changes the function, not just its scale).
- `fused=True` is used when every trainable parameter is a floating CUDA tensor (the fused kernel only exists
  there); CPU and mixed cases fall back to the foreach implementation.
- The schedule is a multiplier on the base LR (LambdaLR), stepped once per optimizer step: linear from
  `1/(warmup+1)` to 1 over `warmup_steps`, then cosine from 1 to `min_lr_ratio` at `total_steps`, flat after.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed (>= 2-D) and a non-decayed (0/1-D) group."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen (check the freeze_* switches)")
    return groups


def _fused_ok(params: Iterable[torch.Tensor]) -> bool:
    params = list(params)
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                fused: bool | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = _fused_ok(p for g in groups for p in g["params"])
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                            min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)
    )
