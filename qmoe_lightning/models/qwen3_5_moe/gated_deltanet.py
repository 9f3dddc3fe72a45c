"""Gated DeltaNet linear attention of Qwen3.5 (`linear_attn`).

Projections: `in_proj_qkv` (channels q | k | v), `in_proj_z` (output gate), `in_proj_b` (beta), `in_proj_a` (decay);
a depthwise causal conv over qkv (kernel K, no bias) followed by SiLU; per value head a decay
`g = -exp(A_log) * softplus(a + dt_bias)` (fp32, <= 0) and `beta = sigmoid(b)`; the gated delta rule; a gated RMS
norm (weight shared across heads) and `out_proj`.

A_log and dt_bias stay fp32 even in a bf16 model (they are exponentiated; bf16 rounding of A_log moves the decay
by up to 0.4 %). Padding tokens are zeroed on entry as transformers does, so they never write to the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import causal_conv1d_silu, gated_delta_rule
from ..norms import GatedRMSNorm, KeepFp32Mixin
from ..packing import SequenceInfo


class GatedDeltaNet(KeepFp32Mixin, nn.Module):
    _fp32_names = ("A_log", "dt_bias")

    def __init__(self, config):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.num_v_heads}) must be a multiple of linear_num_key_heads "
                f"({self.num_k_heads})"
            )
        self.key_dim = self.head_k_dim * self.num_k_heads
        self.value_dim = self.head_v_dim * self.num_v_heads
        self.conv_dim = 2 * self.key_dim + self.value_dim
        H = config.hidden_size
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)
        # kept as nn.Conv1d so checkpoint names/shapes ([conv_dim, 1, K]) match; the forward uses its weight only
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=config.linear_conv_kernel_dim, groups=self.conv_dim,
            bias=False, padding=config.linear_conv_kernel_dim - 1,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.dt_bias.fill_(1.0)
            # transformers' init: A ~ U(0.01, 16), lower bound keeps log(A) finite
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log_())

    def forward(self, x: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
        if info.token_mask is not None:
            x = (x * info.token_mask[..., None]).to(x.dtype)
        B, T, _ = x.shape  # (B, T, H)
        qkv = causal_conv1d_silu(self.in_proj_qkv(x), self.conv1d.weight.squeeze(1), info)  # (B, T, conv_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        z = self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim)
        beta = self.in_proj_b(x).sigmoid()  # (B, T, Hv)
        acc = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(acc).exp() * F.softplus(self.in_proj_a(x).to(acc) + self.dt_bias.to(acc))  # (B, T, Hv)
        core = gated_delta_rule(q, k, v, g, beta, info)  # (B, T, Hv, dv)
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.reshape(B, T, self.value_dim))
