"""Expert parallelism for `GroupedExperts` (and `LoRAGroupedExperts`): each rank of an `ep` group keeps E/ep experts
and the (token, slot) pairs travel to the rank owning their expert with two autograd all-to-alls.

Why here and not in the model: the model files never touch collectives. The experts module computes as it always
does (`GroupedExperts.forward`: sort by expert, dispatch, `swiglu` on the local rows, combine, then each token's k
weighted rows gathered back and summed); EP
only replaces its `dispatcher` with an `AllToAllDispatcher`. `shard_experts_` does that IN PLACE and keeps the
rank's contiguous slice [r*E/ep, (r+1)*E/ep) of every expert-dim parameter (base weights and, for LoRA, the
per-expert A/B adapters, all with the expert on dim 0: `GroupedExperts.expert_tensors`) as plain local Parameters.
Parameter NAMES do not change (checkpoints, state-dict adapter, optimizer grouping keep working). The dispatcher
holds the layout (`ep_size`, `ep_rank`; the module keeps `num_experts` = global E and `num_local_experts`) and, once
`parallelize_model` gives it, how the slices tile the global (E, ...) tensors (`global_layout`, `state.py`), so
loaders, exporters and clipping can place them.

Forward on one rank (N tokens, top-k; the maths is the single-process one row for row):
  1. (GroupedExperts) the N*k pairs sorted by GLOBAL expert (stable): rows are then grouped by destination rank,
     because rank r owns a contiguous expert range;
  2. split-size exchange: all_to_all of the per-expert counts (E,) -> what each source sends to each local expert;
  3. dispatch: autograd `all_to_all_single` of the sorted rows (send splits = rows per destination rank), then the
     received rows (grouped by source rank, then local expert) permuted to local-expert order;
  4. (GroupedExperts.swiglu) the grouped GEMMs (plus LoRA) on E/ep experts;
  5. combine: unpermute, and the reverse autograd all_to_all brings every row back to the rank and position it
     came from; (GroupedExperts) each row times its routing weight, gathered back to pair order and the token's k
     slots summed (`_slot_sums`), as on one process.
Backward of the all-to-alls is the opposite exchange (torch.distributed.nn.functional), so router, input and expert
gradients are exact. An expert weight's gradient sums the contributions of all ranks' tokens: under a data-parallel
mean objective it is ep-times (dp-times with expert-FSDP) too large unless divided; `parallelize.py` sets that
divide factor.

Overlap (`overlap_dispatch`, off by default): the dispatch all-to-all is started asynchronously and the shared expert
(Qwen3.5; independent of the routed experts) is computed while the rows travel; in backward the rows' gradient
travels back while the shared expert's backward runs (autograd schedules the later-created shared-expert nodes
first). The combine all-to-all and the split-size exchange stay blocking (nothing independent is left to run), and
a model without a shared expert (Qwen3-VL-MoE) has nothing to overlap. Bitwise the blocking path's numbers
(tests/test_parallel_ep.py); the speed effect has not been measured on GPUs yet.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.distributed.nn.functional import all_to_all_single as _autograd_a2a

from qmoe_lightning.models.moe import GroupedExperts


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """[start, stop) of the global experts owned by `ep_rank`."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
    n = num_experts // ep_size
    return ep_rank * n, (ep_rank + 1) * n


@dataclass
class _Exchange:
    perm: torch.Tensor  # received rows -> local-expert order
    send_splits: list[int]
    recv_splits: list[int]
    rows: int  # rows this rank sent


class AllToAllDispatcher:
    """Sends each sorted row to the rank owning its expert and the expert outputs back (see the module doc).

    overlap: the rows' all-to-all is started asynchronously and `alongside` (the shared expert) computed while they
    travel, in forward and in backward (`_StartExchange` / `_FinishExchange`). Same operations on the same values in
    the same order per tensor: bitwise the blocking path's results."""

    def __init__(self, group: dist.ProcessGroup | None, num_local_experts: int, overlap: bool = False,
                 global_layout: tuple | None = None):
        self.group, self.num_local_experts, self.overlap = group, num_local_experts, overlap
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        # (mesh, placements): how this rank's expert tensors tile the global (E, ...) ones (`state.global_view`);
        # None until `parallelize_model` decides it (a bare `shard_experts_` computes, it cannot checkpoint)
        self.global_layout = global_layout

    def dispatch(self, xs: torch.Tensor, counts: torch.Tensor, alongside=None):
        """xs (N*k, H) sorted by global expert, counts (E,) -> (rows of my local experts, their offsets (El,),
        the exchange, what `alongside()` returned)."""
        ep, El = self.ep_size, self.num_local_experts
        # split-size exchange: recv_counts[s, j] = rows source rank s sends to my local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(ep, El)
        send_splits = counts.view(ep, El).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        if self.overlap and alongside is not None:
            flight = _Flight()
            buffer = _StartExchange.apply(xs, flight, recv_splits, send_splits, self.group)
            side = alongside()  # computed while the rows travel
            xr = _FinishExchange.apply(buffer, flight)
        else:
            xr = _autograd_all_to_all(xs.new_empty(sum(recv_splits), xs.shape[1]), xs, recv_splits, send_splits,
                                      group=self.group)
            side = alongside() if alongside is not None else None
        # (source, local expert) order -> local-expert order (stable: sources stay in rank order per expert)
        local_id = torch.repeat_interleave(torch.arange(El, device=xs.device).repeat(ep), recv_counts.reshape(-1))
        perm = local_id.argsort(stable=True)
        offs = recv_counts.sum(0).cumsum(0).to(torch.int32)  # (El,)
        # a gather, not xr[perm]: advanced indexing's backward is a serial index_put with accumulation
        return xr.index_select(0, perm), offs, _Exchange(perm, send_splits, recv_splits, xs.shape[0]), side

    def combine(self, ys: torch.Tensor, ex: _Exchange) -> torch.Tensor:
        yr = torch.empty_like(ys).index_copy(0, ex.perm, ys)  # back to (source, local expert) order
        return _autograd_all_to_all(yr.new_empty(ex.rows, yr.shape[1]), yr, ex.send_splits, ex.recv_splits,
                                    group=self.group)


