"""Test-only callback for the preemption tests, importable by `cli.py` subprocesses (the tests put this directory on
PYTHONPATH)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


class MarkTraining(pl.Callback):
    """Writes `path` once the run has taken `after_step` optimizer steps: the test then knows training is under way
    (and the SIGTERM handler installed) before it sends the signal from outside."""

    def __init__(self, path: str, after_step: int = 1):
        self.path, self.after_step = Path(path), after_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.after_step and not self.path.exists():
            self.path.write_text(str(trainer.global_step))
