"""Gated DeltaNet linear attention (`linear_attn`) of the hybrid decoders (Qwen3.5-MoE, Qwen3-Next).

Per layer: projections of x to q, k, v (channels q | k | v), the output gate z, beta and the decay input a; a
depthwise causal conv over qkv (kernel K, no bias) followed by SiLU; per value head a decay
`g = -exp(A_log) * softplus(a + dt_bias)` (fp32, <= 0) and `beta = sigmoid(b)`; the gated delta rule; a gated RMS
norm (weight shared across heads) and `out_proj`.

The projections come in two layouts, each the one its family's published checkpoints hold, so that every loader,
exporter and PEFT adapter reads and writes them unchanged:
- separate (Qwen3.5): `in_proj_qkv` (q of every key head, then k, then v), `in_proj_z`, `in_proj_b`, `in_proj_a`;
- grouped per key head (Qwen3-Next): `in_proj_qkvz` whose rows are, for each of the nk key heads, [q (dk) | k (dk) |
  v (r*dv) | z (r*dv)] with r = nv / nk value heads per key head, and `in_proj_ba` ([b (r) | a (r)] per key head).
  The forward regroups the projected channels into the separate layout (transformers' `fix_query_key_value_ordering`)
  before the conv: after that the two are the same computation. A LoRA on `in_proj_qkvz` is then exactly what peft
  puts on transformers' module of that name; splitting the weight at load instead would make a peft adapter of it a
  rank-2r one with its own alpha.

A_log and dt_bias stay fp32 even in a bf16 model (they are exponentiated; bf16 rounding of A_log moves the decay
by up to 0.4 %). Padding tokens are zeroed on entry as transformers does, so they never write to the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import causal_conv1d_silu, gated_delta_rule
from .norms import GatedRMSNorm, KeepFp32Mixin
from .packing import SequenceInfo


class ConvTaps(nn.Conv1d):
    """The depthwise causal conv's weight, an nn.Conv1d so the checkpoint names and shapes ([conv_dim, 1, K]) match.
    Calling it returns the (conv_dim, K) taps the packed conv kernels take. Read through a call, not as `.weight`:
    FSDP2 gathers a unit when its first module is called and reshards it once all of them ran, and a bf16-true Gated
    DeltaNet's projections + conv form one unit (`parallelize._shard_mixed_dtypes`); with the weight read directly
    the unit never completed and stayed gathered until the end of the whole forward (found by the memory planner)."""

    def forward(self) -> torch.Tensor:
        return self.weight.squeeze(1)


class GatedDeltaNet(KeepFp32Mixin, nn.Module):
    _fp32_names = ("A_log", "dt_bias")

    def __init__(self, config, grouped_projections: bool = False):
        """grouped_projections: hold the projections fused per key head (`in_proj_qkvz`, `in_proj_ba`)."""
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
        self.grouped_projections = grouped_projections
        H = config.hidden_size
        if grouped_projections:
            self.in_proj_qkvz = nn.Linear(H, self.conv_dim + self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(H, 2 * self.num_v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
            self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)
        self.conv1d = ConvTaps(
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

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, H) -> qkv (B, T, conv_dim) in the separate layout, z (B, T, Hv, dv), b, a (B, T, Hv)."""
        B, T, _ = x.shape
        if not self.grouped_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).reshape(B, T, self.num_v_heads, self.head_v_dim),
                    self.in_proj_b(x), self.in_proj_a(x))
        nk, dk, r = self.num_k_heads, self.head_k_dim, self.num_v_heads // self.num_k_heads
        grouped = self.in_proj_qkvz(x).view(B, T, nk, 2 * dk + 2 * r * self.head_v_dim)  # per key head
        q, k, v, z = grouped.split([dk, dk, r * self.head_v_dim, r * self.head_v_dim], dim=-1)
        qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, nk, 2 * r).split([r, r], dim=-1)
        return (qkv, z.reshape(B, T, self.num_v_heads, self.head_v_dim),
                b.reshape(B, T, self.num_v_heads), a.reshape(B, T, self.num_v_heads))

    def forward(self, x: torch.Tensor, info: SequenceInfo) -> torch.Tensor:
        if info.token_mask is not None:
            x = (x * info.token_mask[..., None]).to(x.dtype)
        B, T, _ = x.shape  # (B, T, H)
        qkv, z, b, a = self._project(x)
        qkv = causal_conv1d_silu(qkv, self.conv1d(), info)  # (B, T, conv_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()  # (B, T, Hv)
        acc = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))  # (B, T, Hv)
        core = gated_delta_rule(q, k, v, g, beta, info)  # (B, T, Hv, dv)
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.reshape(B, T, self.value_dim))
