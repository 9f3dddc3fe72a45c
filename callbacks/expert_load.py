"""`ExpertLoadStats`: how evenly the routers spread tokens over experts, over a window of steps and all ranks.

Every micro-batch contributes its `RouterStats` (top-k pick counts per layer x expert, router probability and
entropy sums). They are summed locally over `window_steps` optimizer steps, then summed over data-parallel ranks
with ONE all-reduce, and logged:
    experts/max_mean_ratio        mean over layers of (max expert load / mean expert load); 1.0 = balanced
    experts/max_mean_ratio_worst  the largest per-layer ratio
    experts/cv                    mean over layers of the coefficient of variation (std / mean) of expert loads
    experts/dead                  (layer, expert) pairs that received no token in the window
    experts/router_entropy        mean router entropy per token (nats), mean over layers
    experts/router_entropy_norm   the same divided by log(num_experts) (1.0 = uniform router)
    experts/window_tokens         routed tokens in the window (all ranks)
The last window's totals are kept in `self.last_counts` (L x E) and `self.last_summary` for inspection.

Every `heatmap_every_n_steps` (at the first window end on or after each multiple) a layers x experts heatmap of
the window's relative load (`heatmap.py`: labelled axes, colour bar in x uniform share, dead experts crossed out,
step / CV / max-mean / dead in the title) is written to `<dirpath>/expert_load_step{step:07d}.png` (default dirpath:
`<default_root_dir>/expert_load`) on global rank 0, and logged with `add_image` when the logger is TensorBoard.
Token counts follow the model's `expert_token_counts` (what the routers actually picked, top-k per token).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from qmoe_lightning.router_stats import ReadsRouterStats, RouterStats, moe_layer_indices

from .heatmap import load_heatmap_figure, save_figure
from .module_contract import require_qmoe_module
from .run_report import output_line


class ExpertLoadStats(ReadsRouterStats, pl.Callback):
    def __init__(self, window_steps: int = 10, heatmap_every_n_steps: int | None = 100, dirpath: str | None = None,
                 per_layer: bool = False):
        """
        Args:
            window_steps: optimizer steps aggregated into one measurement.
            heatmap_every_n_steps: write (and log) the layers x experts heatmap this often; None disables it.
            dirpath: where heatmaps are written (default `<default_root_dir>/expert_load`).
            per_layer: also log each layer's max/mean ratio and entropy (experts/layer_{l}/...).
        """
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.window_steps = window_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.dirpath = dirpath
        self.per_layer = per_layer
        self._acc: RouterStats | None = None
        self._steps_in_window = 0
        self._last_index = 0
        self._next_heatmap = heatmap_every_n_steps
        self.last_counts: torch.Tensor | None = None
        self.last_summary: dict[str, float] = {}
        self.heatmaps: list[Path] = []

    def _dir(self, trainer) -> Path:
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "expert_load"))

    def setup(self, trainer, pl_module, stage: str) -> None:
        require_qmoe_module(pl_module, self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.last_step
        if step is None or step.index <= self._last_index:  # no new optimizer step since the last batch
            return
        self._last_index = step.index
        for s in step.router_stats:
            self._acc = s if self._acc is None else self._acc.merge(s)
        self._steps_in_window += 1
        if self._steps_in_window >= self.window_steps:
            self._flush(trainer, pl_module)

    def output_lines(self) -> list[str]:
        return [output_line("heatmaps", f"{self.heatmaps[-1].parent} ({len(self.heatmaps)})")] if self.heatmaps else []

    def on_train_end(self, trainer, pl_module) -> None:
        # a partial last window still says something: report it rather than drop it (collective on all ranks)
        if self._steps_in_window > 0:
            self._flush(trainer, pl_module, force_heatmap=bool(not self.heatmaps and self.heatmap_every_n_steps),
                        at_end=True)

    def _flush(self, trainer, pl_module, force_heatmap: bool = False, at_end: bool = False) -> None:
        local = self._acc
        self._acc, self._steps_in_window = None, 0
        if local is None:
            return
        flat = trainer.strategy.reduce(local.flat().to(pl_module.device), reduce_op="sum")
        stats = local.unflat(flat.cpu())
        self.last_counts = stats.counts.round().long()
        load = stats.load_summary()
        entropy = stats.mean_entropy()
        E = stats.num_experts
        summary = {
            "experts/max_mean_ratio": float(load["max_mean_ratio"].mean()),
            "experts/max_mean_ratio_worst": float(load["max_mean_ratio"].max()),
            "experts/cv": float(load["cv"].mean()),
            "experts/dead": float(load["dead"].sum()),
            "experts/router_entropy": float(entropy.mean()),
            "experts/router_entropy_norm": float(entropy.mean() / math.log(E)) if E > 1 else 1.0,
            "experts/window_tokens": float(stats.tokens),
        }
        if self.per_layer:
            for row, layer in enumerate(moe_layer_indices(pl_module, stats.num_layers)):
                summary[f"experts/layer_{layer}/max_mean_ratio"] = float(load["max_mean_ratio"][row])
                summary[f"experts/layer_{layer}/router_entropy"] = float(entropy[row])
        self.last_summary = summary
        if not at_end:
            pl_module.log_dict(summary)
        elif trainer.is_global_zero:  # Lightning refuses self.log in on_train_end: straight to the loggers
            for logger in trainer.loggers:
                logger.log_metrics(summary, step=trainer.global_step)
        step = trainer.global_step
        due = self._next_heatmap is not None and step >= self._next_heatmap
        if due or force_heatmap:
            if self.heatmap_every_n_steps:
                while self._next_heatmap is not None and self._next_heatmap <= step:
                    self._next_heatmap += self.heatmap_every_n_steps
            if trainer.is_global_zero:
                self._write_heatmap(trainer, self.last_counts.numpy(), step,
                                    moe_layer_indices(pl_module, self.last_counts.shape[0]))

    def _write_heatmap(self, trainer, counts, step: int, layers: list[int] | None = None) -> None:
        fig, title = load_heatmap_figure(counts, step, layers=layers)
        path, image = save_figure(fig, title, self._dir(trainer) / f"expert_load_step{step:07d}.png")
        self.heatmaps.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("experts/load_heatmap", image, step, dataformats="HWC")
