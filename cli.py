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
  fit the model's embedding stops the run, see `callbacks.DataMatchesModel`);
- `--ckpt_path last` resumes from the newest `last*.ckpt` of `<default_root_dir>/checkpoints` when the config uses
  `RunCheckpoint` (`last.ckpt`; `last-v1.ckpt` after a second fresh fit into the same directory, which Lightning
  versions instead of overwriting the first run's), resolved once, by Lightning's own code, and then both checked
  and loaded; a resume continues the saved run exactly (optimizer and schedule state included), so model settings
  that differ from the checkpoint's (`--model.lr 0.5`) stop the run with a message saying what differs and what to
  do, instead of being silently replaced by the checkpoint's (Lightning's behaviour) or ignored by the restored
  schedule;
  validate / test / predict only read the weights, so only the settings that shape the model must match;
- a `--ckpt_path` that does not exist, is no checkpoint, is a distributed checkpoint directory in a run whose
  strategy cannot read one, or whose pickled parts refer to anything but plain data (`checkpoint_safety`: a
  checkpoint from elsewhere must not run code) stops the run with exit 2 naming it; checkpoints are loaded with
  `weights_only=True` unless `--weights_only false` is given;
- fit and predict hold `<default_root_dir>/.qmoe_run.lock` while they run (`qmoe_lightning.run_lock`): a second
  one into the same directory stops with exit 2 naming the first (pid, host, start time); a lock left by a killed
  run is taken over with a warning;
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

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import DataMatchesModel, ResumePosition, RunCheckpoint, StepProgressBar, TokensPerSecond
from callbacks.predictions import PredictionWriter
from callbacks.preemption import Preempted, PreemptionCheckpoint
from callbacks.run_report import output_line
from qmoe_lightning.export_dir import NonFiniteError
from data_modules.datamodule import MultimodalPackingDataModule
from qmoe_lightning.lightning_module import QMoELightningModule
from qmoe_lightning.startup_noise import silence_third_party_noise


# module arguments a checkpoint may differ in: they do not shape the training state (decoding options of predict)
NOT_TRAINING_SETTINGS = {"generation", "nonfinite", "nonfinite_max_skips"}  # a resume after a NaN stop may skip
# exit code of a run stopped by a NaN / inf loss or gradient (2: bad input, 143: SIGTERM)
EXIT_NONFINITE = 3
# what makes a checkpoint's tensors fit the model (the only settings validate / test / predict compare)
# (router_balancing: a bias / both checkpoint holds the routers' balancing bias, which also changes the routing)
MODEL_SHAPE_SETTINGS = {"pretrained", "model_config", "text_only", "lora", "processor_source", "mtp",
                        "router_balancing"}


class SaveConfigBesideCheckpoints(SaveConfigCallback):
    """Writes the run's config next to its checkpoints (`config.yaml` + a timestamped copy), overwriting safely."""

    saved_to: str | None = None

    def output_lines(self) -> list[str]:
        return [output_line("config", self.saved_to)] if self.saved_to else []

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
            self.parser.save(self.config, stamped, skip_unset=False, overwrite=True, multifile=self.multifile)
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
        `--trainer.enable_progress_bar false` must not meet a progress bar callback it refuses), plus
        `PreemptionCheckpoint`, `PredictionWriter`, `TokensPerSecond`, `DataMatchesModel` and `ResumePosition` unless
        the config names its own."""
        from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(c, ProgressBar) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, StepProgressBar()]
        if not any(isinstance(c, PreemptionCheckpoint) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, PreemptionCheckpoint()]  # SIGTERM: finish the step, checkpoint, exit 143
        if not any(isinstance(c, BasePredictionWriter) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, PredictionWriter()]  # predict: predictions.jsonl and the exact match
        # train/tokens_per_s; the tokenizer fits the model; a resume on another layout keeps its position
        for kind in (TokensPerSecond, DataMatchesModel, ResumePosition):
            if not any(isinstance(c, kind) for c in [*configured, *callbacks]):
                callbacks = [*callbacks, kind()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        """data.model_path unset: the processor of the model that trains (its tokenizer must index its embedding)."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        _check_model_source("model.pretrained", cfg["model"].get("pretrained"))
        _check_model_source("model.processor_source", cfg["model"].get("processor_source"))
        _check_model_source("data.model_path", cfg["data"].get("model_path"))
        if cfg["data"].get("model_path") is None:
            model = cfg["model"]
            source = model.get("processor_source") or model.get("pretrained")
            cfg["data"]["model_path"] = source if source is not None else "embedded"

    def _parse_ckpt_path(self) -> None:
        """Replaces Lightning's, which overwrites the model section with the checkpoint's hyperparameters and so
        silently drops `--model.*` overrides (and the saved config then records values the user did not ask for).
        The checkpoint is checked in `_run_subcommand` instead, once the trainer exists: `last` can only be
        resolved the way Lightning resolves it with the trainer's checkpoint callbacks."""

    def _run_subcommand(self, subcommand: str) -> None:
        """The run directory's lock (fit, predict), then the checkpoint checks, then Lightning's subcommand; the
        lock is given back however the command ends."""
        lock = _take_run_lock(self.trainer, subcommand)
        try:
            self._check_ckpt_path(subcommand)
            super()._run_subcommand(subcommand)
        finally:
            if lock is not None:
                lock.release()

    def _check_ckpt_path(self, sub: str) -> None:
        """`--ckpt_path` resolved to the file or directory Lightning will load (which the trainer is then given, so
        the checked one is the loaded one), refused with exit 2 when missing, unreadable by this run's strategy,
        unsafe to unpickle, or saved with model settings that differ from the run's."""
        init = self.config_init[sub]
        if "weights_only" in init and init.get("weights_only") is None:
            # torch.load's own default is weights_only=True, but not for URLs (Lightning passes False there) nor
            # under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: a checkpoint is never trusted to carry code here
            init["weights_only"] = True
        path = _resolve_ckpt_path(self.trainer, sub, init.get("ckpt_path"))
        if path is None:
            return
        init["ckpt_path"] = str(path)
        cfg = self.config[sub]
        saved = _checkpoint_hparams(path, self.trainer.strategy)
        given = cfg["model"].as_dict() if isinstance(cfg["model"], Namespace) else dict(cfg["model"])
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


