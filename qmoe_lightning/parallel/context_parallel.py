"""Context parallelism applied from outside the model: the collectives of a context-parallel (cp) group
(`ContextParallelGroup`) and the row split a parallelised model's forward calls (`ContextParallelRows`).

The model files never touch `torch.distributed`: `parallelize_model(..., context_parallel=group)` puts a
`ContextParallelRows` into the model's `ParallelContext.rows` (in place of the single-device `WholeRow`), as expert
parallelism puts an all-to-all dispatcher into every experts module. The forward then hands it the whole row and gets
this rank's slice back; the layers of a split row (`models/context_parallel.py`: attention over gathered keys, the
Gated DeltaNet halo and state scan) call only the group's methods below. Every method is a collective: every rank of
the group calls it, in the same order, with tensors of the same shape (the row is padded so that every rank holds
the same number of tokens).

Autograd: `all_gather` is differentiable. Its backward SUMS the gradient every rank computed for the gathered
tensor and hands each rank the part of its own input (an all-reduce then a slice: gloo has no reduce-scatter; NCCL
uses reduce-scatter). That is what makes a split row exact: rank r's keys, values, halo rows and state transition
receive the gradient of every later rank that read them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qmoe_lightning.models.context_parallel import check_same_row, split_row
from qmoe_lightning.models.decoder import Deepstack
from qmoe_lightning.models.lm_loss import masked_rows


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, size: int, rank: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size, ctx.rank = dim, group, size, rank
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank, dim, group = ctx.size, ctx.rank, ctx.dim, ctx.group
        # summed in fp32 (bf16 partial sums would be rounded before they add up), into a tensor of our own
        dtype = grad.dtype
        grad = grad.to(torch.promote_types(dtype, torch.float32), copy=True)
        if dist.get_backend(group) == "nccl":
            pieces = [p.contiguous() for p in grad.chunk(size, dim=dim)]
            out = torch.empty_like(pieces[rank])
            dist.reduce_scatter(out, pieces, group=group)
            return out.to(dtype), None, None, None, None
        dist.all_reduce(grad, group=group)
        return grad.chunk(size, dim=dim)[rank].to(dtype).contiguous(), None, None, None, None


class ContextParallelGroup:
    """The ranks that share one packed row (`size`), this rank's place in it (`rank`), and their collectives."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"ContextParallelGroup(size={self.size}, rank={self.rank})"

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `x` (same shape on all) concatenated along `dim` in rank order; differentiable."""
        return _AllGather.apply(x, dim, self.group, self.size, self.rank)

    @torch.no_grad()
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (a new tensor; no gradient)."""
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out

    @torch.no_grad()
    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (dim 0) of every rank, concatenated in rank order; row counts may differ (no gradient)."""
        n = torch.tensor([x.shape[0]], device=x.device)
        counts = [torch.empty_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n, group=self.group)
        counts = [int(c) for c in counts]
        most = max(counts)
        padded = x.new_zeros(most, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])


class ContextParallelRows:
    """The `RowSplit` of a cp group (`models/parallel_context.py`): each packed row in contiguous slices, one per
    rank, padded to the same length on every rank (`models.context_parallel.split_row`)."""

    def __init__(self, group: ContextParallelGroup) -> None:
        self.group = group
        self.size = group.size

    def __repr__(self) -> str:
        return f"ContextParallelRows({self.group!r})"

    def split(self, inputs_embeds, position_ids, info, targets, deepstack, min_slice: int):
        check_same_row(self.group, info, targets)  # a rank whose data differs would exchange another row's slices
        info = split_row(self.group, info, min_slice=min_slice)
        cs = info.cp
        if deepstack is not None:  # the visual tokens of this slice, at their local positions
            mine = (deepstack.positions >= cs.start) & (deepstack.positions < cs.end)
            deepstack = Deepstack(deepstack.positions[mine] - cs.start, [masked_rows(e, mine) for e in deepstack.embeds])
        return cs.take(inputs_embeds, 1), cs.take(position_ids, 2), info, cs.take(targets, 1, fill=-100), deepstack

    def local(self, info, x: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
        return info.cp.take(x, dim, fill)

    def row_sums(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_sum(x)

    def hidden_after(self, hidden: torch.Tensor) -> torch.Tensor:
        firsts = self.group.all_gather(hidden[0, :1].detach(), 0)  # (cp, H) every rank's first hidden state
        r = self.group.rank
        return firsts[r + 1: r + 2] if r + 1 < self.size else hidden.new_zeros(1, hidden.shape[-1])


def context_parallel_groups(world_size: int, cp_size: int, inner: int) -> list[list[int]]:
    """Rank lists of the cp groups. The training mesh's efsdp dimension is (data, cp) with cp inner, and `inner` =
    the ep ranks after it: rank = ((r * F + f) * cp + c) * ep + e, so a cp group is every c for one (r, f, e)."""
    if world_size % (cp_size * inner):
        raise ValueError(f"world size {world_size} is not divisible by cp_size {cp_size} x ep_size {inner}")
    groups = []
    for outer in range(world_size // (cp_size * inner)):
        for e in range(inner):
            groups.append([(outer * cp_size + c) * inner + e for c in range(cp_size)])
    return groups


def new_context_parallel_group(cp_size: int, ep_size: int) -> ContextParallelGroup:
    """Create every cp group (a collective: all ranks call it) and return this rank's."""
    world, me = dist.get_world_size(), dist.get_rank()
    groups = context_parallel_groups(world, cp_size, ep_size)
    mine = None
    for ranks in groups:
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    return ContextParallelGroup(mine)


def data_parallel_coordinates(rank: int, cp_size: int, ep_size: int) -> int:
    """The data-parallel rank of global `rank`: the cp ranks of one group share it (they hold the same row)."""
    ep = rank % ep_size
    outer = rank // (cp_size * ep_size)
    return outer * ep_size + ep
