"""`RunCheckpoint`: ModelCheckpoint whose directory is stable across runs: `<default_root_dir>/checkpoints`.

Lightning's default puts checkpoints under the logger's versioned directory (`lightning_logs/version_N/`), so a
second run into the same `default_root_dir` looks in a new, empty version directory and `--ckpt_path last` finds
nothing. Here the directory depends on `default_root_dir` only, so re-running into the same directory resumes
from its `last.ckpt`. `save_last` defaults to True for the same reason.
"""

from __future__ import annotations

import os
import re
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from qmoe_lightning.export_dir import NonFiniteError, refuse_nonfinite_model

from .module_contract import require_qmoe_module


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | None = None, save_last: bool | None = True, **kwargs):
        """
        Args:
            dirpath: checkpoint directory (default `<default_root_dir>/checkpoints`).
            save_last: also keep `last.ckpt` (what `--ckpt_path last` resumes from).
            **kwargs: any other `ModelCheckpoint` argument (every_n_train_steps, save_top_k, monitor, ...).
        """
        super().__init__(dirpath=dirpath, save_last=save_last, **kwargs)
        self._dirpath_given = dirpath is not None

    def resolve_dirpath(self, trainer) -> None:
        """dirpath := <default_root_dir>/checkpoints unless given (also what the CLI saves the config beside)."""
        if not self._dirpath_given:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        require_qmoe_module(pl_module, self)
        self.resolve_dirpath(trainer)
        with warnings.catch_warnings():
            if _only_configs(self.dirpath):  # the CLI's config.yaml is written here first: a fresh run is no warning
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # `ckpt_path="last"` is resolved before the callbacks' setup: the directory must be known here already
        self.resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        model = trainer.lightning_module.model
        if model is not None:  # before anything is written or rotated out
            refuse_nonfinite_model(model, f"the checkpoint {filepath}")
        super()._save_checkpoint(trainer, filepath)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteError):
            rank_zero_info(f"no checkpoint written at the stop ({type(exception).__name__}); the last one of a good "
                           f"step stays in {self.dirpath}")
            return
        super().on_exception(trainer, pl_module, exception)


def _only_configs(dirpath) -> bool:
    """True when `dirpath` holds nothing but the CLI's saved configs (`config*.yaml` and their temporaries)."""
    try:
        names = os.listdir(dirpath)
    except OSError:
        return True
    return all(re.fullmatch(r"\.?config.*\.yaml(\.tmp)?", n) for n in names)
