"""Kernel choice, made per call from the tensors' device and what is importable (never at import time).

| op                 | CUDA (fast)                                              | otherwise (exact torch reference)          |
|--------------------|----------------------------------------------------------|--------------------------------------------|
| gated delta rule   | fla `chunk_gated_delta_rule(cu_seqlens=...)`             | `delta_rule.chunk_gated_delta_rule_*`      |
| causal conv1d      | `causal_conv1d_fn(seq_idx=...)`, else fla's Triton conv  | `delta_rule.causal_depthwise_conv_packed`  |
| packed attention   | `torch.nn.attention.varlen.varlen_attn` (bf16/fp16)      | SDPA per document                          |
| (context parallel) | the same, queries of the slice vs gathered keys          | SDPA per segment, lower-right causal mask  |
| grouped experts    | `torch._grouped_mm` (bf16; fp32: the per-expert segments) | `torch._grouped_mm` (fp32 and bf16)       |

A row split over context-parallel ranks (`info.cp`) runs the same kernels on its slice, with what crosses the slice
boundary exchanged around them (`context_parallel.py`: gathered keys / values, the conv halo, the carried state).

Footguns handled here:
- fla + triton installed on a CPU machine make transformers pick fla at import and crash every CPU forward. Here
  fla is only imported when a CUDA tensor arrives.
- A CUDA run without fla falls back to the torch delta rule: same numbers, about 2x slower end to end. That is
  warned once, loudly, never silent. The torch conv fallback is exact too (only slower).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from . import context_parallel
from .delta_rule import causal_depthwise_conv_packed, chunk_gated_delta_rule_with_state
from .packing import SequenceInfo

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fla_chunk_fn():
    if not (_has("fla") and _has("triton")):
        return None
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule


def _causal_conv1d_fn():
    if not _has("causal_conv1d"):
        return None
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn


def _fla_conv_fn():
    """fla's Triton causal conv (it takes cu_seqlens): the CUDA conv where causal-conv1d is not installed (it builds
    with nvcc against the CUDA torch; fla needs nothing built)."""
    if not (_has("fla") and _has("triton")):
        return None
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d


def gated_delta_rule(q, k, v, g, beta, info: SequenceInfo, chunk_size: int | None = None) -> torch.Tensor:
    """q, k (B, T, Hk, dk); v (B, T, Hv, dv); g, beta (B, T, Hv) -> (B, T, Hv, dv). Documents never mix.

    chunk_size of the torch chunked path (None: 32 on CPU, 64 on CUDA; fla picks its own). The result does not
    depend on it beyond float rounding. On CPU the (C, C) work per token (decay masks, the UT transform) grows with
    C while the scan over chunks is a Python loop whose per-chunk cost is mostly op overhead: 32 was 30 % faster
    than 64 on packed rows of short documents (median ~150 tokens) and as fast on one 8K-token document."""
    run = functools.partial(_delta_rule_with_state, chunk_size=chunk_size)
    if info.cp is not None:  # a slice of a row split over ranks: the state crosses the slice boundary
        return context_parallel.delta_rule_with_carry(q, k, v, g, beta, info, run)
    return run(q, k, v, g, beta, info, None, False)[0]


def torch_delta_rule_chunk_size(x: torch.Tensor) -> int:
    """Chunk size of the torch chunked delta rule for tensors on x's device (see `gated_delta_rule`)."""
    return 64 if x.is_cuda else 32


def _delta_rule_with_state(q, k, v, g, beta, info: SequenceInfo, initial_state, output_final_state,
                          chunk_size: int | None = None):
    """-> (out, final states or None); initial_state (N documents, Hv, dk, dv) or None (zeros)."""
    if q.is_cuda:
        fla = _fla_chunk_fn()
        if fla is not None:
            return fla_delta_rule(fla, q, k, v, g, beta, info, initial_state, output_final_state)
        _warn_once(
            "fla",
            "qmoe_lightning: flash-linear-attention is not installed; Gated DeltaNet runs the exact torch chunked "
            "delta rule on GPU, which is about 2x slower end to end. Install the GPU extra: "
            "pip install 'qmoe_lightning[gpu]'.",
        )
    chunk_size = chunk_size or torch_delta_rule_chunk_size(q)
    return chunk_gated_delta_rule_with_state(q, k, v, g, beta, info.chunk_layout(chunk_size), initial_state,
                                             output_final_state)


