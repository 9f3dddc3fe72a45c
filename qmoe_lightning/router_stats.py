"""Per-layer router statistics of one forward pass, small enough to keep after the step and sum over steps/ranks.

`RouterStats` holds, per MoE layer l and expert e:
    counts[l, e]     top-k picks (the model's `expert_token_counts`)
    prob_sum[l, e]   sum over tokens of the softmax router probability (fp32 softmax, as the model's aux loss)
    entropy_sum[l]   sum over tokens of the router entropy  -sum_e p log p
    tokens           number of routed tokens (rows of the router logits)
All fields are sums, so statistics of a window of steps and of several data-parallel ranks are plain sums
(`merge`, `all_reduce`), and every derived figure (load ratios, per-layer aux loss, mean entropy) is computed once
from the sums. The router logits themselves ([tokens, experts] per layer) are never kept past the step.

Per-layer aux loss uses the model's formula restricted to one layer (see `modeling.load_balancing_loss`):
    aux_l = E * sum_e (counts[l, e] / N) * (prob_sum[l, e] / N)
The model's total `aux_loss` pools all layers first (f and P averaged over layers, then multiplied), so it is not
the mean of the per-layer values; both are logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouterStats:
    counts: torch.Tensor  # (L, E) float64
    prob_sum: torch.Tensor  # (L, E) float64
    entropy_sum: torch.Tensor  # (L,) float64
    tokens: torch.Tensor  # () float64

    @classmethod
    @torch.no_grad()
    def from_router_outputs(cls, router_logits, expert_token_counts: torch.Tensor,
                            token_mask: torch.Tensor | None = None) -> RouterStats:
        """router_logits: per layer (N, E); expert_token_counts: (L, E) top-k picks of real tokens (the model
        leaves padding out); token_mask: (N,) or (B, T) real tokens (attention_mask), so that probabilities,
        entropies and the token count cover the same tokens as the counts."""
        keep = None if token_mask is None else token_mask.reshape(-1).bool().to(router_logits[0].device)
        if keep is not None:
            router_logits = [lg[keep] for lg in router_logits]
        probs = [torch.softmax(lg.detach().float(), dim=-1) for lg in router_logits]
        prob_sum = torch.stack([p.sum(0) for p in probs]).double()
        entropy = torch.stack([-(p * torch.log(p.clamp_min(1e-30))).sum(-1).sum() for p in probs]).double()
        n = torch.tensor(float(router_logits[0].shape[0]), dtype=torch.float64, device=prob_sum.device)
        return cls(expert_token_counts.detach().to(prob_sum.device).double(), prob_sum, entropy, n)

    def merge(self, other: RouterStats) -> RouterStats:
        return RouterStats(self.counts + other.counts, self.prob_sum + other.prob_sum,
                           self.entropy_sum + other.entropy_sum, self.tokens + other.tokens)

    def flat(self) -> torch.Tensor:
        return torch.cat([self.counts.reshape(-1), self.prob_sum.reshape(-1), self.entropy_sum, self.tokens[None]])

    def unflat(self, flat: torch.Tensor) -> RouterStats:
        L, E = self.counts.shape
        c, p = L * E, 2 * L * E
        return RouterStats(flat[:c].reshape(L, E), flat[c:p].reshape(L, E), flat[p:p + L], flat[p + L])

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    def per_layer_aux_loss(self) -> torch.Tensor:
        """(L,) the load-balancing loss of each layer alone (model formula)."""
        n = self.tokens.clamp_min(1)
        return self.num_experts * ((self.counts / n) * (self.prob_sum / n)).sum(-1)

    def mean_entropy(self) -> torch.Tensor:
        """(L,) mean router entropy per token, in nats."""
        return self.entropy_sum / self.tokens.clamp_min(1)

    def load_summary(self) -> dict[str, torch.Tensor]:
        """Per-layer load figures from the pick counts: max/mean ratio, coefficient of variation, dead experts."""
        mean = self.counts.mean(-1)
        safe = mean.clamp_min(1e-12)
        return {
            "max_mean_ratio": self.counts.max(-1).values / safe,  # (L,)
            "cv": self.counts.std(-1, unbiased=False) / safe,  # (L,)
            "dead": (self.counts == 0).sum(-1),  # (L,) experts with no token
        }


class ReadsRouterStats:
    """Base of a callback that reads `last_step.router_stats`: the LightningModule collects router statistics (they
    cost `output_router_logits`) only when a callback of the run is one and `needs_router_stats` is true."""

    needs_router_stats: bool = True


def moe_layer_indices(pl_module, rows: int) -> list[int]:
    """The decoder-layer index of each of `rows` router-statistics rows: only MoE layers route (a Qwen3-VL-MoE with
    dense layers has fewer rows than layers), so row i is layer `text_model.moe_layers[i]`."""
    layers = list(pl_module.model.text_model.moe_layers)
    return layers if len(layers) == rows else list(range(rows))
