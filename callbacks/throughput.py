"""`TokensPerSecond`: `train/tokens_per_s`, the real (non-padding) tokens of every rank per second of training.

Wall time between the ends of consecutive optimizer steps (the first from the start of training); an in-fit
validation's time is taken out. The token count is the step's global one (`last_step.tokens`: summed over the ranks
in the step's own all-reduce, a row split over context-parallel ranks counted once), so no collective is added.
The CLI adds it to every run that does not name one.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback

from .module_contract import require_qmoe_module


class TokensPerSecond(Callback):
    def __init__(self) -> None:
        self._t_prev: float | None = None  # end of the last optimizer step
        self._t_pause: float | None = None  # start of an in-fit validation
        self._last_index = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        require_qmoe_module(pl_module, self)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t_prev = time.perf_counter()
        self._last_index = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.last_step
        if step is None or step.index <= self._last_index or self._t_prev is None:
            return  # inside an accumulation window: no step ended
        self._last_index = step.index
        now = time.perf_counter()
        dt, self._t_prev = now - self._t_prev, now
        if dt > 0:
            pl_module.log("train/tokens_per_s", step.tokens / dt, prog_bar=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t_pause = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._t_prev is not None and self._t_pause is not None:
            self._t_prev += time.perf_counter() - self._t_pause
        self._t_pause = None
