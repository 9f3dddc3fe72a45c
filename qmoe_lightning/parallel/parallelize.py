"""`parallelize_model`: context parallelism, expert parallelism, activation checkpointing and FSDP2 applied to a
native model (any registered family) from outside the model files, in a fixed order; what was done is returned as
the model's `ParallelContext` (`models/parallel_context.py`, also set as `model.parallel`).

Mesh (see `build_mesh`): dims ("replicate", "efsdp", "ep"), `ep` innermost so an EP group is consecutive ranks
(one node). Flattened views: "dp_shard" = efsdp x ep (dense FSDP shards over it), "data_parallel" = all three (the
sampler's rank / world). Dense parameters: FSDP over dp_shard (HSDP with replicate > 1). Experts: EP over `ep`,
then FSDP over `efsdp` (HSDP over (replicate, efsdp)).

Order (each step relies on the one before; torchtitan's):
  0. CP: the model's row split becomes `ContextParallelRows` (`context_parallel.py`) when a cp group is given;
  1. EP: every `GroupedExperts` (or LoRA experts) keeps its E/ep experts (`expert_parallel.shard_experts_`);
  2. activation checkpointing per decoder block (the blocks' own, inside their forward, so inside the FSDP2 unit).
     Routing is recorded in the forward and REPLAYED on recompute (`models.moe.RoutingReplay`): the recomputed
     router uses the recorded top-k indices (weights re-gathered from the recomputed probabilities, bitwise the same
     values), so a recompute can never route tokens differently (bf16 / nondeterministic GEMMs) and the all-to-all
     split sizes of the recompute always match the other ranks';
  (compile: the place of a per-block `torch.compile`, between activation checkpointing and FSDP2, is marked in
     `parallelize_model`; nothing is compiled yet)
  3. FSDP2: per block, the experts first (expert mesh), then the block (dense mesh: attention, router, shared
     expert, norms); the vision tower, then the root (embeddings, LM head, final norm). The context says
     `always_run_vision`: a rank without images still runs the tower (on a placeholder, times 0), and images +
     videos take one tower call, so all ranks issue the same all-gathers / reduce-scatters in the same order.
     FSDP2 wants one dtype among the trainable parameters of a unit; under bf16-true a Gated DeltaNet keeps its
     A_log / dt_bias in fp32 (`KeepFp32Mixin`), so such a module becomes a unit of its own first
     (`_shard_mixed_dtypes`; "FSDP expects uniform original parameter dtype" otherwise).
  4. Gradient scale: FSDP averages over the mesh it reduces on. Dense parameters see every data-parallel rank, so
     that is the data-parallel mean (what the LightningModule's normalisation expects, as with DDP). An expert
     gradient, however, already SUMS the contributions of the ep ranks (the all-to-all backward brought them
     home), and FSDP then reduces only over efsdp: without correction it is ep-times the mean. The experts' FSDP
     modules therefore divide by the full data-parallel size (`set_gradient_divide_factor(dp_world)`); on gloo
     FSDP modules sum in the collectives and divide afterwards (`set_force_sum_reduction_for_comms`, gloo has no
     PREMUL_SUM / AVG), except expert modules whose shard group has one rank (efsdp = 1, also under HSDP): torch
     2.13 would divide twice there (`_needs_force_sum`).
Without FSDP (`fsdp=False`), the same 1/dp_world is applied to expert gradients by a tensor hook and dense
gradients are left for DDP-like averaging by the caller.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from qmoe_lightning.models.causal_lm import MoeCausalLM
from qmoe_lightning.models.moe import GroupedExperts
from qmoe_lightning.models.parallel_context import WHOLE_ROW, ParallelContext
from qmoe_lightning.models.vision_language import VisionLanguageMoe

from .context_parallel import ContextParallelGroup, ContextParallelRows
from .expert_parallel import is_expert_parallel, shard_experts_
from .state import expert_layout


# ---------------------------------------------------------------------------------------------------------- mesh
@dataclass
class ParallelDims:
    world_size: int
    ep: int
    replicate: int = 1

    def __post_init__(self):
        if self.ep < 1 or self.replicate < 1:
            raise ValueError(f"ep_size and replicate must be >= 1, got {self.ep}, {self.replicate}")
        if self.world_size % (self.ep * self.replicate):
            raise ValueError(f"world size {self.world_size} is not divisible by ep_size {self.ep} x replicate "
                             f"{self.replicate}")

    @property
    def efsdp(self) -> int:
        return self.world_size // (self.ep * self.replicate)


def build_mesh(device_type: str, world_size: int, ep_size: int, replicate: int = 1) -> DeviceMesh:
    """3-D mesh ("replicate", "efsdp", "ep") plus the flattened "dp_shard" (efsdp x ep) and "data_parallel"."""
    dims = ParallelDims(world_size, ep_size, replicate)
    mesh = init_device_mesh(device_type, (dims.replicate, dims.efsdp, dims.ep),
                            mesh_dim_names=("replicate", "efsdp", "ep"))
    mesh["efsdp", "ep"]._flatten("dp_shard")
    mesh["replicate", "efsdp", "ep"]._flatten("data_parallel")
    return mesh


def dense_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return mesh["replicate", "dp_shard"] if mesh["replicate"].size() > 1 else mesh["dp_shard"]


def expert_mesh(mesh: DeviceMesh) -> DeviceMesh:
    return mesh["replicate", "efsdp"] if mesh["replicate"].size() > 1 else mesh["efsdp"]


# ---------------------------------------------------------------------------------------------------------- AC
# ---------------------------------------------------------------------------------------------------------- model
def decoder_blocks(model: MoeCausalLM) -> list[nn.Module]:
    """The decoder blocks of the main model, then those of its multi-token prediction module (if any): each is
    parallelised the same way (its experts sharded, itself one FSDP2 unit, checkpointed)."""
    if not isinstance(model, MoeCausalLM):
        raise TypeError(f"{type(model).__name__}: expected a native model (a MoeCausalLM: Qwen3.5-MoE, Qwen3-VL-MoE)")
    return list(model.text_model.layers) + (list(model.mtp.layers) if model.mtp is not None else [])


def _is_gloo(mesh: DeviceMesh) -> bool:
    return dist.get_backend(mesh.get_group(0)) == "gloo"


def _scale_grad_hook(factor: float):
    def hook(grad):
        return grad / factor
    return hook


def parallelize_model(
    model: MoeCausalLM,
    mesh: DeviceMesh,
    ep_size: int | None = None,
    fsdp: bool = True,
    activation_checkpointing: bool = False,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    context_parallel: ContextParallelGroup | None = None,
    overlap_dispatch: bool = False,
) -> ParallelContext:
    """Apply CP -> EP -> activation checkpointing -> FSDP2 in place (see module doc); returns the model's new
    `ParallelContext` (also `model.parallel`).

    `mesh` comes from `build_mesh` (or has its dims: "ep", "efsdp", "replicate", flattened "dp_shard",
    "data_parallel"). `ep_size` defaults to the mesh's ep size and must match it. LoRA must be applied BEFORE
    (its per-expert adapters are sharded with the experts). `context_parallel` (the ranks sharing each row): the
    model then splits every row over them. `overlap_dispatch`: the experts' all-to-all runs while the shared expert
    computes (`expert_parallel.AllToAllDispatcher`)."""
    if ep_size is None:
        ep_size = mesh["ep"].size()
    if ep_size != mesh["ep"].size():
        raise ValueError(f"ep_size={ep_size} but the mesh's ep dimension has size {mesh['ep'].size()}")
    dp_world = mesh["data_parallel"].size()
    blocks = decoder_blocks(model)  # checks that it is a native model

    # 0. context parallelism: the forward splits every row over the cp group
    split = context_parallel is not None and context_parallel.size > 1
    rows = ContextParallelRows(context_parallel) if split else WHOLE_ROW

    # 1. expert parallelism; the expert tensors' place in the global (E, ...) tensors, for checkpoints / export /
    # loading (state.py), goes with each module's dispatcher
    experts_modules = [m for block in blocks for m in block.modules() if isinstance(m, GroupedExperts)]
    if ep_size > 1:
        group = mesh["ep"].get_group()
        layout = expert_layout(mesh, fsdp)
        for m in experts_modules:
            if not is_expert_parallel(m):
                shard_experts_(m, group, overlap=overlap_dispatch, global_layout=layout)
    ep_scaled = ep_size > 1 or expert_mesh(mesh).size() < dp_world  # expert grads not averaged by dense FSDP

    # 2. activation checkpointing with routing replay (also what a model that asked for its own gets)
    if activation_checkpointing:
        model.set_activation_checkpointing(True)

    # (compile: a per-block torch.compile goes here, after checkpointing and before FSDP2 wraps the blocks)

    # 3. FSDP2
    # every rank runs the vision tower once per forward under FSDP (the same all-gathers on every rank)
    vision = fsdp and isinstance(model, VisionLanguageMoe)
    model.parallel = ParallelContext(mesh=mesh, ep_size=ep_size, fsdp=fsdp, rows=rows,
                                     always_run_vision=vision)
    if not fsdp:
        if ep_scaled:
            for m in experts_modules:
                for p in m.parameters(recurse=False):
                    if p.requires_grad:
                        p.register_hook(_scale_grad_hook(float(dp_world)))
        return model.parallel
    mp_policy = mp_policy or MixedPrecisionPolicy()
    dmesh, emesh = dense_mesh(mesh), expert_mesh(mesh)
    kw = dict(mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    for block in blocks:
        for m in block.modules():
            if isinstance(m, GroupedExperts):
                fully_shard(m, mesh=emesh, **kw)
                if ep_scaled:
                    m.set_gradient_divide_factor(float(dp_world))
        _shard_mixed_dtypes(block, dmesh, kw)
        fully_shard(block, mesh=dmesh, **kw)
    if vision:
        visual = model.model.visual
        for blk in visual.blocks:
            fully_shard(blk, mesh=dmesh, **kw)
        fully_shard(visual, mesh=dmesh, **kw)
    fully_shard(model, mesh=dmesh, mp_policy=mp_policy, reshard_after_forward=False)
    if _is_gloo(dmesh):
        factored = {id(m) for m in experts_modules} if ep_scaled else set()
        for m in model.modules():
            if isinstance(m, FSDPModule) and _needs_force_sum(m, id(m) in factored):
                m.set_force_sum_reduction_for_comms(True)
    return model.parallel


def _shard_mixed_dtypes(unit: nn.Module, mesh: DeviceMesh, kw: dict) -> None:
    """Leave `unit` with trainable parameters of one dtype for its own `fully_shard`: every module below it that
    directly owns trainable parameters of another dtype (bf16-true: the fp32 A_log / dt_bias of a Gated DeltaNet)
    becomes an FSDP2 unit of its own, after its children that still hold unsharded parameters became one more unit
    together (one all-gather for all of them). Deepest modules first. Nothing happens when the dtypes agree (fp32,
    bf16-mixed, LoRA: the trainable adapters have one dtype)."""

    def unsharded(module: nn.Module) -> list[nn.Parameter]:
        inside = {id(p) for m in module.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
        return [p for p in module.parameters() if id(p) not in inside]

    trainable = [p for p in unsharded(unit) if p.requires_grad]
    if len({p.dtype for p in trainable}) <= 1:
        return
    sizes = Counter()
    for p in trainable:
        sizes[p.dtype] += p.numel()
    main = sizes.most_common(1)[0][0]
    for name, m in reversed(list(unit.named_modules())):
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and not isinstance(m, FSDPModule)]
        if not any(p.dtype != main for p in own):
            continue
        if m is unit or any(p.dtype == main for p in own):
            raise ValueError(f"{type(unit).__name__}.{name or '(itself)'}: trainable parameters of dtypes "
                             f"{sorted({str(p.dtype) for p in own})} in one module; FSDP2 shards one dtype per unit")
        children = [c for c in m.children() if unsharded(c)]
        if children:
            fully_shard(children, mesh=mesh, **kw)
        fully_shard(m, mesh=mesh, **kw)


def _needs_force_sum(module: FSDPModule, has_divide_factor: bool) -> bool:
    """gloo has no AVG / PREMUL_SUM, so FSDP must sum in the collectives and divide afterwards (force-sum) -- except
    where torch 2.13 would then divide twice: when the SHARD group has one rank, FSDP skips the reduce-scatter and
    divides the copied gradient by an explicit divide factor itself, and force-sum divides again afterwards (experts
    with efsdp = 1 would get 1/dp of their gradient; with HSDP, replicate x efsdp=1, 1/dp^2 before this check). Without
    force-sum that case issues only an all-reduce with SUM (HSDP) or nothing (one rank), both fine on gloo."""
    info = module._get_fsdp_state()._fsdp_param_group.mesh_info
    if info.mesh.size() == 1:
        return False  # no collective at all
    return info.shard_mesh_size > 1 or not has_divide_factor

