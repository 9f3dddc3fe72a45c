"""Full (softmax) attention of the decoders: GQA with per-head q/k RMSNorm, rotary, optionally an output gate.

- Qwen3.5 (`gated_attention`, output_gate=True): `q_proj` emits, per head, [query | gate] (2*D): the split is per
  head, not over the whole projection; q_norm / k_norm are zero-centred; the rotary is partial; the output is
  `o_proj(attn * sigmoid(gate))`.
- Qwen3-VL-MoE and Qwen3-MoE (`plain_attention`, output_gate=False): `q_proj` emits the query only; q_norm / k_norm
  are standard RMSNorms (w * x_hat); the rotary covers the whole head; the output is `o_proj(attn)`.
Both: q_norm and k_norm run over D before the rotary; the attention kernel handles packed rows (`kernels`).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import causal_attention
from .norms import RMSNorm, ZeroCenteredRMSNorm
from .packing import SequenceInfo
from .rotary import apply_partial_rotary, head_dim_of


class Attention(nn.Module):
    def __init__(self, config, *, output_gate: bool, norm: type[nn.Module]):
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.output_gate = output_gate
        bias = config.attention_bias
        D = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * D * (2 if output_gate else 1), bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, config.hidden_size, bias=bias)
        self.q_norm = norm(D, eps=config.rms_norm_eps)
        self.k_norm = norm(D, eps=config.rms_norm_eps)
        self.scaling = D**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        D = self.head_dim
        if self.output_gate:
            q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * D).chunk(2, dim=-1)  # (B, T, Hq, D) each
        else:
            q, gate = self.q_proj(x).view(B, T, self.num_heads, D), None
        q = self.q_norm(q).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D).transpose(1, 2)
        cos, sin = rope
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        out = causal_attention(q, k, v, info, self.scaling).reshape(B, T, self.num_heads * D)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(B, T, self.num_heads * D))
        return self.o_proj(out)


def gated_attention(config) -> Attention:
    """Qwen3.5's gated attention (`self_attn`)."""
    return Attention(config, output_gate=True, norm=ZeroCenteredRMSNorm)


def plain_attention(config) -> Attention:
    """Qwen3-VL-MoE's attention (`self_attn`): no output gate, standard q/k RMSNorm."""
    return Attention(config, output_gate=False, norm=RMSNorm)
