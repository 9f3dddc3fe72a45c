"""`StepGuard`: whether an optimizer step is taken, skipped, or stops the run, from global values only.

Non-finite steps (`model.nonfinite`): a step whose loss (all ranks) or gradient norm (all ranks, before clipping)
is NaN / inf never reaches the weights. Both values are already global (the loss sums ride in the step's
all-reduce, the norm is all-reduced by the clip), so every rank takes the same decision with no extra collective;
only then one more all-reduce finds which parameter groups (router, routed_experts, attention, lora, embeddings,
...) hold non-finite gradients, for the message. `stop` (default) raises `NonFiniteTrainingError` from the step on
every rank: nothing of that step is saved (no checkpoint, no export; the last checkpoint and export of a good step
stay as they were) and `cli.py` exits non-zero with the message. `skip` drops the step's gradients instead: the
optimizer steps nothing (weights and AdamW moments unchanged), the LR schedule is not advanced (as transformers'
Trainer does for an overflow step), the trainer's step count still is (`max_steps` counts skipped steps), the
routers' balancing bias is not moved, and `train/nonfinite_skips` counts them; more than `nonfinite_max_skips` in a
row stop the run as `stop` does. A step window without a single target token on any rank (every document of the
window dropped at decode time) is skipped the same way and counted as `train/empty_steps` (it is not an error: its
gradient is zero, but AdamW's momentum would still move the weights). The counters are kept in checkpoints
(`SkippedSteps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .export_dir import NonFiniteError

log = logging.getLogger(__name__)


class NonFiniteTrainingError(NonFiniteError):
    """A training step's loss or gradients went NaN / inf (model.nonfinite: stop, or too many skips in a row)."""


# parameter groups named in non-finite messages, in the order they are reported
NONFINITE_GROUPS = ("lora", "router", "routed_experts", "shared_expert", "attention", "linear_attention", "dense_mlp",
                    "embeddings", "lm_head", "vision", "mtp", "other")


def parameter_group(name: str) -> str:
    """The group of a native parameter name, as in the LoRA table (`lora.group_of`) with the routers, embeddings,
    LM head and MTP module apart and every adapter tensor under "lora"."""
    from .lora import group_of, is_adapter_key

    if is_adapter_key(name):
        return "lora"
    if name == "mtp" or name.startswith("mtp.") or ".mtp." in name:
        return "mtp"
    if name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.bias"):
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "lm_head"
    return group_of(name)


@dataclass
class StepVerdict:
    """What the step in progress is, decided in `on_before_optimizer_step` from global sums (same on every rank)."""

    index: int  # the step's number (global step after it)
    empty: bool  # no target token in the window on any rank
    bad_loss: list[str]  # loss terms that are NaN / inf ("loss nan", ...)
    bias_update: tuple | None = None  # (routers, global (L, E) counts): applied only if the step is taken


@dataclass
class SkippedSteps:
    """Steps not taken over the whole run (checkpointed with it)."""

    nonfinite: int = 0  # for a NaN / inf loss or gradient
    empty: int = 0  # for having no target token
    nonfinite_in_row: int = 0  # the current run of non-finite steps

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> SkippedSteps:
        state = state or {}
        return cls(**{k: int(state.get(k, 0)) for k in ("nonfinite", "empty", "nonfinite_in_row")})


class StepGuard:
    def __init__(self, policy: str = "stop", max_skips: int = 5, lr: float | None = None) -> None:
        """policy: "stop" or "skip" (model.nonfinite); max_skips: model.nonfinite_max_skips; lr: for the message."""
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {policy!r}")
        if not (isinstance(max_skips, int) and max_skips >= 0):
            raise ValueError(f"nonfinite_max_skips must be an integer >= 0, got {max_skips!r}")
        self.policy, self.max_skips, self.lr = policy, max_skips, lr
        self.skipped = SkippedSteps()

    def empty_step(self, verdict: StepVerdict) -> None:
        """A window without any target token: counted, and the caller skips it."""
        self.skipped.empty += 1
        log.warning("step %d has no target token on any rank (every document of its window was dropped or has no "
                    "answer): skipped, %d so far", verdict.index, self.skipped.empty)

    def take(self, verdict: StepVerdict | None, norm: torch.Tensor | None,
             nonfinite_groups: Callable[[], tuple[list[str], list[str]]]) -> bool:
        """True: take the step. False: skip it (policy "skip", counted). Raises NonFiniteTrainingError when the run
        must stop. `verdict` and `norm` are global, so every rank returns the same; `nonfinite_groups` (a
        collective) is only called on the non-finite branch, which every rank then takes."""
        bad_norm = norm is not None and not bool(torch.isfinite(norm))
        if verdict is None or (not verdict.bad_loss and not bad_norm):
            self.skipped.nonfinite_in_row = 0
            return True
        what = list(verdict.bad_loss)
        if bad_norm:
            what.append(f"gradient norm {float(norm)}")
        groups, names = nonfinite_groups()
        if groups:
            what.append(f"non-finite gradients in {', '.join(groups)} (e.g. {', '.join(names)})")
        elif bad_norm:
            what.append("every gradient is finite: their norm overflowed")
        skipped = self.skipped
        if self.policy == "skip" and skipped.nonfinite_in_row < self.max_skips:
            skipped.nonfinite += 1
            skipped.nonfinite_in_row += 1
            log.warning("step %d skipped (model.nonfinite=skip, %d in a row, %d in all): %s", verdict.index,
                        skipped.nonfinite_in_row, skipped.nonfinite, "; ".join(what))
            return False
        why = ("model.nonfinite=stop" if self.policy != "skip" else
               f"{skipped.nonfinite_in_row + 1} non-finite steps in a row, more than model.nonfinite_max_skips="
               f"{self.max_skips}")
        raise NonFiniteTrainingError(
            f"training stopped at step {verdict.index} ({why}): {'; '.join(what)}. Nothing of this step was applied "
            "or saved: the last checkpoint and export written by an earlier step are unchanged. Usual causes: a "
            f"learning rate too high (model.lr is {self.lr:g}), no gradient clipping (trainer.gradient_clip_val), "
            "fp16 overflow. To skip such steps instead: --model.nonfinite skip (at most "
            "model.nonfinite_max_skips in a row).")


@torch.no_grad()
def nonfinite_gradient_groups(model: nn.Module, optimizer, reduce: Callable[[torch.Tensor], torch.Tensor],
                              device) -> tuple[list[str], list[str]]:
    """The parameter groups with a NaN / inf gradient on ANY rank, and up to 3 parameter names. Collectives (`reduce`
    and an all_gather_object): only called when every rank has found the step non-finite."""
    import torch.distributed as dist

    names = {id(p): n for n, p in model.named_parameters()}
    flags = torch.zeros(len(NONFINITE_GROUPS), dtype=torch.float32, device=device)
    local = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if g.numel() and not bool(torch.isfinite(g).all()):
                name = names.get(id(p), "?")
                k = NONFINITE_GROUPS.index(parameter_group(name))
                if not flags[k]:  # one example per group
                    local.append((k, name))
                flags[k] = 1.0
    flags = reduce(flags)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, local)
        local = sorted({example for examples in every for example in examples})
    examples = list({k: name for k, name in reversed(local)}.values())[::-1]  # first per group, group order
    return [g for g, f in zip(NONFINITE_GROUPS, flags.tolist()) if f > 0], examples[:3]
