"""The optimizer step's accumulation window: what its micro-batches add up, and the token-count normalisation.

The objective of one optimizer step is
    sum over all micro-batches and data-parallel ranks of CE_sum / N_global
    + aux_coef * sum over micro-batches of n_i * aux_i / N_global
where N_global counts the target tokens of the whole accumulation window on all ranks: the gradient of one big
batch made of every micro-batch, whatever the split. N_global is only known once the window is complete, so each
micro-batch returns the UNNORMALISED sum (CE_sum_i + aux_coef * n_i * aux_i, plus the MTP CE sums); Lightning divides
it by `accumulate_grad_batches` and DDP / FSDP average over ranks; once the window is complete `StepWindow.reduce`
sums its fields over the ranks in one all-reduce and the module multiplies the gradients by
`accumulate_grad_batches * world_size / N_global` (`normalisation_factor`) before clipping and the optimizer. (The aux
term is weighted by each micro-batch's target tokens so that the same single rescale is exact for it too.)

Footgun: callbacks' `on_before_optimizer_step` run BEFORE this rescale (Lightning calls callbacks first); read
gradients in `configure_gradient_clipping` or later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .global_sums import GlobalSums
from .models.causal_lm import MoeOutput
from .router_stats import RouterStats


@dataclass(frozen=True)
class StepSummary:
    """What the last optimizer step did: `QMoELightningModule.last_step`, read by callbacks (never written).

    `index` is the step's number (the trainer's global step after it: 1 for the first step of a run, resumes
    continue the count): a callback that must see each step once keeps the last index it handled."""

    index: int
    loss: float  # token-weighted CE of the step, all ranks
    global_targets: float  # target tokens of the step, all ranks
    aux_values: tuple[torch.Tensor, ...]  # the model's aux loss of each of this rank's micro-batches
    router_stats: tuple[RouterStats, ...]  # per micro-batch of this rank, when a callback asked for them
    tokens: float = 0.0  # real (non-padding) tokens of the step, all ranks (a row split over cp ranks counted once)


@dataclass
class StepTotals:
    """A complete window summed over the ranks (the same values on every rank)."""

    sums: GlobalSums

    @property
    def n_targets(self) -> float:
        return self.sums.value("n_targets")

    @property
    def loss(self) -> float:
        """Token-weighted CE of the step."""
        return self.sums.value("ce") / max(self.n_targets, 1.0)

    @property
    def aux_mean(self) -> float:
        """The model's aux loss, mean over the micro-batches of all ranks."""
        return self.sums.value("aux") / max(self.sums.value("micro_batches"), 1.0)

    @property
    def tokens(self) -> float:
        return self.sums.value("tokens")

    @property
    def expert_counts(self) -> torch.Tensor | None:
        """(L, E) top-k picks of the window's real tokens on all ranks (exact integers), when balancing by bias."""
        return self.sums["expert_counts"] if "expert_counts" in self.sums else None

    def mtp_loss_per_depth(self) -> list[float]:
        if "mtp_ce" not in self.sums:
            return []
        return (self.sums["mtp_ce"] / self.sums["mtp_n"].clamp_min(1.0)).tolist()

    def nonfinite_losses(self) -> list[str]:
        """Which of the step's global losses are NaN / inf (every rank reaches the same list)."""
        bad = [f"{what} {value}" for what, value in (("loss", self.sums.value("ce")), ("aux loss", self.sums.value("aux")))
               if not math.isfinite(value)]
        if "mtp_ce" in self.sums and not bool(torch.isfinite(torch.cat([self.sums["mtp_ce"], self.sums["mtp_n"]])).all()):
            bad.append("mtp loss " + ", ".join(f"{v:g}" for v in self.sums["mtp_ce"].tolist()))
        return bad

    def normalisation_factor(self, accumulate_grad_batches: int, world_size: int) -> float:
        """What the averaged gradients are multiplied by to become the gradient of the objective above."""
        return accumulate_grad_batches * world_size / max(self.n_targets, 1.0)


@dataclass
class StepWindow:
    """Sums over the micro-batches of the optimizer step in progress (this rank)."""

    ce_sum: torch.Tensor | float = 0.0
    n_targets: torch.Tensor | float = 0.0
    aux_sum: torch.Tensor | float = 0.0
    tokens: float = 0
    micro_batches: int = 0
    aux_values: list[torch.Tensor] = field(default_factory=list)  # model aux loss of each micro-batch
    expert_counts: torch.Tensor | float = 0.0  # (L, E) top-k picks of real tokens, when balancing by bias
    router_stats: list[RouterStats] = field(default_factory=list)  # per micro-batch, when collected
    mtp_ce: torch.Tensor | float = 0.0  # (D,) MTP CE sums per depth
    mtp_n: torch.Tensor | float = 0.0  # (D,) MTP targets per depth

    def add(self, out: MoeOutput, tokens: float, *, expert_counts: bool, router_stats: bool) -> None:
        """One micro-batch's forward output (`tokens`: its real tokens, this rank's share of a split row)."""
        if out.mtp is not None:
            self.mtp_ce = self.mtp_ce + out.mtp.ce.detach().double()
            self.mtp_n = self.mtp_n + out.mtp.num_targets.double()
        self.ce_sum = self.ce_sum + out.ce_loss.detach()
        self.n_targets = self.n_targets + out.num_label_tokens.to(out.ce_loss.dtype).detach()
        self.aux_sum = self.aux_sum + out.aux_loss.detach()
        self.aux_values.append(out.aux_loss.detach())
        self.tokens += tokens
        self.micro_batches += 1
        if expert_counts:
            self.expert_counts = self.expert_counts + out.expert_token_counts.detach()
        if router_stats and out.router_logits is not None:
            self.router_stats.append(RouterStats.from_router_outputs(out.router_logits, out.expert_token_counts,
                                                                     out.token_mask))

    def reduce(self, device: torch.device, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor], mtp_depths: int,
               count_shape: tuple[int, int] | None) -> StepTotals:
        """Every field summed over the ranks in one all-reduce. `count_shape` (L, E): the expert counts ride along
        (integers: exact in float64); a window without any micro-batch sums to zeros of the declared shapes."""
        sums = GlobalSums(device, n_targets=self.n_targets, ce=self.ce_sum, aux=self.aux_sum, tokens=self.tokens,
                          micro_batches=self.micro_batches)
        if mtp_depths:
            sums.add("mtp_ce", self.mtp_ce, (mtp_depths,))
            sums.add("mtp_n", self.mtp_n, (mtp_depths,))
        if count_shape is not None:
            counts = torch.as_tensor(self.expert_counts)
            if counts.dim() and tuple(counts.shape) != count_shape:
                raise RuntimeError(f"expert counts of shape {tuple(counts.shape)} for {count_shape[0]} routers of "
                                   f"{count_shape[1]} experts: the model's count rows must be its MoE decoder "
                                   "layers, in order")
            sums.add("expert_counts", counts, count_shape)
        return StepTotals(sums.reduced(sum_over_ranks))

    def summary(self, index: int, totals: StepTotals) -> StepSummary:
        return StepSummary(index, totals.loss, totals.n_targets, tuple(self.aux_values), tuple(self.router_stats),
                           totals.tokens)


def scale_gradients_(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(factor)
