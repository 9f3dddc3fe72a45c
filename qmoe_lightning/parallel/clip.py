"""EP-aware gradient-norm clipping for models parallelised by `parallelize_model`.

Why: with experts sharded on the ep/efsdp meshes and dense parameters on the dp_shard mesh, the gradients are
DTensors on different meshes (or plain tensors for EP without FSDP). `torch.nn.utils.clip_grad_norm_` stacks the
per-parameter norms and fails ("aten.stack must have the same mesh"); reducing per mesh separately and adding is
easy to get wrong (replicated shards counted several times, EP shards counted once).

How: every rank computes the squared norm of its LOCAL gradient pieces, each weighted by 1 / (number of ranks that
hold an identical copy of that piece), and ONE all-reduce (sum) over the whole world gives the exact global sum:
  - DTensor gradient: copies = product of the mesh sizes over its Replicate placements (HSDP's replicate dim);
    Shard placements split it into distinct pieces;
  - plain tensor of an expert-parallel module: copies = world / ep (the slices differ across ep);
  - other plain tensors: copies = world (replicated everywhere, e.g. DDP or no parallelism).
inf-norm uses a max all-reduce instead. Then every gradient is scaled by min(1, max_norm / (norm + 1e-6)), like
torch's clip_grad_norm_. Returns the total norm (before clipping) as a 0-dim fp32 tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from .expert_parallel import is_expert_parallel


def _pieces(model: nn.Module, world: int):
    """(local grad, copies) for every parameter with a gradient, each parameter once."""
    seen = set()
    ep_params = {id(p): m.dispatcher.ep_size for m in model.modules() if is_expert_parallel(m)
                 for p in m.parameters(recurse=False)}
    for p in model.parameters():
        if id(p) in seen or p.grad is None:
            continue
        seen.add(id(p))
        g = p.grad
        if isinstance(g, DTensor):
            copies = 1
            for dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate):
                    copies *= g.device_mesh.size(dim)
            yield g.to_local(), copies
        else:
            yield g, world // ep_params.get(id(p), 1)


@torch.no_grad()
def grad_norm(model: nn.Module, norm_type: float = 2.0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Exact global gradient norm of a (possibly) EP + FSDP sharded model."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    pieces = list(_pieces(model, world))
    device = pieces[0][0].device if pieces else torch.device("cpu")
    if math.isinf(norm_type):
        total = torch.zeros((), device=device, dtype=torch.float32)
        for g, _ in pieces:
            if g.numel():
                total = torch.maximum(total, g.detach().float().abs().max())
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    total = torch.zeros((), device=device, dtype=torch.float64)
    for g, copies in pieces:
        if g.numel():
            total += g.detach().double().norm(norm_type) ** norm_type / copies
    if distributed:
        dist.all_reduce(total, group=group)
    return (total ** (1.0 / norm_type)).float()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Clip all gradients of `model` in place to a global norm of `max_norm`; returns the norm before clipping."""
    norm = grad_norm(model, norm_type, group)
    coef = torch.clamp(max_norm / (norm.double() + 1e-6), max=1.0)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                g.mul_(coef.to(g.dtype))
    return norm


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, gradient_clip_val=None,
                   gradient_clip_algorithm=None) -> torch.Tensor | None:
    """Clip the optimizer's gradients as the Trainer's `gradient_clip_val` / `gradient_clip_algorithm` say, and return
    the total gradient norm BEFORE clipping (None without any gradient). `sharded`: the model was parallelised
    (mixed EP / FSDP meshes: `clip_grad_norm_` above; torch's cannot stack them).

    Clipping by norm happens only for a finite norm: scaling by a NaN coefficient would spread one group's NaN to
    every gradient, and such a step is never taken anyway (`step_guard`)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return None
    by_value = str(gradient_clip_algorithm or "norm").lower().endswith("value")
    max_norm = gradient_clip_val if gradient_clip_val and not by_value else float("inf")
    if sharded:  # a NaN norm scales nothing there
        norm = clip_grad_norm_(model, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if math.isfinite(max_norm) and bool(torch.isfinite(norm)):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    if by_value and gradient_clip_val and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
    return norm
