"""`ExpertParallelStrategy`: Lightning's `ModelParallelStrategy` with an expert-parallel mesh.

Lightning's strategy builds a (data_parallel, tensor_parallel) mesh only. This subclass overrides
`setup_environment()` (process group via `_setup_distributed()`, as the parent) and builds instead the mesh of
`parallelize.build_mesh`: dims ("replicate", "efsdp", "ep") with the flattened "data_parallel" view, which the
parent's `distributed_sampler_kwargs` reads, so the sampler shards data over every rank. The mesh is set on the
LightningModule (`self.device_mesh` in `configure_model`). Distributed checkpoints (DCP directories) are the parent's,
with expert tensors described by their global views (state.py) on save and load, so every ep rank writes its own
experts at their global offsets. Launch (incl. torchrun / SLURM multi-node) is the parent's.

YAML:
    trainer:
      strategy:
        class_path: qmoe_lightning.parallel.strategy.ExpertParallelStrategy
        init_args: {ep_size: 2, replicate: 1, cp_size: 1, activation_checkpointing: false, mixed_precision: false}

Context parallelism (`cp_size`): the cp ranks of a group are consecutive in the efsdp dimension (rank =
((replicate * F + f) * cp + c) * ep + e), so parameters shard exactly as without it (efsdp = world / (ep x
replicate) counts them) and gradients are averaged over every rank as before; only the sampler
(`distributed_sampler_kwargs`: world / cp replicas) and the model's `context_parallel` group see cp.

`configure_model` must call `self.trainer.strategy.parallelize(self.model)` after LoRA is applied: either on a
meta-device model, then `to_empty` and `parallel.loading.load_hf_weights_parallel` (what QMoELightningModule does
with a checkpoint: rank-local loading), or on a model already holding its full weights. Gradient clipping must use
`qmoe_lightning.parallel.clip.clip_grad_norm_(self.model, ...)` (QMoELightningModule does).
"""

from __future__ import annotations

import atexit
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from qmoe_lightning.models.conversion import is_native_only_key

from .context_parallel import data_parallel_coordinates, new_context_parallel_group
from .parallelize import ParallelDims, build_mesh, parallelize_model
from .state import global_optimizer_state, global_state_dict, is_expert_parallel_model


_DISTRIBUTED = False  # this process ran a multi-process ExpertParallelStrategy (cli.exit_after_distributed_run)


def was_distributed() -> bool:
    return _DISTRIBUTED


