"""`ExpertParallelStrategy`: Lightning's `ModelParallelStrategy` with an expert-parallel mesh.

Lightning's strategy builds a (data_parallel, tensor_parallel) mesh only. This subclass overrides
`setup_environment()` (process group via `_setup_distributed()`, as the parent) and builds instead the mesh of
`parallelize.build_mesh`: dims ("replicate", "efsdp", "ep") with the flattened "data_parallel" view, which the
parent's `distributed_sampler_kwargs` reads, so the sampler shards data over every rank. The mesh is set on the
LightningModule (`self.device_mesh` in `configure_model`). Everything else (launch incl. torchrun / SLURM multi-node,
distributed checkpoints, optimizer-state handling) is the parent's.

YAML:
    trainer:
      strategy:
        class_path: qmoe_lightning.parallel.strategy.ExpertParallelStrategy
        init_args: {ep_size: 2, replicate: 1, activation_checkpointing: false, mixed_precision: false}

`configure_model` must call `self.trainer.strategy.parallelize(self.model)` after the weights are loaded (and after
LoRA is applied); gradient clipping must use `qmoe_lightning.parallel.clip.clip_grad_norm_(self.model, ...)`.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from .parallelize import ParallelDims, build_mesh, parallelize_model


class ExpertParallelStrategy(ModelParallelStrategy):
    def __init__(self, ep_size: int = 1, replicate: int = 1, activation_checkpointing: bool = False,
                 mixed_precision: bool = False, fsdp: bool = True, **kwargs):
        """
        Args:
            ep_size: expert-parallel group size (experts per rank = num_experts / ep_size). The expert-FSDP size is
                world / (ep_size * replicate).
            replicate: HSDP replication degree (dense and expert shards are replicated over this many groups,
                typically one per node); 1 = plain FSDP.
            activation_checkpointing: per-block activation checkpointing with routing replay.
            mixed_precision: FSDP2 MixedPrecisionPolicy with bf16 parameters and fp32 gradient reduction (for fp32
                master weights, i.e. `precision: 32-true`).
            fsdp: shard parameters with FSDP2 (False: EP only, dense parameters replicated).
            **kwargs: ModelParallelStrategy's (save_distributed_checkpoint, process_group_backend, timeout).
        """
        super().__init__(**kwargs)
        self.ep_size, self.replicate = int(ep_size), int(replicate)
        self.activation_checkpointing, self.mixed_precision, self.fsdp = activation_checkpointing, mixed_precision, fsdp

    def build_device_mesh(self, world_size: int, device: torch.device) -> DeviceMesh:
        ParallelDims(world_size, self.ep_size, self.replicate)  # validates divisibility with a clear message
        return build_mesh(device.type, world_size, self.ep_size, self.replicate)

    def setup_environment(self) -> None:
        ParallelStrategy.setup_environment(self)  # skip ModelParallelStrategy's (dp, tp) mesh
        self._setup_distributed()
        self._device_mesh = self.build_device_mesh(self.world_size, self.root_device)
        assert self.lightning_module is not None
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

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self.ep_size > 1:
            # expert slices are plain local tensors on each ep rank: DCP would see them as replicas and keep one
            raise NotImplementedError(
                "checkpoints of expert-parallel runs (ep_size > 1) are not supported yet: distributed checkpoints "
                "would keep only one rank's experts. Set trainer.enable_checkpointing: false for now.")
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """EP + AC + FSDP2 on the strategy's mesh with its options (call from `configure_model`)."""
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed_precision \
            else None
        return parallelize_model(model, self.device_mesh, self.ep_size, fsdp=self.fsdp,
                                 activation_checkpointing=self.activation_checkpointing, mp_policy=mp)