def _check_model_source(key: str, value) -> None:
    """A model / processor source that is neither an existing directory nor a hub id ('org/name', fetched later)
    nor the embedded sentinel: exit 2 naming it, before anything is built (the first to read it would otherwise be
    the data preparation, with a bare "No such file or directory")."""
    if value is None:
        return
    from qmoe_lightning.embedded import embedded_model_name
    from qmoe_lightning.models.checkpoint import is_hub_id

    try:
        if embedded_model_name(value) is not None:
            return
    except ValueError as err:  # embedded:<unknown>
        _refuse(f"--{key} {value}: {err}")
    path = Path(str(value)).expanduser()
    if path.is_dir() or (is_hub_id(value) and not path.exists()):
        return
    if path.exists():
        _refuse(f"--{key} {value} is a file; expected a Hugging Face model directory (config.json, *.safetensors, "
                "the tokenizer / processor files), a hub model id ('org/name') or 'embedded'")
    _refuse(f"--{key} {value} is neither a local directory (no directory {path.resolve()}) nor a hub model id "
            "('org/name'); expected a Hugging Face model directory, a hub id or 'embedded'")


# what a --ckpt_path is expected to be, in the refusals
_EXPECTED_CKPT = ("expected a .ckpt file or a distributed checkpoint directory written by a fit (e.g. "
                  "<default_root_dir>/checkpoints/last.ckpt, or `--ckpt_path last`)")


def _refuse(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def _take_run_lock(trainer, subcommand: str):
    """fit and predict write into the run directory (checkpoints, config.yaml, exports, predictions.jsonl): one
    such command at a time (qmoe_lightning.run_lock). validate / test only add timestamped config copies and
    versioned logs, so they may run beside a fit. Global rank 0 only, before it starts the other ranks (Lightning
    starts them inside trainer.fit): a refused run starts none. Under torchrun / SLURM the other ranks already run
    and end when rank 0's exit ends the job."""
    if subcommand not in ("fit", "predict") or trainer.global_rank != 0:
        return None
    from qmoe_lightning.run_lock import RunLock, RunLockHeld

    lock = RunLock(trainer.default_root_dir)
    try:
        lock.acquire()
    except RunLockHeld as held:
        _refuse(str(held))
    return lock


def _resolve_ckpt_path(trainer, subcommand: str, ckpt_path) -> Path | None:
    """The checkpoint Lightning will load for `ckpt_path`, or None when there is nothing to check (no path; `last`
    with no checkpoint yet, which Lightning starts fresh from with a warning; `best` / `hpc` / registry names and
    URLs, which Lightning resolves itself). `last` is resolved by Lightning's own code on this trainer: the newest
    `last*.ckpt` (by modification time) of the checkpoint callbacks' directories, so after two fresh fits into one
    directory it is the second's `last-v1.ckpt`, not `last.ckpt`. A path that does not exist is refused."""
    if not ckpt_path:
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        import warnings

        from lightning.pytorch.trainer.states import TrainerFn

        with warnings.catch_warnings():  # "no last checkpoint": Lightning says it itself when the run starts
            warnings.simplefilter("ignore")
            found = trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn(subcommand), "last", model_provided=True, model_connected=False)
        return Path(found) if found else None
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return None
    path = Path(ckpt_path)
    if not path.exists():
        _refuse(f"--ckpt_path {path}: no such file or directory; {_EXPECTED_CKPT}")
    return path