def _destroy_process_group_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ExpertParallelStrategy(ModelParallelStrategy):
    def __init__(self, ep_size: int = 1, replicate: int = 1, activation_checkpointing: bool = False,
                 mixed_precision: bool = False, fsdp: bool = True, cp_size: int = 1, overlap_dispatch: bool = False,
                 **kwargs):
        """
        Args:
            ep_size: expert-parallel group size (experts per rank = num_experts / ep_size). The expert-FSDP size is
                world / (ep_size * replicate).
            cp_size: context-parallel group size: this many ranks share every packed row, each keeping one
                contiguous slice of its tokens (`models/context_parallel.py`). The data-parallel world (what the
                sampler splits the packs over) is world / cp_size; parameters are sharded over every rank as
                before (the cp ranks are part of the efsdp dimension). 1: off.
            overlap_dispatch: start the experts' dispatch all-to-all asynchronously and compute the shared expert
                while the rows travel (forward and backward); exact (bitwise the blocking path), its speed effect not
                yet measured on GPUs.
            replicate: HSDP replication degree (dense and expert shards are replicated over this many groups,
                typically one per node); 1 = plain FSDP.
            activation_checkpointing: per-block activation checkpointing with routing replay.
            mixed_precision: FSDP2 MixedPrecisionPolicy with bf16 parameters and fp32 gradient reduction (for fp32
                master weights, i.e. `precision: 32-true`).
            fsdp: shard parameters with FSDP2 (False: EP only, dense parameters replicated).
            **kwargs: ModelParallelStrategy's (save_distributed_checkpoint, process_group_backend, timeout).
        """
        super().__init__(**kwargs)
        self.ep_size, self.replicate, self.cp_size = int(ep_size), int(replicate), int(cp_size)
        if self.cp_size < 1:
            raise ValueError(f"cp_size must be >= 1, got {cp_size}")
        self._context_parallel = None
        self.activation_checkpointing, self.mixed_precision, self.fsdp = activation_checkpointing, mixed_precision, fsdp
        self.overlap_dispatch = bool(overlap_dispatch)

    def build_device_mesh(self, world_size: int, device: torch.device) -> DeviceMesh:
        ParallelDims(world_size, self.ep_size, self.replicate)  # validates divisibility with a clear message
        if not self.fsdp and world_size > 1:
            # nothing in this strategy would reduce the dense gradients (FSDP2 does): every rank would silently
            # train its own replica
            raise ValueError("fsdp=False is for single-process runs: with several processes the dense parameters' "
                             "gradients must be reduced across ranks, which FSDP2 does (keep fsdp: true)")
        if world_size % (self.cp_size * self.ep_size * self.replicate):
            raise ValueError(f"world size {world_size} is not divisible by cp_size {self.cp_size} x ep_size "
                             f"{self.ep_size} x replicate {self.replicate}")
        return build_mesh(device.type, world_size, self.ep_size, self.replicate)

    @property
    def distributed_sampler_kwargs(self) -> dict:
        """The data-parallel coordinates: the cp ranks of one group get the same packs (they split each row)."""
        world = self.world_size // self.cp_size
        return {"num_replicas": world,
                "rank": data_parallel_coordinates(self.global_rank, self.cp_size, self.ep_size)}

    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)  # skip ModelParallelStrategy's (dp, tp) mesh
        self._setup_distributed()
        # a process group still alive when the interpreter tears down its C++ objects can end a successful run in
        # std::terminate ("terminate called without an active exception", exit code -6: seen once on gloo in CI)
        atexit.register(_destroy_process_group_at_exit)
        global _DISTRIBUTED
        _DISTRIBUTED = self.world_size > 1
        self._device_mesh = self.build_device_mesh(self.world_size, self.root_device)
        if self.cp_size > 1:
            self._context_parallel = new_context_parallel_group(self.cp_size, self.ep_size)
            rank_zero_info(f"context parallelism: each packed row split over cp_size={self.cp_size} ranks "
                           f"(contiguous slices); {self.world_size // self.cp_size} data-parallel rank(s)")
        assert self.lightning_module is not None
        # what Lightning's ModelParallelStrategy does: `LightningModule.device_mesh` reads this field
        self.lightning_module._device_mesh = self._device_mesh

    def setup(self, trainer) -> None:
        # configure_model has run: refuse to train a model that was never parallelised (it would run unsharded,
        # with unsynchronised gradients, and silently diverge across ranks)
        from torch.distributed.fsdp import FSDPModule

        from .expert_parallel import is_expert_parallel

        done = any(isinstance(m, FSDPModule) or is_expert_parallel(m) for m in self.lightning_module.modules())
        if self.world_size > 1 and not done:
            raise RuntimeError(f"{type(self).__name__}: the model was not parallelised; the LightningModule's "
                               "configure_model must call `self.trainer.strategy.parallelize(self.model)` after "
                               "building / loading the model (and after applying LoRA)")
        super().setup(trainer)

    # ------------------------------------------------------------------ distributed checkpoints
    # Lightning's DCP path with one change: expert tensors are saved / loaded through their global (E, ...) views
    # (state.py), so each ep rank writes its own experts under the real global offsets. The checkpoint is an
    # ordinary DCP directory of unparallelised shapes: it resumes on the same layout, on another ep / efsdp split,
    # and loads into a single-process model (`torch.distributed.checkpoint.load(..., no_dist=True)`).
    def _expert_parallel(self) -> bool:
        return self.model is not None and is_expert_parallel_model(self.model)

    def lightning_module_state_dict(self) -> dict:
        if not self._expert_parallel():
            return super().lightning_module_state_dict()
        if not self._save_distributed_checkpoint:
            raise ValueError("save_distributed_checkpoint=False (one consolidated file) is not supported with "
                             "ep_size > 1: keep the default distributed checkpoint directory, and use "
                             "callbacks.HFExport for a consolidated model")
        return global_state_dict(self.model)

    def optimizer_state(self, optimizer) -> dict:
        if not self._expert_parallel():
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = _unwrapped(optimizer)
        return global_optimizer_state(self.model, get_optimizer_state_dict(self.model, optimizer))

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """A DCP directory through `checkpoint_safety` (its `.metadata` and non-tensor items are never unpickled
        freely: torch's reader and planner would run code that came with the directory), with expert tensors
        through their global views; a `.ckpt` file is the parent's (`torch.load`, weights_only unless the caller
        says otherwise). `meta.pt` (the trainer state) is read with weights_only=True unless asked otherwise."""
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        from qmoe_lightning.parallel.checkpoint_safety import read_dcp_metadata

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            if self._expert_parallel():
                raise ValueError(f"{path}: not a distributed checkpoint directory (with {_METADATA_FILENAME}); an "
                                 "expert-parallel run resumes from the checkpoints its strategy writes")
            weights_only = True if weights_only is None else weights_only  # not torch's default: explicit
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = set(read_dcp_metadata(path).state_dict_metadata)  # UnsafeCheckpointError for a crafted one
        if self._expert_parallel():
            self._load_expert_parallel(path, saved)
        else:
            self._load_sharded(path, saved)
        return torch.load(path / _METADATA_FILENAME, weights_only=True if weights_only is None else weights_only)

    def _loadable_keys(self, path: Path, keys, saved: set) -> set:
        """The model's state-dict keys to read from the checkpoint at `path` (whose items are `saved`), checked.
        strict_loading=False (LoRA: checkpoints hold the adapters only) excuses FROZEN tensors only: they come from
        `pretrained`; a trainable one missing, or a tensor the model does not have, means another model / config.
        The routers' balancing bias is no parameter but is not in `pretrained` either: always required."""
        have = {k for k in keys if f"state_dict.{k}" in saved}
        missing = sorted(set(keys) - have)
        trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
        bad = missing if self.lightning_module.strict_loading else [
            k for k in missing if k in trainable or is_native_only_key(k)]
        unexpected = sorted(k[len("state_dict."):] for k in saved
                            if k.startswith("state_dict.") and k[len("state_dict."):] not in keys)
        if bad or unexpected or not have:
            raise KeyError(f"{path} does not match this model: {len(bad)} tensor(s) missing from the checkpoint "
                           f"{bad[:5]}, {len(unexpected)} unexpected {unexpected[:5]} (another model or LoRA config?)")
        return have

    def _load_sharded(self, path: Path, saved: set) -> None:
        """Lightning's sharded-checkpoint load (`fabric.strategies.model_parallel._load_checkpoint`) with the safe
        reader and planner, reading only the tensors the checkpoint holds (Lightning's asks for every tensor of
        the model, so an adapter-only LoRA checkpoint could not be resumed under context parallelism)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)

        from qmoe_lightning.parallel.checkpoint_safety import safe_dcp_load

        state = get_model_state_dict(self.model)
        have = self._loadable_keys(path, state, saved)
        module_state = {"state_dict": {k: state[k] for k in have}}
        safe_dcp_load(module_state, path)
        # not strict: what is absent was checked above (frozen tensors of a LoRA run, which come from `pretrained`)
        self.model.load_state_dict(module_state["state_dict"], strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            optimizer = _unwrapped(optimizer)
            optim_state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            safe_dcp_load(optim_state, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[f"optimizer_{idx}"],
                                     options=StateDictOptions(cpu_offload=True))

    def _load_expert_parallel(self, path: Path, saved: set) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from qmoe_lightning.parallel.checkpoint_safety import safe_dcp_load

        views = global_state_dict(self.model)
        have = self._loadable_keys(path, views, saved)
        # in place: the views share storage with the parameters and buffers (state_dict() detaches, no copy)
        safe_dcp_load({"state_dict": {k: views[k] for k in have}}, path)

        for idx, optimizer in enumerate(self.optimizers):
            optimizer = _unwrapped(optimizer)
            osd = get_optimizer_state_dict(self.model, optimizer)
            safe_dcp_load({f"optimizer_{idx}": global_optimizer_state(self.model, osd)}, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=osd)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """EP + AC + FSDP2 on the strategy's mesh with its options (call from `configure_model`)."""
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed_precision \
            else None
        parallelize_model(model, self.device_mesh, self.ep_size, fsdp=self.fsdp,
                          activation_checkpointing=self.activation_checkpointing, mp_policy=mp,
                          context_parallel=self._context_parallel, overlap_dispatch=self.overlap_dispatch)
        return model


def _unwrapped(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's `LightningOptimizer` wrapper (what DCP's state-dict helpers take)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
