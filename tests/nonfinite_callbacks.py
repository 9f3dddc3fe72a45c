"""Test-only callbacks for the non-finite step checks, importable by `cli.py` subprocesses (the tests put this
directory on PYTHONPATH)."""

from __future__ import annotations

import lightning.pytorch as pl


class PoisonGradientOnRank(pl.Callback):
    """At optimizer step `step` (1-based), set one element of this rank's local gradient of the first parameter
    whose name contains `name` to NaN, on global rank `rank` only: the other ranks see finite local values."""

    def __init__(self, step: int = 2, rank: int = 1, name: str = "mlp.experts."):
        self.step, self.rank, self.name = step, rank, name

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 != self.step or trainer.global_rank != self.rank:
            return
        for n, p in pl_module.model.named_parameters():
            if self.name in n and p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.view(-1)[0] = float("nan")
                print(f"rank {self.rank}: poisoned the gradient of {n} at step {self.step}", flush=True)
                return
        raise RuntimeError(f"no parameter with a gradient matches {self.name!r}")
