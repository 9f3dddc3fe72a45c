"""Sparse MoE block of Qwen3.5-MoE: top-k router, grouped routed experts, gated shared expert.

Native expert layout (x @ W, the layout grouped GEMMs and expert parallelism want; E = num experts, H = hidden,
I = moe intermediate):
    experts.gate_and_up_projs  (E, H, 2I)   columns: gate | up
    experts.down_projs         (E, I, H)
The HF checkpoint layout is the transpose of both (see state_dict_adapter.py).

Numerics follow transformers exactly: router matmul in the activation dtype, softmax in fp32, top-k, always
renormalised, weights cast back to the activation dtype; the routing weight multiplies the expert output AFTER
the down projection (NeMo multiplies before it and loses exact parity in bf16).

`GroupedExperts.forward` sorts the (token, slot) pairs by expert once and runs two `torch._grouped_mm` calls (CPU
and CUDA); `experts_loop_reference` is the readable per-expert loop kept beside it for tests.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> logits (N, E), weights (N, k) in x.dtype, indices (N, k)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Can `torch._grouped_mm` run the expert matmuls for activations `x` (CUDA: bf16 only)? Else the per-expert
    loop runs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16
    return x.dtype in (torch.float32, torch.bfloat16)


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """indices (N, k) -> order (N*k,) of (token, slot) pairs grouped by expert, their token (N*k,), and
    grouped_mm offsets (E,) int32 (cumulative pair counts per expert)."""
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, order // indices.shape[1], offs


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_and_up_projs = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_projs = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_and_up_projs, std=std)
        nn.init.normal_(self.down_projs, std=std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), indices/weights (N, k) -> (N, H)."""
        if not grouped_mm_supported(x):
            return experts_loop_reference(self, x, indices, weights)
        order, token_of, offs = sort_by_expert(indices, self.num_experts)  # (N*k,), (N*k,), (E,)
        xs = x[token_of]  # (N*k, H)
        gate, up = torch._grouped_mm(xs, self.gate_and_up_projs, offs=offs).chunk(2, dim=-1)  # (N*k, I) each
        ys = torch._grouped_mm(F.silu(gate) * up, self.down_projs, offs=offs)  # (N*k, H)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))


def experts_loop_reference(experts: GroupedExperts, x, indices, weights) -> torch.Tensor:
    """Per-expert loop (transformers' eager path, native layout). Exact; slow on many experts."""
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


class SharedExpertMLP(nn.Module):
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
        self.gate = TopKRouter(H, E, config.num_experts_per_tok)
        self.experts = GroupedExperts(E, H, config.moe_intermediate_size)
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        self.shared_experts = SharedExpertMLP(H, shared) if shared else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> out (B, T, H), router logits (B*T, E), top-k indices (B*T, k)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_experts(flat)
        return out.reshape(B, T, H), logits, indices
