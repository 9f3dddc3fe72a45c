"""Gated delta rule, exact torch paths (CPU reference and fallback).

Recurrence per value head, state S (dk, dv) starting at 0 for every document:
    S = exp(g_t) S;   S = S + k_t (beta_t (v_t - k_t^T S))^T;   o_t = q_t^T S
with q, k l2-normalised in fp32 and q scaled by dk^-0.5 (transformers' `use_qk_l2norm_in_kernel=True`).

`chunk_gated_delta_rule_with_state` is transformers' chunked algorithm (UT transform inside chunks of C, a scan over
chunks) with one change: the chunks are laid out per document (see `packing.ChunkLayout`), so every document
starts from a zero state at a chunk boundary of its own, and the chunks of all documents are scanned together.
A single document therefore runs the same algorithm transformers runs on it alone; the sums differ only in float
rounding (the UT transform goes through the inverse of the unit triangular matrix, transformers forward-substitutes
row by row; the CPU path uses C = 32, transformers 64; see `kernels.gated_delta_rule`).

Precision: everything after `_prepare` runs in fp32 (fp64 inputs stay fp64), also under `torch.autocast`, which is
switched off inside: autocast would round the UT transform's triangular inverse, the decay products and the
recurrent state to bf16 at every matmul (the state of a long document accumulates those roundings chunk after
chunk), and its bf16 matmul results met the fp32 inverse in `_UnitLowerSolve`'s backward ("expected m1 and m2 to
have the same dtype"). fla's kernels keep the state and the UT transform in fp32 likewise; the output is cast to
q's dtype, the dtype the surrounding (autocast) projections produced.

`recurrent_gated_delta_rule_reference` is the token-by-token loop, the readable reference the tests and
`bench/gpu/check.py` compare the fast paths against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import ChunkLayout


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta):
    """fp32, grouped value heads expanded, q/k normalised, q scaled. Shapes (B, T, H, d) / (B, T, H)."""
    hk, hv = k.shape[2], v.shape[2]
    if hk != hv:  # value head i reads key head i // (hv / hk)
        q = q.repeat_interleave(hv // hk, dim=2)
        k = k.repeat_interleave(hv // hk, dim=2)
    acc = torch.promote_types(v.dtype, torch.float32)  # at least fp32; fp64 stays fp64 (reference runs)
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


class _UnitLowerSolve(torch.autograd.Function):
    """X = A^-1 R for a batch of unit lower-triangular A (C, C) (diagonal and upper part ignored), through the
    inverse: forward A^-1 (one triangular solve against I) then a batched matmul; backward two batched matmuls with
    the saved inverse (dR = A^-T dX, dA = -(dR X^T) strictly lower). autograd's solve_triangular backward solves
    against A^T again: for C = 64 the batched LAPACK solves are small and slow (the upper-triangular one about twice
    the lower), and it was the largest single item of a Gated DeltaNet layer's backward on CPU. X agrees with the
    solve up to float rounding (both ~4e-7 from fp64 on unit-norm keys)."""

    @staticmethod
    def forward(ctx, A, R):
        # one dtype for all (A's and R's promoted), whatever autocast is on: the backward runs outside autocast and
        # must meet the same dtypes; gradients go back in each input's own dtype
        dtype = torch.promote_types(A.dtype, R.dtype)
        ctx.dtypes = (A.dtype, R.dtype)
        with torch.autocast(A.device.type, enabled=False):
            A, R = A.to(dtype), R.to(dtype)
            C = A.shape[-1]
            eye = torch.eye(C, dtype=dtype, device=A.device).expand(A.shape)
            inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (..., C, C)
            X = inverse @ R  # (..., C, n)
        ctx.save_for_backward(inverse, X)
        return X

    @staticmethod
    def backward(ctx, dX):
        inverse, X = ctx.saved_tensors
        a_dtype, r_dtype = ctx.dtypes
        with torch.autocast(dX.device.type, enabled=False):
            dR = inverse.mT @ dX.to(inverse.dtype)
            dA = -(dR @ X.mT).tril_(-1).to(a_dtype) if ctx.needs_input_grad[0] else None
        return dA, dR.to(r_dtype)


def unit_lower_solve(A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """A^-1 R for unit lower-triangular A (..., C, C) (its diagonal and upper part are not read), R (..., C, n)."""
    return _UnitLowerSolve.apply(A, R)


def chunk_gated_delta_rule_with_state(q, k, v, g, beta, layout: ChunkLayout, initial_state: torch.Tensor | None = None,
                                      output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k (B, T, Hk, dk), v (B, T, Hv, dv), g (log decay, <= 0) and beta (B, T, Hv), from a given state:
    initial_state (N, Hv, dk, dv) per document of the layout (None: zeros) -> (out (B, T, Hv, dv) in q's dtype,
    final states (N, Hv, dk, dv) in fp32, or None). fla's `initial_state` /
    `output_final_state` semantics; context parallelism carries a document's state from one rank's slice to the
    next with it. Runs in fp32 with autocast off (module doc)."""
    with torch.autocast(q.device.type, enabled=False):
        return _chunk_gated_delta_rule(q, k, v, g, beta, layout, initial_state, output_final_state)


