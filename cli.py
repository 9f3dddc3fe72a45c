"""Command line of qmoe_lightning: `python cli.py {fit,validate,test} --config configs/X.yaml [--a.b value ...]`.

A LightningCLI (jsonargparse) over `QMoELightningModule` and `MultimodalPackingDataModule`:
- every argument is typed and documented from the classes' docstrings (`python cli.py fit --help`); unknown keys
  and wrong types fail at parse time, before anything is built, with the offending key in the message;
- dotted overrides: `--trainer.max_steps 10 --data.train_path d.jsonl --trainer.default_root_dir runs/x`;
- `--print_config` prints the fully resolved config;
- the config of every run is saved beside its checkpoints: `<checkpoint dir>/config.yaml` (the latest run) plus
  `config-<UTC time>.yaml` (kept per run), so re-running into the same directory never fails and never loses the
  config of an earlier run. Without a checkpoint callback it goes to the logger's directory instead;
- `--ckpt_path last` resumes from `<default_root_dir>/checkpoints/last.ckpt` when the config uses `RunCheckpoint`.
The optimizer and schedule are the module's own (`model.lr`, `model.warmup_steps`, ...), so the CLI's generic
`--optimizer` / `--lr_scheduler` groups are not added.
"""

from __future__ import annotations

import os
import shutil
import time

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import RunCheckpoint
from data_modules.datamodule import MultimodalPackingDataModule
from qmoe_lightning.lightning_module import QMoELightningModule


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Writes the run's config next to its checkpoints (`config.yaml` + a timestamped copy), overwriting safely."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        target = None
        # Lightning moves checkpoint callbacks to the end of the list, so their setup has not run yet here
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint):
                cb._default_dir(trainer)
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                target = str(cb.dirpath)
                break
        if target is None:
            target = trainer.log_dir or trainer.default_root_dir
        target = trainer.strategy.broadcast(target)
        if trainer.is_global_zero:
            os.makedirs(target, exist_ok=True)
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:] + "Z"
            stamped = os.path.join(target, f"config-{stamp}.yaml")
            self.parser.save(self.config, stamped, skip_none=False, overwrite=True, multifile=self.multifile)
            tmp = os.path.join(target, f".{self.config_filename}.tmp")
            shutil.copyfile(stamped, tmp)
            os.replace(tmp, os.path.join(target, self.config_filename))  # atomic: never a half-written config
            self.saved_to = os.path.join(target, self.config_filename)
        self.already_saved = True
        trainer.strategy.barrier("save_config")


class QMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})


def main(args=None, run: bool = True) -> QMoECLI:
    return QMoECLI(
        QMoELightningModule,
        MultimodalPackingDataModule,
        save_config_callback=SaveConfigBesideCheckpoints,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "yaml"},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
