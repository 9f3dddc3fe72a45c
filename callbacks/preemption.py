"""`PreemptionCheckpoint`: on SIGTERM, finish the optimizer step, save a resumable checkpoint, exit non-zero.

Schedulers (SLURM preemption and time limits, Kubernetes evictions, spot reclaims) send SIGTERM and kill the job a
grace period later. Lightning's own handling raises a `SystemExit` with code 0 after the current *batch*, in the
middle of a gradient-accumulation window, and saves nothing: the run looks successful and the work since the last
periodic checkpoint is gone. Here:

- the handler only records the signal (a signal handler must not run collectives: Lightning's broadcasts from inside
  its handler, which deadlocks when the ranks are in different collectives at that instant);
- at the end of every optimizer step (never inside an accumulation window: the step in progress is finished, so the
  checkpoint is at a step boundary and the resume is exact) the ranks agree whether any of them was signalled, with
  one scalar all-reduce; so a SIGTERM that reached only one process (`kill PID` of the launching process) stops
  every rank at the same step;
- then every rank takes part in `trainer.save_checkpoint` into the run's `last` checkpoint (the file or distributed
  checkpoint directory `--ckpt_path last` resumes from), rank 0 prints where it went and how to resume, and the run
  ends with `SystemExit(143)` (128 + SIGTERM, the shell's convention), so a job script sees the stop. Nothing is
  exported at a preemption: the export is the end-of-training artefact; the checkpoint carries the work.

A SIGTERM before the run's handlers are set (data preparation, model build) kills the process as usual: nothing
trained is lost. One during the sanity check or a validation inside the fit is acted on at the next optimizer step
(after the validation: a long validation can outlast a scheduler's grace period). One during the end-of-fit export
kills the process (the handler is removed when training ends): the export swap leaves the previous export whole. SLURM: a preempted job with `--requeue` restarts its batch script, whose `--ckpt_path last`
resumes (a first start without any checkpoint starts fresh); Lightning's SIGUSR1 auto-requeue is left as it is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

EXIT_CODE = 128 + signal.SIGTERM  # 143


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; its exit code is 143."""

    def __init__(self, message: str):
        super().__init__(EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, signum: int = signal.SIGTERM):
        """
        Args:
            signum: the signal that asks the run to stop (SIGTERM, what schedulers send before killing).
        """
        self.signum = signum
        self.received = False
        self._previous = None
        self._installed = False

    # ----------------------------------------------------------------------------- the handler
    def _on_signal(self, signum, frame) -> None:
        # only a flag: the step in progress finishes first, the ranks agree at its end (see the module doc)
        if not self.received:
            sys.stderr.write(f"[rank {os.environ.get('RANK', os.environ.get('LOCAL_RANK', '0'))}] received "
                             f"{signal.Signals(signum).name}: finishing the current optimizer step, then saving a "
                             "checkpoint\n")
        self.received = True

    def _install(self, trainer) -> None:
        # Lightning registers its handlers after `on_fit_start`, just before the sanity check: ours replaces it
        # from the first hook after that. A signal Lightning's handler caught in between is taken over.
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True
        if self.signum == signal.SIGTERM and trainer.received_sigterm:
            self.received = True

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def _uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_end(self, trainer, pl_module) -> None:
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._uninstall()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._uninstall()

    # ----------------------------------------------------------------------------- the stop
    def _any_rank_signalled(self, trainer, pl_module) -> bool:
        flag = torch.tensor(1.0 if self.received else 0.0, device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="sum")
        return bool(flag.item() > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.step_in_progress:  # inside an accumulation window: finish the step first
            return
        if not self._any_rank_signalled(trainer, pl_module):
            return
        path = save_last_checkpoint(trainer)
        message = (f"stopped by {signal.Signals(self.signum).name} after optimizer step {trainer.global_step}; "
                   f"resumable checkpoint: {path}\nresume with the same command plus `--ckpt_path last` (or "
                   f"`--ckpt_path {path}`)")
        if trainer.is_global_zero:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        raise Preempted(message)


def save_last_checkpoint(trainer) -> str:
    """Save where `--ckpt_path last` looks and return the path. With a checkpoint callback that keeps `last`
    (`RunCheckpoint`), its own save of `last`: this run's file, versioned past another run's (`last-v1.ckpt` in a
    directory a previous fit used, never overwriting that run's), through its checks (RunCheckpoint refuses
    non-finite weights). Without one, `<default_root_dir>/checkpoints/last.ckpt`, likewise versioned."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.save_last:
            # ModelCheckpoint has no public "save last now"; these two are what its own hooks call (Lightning 2.6)
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            return cb.last_model_path
    directory = os.path.join(trainer.default_root_dir, "checkpoints")
    path, version = os.path.join(directory, "last.ckpt"), 1
    while os.path.exists(path):
        path, version = os.path.join(directory, f"last-v{version}.ckpt"), version + 1
    path = trainer.strategy.broadcast(path)  # every rank writes its part into the same place
    trainer.save_checkpoint(path)
    return path
