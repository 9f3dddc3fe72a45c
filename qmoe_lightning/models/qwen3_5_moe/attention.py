"""Gated full attention of Qwen3.5 (`self_attn`).

`q_proj` emits, per head, [query | gate] (2*D): the split is per head, not over the whole projection. q_norm and
k_norm (zero-centred RMSNorm over D) run before the partial rotary; the output is `o_proj(attn * sigmoid(gate))`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import causal_attention
from ..norms import ZeroCenteredRMSNorm
from ..packing import SequenceInfo
from ..rotary import apply_partial_rotary


class GatedAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        D = self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * D * 2, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, config.hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(D, eps=config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(D, eps=config.rms_norm_eps)
        self.scaling = D**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        D = self.head_dim
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * D).chunk(2, dim=-1)  # (B, T, Hq, D) each
        gate = gate.reshape(B, T, self.num_heads * D)
        q = self.q_norm(q).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, D).transpose(1, 2)
        cos, sin = rope
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        out = causal_attention(q, k, v, info, self.scaling).reshape(B, T, self.num_heads * D)
        return self.o_proj(out * torch.sigmoid(gate))