def _chunk_gated_delta_rule(q, k, v, g, beta, layout: ChunkLayout, initial_state, output_final_state):
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    H, dk, dv = v.shape[2], k.shape[-1], v.shape[-1]
    C, N = layout.chunk_size, layout.num_chunks

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, *d) -> (N, H, C, *d)
        flat = x.reshape(B * T, *x.shape[2:])
        slots = flat.new_zeros(N * C, *x.shape[2:]).index_copy(0, layout.token_slot, flat)
        return slots.view(N, C, *x.shape[2:]).transpose(1, 2)

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))  # (N, H, C, d) / (N, H, C)
    v_beta = v * beta.unsqueeze(-1)
    k_beta = k * beta.unsqueeze(-1)
    cum = g.cumsum(dim=-1)  # (N, H, C)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # (N, H, C, C)

    ut = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    # one solve for both right-hand sides (the batched solve loops over its N*H small systems: once, not twice)
    rhs = torch.cat([v_beta, k_beta * cum.exp().unsqueeze(-1)], dim=-1)  # (N, H, C, dv + dk)
    new_values, k_cumdecay = unit_lower_solve(ut, rhs).split([dv, dk], dim=-1)

    q = q * cum.exp().unsqueeze(-1)
    k = k * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (N, H, 1, 1)

    outs, finished = [], []  # finished: the states of the documents as they drop out (the longest last)
    running = layout.wave_sizes[0] if layout.wave_sizes else 0
    if initial_state is None:
        state = q.new_zeros(running, H, dk, dv)
    else:
        order = torch.tensor(layout.doc_order[:running], dtype=torch.long, device=q.device)
        state = initial_state.to(q.dtype).index_select(0, order)
    # the waves' chunks split once: the backward of `split` is one cat, where slicing every wave out of the whole
    # tensors cost a zero-filled full-size gradient per wave and tensor
    waves = zip(*(t.split(layout.wave_sizes) for t in (new_values, k_cumdecay, q, intra, k, chunk_decay)))
    for n, (nv, kcd, qw, intra_w, kw, decay) in zip(layout.wave_sizes, waves):
        # documents still running are the prefix 0..n-1; finished ones are dropped
        if output_final_state and n < state.shape[0]:
            finished.append(state[n:])
        state = state[:n]
        v_new = nv - kcd @ state
        outs.append(qw @ state + intra_w @ v_new)
        state = state * decay + kw.transpose(-1, -2) @ v_new
    final = None
    if output_final_state:
        finished.append(state)
        # reversed drop order is slot-rank order (the final state first: the longest documents rank first); a
        # document without a chunk (empty) keeps its initial state
        ranked = torch.cat(finished[::-1])
        docs = len(layout.doc_order)
        base = initial_state.to(q.dtype) if initial_state is not None else q.new_zeros(docs, H, dk, dv)
        order = torch.tensor(layout.doc_order[:ranked.shape[0]], dtype=torch.long, device=q.device)
        final = base.index_copy(0, order, ranked)
    if not outs:
        return v.new_zeros(B, T, H, dv).to(out_dtype), final
    out = torch.cat(outs).transpose(1, 2).reshape(N * C, H, dv)  # slot order
    # index_select, not out[token_slot]: advanced indexing's backward is a serial index_put (2.7 vs 0.24 ms here)
    return out.index_select(0, layout.token_slot).view(B, T, H, dv).to(out_dtype), final


