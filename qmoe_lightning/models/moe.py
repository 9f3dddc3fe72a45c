"""Sparse MoE block of Qwen3.5-MoE and Qwen3-VL-MoE: top-k router, grouped routed experts, gated shared expert
(Qwen3.5 only: a config without `shared_expert_intermediate_size` has none).

Native expert layout (x @ W, the layout grouped GEMMs and expert parallelism want; E = num experts, H = hidden,
I = moe intermediate):
    experts.gate_and_up_projs  (E, H, 2I)   columns: gate | up
    experts.down_projs         (E, I, H)
The HF checkpoint layout is the transpose of both (see the family's state_dict_adapter.py).

Numerics follow transformers exactly: router matmul in the activation dtype, softmax in fp32, top-k, always
renormalised, weights cast back to the activation dtype; the routing weight multiplies the expert output AFTER
the down projection (NeMo multiplies before it and loses exact parity in bf16).

One expert computation (`GroupedExperts`): the (token, slot) pairs are sorted by expert once, handed to the
module's `dispatcher` (here `LocalDispatcher`: every expert is local; `parallel.expert_parallel.AllToAllDispatcher`
sends rows to the rank owning their expert and back), and `swiglu` runs on the rows of each local expert:
`torch._grouped_mm` where it runs (CPU fp32 / bf16, CUDA bf16), else a loop over the experts' row segments doing
the same maths (fp64, CUDA fp32). Adapters plug into `adapt` (LoRA: `lora.experts.LoRAGroupedExperts`), between
each projection and what follows it. `experts_loop_reference` is the readable per-expert loop over token
indices, kept beside it for tests only.

Mixed precision (autocast): the expert rows are cast to the autocast dtype before they are dispatched (an
expert-parallel all-to-all moves bf16 rows, half the bytes of fp32) and the expert weights where they are used,
so the grouped GEMMs run in bf16 as a linear layer would under autocast (`torch._grouped_mm` is on no autocast
list: it met bf16 rows and fp32 weights and stopped). The weighted sum of each token's slots comes back in the
block's input dtype.

Routing replay (activation checkpointing): a recompute must route tokens exactly as the forward did (bf16 GEMMs
can tie differently, and under expert parallelism the all-to-all split sizes of the recompute must match the other
ranks'). A router given a `RoutingReplay` records its top-k indices in the checkpointed forward and reuses them in
the recompute; the decoder block owns the object and drives its phases (`decoder.DecoderBlock`).

Aux-loss-free load balancing (DeepSeek-V3, `model.router_balancing: bias | both`): a router may carry a per-expert
bias (`TopKRouter.expert_bias`, fp32, a persistent BUFFER: it is never trained by a gradient and never rounded to
bf16). It is added to the fp32 softmax probabilities for the top-k SELECTION only; the gate weights stay the
unbiased probabilities of the selected experts, renormalised as without it. The bias is moved after each optimizer
step by `balancing_bias_delta` (bias += rate * sign(mean load - load), from the global pick counts of the step):
overloaded experts become less likely to be picked, underloaded ones more. Without the bias (`None`, the default)
the router is the code path it always was; an all-zero bias selects bitwise the same experts with the same weights.
Routing replay records the BIASED selection. The bias is training state of this implementation only: the Hugging
Face router has no such tensor, so the state-dict adapters never export it and HF loaders never ask for it
(`is_balancing_bias_key`); Lightning / distributed checkpoints keep it like any buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import KeepFp32Mixin
from .precision import autocast_dtype

BALANCING_BIAS = "expert_bias"  # TopKRouter's buffer name (state-dict key suffix ".mlp.gate.expert_bias")


def is_balancing_bias_key(key: str) -> bool:
    """A state-dict key of a router's balancing bias (native training state with no Hugging Face tensor)."""
    return key == BALANCING_BIAS or key.endswith("." + BALANCING_BIAS)


