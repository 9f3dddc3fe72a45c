"""The chunked gated delta rule from a zero state, the form the kernel tests compare against the token loop
(the models call `delta_rule.chunk_gated_delta_rule_with_state` through `kernels.gated_delta_rule`)."""

from __future__ import annotations

import torch

from qmoe_lightning.models.delta_rule import chunk_gated_delta_rule_with_state
from qmoe_lightning.models.packing import ChunkLayout


def chunk_gated_delta_rule_packed(
    q: torch.Tensor,  # (B, T, Hk, dk)
    k: torch.Tensor,  # (B, T, Hk, dk)
    v: torch.Tensor,  # (B, T, Hv, dv)
    g: torch.Tensor,  # (B, T, Hv) log decay, <= 0
    beta: torch.Tensor,  # (B, T, Hv)
    layout: ChunkLayout,
) -> torch.Tensor:
    """-> (B, T, Hv, dv) in q's dtype."""
    return chunk_gated_delta_rule_with_state(q, k, v, g, beta, layout)[0]
