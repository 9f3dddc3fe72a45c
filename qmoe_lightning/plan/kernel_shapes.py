"""The GPU kernels' memory, for planning a CUDA recipe on a machine without one.

On CUDA the Gated DeltaNet runs flash-linear-attention's `chunk_gated_delta_rule` (`models/kernels.py`), whose
memory differs from the CPU torch reference (a chunk loop in fp32 that saves per-chunk intermediates, and runs for
seconds per layer on fake tensors). `FlaChunkShapes` allocates what fla's `ChunkGatedDeltaRuleFunction` allocates and
keeps (fla `ops/gated_delta_rule/chunk.py`, chunk size 64; B = 1, T tokens, H value heads, K / V head dims,
NT = the chunks of all documents):
- forward: q and k L2-normalised (copies) with their fp32 inverse norms (T, H); the chunk-local cumulative decay g
  (T, H) fp32; the WY matrix A (T, H, 64) (fp32, then solved into the input dtype); w (T, H, K) and u (T, H, V);
  the per-chunk states h (NT, H, K, V) and the new values (T, H, V); the output (T, H, V). Saved for backward: the
  normalised q, k and their norms, v, g, beta, A (w, u, h recomputed in backward);
- backward: w, u, h and the new values recomputed, dv (T, H, V), the state gradients dh (NT, H, K, V), dq, dk, dw
  (T, H, K) and dg (T, H) in fp32, then the input gradients.
The conv and attention kernels keep what the CPU path keeps (their inputs and output, and the softmax statistics),
so they run as they are.
"""

from __future__ import annotations

import contextlib

import torch


class _FlaChunkShapes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, num_chunks: int):
        T, H, K, V = q.shape[1], v.shape[2], k.shape[-1], v.shape[-1]
        f32 = torch.float32
        qn, kn = torch.empty_like(q), torch.empty_like(k)
        q_rstd, k_rstd = q.new_empty(q.shape[:-1], dtype=f32), k.new_empty(k.shape[:-1], dtype=f32)
        g_cum = g.new_empty(g.shape, dtype=f32)
        a32 = q.new_empty((1, T, H, 64), dtype=f32)
        a = torch.empty_like(a32, dtype=q.dtype)
        del a32
        w, u = q.new_empty((1, T, H, K)), v.new_empty((1, T, H, V))
        h, v_new = q.new_empty((1, num_chunks, H, K, V)), torch.empty_like(u)
        out = torch.empty_like(u)
        del w, u, h, v_new
        ctx.save_for_backward(qn, q_rstd, kn, k_rstd, v, g_cum, beta, a)
        ctx.num_chunks = num_chunks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qn, q_rstd, kn, k_rstd, v, g_cum, beta, a = ctx.saved_tensors
        T, H, K, V = qn.shape[1], v.shape[2], kn.shape[-1], v.shape[-1]
        f32 = torch.float32
        w, u = qn.new_empty((1, T, H, K)), v.new_empty((1, T, H, V))
        h, v_new = qn.new_empty((1, ctx.num_chunks, H, K, V)), torch.empty_like(u)
        dv = torch.empty_like(u)
        dh = torch.empty_like(h)
        dq, dk = qn.new_empty(qn.shape, dtype=f32), kn.new_empty(kn.shape, dtype=f32)
        dw, dg = qn.new_empty((1, T, H, K), dtype=f32), g_cum.new_empty(g_cum.shape)
        del w, u, h, v_new, dh, dw
        db = torch.empty_like(beta)
        return dq.to(qn.dtype), dk.to(kn.dtype), dv, dg.to(g_cum.dtype), db, None


@contextlib.contextmanager
def fla_chunk_shapes():
    """The Gated DeltaNet's delta rule runs `_FlaChunkShapes` while inside (a CUDA recipe's plan)."""
    from qmoe_lightning.models import kernels

    original = kernels._delta_rule_with_state

    def delta_rule(q, k, v, g, beta, info, initial_state, output_final_state, chunk_size=None):
        starts = info.cu_seqlens.tolist() if info.cu_seqlens is not None else [0, q.shape[1]]
        num_chunks = sum(-(-(e - s) // 64) for s, e in zip(starts, starts[1:]))
        out = _FlaChunkShapes.apply(q, k, v, g, beta, num_chunks)
        final = None
        if output_final_state:
            final = q.new_empty((len(starts) - 1, v.shape[2], k.shape[-1], v.shape[-1]), dtype=torch.float32)
        return out, final

    kernels._delta_rule_with_state = delta_rule
    try:
        yield
    finally:
        kernels._delta_rule_with_state = original
