"""Global views of an expert-parallel model's state: every tensor as a DTensor of its UNPARALLELISED shape.

Why: `shard_experts_` keeps each rank's E/ep experts as a tensor of shape (E/ep, ...) under the same parameter name
on every ep rank (and FSDP2 then shards that slice over efsdp, as a DTensor whose "global" shape is still
(E/ep, ...)). Anything that reasons about names and global shapes would be wrong on such tensors: distributed
checkpoints (DCP would take the ep ranks' different slices for replicas of one (E/ep, ...) tensor and keep one),
the HF export (it needs all E experts), rank-local loading (it needs each rank's offsets into the checkpoint's
(E, ...) tensors). Here every expert-dim tensor is re-described, without copying, as a DTensor of shape (E, ...)
on a mesh whose dims say how it is split:

- experts under FSDP2 (the default): mesh ("replicate", "ep", "efsdp") over the same ranks as the training mesh but
  with `ep` BEFORE `efsdp`, placements (Replicate, Shard(0), Shard(0)). DTensor applies Shard placements in mesh
  order, so the expert dim is split over ep first (rank r: experts [r*E/ep, (r+1)*E/ep)), then that range over
  efsdp, with torch.chunk semantics at both levels: exactly how shard_experts_ and FSDP2 split it. (The training
  mesh keeps ep innermost so that an EP group is consecutive ranks, one node; that order would nest the other way,
  so a second mesh is built, once, in `parallelize_model`: `expert_layout`.)
- experts without FSDP: the training mesh, placements (Replicate, Replicate, Shard(0)).

Dense FSDP2 parameters already are DTensors of their global shape and pass through unchanged. The views share
storage with the parameters (DTensor.from_local, no copy), so loading into a view (DCP) loads into the model.
Optimizer states (AdamW exp_avg / exp_avg_sq have the parameter's layout) get the same treatment by name.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .expert_parallel import is_expert_parallel

# DTensor warns about the two sequential all-gathers of a (Shard(0), Shard(0)) full_tensor(); that is intended here
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def build_expert_state_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The training mesh ("replicate", "efsdp", "ep") re-ordered as ("replicate", "ep", "efsdp"), same ranks.
    Collective (creates process groups): every rank must call it, in the same order."""
    ranks = mesh.mesh.permute(0, 2, 1).contiguous()
    return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("replicate", "ep", "efsdp"))


def expert_layout(training_mesh: DeviceMesh, fsdp: bool) -> tuple[DeviceMesh, tuple]:
    """(mesh, placements) of the expert tensors' global views (see module doc); the expert dispatchers hold it.
    Under FSDP a collective (`build_expert_state_mesh`): every rank must call it, in the same order."""
    if fsdp:
        return build_expert_state_mesh(training_mesh), (Replicate(), Shard(0), Shard(0))
    return training_mesh, (Replicate(), Replicate(), Shard(0))


def global_view(tensor: torch.Tensor, experts: nn.Module) -> DTensor:
    """(E/ep[/efsdp], ...) local expert tensor (plain or FSDP DTensor) of `experts` -> DTensor of shape (E, ...)."""
    mesh, placements = experts.dispatcher.global_layout
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    shape = (experts.num_experts, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def expert_keys(root: nn.Module) -> dict[str, nn.Module]:
    """state-dict key of every expert-dim tensor of an expert-parallel module under `root` -> that module."""
    out = {}
    for name, module in root.named_modules():
        if is_expert_parallel(module):
            if module.dispatcher.global_layout is None:
                raise RuntimeError(f"{name}: expert-parallel module without a global layout; parallelise the model "
                                   "with parallelize_model")
            for pname in module.expert_tensors():
                out[f"{name}.{pname}" if name else pname] = module
    return out


def is_expert_parallel_model(root: nn.Module) -> bool:
    return any(is_expert_parallel(m) for m in root.modules())


def global_state_dict(root: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """`root.state_dict()` (or the given one, same keys) with every expert tensor replaced by its global view."""
    sd = root.state_dict() if state_dict is None else state_dict
    keys = expert_keys(root)
    return {k: (global_view(v, keys[k]) if k in keys else v) for k, v in sd.items()}


def global_optimizer_state(root: nn.Module, optim_state: dict) -> dict:
    """A `get_optimizer_state_dict(root, opt)` result (FQN keyed) with expert-shaped states as global views.
    The views share storage with the given state (loading into them loads into it)."""
    keys = expert_keys(root)
    state = {}
    for fqn, entries in optim_state["state"].items():
        module = keys.get(fqn)
        if module is None:
            state[fqn] = entries
            continue
        local_shape = _local(module.expert_tensors()[fqn.rpartition(".")[2]]).shape
        state[fqn] = {name: (global_view(v, module) if isinstance(v, torch.Tensor) and _local(v).shape == local_shape
                             else v) for name, v in entries.items()}
    return {**optim_state, "state": state}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """All-gathered value of a (global-view) tensor: a collective for a DTensor (all ranks must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded_model(root: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2) or an expert-parallel slice: the full values need collectives."""
    return is_expert_parallel_model(root) or any(isinstance(p, DTensor) for p in root.parameters())


def full_tensor_fetcher(root: nn.Module):
    """name -> full (unsharded, detached) tensor of `root.state_dict()[name]`, by global view + all-gather.

    A collective per call for sharded tensors: EVERY rank must call it with the same names in the same order
    (exporters walk the same mapping on all ranks and only rank 0 writes). Peak extra memory: one full tensor."""
    sd = root.state_dict()
    keys = expert_keys(root)

    def fetch(name: str) -> torch.Tensor:
        value = sd[name]
        if name in keys:
            value = global_view(value, keys[name])
        return full_tensor(value.detach())

    return fetch
