"""What the project's callbacks read from the LightningModule: the typed state of a `QMoELightningModule`
(`last_step`, `step_in_progress`, `checkpoint_source`, `parallelized`, `model`, `hparams`).

Checked once, when the callback is set up: a callback attached to another LightningModule stops the run at its
start naming itself, instead of an AttributeError mid-run (or, with attribute probes, silently doing nothing).
"""

from __future__ import annotations


def require_qmoe_module(pl_module, callback) -> None:
    from qmoe_lightning.lightning_module import QMoELightningModule

    if not isinstance(pl_module, QMoELightningModule):
        raise TypeError(f"{type(callback).__name__} reads the state of a QMoELightningModule (the step summaries, "
                        f"the native model); this run's module is a {type(pl_module).__name__}")