def _checkpoint_hparams(path: Path, strategy=None) -> dict:
    """The module hyperparameters saved in a Lightning checkpoint file or distributed checkpoint directory, read
    without unpickling anything but plain data (exit 2 naming the path otherwise). A distributed checkpoint's
    `.metadata` goes through `checkpoint_safety` (torch would unpickle it freely), and is refused where `strategy`
    (given) cannot read a directory at all."""
    import torch

    if path.is_dir():
        from qmoe_lightning.parallel.checkpoint_safety import METADATA_FILE, UnsafeCheckpointError, read_dcp_metadata
        from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

        if not (path / METADATA_FILE).is_file():
            _refuse(f"--ckpt_path {path} is a directory without {METADATA_FILE}, so not a distributed checkpoint; "
                    f"{_EXPECTED_CKPT}")
        # Lightning's own FSDP / ModelParallel strategies read such a directory too, but through torch's default
        # planner, which unpickles its non-tensor items freely (code in a .distcp file would run): only ours loads
        # it through checkpoint_safety
        if strategy is not None and not isinstance(strategy, ExpertParallelStrategy):
            _refuse(f"--ckpt_path {path} is a distributed checkpoint directory (written by a multi-process run), "
                    f"which this run's strategy ({type(strategy).__name__}) cannot read safely: it loads .ckpt "
                    "files (Lightning's sharded strategies would unpickle the directory's items). Run with the "
                    "strategy that wrote it (qmoe_lightning.parallel.strategy.ExpertParallelStrategy; the run's own "
                    "config, saved beside its checkpoints as config.yaml), or start from its weights as a new run: "
                    "--model.pretrained <default_root_dir>/hf_export (without --ckpt_path)")
        try:
            read_dcp_metadata(path)
        except UnsafeCheckpointError as err:
            _refuse(f"--ckpt_path {path}: {err}")
        except Exception as err:
            _refuse(f"--ckpt_path {path}: its {METADATA_FILE} is not readable distributed checkpoint metadata "
                    f"({type(err).__name__}: {err}); {_EXPECTED_CKPT}")
    meta = path / "meta.pt" if path.is_dir() else path
    try:
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} is missing")
        ckpt = torch.load(meta, weights_only=True, map_location="cpu", mmap=True)  # tensors stay on disk
        if not isinstance(ckpt, dict):
            raise TypeError(f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
    except Exception as err:  # Lightning would fail later with an IndexError that does not name the file
        _refuse(f"--ckpt_path {path}: not a readable Lightning checkpoint ({type(err).__name__}: {err}); "
                f"{_EXPECTED_CKPT}")
    return {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}


def _canonical(value) -> str:
    if isinstance(value, Namespace):  # jsonargparse's section of the config
        value = value.as_dict()
    return json.dumps(value, sort_keys=True, default=str)  # tuples and lists both become JSON arrays


def main(args=None, run: bool = True) -> QMoECLI:
    silence_third_party_noise()
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


def exit_after_distributed_run(code: int = 0) -> None:
    """End a finished multi-process run without the interpreter's teardown. After a successful run (checkpoints and
    exports written, loggers finalised by Lightning), the C++ objects of torch.distributed (gloo threads, stores) are
    sometimes destroyed in an order that ends the process in std::terminate ("terminate called without an active
    exception", exit code -6), even with the process group destroyed first: seen on gloo in CI, in this app and in a
    test script. Nothing is left to do at that point, so the process leaves with os._exit(code) after flushing its
    output. Single-process runs end normally."""
    import torch.distributed as dist

    from qmoe_lightning.parallel.strategy import was_distributed

    if was_distributed() or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    try:
        main()
    except Preempted as stop:  # the checkpoint is written; leave like a finished distributed run, but with 143
        exit_after_distributed_run(stop.code)
        raise
    except NonFiniteError as err:  # one paragraph (step, quantity, groups, what to do), not a traceback
        sys.stderr.write(f"error: {err}\n")
        exit_after_distributed_run(EXIT_NONFINITE)
        raise SystemExit(EXIT_NONFINITE) from None
    exit_after_distributed_run()
