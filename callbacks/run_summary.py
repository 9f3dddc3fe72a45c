"""`RunSummaryPlot`: one figure of the whole run, `<default_root_dir>/run_summary.png`, written when fit ends.

Panels: train / val loss, aux loss, expert-load CV and dead experts over optimizer steps (see `heatmap.py`), taken
from what the module and the MoE callbacks logged: after every optimizer step each metric of interest is recorded
at its latest logged value (the expert statistics change once per window, so they draw as steps), val/loss after
each validation. Global rank 0 draws it (also logged to TensorBoard); nothing is gathered, the logged values already
are global.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from .heatmap import save_figure, summary_figure
from .run_report import output_line

TRAIN_KEYS = ("train/loss", "moe/aux_loss", "train/aux_loss", "experts/cv", "experts/dead")


class RunSummaryPlot(pl.Callback):
    def __init__(self, filename: str = "run_summary.png"):
        """
        Args:
            filename: written under the trainer's default_root_dir.
        """
        self.filename = filename
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.path: Path | None = None
        self._last_step = -1

    def _record(self, key: str, step: int, value) -> None:
        self.history.setdefault(key, []).append((step, float(value)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: nothing new yet
            return
        self._last_step = step
        metrics = trainer.callback_metrics
        for key in TRAIN_KEYS:
            if key in metrics:
                self._record(key, step, metrics[key])

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self._record("val/loss", trainer.global_step, trainer.callback_metrics["val/loss"])

    def output_lines(self) -> list[str]:
        return [output_line("summary", self.path)] if self.path is not None else []

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        fig, title = summary_figure(self.history, title=f"run summary: {trainer.global_step} optimizer steps")
        self.path, image = save_figure(fig, title, os.path.join(trainer.default_root_dir, self.filename))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("run/summary", image, trainer.global_step, dataformats="HWC")
