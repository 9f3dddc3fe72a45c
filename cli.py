"""Command line of qmoe_lightning: `python cli.py {fit,validate,test,predict} --config configs/X.yaml [--a.b value ...]`.

A LightningCLI (jsonargparse) over `QMoELightningModule` and `MultimodalPackingDataModule`:
- every argument is typed and documented from the classes' docstrings (`python cli.py fit --help`); unknown keys
  and wrong types fail at parse time, before anything is built, with the offending key in the message;
- dotted overrides: `--trainer.max_steps 10 --data.train_path d.jsonl --trainer.default_root_dir runs/x`;
- `--print_config` prints the fully resolved config;
- the config of every run is saved beside its checkpoints: `<checkpoint dir>/config.yaml` (the latest fit) plus
  `config-<UTC time>.yaml` (kept per run; `config-<stage>-<UTC time>.yaml` for validate / test / predict, which
  never replace the fit's config.yaml that a resume is told to use), so re-running into the same directory never
  fails and never loses the config of an earlier run. Without a checkpoint callback it goes to the logger's
  directory instead;
- `predict` answers the prompts of `--data.predict_path` with transformers' `generate` on the trained model
  (`--model.generation.*`: greedy by default) and writes `<default_root_dir>/predictions.jsonl`;
- `data.model_path` (the processor the data is tokenised with) follows `model.pretrained` unless given: training a
  real model on the embedded tokenizer's ids cannot happen by omission (and a processor whose vocabulary does not
  fit the model's embedding stops the run, see `QMoELightningModule.on_fit_start`);
- `--ckpt_path last` resumes from `<default_root_dir>/checkpoints/last.ckpt` when the config uses `RunCheckpoint`;
  a resume continues the saved run exactly (optimizer and schedule state included), so model settings that differ
  from the checkpoint's (`--model.lr 0.5`) stop the run with a message saying what differs and what to do, instead
  of being silently replaced by the checkpoint's (Lightning's behaviour) or ignored by the restored schedule;
  validate / test / predict only read the weights, so only the settings that shape the model must match;
The optimizer and schedule are the module's own (`model.lr`, `model.warmup_steps`, ...), so the CLI's generic
`--optimizer` / `--lr_scheduler` groups are not added.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import RunCheckpoint, StepProgressBar
from data_modules.datamodule import MultimodalPackingDataModule
from qmoe_lightning.lightning_module import QMoELightningModule


# module arguments a checkpoint may differ in: they do not shape the training state (decoding options of predict)
NOT_TRAINING_SETTINGS = {"generation"}
# what makes a checkpoint's tensors fit the model (the only settings validate / test / predict compare)
# (router_balancing: a bias / both checkpoint holds the routers' balancing bias, which also changes the routing)
MODEL_SHAPE_SETTINGS = {"pretrained", "model_config", "text_only", "lora", "processor_source", "mtp",
                        "router_balancing"}


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Writes the run's config next to its checkpoints (`config.yaml` + a timestamped copy), overwriting safely."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        target = None
        # Lightning moves checkpoint callbacks to the end of the list, so their setup has not run yet here
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint):
                cb.resolve_dirpath(trainer)
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
            stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
            fit = stage == "fit"
            stamped = os.path.join(target, f"config-{stamp}.yaml" if fit else f"config-{stage}-{stamp}.yaml")
            self.parser.save(self.config, stamped, skip_none=False, overwrite=True, multifile=self.multifile)
            self.saved_to = stamped
            if fit:  # config.yaml is the config a resume uses: a predict / validate config must not replace it
                tmp = os.path.join(target, f".{self.config_filename}.tmp")
                shutil.copyfile(stamped, tmp)
                os.replace(tmp, os.path.join(target, self.config_filename))  # atomic: never a half-written config
                self.saved_to = os.path.join(target, self.config_filename)
        self.already_saved = True
        trainer.strategy.barrier("save_config")


class QMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})

    def _instantiate_trainer(self, config, callbacks):
        """Lightning's, plus `StepProgressBar` as the progress bar ("Epoch N", not "Epoch N/-2") when the config
        shows one and names none of its own (added here, not to the saved config: a rerun with
        `--trainer.enable_progress_bar false` must not meet a progress bar callback it refuses)."""
        from lightning.pytorch.callbacks import ProgressBar

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """data.model_path unset: the processor of the model that trains (its tokenizer must index its embedding)."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg["data"].get("model_path") is None:
            model = cfg["model"]
            source = model.get("processor_source") or model.get("pretrained")
            cfg["data"]["model_path"] = source if source is not None else "embedded"

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which overwrites the model section with the checkpoint's hyperparameters and so
        silently drops `--model.*` overrides (and the saved config then records values the user did not ask for)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        path = _resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("trainer", {}).get("default_root_dir"))
        saved = _checkpoint_hparams(path) if path is not None else {}
        given = cfg["model"].as_dict() if hasattr(cfg["model"], "as_dict") else dict(cfg["model"])
        # fit resumes the run: every setting counts; validate / test / predict only read weights from it, so only
        # what shapes the model does (a different lr cannot change an evaluation)
        keys = set(saved) & set(given) - NOT_TRAINING_SETTINGS
        if sub != "fit":
            keys &= MODEL_SHAPE_SETTINGS
        differ = [k for k in sorted(keys) if _canonical(saved[k]) != _canonical(given[k])]
        if differ and sub != "fit":
            lines = "\n".join(f"  model.{k}: {given[k]!r} here, {saved[k]!r} in the checkpoint" for k in differ)
            sys.stderr.write(f"error: {sub} with weights from {path}, but the model it was trained as differs:\n"
                             f"{lines}\nUse the run's own config (saved beside its checkpoints as config.yaml).\n")
            raise SystemExit(2)
        if differ:
            lines = "\n".join(f"  model.{k}: {given[k]!r} here, {saved[k]!r} in the checkpoint" for k in differ)
            sys.stderr.write(
                f"error: resuming from {path}, but these model settings differ from the checkpoint's:\n{lines}\n"
                "A resume continues the saved run exactly (weights, optimizer and LR schedule state), so they cannot "
                "change here. Resume with the run's own config (saved beside its checkpoints as config.yaml), or "
                "train on with new settings as a new run from the exported weights: --model.pretrained "
                "<default_root_dir>/hf_export (without --ckpt_path).\n")
            raise SystemExit(2)


