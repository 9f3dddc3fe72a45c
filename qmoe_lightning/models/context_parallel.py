"""Context parallelism inside the model: one packed row split into contiguous slices over the ranks of a cp group,
exact against the whole row on one rank.

Who does what. Every rank of the group receives the same packed row; the model computes what needs the whole row on
it (the embeddings, the vision tower and its splice, the mRoPE positions, the label shift), then `split_row` keeps
this rank's slice and every layer runs on T / cp tokens. Three things cross a slice boundary, each with its own
exchange (the collectives are the injected `comm`, `parallel/context_parallel.ContextParallelGroup`; this file
never imports torch.distributed; `parallel/context_parallel.ContextParallelRows` is the row split that a
parallelised model's forward calls, and it calls `split_row` / `check_same_row` below):

- attention: every local query attends to the keys and values of its own document on all ranks. K and V of the
  slices are all-gathered (one collective per attention layer, 2 x T x Hkv x D values received; its backward sums the
  key / value gradients back to their ranks) and each local document segment runs causal attention against the keys
  from its document's start, aligned lower-right (the queries are the LAST rows of that key range): one
  `varlen_attn` call over all local segments on CUDA in bf16 / fp16 (flash-attention aligns causal masks
  lower-right), SDPA with torch's lower-right causal bias on CUDA in fp32, with an explicit mask on CPU.
- the Gated DeltaNet conv: a token needs the K-1 inputs before it in its document. Each rank's last K-1 conv inputs
  are all-gathered (tiny) and rank r prepends rank r-1's; the conv then runs on the window with the document
  boundaries of the window, so a document that starts inside the halo is still masked exactly.
- the delta-rule state: S_out = M S_in + B is affine in the incoming state (M = prod_t (I - b_t k_t k_t^T) e^{g_t},
  dk x dk per head). A rank whose last document goes on past its slice runs that segment once more from the state
  [0 | I] with values [v | 0], which yields [B | M] in one pass (the state's columns evolve independently). The
  (Hv, dk, dv + dk) carries of all ranks are all-gathered, each rank folds those of the ranks before it (a scan:
  S = M_j S + B_j over the ranks its document covers, reset where a document starts) and runs its slice from that
  state. Cost per Gated DeltaNet layer: one extra delta-rule pass over the last segment, at most the slice, with
  dv + dk value columns (recomputed in backward rather than stored); communication Hv x dk x (dv + dk) x cp fp32
  values. The slices run in parallel; only the small scan is sequential.

Every rank runs every exchange, and every exchange's backward (a collective too): ranks with nothing to contribute
or no use for the result tie in through `zero_tie`. The ranks check once per forward that they hold the same row.

Everything else (projections, norms, routing, experts, the LM head and CE) is per token. The split is CONTIGUOUS,
not load-balanced: it keeps the state scan a plain prefix over ranks. Causal attention over a long document then
costs the last rank more than the first ((2r + 1) / cp^2 of it on rank r); attention is one layer in four in
Qwen3.5, and the Gated DeltaNet, MoE and LM head are balanced. The row is padded (a document of padding, no targets,
masked from the aux loss and the statistics) so that every rank holds the same number of tokens, at least K-1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .packing import SequenceInfo, build_sequence_info


class _ZeroTie(torch.autograd.Function):
    """A fp32 zero that needs a gradient exactly when one of its inputs does, and hands each a zero gradient.

    What it is for: the backward of a gather is a collective, and autograd runs it only on the ranks where the
    gathered tensor needs a gradient and reaches the loss. A rank that has nothing to contribute (no state carry) or
    no use for the result (no carry into its slice, no halo before rank 0) still ties its tensors into the graph with
    this, so every rank runs every backward collective. Unlike `x.sum() * 0`, an overflowing or NaN x (fp16 sums of a
    long slice) cannot turn it into NaN."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs)


def zero_tie(*tensors: torch.Tensor) -> torch.Tensor:
    return _ZeroTie.apply(*tensors)