def recurrent_gated_delta_rule_reference(q, k, v, g, beta, cu_seqlens: torch.Tensor | None = None,
                                         initial_state: torch.Tensor | None = None, finals: list | None = None):
    """Token-by-token loop with a state reset at every document start (to `initial_state[d]` (N, H, dk, dv) when
    given; `finals` collects each document's last state). Slow; the reference of tests and bench/gpu/check.py."""
    with torch.autocast(q.device.type, enabled=False):
        return _recurrent_reference(q, k, v, g, beta, cu_seqlens, initial_state, finals)


def _recurrent_reference(q, k, v, g, beta, cu_seqlens, initial_state, finals):
    out_dtype = q.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    B, T, H, dv = v.shape
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    out = torch.zeros_like(v)
    for b in range(B):
        for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = v.new_zeros(H, k.shape[-1], dv) if initial_state is None else initial_state[d].to(v.dtype)
            for t in range(s, e):
                state = state * g[b, t].exp()[:, None, None]
                kv = (state * k[b, t].unsqueeze(-1)).sum(-2)
                delta = (v[b, t] - kv) * beta[b, t].unsqueeze(-1)
                state = state + k[b, t].unsqueeze(-1) * delta.unsqueeze(-2)
                out[b, t] = (state * q[b, t].unsqueeze(-1)).sum(-2)
            if finals is not None:
                finals.append(state)
    return out.to(out_dtype)


def causal_depthwise_conv_packed(
    x: torch.Tensor,  # (B, T, D)
    weight: torch.Tensor,  # (D, K)
    cu_seqlens: torch.Tensor | None,  # (N+1,) with B == 1: taps never reach into the previous document
) -> torch.Tensor:
    """Causal depthwise conv (left pad K-1) per document, then SiLU; -> (B, T, D).

    Packed rows are laid out with K-1 zero rows in front of every document and run through one convolution: each
    document sees exactly the zero left context it would see alone (results equal the per-document conv up to
    float rounding, ~1e-7; transformers runs F.conv1d in the weight's dtype, and so does this).

    The convolution is a (1, K) depthwise conv2d on a channels-last view of the (B, T, D) activations, so neither
    direction transposes them: conv1d wants (B, D, T), and the transposes there and back (a silu backward on mixed
    strides, the conv's own layout copies) made the layer's conv twice as slow on CPU. Same values as conv1d.
    """
    dtype = x.dtype
    B, T, D = x.shape
    K = weight.shape[-1]
    xw = x.to(weight.dtype)  # (B, T, D)
    if cu_seqlens is None:
        out = _depthwise_conv_rows(F.pad(xw, (0, 0, K - 1, 0)), weight)  # (B, T, D)
        return F.silu(out).to(dtype)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)  # (T,)
    where = torch.arange(T, device=x.device) + (K - 1) * (doc + 1)  # row of each token in the gapped row
    gapped = xw.new_zeros(B, T + (K - 1) * lengths.numel(), D).index_copy(1, where, xw)  # (B, T', D)
    out = _depthwise_conv_rows(gapped, weight)  # no padding: the gaps are the padding
    return F.silu(out.index_select(1, where - (K - 1))).to(dtype)


def _depthwise_conv_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), weight (D, K) -> (B, L-K+1, D): out[t] = sum_j weight[:, j] * x[t + j], no padding; computed as a
    channels-last (1, K) conv2d ((B, L, D) memory is (B, D, 1, L) in channels-last), so nothing is transposed."""
    B, L, D = x.shape
    K = weight.shape[-1]
    out = F.conv2d(x.unsqueeze(1).permute(0, 3, 1, 2), weight.view(D, 1, 1, K), groups=D)  # (B, D, 1, L-K+1)
    return out.permute(0, 2, 3, 1).reshape(B, L - K + 1, D)