class _Flight:
    """The all-to-all in flight between `_StartExchange` and `_FinishExchange` (forward), and its gradient's in
    the other direction (backward)."""

    work = None
    grad = None
    grad_work = None


class _StartExchange(torch.autograd.Function):
    """Starts the rows' all-to-all and returns the receive buffer, filled once `_FinishExchange` has waited.

    Backward: the gradient's reverse all-to-all was started by `_FinishExchange.backward`; autograd runs the
    backward of the work done in between (the shared expert's: created later, so scheduled first) before this node
    waits for it."""

    @staticmethod
    def forward(ctx, xs, flight: _Flight, recv_splits, send_splits, group):
        ctx.flight = flight
        received = xs.new_empty(sum(recv_splits), xs.shape[1])
        flight.work = dist.all_to_all_single(received, xs.contiguous(), recv_splits, send_splits, group=group,
                                             async_op=True)
        flight.splits, flight.group, flight.rows = (recv_splits, send_splits), group, xs.shape[0]
        return received

    @staticmethod
    def backward(ctx, _unused):
        flight = ctx.flight
        flight.grad_work.wait()
        grad, flight.grad, flight.grad_work = flight.grad, None, None
        return grad, None, None, None, None


class _FinishExchange(torch.autograd.Function):
    """Waits for the rows started by `_StartExchange` (forward); starts their gradient's way back (backward)."""

    @staticmethod
    def forward(ctx, received, flight: _Flight):
        ctx.flight = flight
        flight.work.wait()
        flight.work = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        recv_splits, send_splits = flight.splits
        grad = grad.contiguous()
        flight.grad = grad.new_empty(flight.rows, grad.shape[1])
        flight.grad_work = dist.all_to_all_single(flight.grad, grad, send_splits, recv_splits, group=flight.group,
                                                  async_op=True)
        return grad, None  # a placeholder: `_StartExchange.backward` returns the exchanged gradient instead


def _autograd_all_to_all(output, input, output_split_sizes, input_split_sizes, group):
    # torch 2.13 marks the module deprecated (in favour of _functional_collectives, a private, traced-graph API);
    # it is the eager autograd all-to-all with uneven splits, which is what we need
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _autograd_a2a(output, input, output_split_sizes, input_split_sizes, group=group)


def is_expert_parallel(module: nn.Module) -> bool:
    return isinstance(module, GroupedExperts) and isinstance(module.dispatcher, AllToAllDispatcher)


@torch.no_grad()
def shard_experts_(experts: GroupedExperts, ep_group: dist.ProcessGroup | None, overlap: bool = False,
                   global_layout: tuple | None = None) -> GroupedExperts:
    """Keep this rank's E/ep experts (and their LoRA adapters) and switch `experts` to all-to-all dispatch, in place
    (`overlap`: the shared expert computed while the rows travel, `AllToAllDispatcher`; `global_layout`: see
    `state.expert_layout`).

    Parameters must hold the FULL (global) experts when called, on any device including meta (then the slice is
    meta too and is filled later by `loading.load_expert_parallel_weights` or `reset_parameters`)."""
    if is_expert_parallel(experts):
        raise ValueError("experts are already expert-parallel")
    ep_size = dist.get_world_size(ep_group)
    ep_rank = dist.get_rank(ep_group)
    E = experts.num_experts
    start, stop = expert_range(E, ep_size, ep_rank)
    for name, p in experts.expert_tensors().items():
        if p.shape[0] != E:
            raise ValueError(f"{name}: dim 0 is {p.shape[0]}, expected the {E} global experts")
        local = p.detach()[start:stop].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=p.requires_grad))
    experts.num_local_experts = stop - start
    experts.dispatcher = AllToAllDispatcher(ep_group, stop - start, overlap=overlap, global_layout=global_layout)
    return experts