@dataclass
class ContextSlice:
    """This rank's slice of a row split over a context-parallel group; `SequenceInfo.cp` of the local info."""

    comm: object  # ContextParallelGroup: size, rank, all_gather, all_reduce_sum, gather_rows
    bounds: list[tuple[int, int]]  # every rank's [start, end) in the padded row
    real_len: int  # the row's length before padding
    doc_starts: list[int]  # sorted unique document offsets of the padded row (0 and its length included)
    segment_doc_start: list[int]  # per local segment (the local info's doc_bounds): start of its document
    _windows: dict[int, SequenceInfo] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def start(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def end(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def padded_len(self) -> int:
        return self.bounds[-1][1]

    def carries_in(self, r: int) -> bool:
        """Rank r's first token continues a document of the rank before."""
        return r > 0 and self.bounds[r][0] not in self._starts

    def carries_out(self, r: int) -> bool:
        return r + 1 < self.size and self.carries_in(r + 1)

    def whole(self, r: int) -> bool:
        """No document starts inside rank r's slice after its first token: the slice is one segment."""
        a, b = self.bounds[r]
        return not any(a < c < b for c in self.doc_starts)

    @property
    def _starts(self) -> set[int]:
        return set(self.doc_starts)

    def take(self, x: torch.Tensor | None, dim: int, fill=0) -> torch.Tensor | None:
        """The whole row's tensor (token dimension `dim`, length real_len) -> this rank's slice (padded first)."""
        if x is None:
            return None
        pad = self.padded_len - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
        return x.narrow(dim, self.start, self.end - self.start)

    def halo_window(self, halo: int, device) -> SequenceInfo:
        """Document layout of the conv window [start - halo, end): rank 0's halo (zeros) is a document of its own."""
        if halo not in self._windows:
            a, b = self.start, self.end
            w = a - halo
            cuts = {0, b - w} | {c - w for c in self.doc_starts if w < c < b}
            if self.rank == 0:
                cuts.add(halo)
            cu = torch.tensor(sorted(cuts), dtype=torch.int32, device=device)
            self._windows[halo] = build_sequence_info(1, b - w, device, cu)
        return self._windows[halo]


def split_row(comm, info: SequenceInfo, min_slice: int = 1) -> SequenceInfo:
    """The whole row's `SequenceInfo` -> this rank's: the row padded to cp x max(ceil(T / cp), min_slice) tokens
    (the padding one document of its own), the local document segments as its `cu_seqlens` (a document crossing
    the slice start or end is cut there), `pos_in_doc` from each local segment's start (the chunk layout of the
    delta rule), the local token mask, and `cp` (a `ContextSlice`)."""
    if info.batch_size != 1:
        raise ValueError(f"context parallelism splits ONE packed row; got a batch of {info.batch_size} rows (pack "
                         "the documents into one row with cu_seqlens)")
    size, rank = comm.size, comm.rank
    T = info.seq_len
    if not info.packed and info.token_mask is not None:
        real = int(info.token_mask.sum())
        if not bool(info.token_mask[0, :real].all()):  # the split's attention masks documents, not padded keys
            raise ValueError("context parallelism: a row with padding before or between its real tokens needs "
                             "cu_seqlens (pack it: the padding is then a document of its own); only tail padding "
                             "is accepted without them")
    per = max(-(-T // size), min_slice, 1)
    Tp = per * size
    cu = [c for c, _ in info.all_bounds] + [T] if info.packed else [0, T]
    if Tp > T:
        cu.append(Tp)
    starts = sorted(set(cu))
    bounds = [(r * per, (r + 1) * per) for r in range(size)]
    a, b = bounds[rank]
    cuts = sorted({0, b - a} | {c - a for c in starts if a < c < b})
    segment_doc_start = [max(c for c in starts if c <= a + s) for s in cuts[:-1]]
    device = info.pos_in_doc.device
    cu_local = torch.tensor(cuts, dtype=torch.int32, device=device)
    mask = info.token_mask if info.token_mask is not None else torch.ones(1, T, dtype=torch.bool, device=device)
    mask = torch.cat([mask, mask.new_zeros(1, Tp - T)], dim=1)[:, a:b] if Tp > T else mask[:, a:b]
    return dataclasses.replace(build_sequence_info(1, b - a, device, cu_local),
                               token_mask=None if bool(mask.all()) else mask,
                               cp=ContextSlice(comm, bounds, T, starts, segment_doc_start))


def check_same_row(comm, info: SequenceInfo, targets: torch.Tensor | None) -> None:
    """Every rank of the group must hold the same row (its length, document offsets and targets): a rank whose data
    pipeline dropped or changed a sample would otherwise exchange slices of another row (a hang, or garbage). One
    small gather per forward."""
    cu = info.cu_seqlens.long() if info.packed else torch.tensor([0, info.seq_len])
    cu = cu.to(info.pos_in_doc.device)
    weights = torch.arange(1, cu.numel() + 1, device=cu.device)
    mine = [info.seq_len, cu.numel(), int((cu * weights).sum())]
    if targets is not None:
        t = targets.reshape(-1).long()
        mine += [int((t != -100).sum()), int((t.clamp_min(0) * torch.arange(1, t.numel() + 1, device=t.device) % 7919)
                                             .sum())]
    rows = comm.gather_rows(torch.tensor([mine], dtype=torch.long, device=cu.device))
    if not bool((rows == rows[:1]).all()):
        raise RuntimeError(f"context parallelism: the ranks of a cp group hold different rows ((length, documents, "
                           f"offsets, targets, target checksum) per rank: {rows.tolist()}); every rank of a group must "
                           "receive the same packed micro-batch (the sampler's data-parallel coordinates give them "
                           "the same one: did a sample fail on one rank only?)")


# ---------------------------------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: SequenceInfo, scale: float,
              varlen=None) -> torch.Tensor:
    """q (1, Hq, Tl, D), k / v (1, Hkv, Tl, D) of this rank's slice -> (1, Tl, Hq, D): causal attention of every
    local query over its document's keys on all ranks. varlen: torch's `varlen_attn` when the caller may use it
    (CUDA, bf16 / fp16), else None."""
    kv = info.cp.comm.all_gather(torch.stack([k, v]), dim=3)  # (2, 1, Hkv, T, D): one collective for both
    return attend_gathered(q, kv, info, scale, varlen)


def attend_gathered(q: torch.Tensor, kv: torch.Tensor, info: SequenceInfo, scale: float, varlen=None) -> torch.Tensor:
    """The local part of `attention`, given the gathered kv (2, 1, Hkv, T, D) of the whole (padded) row.

    The local segments' key ranges are consecutive: the first segment's from its document's start (possibly on an
    earlier rank), every other one's its own tokens. So the keys are one contiguous range and varlen takes every
    segment in one call, with key offsets shifted by what the first document has before this slice; its causal
    mask is aligned lower-right when a segment has more keys than queries (flash-attention's rule)."""
    cs = info.cp
    gqa = q.shape[1] != kv.shape[2]
    if varlen is not None:
        first = cs.segment_doc_start[0]
        keys = kv[:, 0, :, first:cs.end].transpose(1, 2)  # (2, Lk, Hkv, D)
        cu_q = info.cu_seqlens.to(torch.int32)
        cu_k = torch.cat([cu_q[:1], cu_q[1:] + (cs.start - first)])
        out = varlen(q[0].transpose(0, 1), keys[0], keys[1], cu_q, cu_k, info.max_seqlen,
                     int((cu_k[1:] - cu_k[:-1]).max()), scale=scale, window_size=(-1, 0), enable_gqa=gqa)
        return out.unsqueeze(0)  # (1, Tl, Hq, D)
    outs = []
    # the queries split by segment, not sliced: each slice's backward zero-fills a full-size gradient (the keys'
    # ranges overlap the rank's earlier segments' document, so they stay slices)
    queries = q.split([e - s for s, e in info.doc_bounds], dim=2)
    for q_seg, (s, e), doc_start in zip(queries, info.doc_bounds, cs.segment_doc_start):
        key_end = cs.start + e  # keys up to this segment's last query (global)
        outs.append(lower_right_causal_attention(q_seg, kv[0, :, :, doc_start:key_end],
                                                 kv[1, :, :, doc_start:key_end], scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


def lower_right_causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """q (B, Hq, Lq, D) are the last Lq positions of the Lk keys (Lq <= Lk): query i sees keys 0 .. Lk - Lq + i.
    CPU: SDPA with an explicit mask (the exact reference). CUDA (fp32; bf16 / fp16 take varlen): torch's
    `causal_lower_right` bias, which the memory-efficient kernel takes without an (Lq, Lk) mask; its lower-right
    kernels want equal head counts, so GQA heads are repeated (K / V only: far less than a mask)."""
    Lq, Lk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), scale=scale)
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------------- Gated DeltaNet
def conv_with_halo(x: torch.Tensor, weight: torch.Tensor, info: SequenceInfo, conv) -> torch.Tensor:
    """x (1, Tl, D) conv inputs of this slice, weight (D, K) -> conv(x) (1, Tl, D), the K-1 inputs before the slice
    taken from the previous rank. `conv(x, weight, info)` is the single-rank kernel."""
    cs = info.cp
    halo = weight.shape[-1] - 1
    if halo == 0:  # a 1-tap conv reads nothing before the slice (the kernel ignores info.cp)
        return conv(x, weight, info)
    tails = cs.comm.all_gather(x[:, -halo:], dim=1)  # (1, cp * halo, D)
    r = cs.rank
    # rank 0 has nothing before it, but still takes part in the gather's backward: its halo is a used zero
    if r > 0:
        before = tails[:, (r - 1) * halo: r * halo]
    else:
        before = x.new_zeros(1, halo, x.shape[2]) + zero_tie(tails).to(x.dtype)
    out = conv(torch.cat([before, x], dim=1), weight, cs.halo_window(halo, x.device))
    return out[:, halo:]


def delta_rule_with_carry(q, k, v, g, beta, info: SequenceInfo, run) -> torch.Tensor:
    """The gated delta rule of this slice with the state carried across ranks (module doc). `run(q, k, v, g, beta,
    info, initial_state, output_final_state) -> (out, final)` is the single-rank kernel (it reads the local document
    layout of `info` and ignores `info.cp`)."""
    cs = info.cp
    r = cs.rank
    Hv, dk, dv = v.shape[2], q.shape[-1], v.shape[-1]
    acc = torch.promote_types(v.dtype, torch.float32)
    if cs.carries_out(r):  # [B | M] of the last segment: values [v | 0] from the state [0 | I]
        s, e = info.doc_bounds[-1]
        v_aug = torch.cat([v[:, s:], v.new_zeros(1, e - s, Hv, dk)], dim=-1)
        eye = torch.eye(dk, dtype=acc, device=v.device).expand(Hv, dk, dk)
        start = torch.cat([torch.zeros(Hv, dk, dv, dtype=acc, device=v.device), eye], dim=-1).unsqueeze(0)
        seg = build_sequence_info(1, e - s, q.device)

        def transition(q_, k_, v_, g_, b_):
            return run(q_, k_, v_, g_, b_, seg, start, True)[1][0].to(acc)  # (Hv, dk, dv + dk)

        # recomputed in backward rather than stored: only the final state is used, and keeping the pass's
        # intermediates would cost as much activation memory again as the segment's main pass
        carry = torch.utils.checkpoint.checkpoint(transition, q[:, s:], k[:, s:], v_aug, g[:, s:], beta[:, s:],
                                                  use_reentrant=False)
    else:  # zeros, tied to the same inputs as a computed carry (so it needs a gradient exactly when one would)
        carry = torch.zeros(Hv, dk, dv + dk, dtype=acc, device=v.device) + zero_tie(q, k, v, g, beta).to(acc)
    # Footgun: the gather's backward is a collective, and autograd runs it only on ranks where the gathered tensor
    # requires grad and reaches the loss. Every rank therefore gathers a carry in the graph and uses the result
    # (`zero_tie`), or the ranks' backward all-reduces pair up wrongly (a hang, or another collective's data).
    carries = cs.comm.all_gather(carry.unsqueeze(0), dim=0)  # (cp, Hv, dk, dv + dk)
    initial = None
    if cs.carries_in(r):
        state = None
        for j in range(r):  # fold the ranks before: a rank holding a document start resets the chain
            b, m = carries[j][..., :dv], carries[j][..., dv:]
            state = m @ state + b if (state is not None and cs.carries_in(j) and cs.whole(j)) else b
        n_docs = len(info.all_bounds)
        initial = torch.cat([state.unsqueeze(0), state.new_zeros(n_docs - 1, Hv, dk, dv)])
    out, _ = run(q, k, v, g, beta, info, initial, False)  # the kernel reads the local layout only
    return out if initial is not None else out + zero_tie(carries).to(out.dtype)
