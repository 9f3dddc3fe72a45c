"""Expert parallelism for `GroupedExperts` (and `LoRAGroupedExperts`): each rank of an `ep` group keeps E/ep experts
and the (token, slot) pairs travel to the rank owning their expert with two autograd all-to-alls.

Why here and not in the model: the model files never touch collectives. `shard_experts_` converts an existing
experts module IN PLACE: its expert-dim parameters (base weights and, for LoRA, the per-expert A/B adapters, all
with the expert on dim 0) are replaced by this rank's contiguous slice [r*E/ep, (r+1)*E/ep) as plain local
Parameters, and the instance's class is swapped for a subclass whose forward dispatches. Parameter NAMES do not
change (checkpoints, state-dict adapter, optimizer grouping keep working); `isinstance(m, GroupedExperts)` stays
true. The global layout is recorded on the module (`ep_rank`, `ep_size`, `num_experts` = global E,
`num_local_experts`) so loaders and exporters can place the slices.

Forward on one rank (N tokens, top-k; the maths is the single-process `GroupedExperts.forward` row for row):
  1. sort the N*k pairs by GLOBAL expert (stable), exactly like `sort_by_expert`: rows are then grouped by
     destination rank, because rank r owns a contiguous expert range;
  2. split-size exchange: all_to_all of the per-expert counts (E,) -> what each source sends to each local expert;
  3. dispatch: autograd `all_to_all_single` of the sorted rows (send splits = rows per destination rank);
  4. permute the received rows (grouped by source rank, then local expert) to local-expert order, run the grouped
     GEMMs (plus LoRA) on E/ep experts, unpermute;
  5. combine: the reverse autograd all_to_all brings every row back to the rank and position it came from;
  6. routing weight times row, `index_add_` into the token: the same order and dtype steps as one process.
Backward of 3/5 is the opposite exchange (torch.distributed.nn.functional), so router, input and expert gradients
are exact. An expert weight's gradient sums the contributions of all ranks' tokens: under a data-parallel mean
objective it is ep-times (dp-times with expert-FSDP) too large unless divided; `parallelize.py` sets that divide
factor. Dispatch does NOT overlap compute here: each all_to_all is blocking and the grouped GEMM waits for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.distributed.nn.functional import all_to_all_single as _autograd_a2a

from qmoe_lightning.lora.experts import expert_mlp
from qmoe_lightning.models.moe import GroupedExperts, grouped_mm_supported

# names of parameters with the expert on dim 0 (GroupedExperts + LoRAGroupedExperts adapters)
EXPERT_DIM0_PARAMS = ("gate_and_up_projs", "down_projs", "gate_and_up_lora_A", "gate_and_up_lora_B", "down_lora_A",
                      "down_lora_B")


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """[start, stop) of the global experts owned by `ep_rank`."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
    n = num_experts // ep_size
    return ep_rank * n, (ep_rank + 1) * n