def balancing_bias_delta(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's bias update from expert loads: counts (..., E) top-k picks per expert (a layer per row) ->
    rate * sign(mean load - load) (same shape, float64): an expert above its layer's mean load goes down by `rate`,
    one below goes up, one exactly at the mean (or a layer that routed nothing) stays. Pure function of the counts:
    ranks that hold the same (all-reduced) counts compute the same update."""
    counts = counts.to(torch.float64)
    return rate * torch.sign(counts.mean(-1, keepdim=True) - counts)


@torch.no_grad()
def update_balancing_bias_(routers: list[TopKRouter], counts: torch.Tensor, rate: float) -> torch.Tensor:
    """bias += rate * sign(mean load - load) for every router (row i of the (L, E) `counts` is routers[i]); returns
    the (L, E) |bias| after the update. Every data-parallel rank holds the same (all-reduced) counts and the same
    replicated fp32 bias, so every rank computes the same result: the replicas never drift. Applied before the
    optimizer step, which does not read the bias: the next forward is the first to see it."""
    delta = balancing_bias_delta(counts, rate)
    for router, d in zip(routers, delta):
        router.expert_bias.add_(d.to(router.expert_bias))
    return torch.stack([r.expert_bias for r in routers]).abs()


class RoutingReplay:
    """Top-k choices of one checkpointed block: recorded by its forward, replayed (in order) by its recompute.

    `phases(cache)` gives the (forward, recompute) context managers for `torch.utils.checkpoint`'s `context_fn`;
    `cache` is per call, so micro-batches never see each other's choices. Outside both phases routers route."""

    def __init__(self):
        self.mode: str | None = None  # None, "record" or "replay"
        self.cache: list[torch.Tensor] = []
        self.position = 0

    def phases(self, cache: list):
        return _ReplayPhase(self, "record", cache), _ReplayPhase(self, "replay", cache)

    def indices(self, probs: torch.Tensor, top_k: int) -> torch.Tensor:
        if self.mode == "record":
            indices = torch.topk(probs.detach(), top_k, dim=-1).indices
            self.cache.append(indices)
            return indices
        indices = self.cache[self.position]
        self.position += 1
        return indices


class _ReplayPhase:
    def __init__(self, replay: RoutingReplay, mode: str, cache: list):
        self.replay, self.mode, self.cache = replay, mode, cache

    def __enter__(self):
        r = self.replay
        self.saved = (r.mode, r.cache, r.position)
        r.mode, r.cache, r.position = self.mode, self.cache, 0
        if self.mode == "record":
            self.cache.clear()
        return self

    def __exit__(self, *exc):
        r = self.replay
        r.mode, r.cache, r.position = self.saved
        return False


class TopKRouter(KeepFp32Mixin, nn.Module):
    """softmax(x W^T) in fp32 -> top-k experts and their (renormalised) probabilities. With `expert_bias` (see the
    module doc; `enable_balancing_bias`) the top-k is taken over probabilities + bias, the weights are not."""

    _fp32_names = (BALANCING_BIAS,)  # Lightning's bf16-true `.to(bf16)` would round a 1e-3 step away

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool = True):
        """normalize: renormalise the top-k probabilities to sum to 1 (Qwen3.5, Qwen3-VL-MoE always; Qwen3-MoE and
        Qwen3-Next as their config's `norm_topk_prob` says)."""
        super().__init__()
        self.top_k = top_k
        self.normalize = normalize
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.replay: RoutingReplay | None = None  # set by the block that checkpoints itself
        # registered as None: not in the state dict (nor in HF checkpoints) until balancing by bias enables it
        self.register_buffer(BALANCING_BIAS, None)

    def enable_balancing_bias(self) -> None:
        """Give the router its (zero) balancing bias, fp32 on the router's device; no-op when it has one."""
        if self.expert_bias is None:
            w = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight  # FSDP2: the shard's
            self.expert_bias = torch.zeros(self.weight.shape[0], dtype=torch.float32, device=w.device)

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> logits (N, E), weights (N, k) in x.dtype, indices (N, k)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        bias = self.expert_bias
        if (self.replay is None or self.replay.mode is None) and bias is None:
            weights, indices = torch.topk(probs, self.top_k, dim=-1)
        else:
            # record and replay run the SAME differentiable ops (the checkpoint checks saved tensors position by
            # position): the indices come from a detached topk or the record, the weights from a gather of the
            # probabilities, which equals topk's values bitwise. The bias only ranks (detached, no gradient path)
            scores = probs if bias is None else probs.detach() + bias
            if self.replay is None or self.replay.mode is None:
                indices = torch.topk(scores.detach(), self.top_k, dim=-1).indices
            else:
                indices = self.replay.indices(scores, self.top_k)
            weights = probs.gather(-1, indices)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Can `torch._grouped_mm` run `x @ w[e]` per expert (CUDA: bf16 only; every non-unit stride of both a multiple
    of 16 bytes, e.g. a bf16 moe_intermediate_size that is a multiple of 8)? Else the per-expert loop runs."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0:
        return False
    if x.dtype not in ((torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16)):
        return False
    size = x.element_size()
    return all(st * size % 16 == 0 for t in (x, w) for st in t.stride() if st != 1)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (rows, in) grouped by expert (cumulative row counts `offs` (E,)), w (E, in, out) -> (rows, out)."""
    return torch._grouped_mm(x, w, offs=offs)


def segment_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as a loop over the experts' row segments (any dtype / device)."""
    bounds = [0] + offs.tolist()
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    # split / unbind, not x[a:b] and w[e]: the backward of every slice or select zero-fills a full-size gradient
    # (per expert: one of x's and one of w's shape); split's and unbind's backward are one cat / stack
    pieces = [xe @ we for xe, we in zip(x[: bounds[-1]].split(sizes), w.unbind(0)) if xe.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, w.shape[-1])


