"""Test-only Lightning callbacks, importable by `cli.py` subprocesses (the tests put this directory on PYTHONPATH)."""

from __future__ import annotations

import lightning.pytorch as pl


class CrashAtStep(pl.Callback):
    """Raise on every rank when optimizer step `step` begins: a crash after `step` completed steps (all ranks fail
    together, so none is left waiting in a collective)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"CrashAtStep: simulated crash at step {self.step}")