class _ExpertParallelMixin:
    """Forward of an expert-parallel experts module. Mixed in front of the module's own class by `shard_experts_`."""

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    num_local_experts: int

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), indices/weights (N, k) (GLOBAL expert ids) -> (N, H)."""
        E, ep, El = self.num_experts, self.ep_size, self.num_local_experts
        # 1. sort pairs by global expert: identical to sort_by_expert on one process
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // indices.shape[1]
        counts = torch.bincount(flat, minlength=E)  # (E,) pairs per global expert, this rank
        # 2. split-size exchange: recv_counts[s, j] = pairs source rank s sends to my local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.ep_group)
        recv_counts = recv_counts.view(ep, El)
        send_splits = counts.view(ep, El).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 3. dispatch the sorted rows to the owners of their experts
        xs = x[token_of]  # (N*k, H), grouped by destination rank
        xr = _autograd_all_to_all(xs.new_empty(sum(recv_splits), xs.shape[1]), xs, recv_splits, send_splits,
                                  group=self.ep_group)
        # 4. (source, local expert) order -> local-expert order (stable: sources stay in rank order per expert)
        local_id = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(ep), recv_counts.reshape(-1))
        perm = local_id.argsort(stable=True)
        offs = recv_counts.sum(0).cumsum(0).to(torch.int32)  # (El,)
        ys_local = self._local_experts(xr[perm], offs)
        yr = torch.empty_like(ys_local).index_copy(0, perm, ys_local)  # back to (source, local expert) order
        # 5. combine: rows return to their source rank, in the order they were sent
        ys = _autograd_all_to_all(yr.new_empty(xs.shape[0], yr.shape[1]), yr, send_splits, recv_splits,
                                  group=self.ep_group)
        # 6. as GroupedExperts.forward
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))

    # ------------------------------------------------------------------ local grouped GEMMs
    def _local_experts(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs (rows, H) grouped by local expert (cumulative `offs`) -> (rows, H), before the routing weight."""
        lora = getattr(self, "adapter_pairs", None)
        pairs = lora() if lora is not None else {}
        if not grouped_mm_supported(xs) or xs.shape[0] == 0:
            return self._local_loop(xs, offs, pairs)
        h = torch._grouped_mm(xs, self.gate_and_up_projs, offs=offs)
        if "gate_up" in pairs:
            h = h + self._lora_grouped(xs, *pairs["gate_up"], offs)
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        ys = torch._grouped_mm(act, self.down_projs, offs=offs)
        if "down" in pairs:
            ys = ys + self._lora_grouped(act, *pairs["down"], offs)
        return ys

    def _local_loop(self, xs: torch.Tensor, offs: torch.Tensor, pairs: dict) -> torch.Tensor:
        """Per-local-expert loop (fp64, fp32 on CUDA, or no rows). Touches every parameter so that autograd and
        FSDP see the same graph on every rank, also when this rank received nothing."""
        bounds = [0] + offs.tolist()
        out = xs.new_zeros(xs.shape[0], self.down_projs.shape[-1])
        # keep xs (-> the dispatch all_to_all) and every expert parameter in the graph even with no rows: all ranks
        # must run the same backward collectives, and FSDP expects a gradient for every parameter
        touch = sum((p.sum() * 0 for p in self._ep_params()), xs.sum() * 0)
        for j in range(self.num_local_experts):
            a, b = bounds[j], bounds[j + 1]
            if a == b:
                continue
            y = expert_mlp(xs[a:b], self.gate_and_up_projs[j], self.down_projs[j], pairs, j,
                           getattr(self, "scaling", 1.0))
            out = out.index_copy(0, torch.arange(a, b, device=xs.device), y)
        return out + touch

    def _ep_params(self):
        for name in EXPERT_DIM0_PARAMS:
            p = getattr(self, name, None)
            if isinstance(p, torch.Tensor):
                yield p

    def extra_repr(self) -> str:
        base = super().extra_repr()
        ep = f"ep_rank={self.ep_rank}/{self.ep_size}, local_experts={self.num_local_experts}/{self.num_experts}"
        return f"{base}, {ep}" if base else ep


def _autograd_all_to_all(output, input, output_split_sizes, input_split_sizes, group):
    # torch 2.13 marks the module deprecated (in favour of _functional_collectives, a private, traced-graph API);
    # it is the eager autograd all-to-all with uneven splits, which is what we need
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _autograd_a2a(output, input, output_split_sizes, input_split_sizes, group=group)


_EP_CLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    if issubclass(cls, _ExpertParallelMixin):
        return cls
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (_ExpertParallelMixin, cls), {})
    return _EP_CLASSES[cls]


def is_expert_parallel(module: nn.Module) -> bool:
    return isinstance(module, _ExpertParallelMixin)


@torch.no_grad()
def shard_experts_(experts: GroupedExperts, ep_group: dist.ProcessGroup | None) -> GroupedExperts:
    """Keep this rank's E/ep experts (and their LoRA adapters) and switch `experts` to all-to-all dispatch, in place.

    Parameters must hold the FULL (global) experts when called, on any device including meta (then the slice is
    meta too and is filled later by `loading.load_expert_parallel_weights` or `reset_parameters`)."""
    if is_expert_parallel(experts):
        raise ValueError("experts are already expert-parallel")
    ep_size = dist.get_world_size(ep_group)
    ep_rank = dist.get_rank(ep_group)
    E = experts.num_experts
    start, stop = expert_range(E, ep_size, ep_rank)
    for name in EXPERT_DIM0_PARAMS:
        p = getattr(experts, name, None)
        if p is None:
            continue
        if p.shape[0] != E:
            raise ValueError(f"{name}: dim 0 is {p.shape[0]}, expected the {E} global experts")
        local = p.detach()[start:stop].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=p.requires_grad))
    experts.ep_group, experts.ep_size, experts.ep_rank = ep_group, ep_size, ep_rank
    experts.num_local_experts = stop - start
    experts.__class__ = _ep_class(type(experts))
    return experts