class LocalDispatcher:
    """Every expert is on this device: the rows sorted by expert are the local rows."""

    def dispatch(self, xs: torch.Tensor, counts: torch.Tensor, alongside=None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        object, object]:
        """xs (rows, H) sorted by expert, counts (E,) rows per expert -> (local rows, their offsets, context, what
        `alongside()` returned). `alongside` is independent work (the shared expert) that a dispatcher whose rows
        travel may run while they do."""
        return xs, counts.cumsum(0).to(torch.int32), None, alongside() if alongside is not None else None

    def combine(self, ys: torch.Tensor, context) -> torch.Tensor:
        """Expert outputs of the local rows -> outputs in the order `dispatch` was given."""
        return ys


def _pair_rows(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """(N, H) token rows -> (N*k, H): row j is token order[j] // k's (the expert-sorted pairs)."""
    return x.index_select(0, torch.div(order, k, rounding_mode="floor"))


def _slot_sums(rows: torch.Tensor, unsort: torch.Tensor, k: int) -> torch.Tensor:
    """(N*k, H) expert-sorted pair rows -> (N, H): back to pair order, each token's k slots summed (slots 0..k-1 in
    order, as one process sums them)."""
    return rows.index_select(0, unsort).view(-1, k, rows.shape[-1]).sum(1)


class _SortedRows(torch.autograd.Function):
    """`_pair_rows` forward, `_slot_sums` of the gradient backward (each is the other's adjoint): no scatter-add with
    repeated indices (what indexing's backward does: a serial accumulate on CPU, a fifth of the MoE block's time on
    the mid-size bench config)."""

    @staticmethod
    def forward(ctx, x, order, unsort, k: int):
        ctx.save_for_backward(unsort)
        ctx.k = k
        return _pair_rows(x, order, k)

    @staticmethod
    def backward(ctx, grad):
        (unsort,) = ctx.saved_tensors
        return _slot_sums(grad, unsort, ctx.k), None, None, None


class _WeightedSlotSums(torch.autograd.Function):
    """(N*k, H) expert-sorted outputs `ys` and (N, k) routing weights -> (N, H): each token's k outputs weighted and
    summed, `_slot_sums(ys * weights[order])` with the weight applied in place on the gathered rows (forward) and on
    the gathered gradient (backward), and the weights' gradient read back as a gather: the composed autograd graph
    kept two more (N*k, H) tensors per block and sent the weights' gradient through a serial scatter-add. Same
    values as the composed ops (the same products, summed in the same order)."""

    @staticmethod
    def forward(ctx, ys, weights, unsort, order, k: int):
        w = weights.reshape(-1, 1)  # (N*k, 1) pair order
        rows = ys.index_select(0, unsort)  # (N*k, H) pair order
        ctx.save_for_backward(ys, weights, unsort, order)
        ctx.k = k
        return rows.mul_(w.to(rows.dtype) if w.dtype != rows.dtype else w).view(-1, k, ys.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        ys, weights, unsort, order = ctx.saved_tensors
        pairs = _pair_rows(grad, order, ctx.k)  # (N*k, H) expert-sorted: each pair gets its token's gradient
        grad_w = None
        if ctx.needs_input_grad[1]:  # <grad of the token, output of the pair>, back to pair order
            grad_w = (pairs * ys).sum(-1).index_select(0, unsort).view_as(weights).to(weights.dtype)
        grad_ys = None
        if ctx.needs_input_grad[0]:
            w = weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # (N*k, 1) expert-sorted
            grad_ys = pairs.mul_(w.to(pairs.dtype) if w.dtype != pairs.dtype else w)
        return grad_ys, grad_w, None, None, None


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts  # global E; this module holds `num_local_experts` of them
        self.intermediate_size = intermediate_size
        self.gate_and_up_projs = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_projs = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.dispatcher = LocalDispatcher()
        self.num_local_experts = num_experts
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_and_up_projs, std=std)
        nn.init.normal_(self.down_projs, std=std)

    def expert_tensors(self) -> dict[str, nn.Parameter]:
        """Every parameter with the expert on dim 0, by attribute name: what expert parallelism slices."""
        return {"gate_and_up_projs": self.gate_and_up_projs, "down_projs": self.down_projs}

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, alongside=None):
        """x (N, H), indices/weights (N, k) (global expert ids) -> (N, H). With `alongside` (independent work: the
        shared expert), run where the dispatcher can overlap it with moving the rows: -> ((N, H), its result).
        Called through the module (`experts(...)`), never `.forward`: FSDP2 gathers the parameters in its hooks."""
        N, k = indices.shape
        flat = indices.reshape(-1)  # (N*k,) pair p = token p // k, slot p % k
        order = flat.argsort(stable=True)  # pairs grouped by expert, token order within an expert
        unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        dtype = autocast_dtype(x)
        xs = _SortedRows.apply(x if dtype is None else x.to(dtype), order, unsort, k)  # (N*k, H): token order[j] // k
        local, offs, context, side = self.dispatcher.dispatch(xs, counts, alongside)
        ys = self.dispatcher.combine(self.swiglu(local, offs), context)  # (N*k, H)
        # weighted by the routing weights, back to pair order, each token's k slots summed (gathers both ways)
        out = _WeightedSlotSums.apply(ys, weights, unsort, order, k).to(x.dtype)
        return out if alongside is None else (out, side)

    def swiglu(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs (rows, H) grouped by local expert (cumulative `offs`) -> (rows, H), before the routing weight."""
        w_gu, w_down = self.gate_and_up_projs, self.down_projs
        dtype = autocast_dtype(xs)
        if dtype is not None:  # both operands in the autocast dtype, as autocast does for a linear layer
            xs, w_gu, w_down = xs.to(dtype), w_gu.to(dtype), w_down.to(dtype)
        mm = grouped_mm if grouped_mm_supported(xs, w_gu) else segment_mm
        h = self.adapt("gate_up", xs, mm(xs, w_gu, offs), offs, mm)  # (rows, 2I)
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up  # (rows, I)
        mm = grouped_mm if grouped_mm_supported(act, w_down) else segment_mm
        ys = self.adapt("down", act, mm(act, w_down, offs), offs, mm)  # (rows, H)
        if xs.shape[0] == 0:
            # no rows here (an expert-parallel rank that received none): keep the input and every parameter in the
            # graph, so all ranks run the same backward collectives and FSDP gets a gradient for each parameter
            ys = ys + sum((p.sum() * 0 for p in self.parameters()), xs.sum() * 0)
        return ys

    def adapt(self, projection: str, x: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, mm) -> torch.Tensor:
        """y = x @ W[projection] of the rows; adapters add their term here (`mm`: the matmul in use)."""
        return y


def experts_loop_reference(experts: GroupedExperts, x, indices, weights) -> torch.Tensor:
    """Per-expert loop over token indices (transformers' eager path, native layout). For tests: exact, slow."""
    out = torch.zeros_like(x)
    I = experts.intermediate_size
    for e in range(experts.num_experts):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        h = x[token] @ experts.gate_and_up_projs[e]  # (n, 2I)
        h = F.silu(h[:, :I]) * h[:, I:]
        y = (h @ experts.down_projs[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert of Qwen3.5, the dense MLP layers of Qwen3-VL-MoE."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """routed(x) + sigmoid(shared_expert_gate(x)) * shared_experts(x)."""

    def __init__(self, config):
        super().__init__()
        H, E = config.hidden_size, config.num_experts
        # a config without `norm_topk_prob` (Qwen3.5, Qwen3-VL-MoE) always renormalises
        self.gate = TopKRouter(H, E, config.num_experts_per_tok, getattr(config, "norm_topk_prob", True))
        self.experts = GroupedExperts(E, H, config.moe_intermediate_size)
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        self.shared_experts = SwiGLUMLP(H, shared) if shared else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> out (B, T, H), router logits (B*T, E), top-k indices (B*T, k)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits, weights, indices = self.gate(flat)
        if self.shared_experts is None:
            return self.experts(flat, indices, weights).reshape(B, T, H), logits, indices

        def shared():  # independent of the routed experts: an expert-parallel dispatcher may overlap it
            return torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_experts(flat)

        routed, shared_out = self.experts(flat, indices, weights, alongside=shared)
        return (routed + shared_out).reshape(B, T, H), logits, indices