def _resolve_ckpt_path(ckpt_path, root) -> Path | None:
    if not ckpt_path:
        return None
    path = Path(root or "", "checkpoints", "last.ckpt") if ckpt_path == "last" else Path(ckpt_path)
    return path if path.exists() else None


def _checkpoint_hparams(path: Path) -> dict:
    """The module hyperparameters saved in a Lightning checkpoint file or distributed checkpoint directory."""
    import torch

    meta = path / "meta.pt" if path.is_dir() else path
    try:
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} is missing")
        ckpt = torch.load(meta, weights_only=True, map_location="cpu", mmap=True)  # tensors stay on disk
        if not isinstance(ckpt, dict):
            raise TypeError(f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
    except Exception as err:  # Lightning would fail later with an IndexError that does not name the file
        sys.stderr.write(f"error: --ckpt_path {path}: not a readable Lightning checkpoint ({type(err).__name__}: "
                         f"{err}); expected a .ckpt file or a distributed checkpoint directory written by a fit "
                         "(e.g. <default_root_dir>/checkpoints/last.ckpt, or `--ckpt_path last`)\n")
        raise SystemExit(2) from None
    return {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}


def _canonical(value) -> str:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.dumps(value, sort_keys=True, default=str)  # tuples and lists both become JSON arrays


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


def exit_after_distributed_run() -> None:
    """End a finished multi-process run without the interpreter's teardown. After a successful run (checkpoints and
    exports written, loggers finalised by Lightning), the C++ objects of torch.distributed (gloo threads, stores) are
    sometimes destroyed in an order that ends the process in std::terminate ("terminate called without an active
    exception", exit code -6), even with the process group destroyed first: seen on gloo in CI, in this app and in a
    test script. Nothing is left to do at that point, so the process leaves with os._exit(0) after flushing its
    output. Single-process runs end normally."""
    import torch.distributed as dist

    from qmoe_lightning.parallel.strategy import was_distributed

    if was_distributed() or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    exit_after_distributed_run()