def fla_delta_rule(fla, q, k, v, g, beta, info: SequenceInfo, initial_state, output_final_state):
    """Our call of fla's `chunk_gated_delta_rule` (`fla`): the layout, the in-kernel q / k normalisation, the scale,
    the documents and the states as the torch path has them. Taken apart so tests run this very call on CPU tensors
    through Triton's interpreter (`tests/test_model_kernels_fla.py`)."""
    return fla(
        q, k, v, g=g, beta=beta, scale=q.shape[-1] ** -0.5, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
        cu_seqlens=info.cu_seqlens.long() if info.packed else None,
    )


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
    """x (B, T, D), weight (D, K) -> silu(causal depthwise conv) (B, T, D), taps reset at document starts."""
    if info.cp is not None:  # a slice of a row split over ranks: the taps reach into the previous rank's slice
        return context_parallel.conv_with_halo(x, weight, info, _causal_conv1d_silu)
    return _causal_conv1d_silu(x, weight, info)


def _causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
    if x.is_cuda:
        conv = _causal_conv1d_fn()
        if conv is not None:
            # (B, T, D) -> (B, D, T) view with channel-last strides, as causal-conv1d's seq_idx path requires
            out = conv(x.to(weight.dtype).transpose(1, 2), weight, None, seq_idx=info.seq_idx, activation="silu")
            return out.transpose(1, 2).to(x.dtype)
        fla_conv = _fla_conv_fn()
        if fla_conv is not None:
            return fla_conv_silu(fla_conv, x, weight, info)
    return causal_depthwise_conv_packed(x, weight, info.cu_seqlens)


def fla_conv_silu(conv, x: torch.Tensor, weight: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
    """Our call of fla's causal conv (`conv`): (B, T, D) as it is, the taps reset at every document start, silu fused.
    Taken apart so tests run this very call through Triton's interpreter (`tests/test_model_kernels_fla.py`)."""
    out, _ = conv(x.to(weight.dtype), weight, activation="silu",
                  cu_seqlens=info.cu_seqlens.long() if info.packed else None)
    return out.to(x.dtype)


def _varlen_fn(q: torch.Tensor):
    """torch's varlen (flash) attention for a CUDA bf16 / fp16 query, else None."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _has("torch.nn.attention.varlen"):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    return None


def causal_attention(q, k, v, info: SequenceInfo, scale: float) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, D). Causal, per document, GQA."""
    if info.cp is not None:  # a slice of a row split over ranks: keys and values of the whole document
        return context_parallel.attention(q, k, v, info, scale, varlen=_varlen_fn(q))
    B, Hq, T, D = q.shape
    gqa = Hq != k.shape[1]
    if info.packed:
        varlen_attn = _varlen_fn(q)
        if varlen_attn is not None:
            cu = info.cu_seqlens.to(torch.int32)
            out = varlen_attn(
                q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, info.max_seqlen,
                info.max_seqlen, scale=scale, window_size=(-1, 0), enable_gqa=gqa,
            )  # (T, Hq, D)
            return out.unsqueeze(0)
        # split, not a slice per document: each slice's backward zero-fills a full (B, H, T, D) gradient (three per
        # document, a fifth of the attention layer's time on a 19-document row); split's backward is one cat
        lengths = [e - s for s, e in info.doc_bounds]
        outs = [F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
                for qd, kd, vd in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
        return torch.cat(outs, dim=2).transpose(1, 2)
    if info.token_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal & info.token_mask[:, None, None, :]  # (B, 1, T, T)
    # a padding query with no visible key would give NaN; let it see itself (its output is never used)
    mask = mask | torch.eye(T, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)
