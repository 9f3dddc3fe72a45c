"""SIGTERM (what schedulers send before killing a job) ends a run with a resumable checkpoint and a non-zero exit:

- in process, a SIGTERM in the middle of a gradient-accumulation window: the optimizer step in progress finishes,
  `last.ckpt` is written at that step, the run ends with exit code 143, and `--ckpt_path last` continues with the
  losses an uninterrupted run has (negative control: without the callback Lightning exits with code 0, mid-window,
  and writes no checkpoint);
- through `cli.py fit` in a subprocess, the signal sent from outside: exit 143, the message names the checkpoint,
  and a resume with `--ckpt_path last` trains on from it (that fresh run's output also shows that the startup
  carries no third-party noise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks import RunCheckpoint
from callbacks.preemption import EXIT_CODE, Preempted, PreemptionCheckpoint
from qmoe_lightning.lightning_module import QMoELightningModule
from test_app_common import make_datamodule, make_trainer, small_data  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


class StepLosses(pl.Callback):
    def __init__(self, sigterm_at_batch: int | None = None, sigterm_in_sanity_check: bool = False):
        self.losses: dict[int, float] = {}
        self.sigterm_at_batch, self.sigterm_in_sanity_check = sigterm_at_batch, sigterm_in_sanity_check

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not pl_module.step_in_progress:
            self.losses[trainer.global_step] = pl_module.last_step.loss
        if batch_idx == self.sigterm_at_batch:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before the next batch

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking and self.sigterm_in_sanity_check:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(root, data, cache, ckpt_path=None, sigterm_at_batch=None, preemption=True, sigterm_in_sanity_check=False):
    torch.manual_seed(0)
    module = QMoELightningModule(pretrained="embedded", lr=3e-3, warmup_steps=2, min_lr_ratio=0.1)
    rec = StepLosses(sigterm_at_batch, sigterm_in_sanity_check)
    callbacks = [RunCheckpoint(every_n_train_steps=100), rec] + ([PreemptionCheckpoint()] if preemption else [])
    sanity = dict(num_sanity_val_steps=1, limit_val_batches=1) if sigterm_in_sanity_check else {}
    trainer = make_trainer(root, max_steps=5, enable_checkpointing=True, accumulate_grad_batches=2,
                           callbacks=callbacks, **sanity)
    trainer.fit(module, datamodule=make_datamodule(data, cache, max_tokens=128), ckpt_path=ckpt_path)
    return rec.losses, trainer


def test_sigterm_mid_window_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, small_data):  # noqa: F811
    cache = tmp_path / "cache"
    full, _ = _fit(tmp_path / "full", small_data, cache)
    assert sorted(full) == [1, 2, 3, 4, 5]

    # an earlier run's last.ckpt in the same directory: the preempted run must not overwrite it
    earlier = tmp_path / "run" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's checkpoint")
    os.utime(earlier, (1, 1))
    # batch 4 is the first micro-batch of step 3 (2 per step): the signal arrives inside the window
    with pytest.raises(Preempted) as stop:
        _fit(tmp_path / "run", small_data, cache, sigterm_at_batch=4)
    assert stop.value.code == EXIT_CODE == 143
    last = tmp_path / "run" / "checkpoints" / "last-v1.ckpt"  # versioned past the earlier run's, as Lightning does
    assert str(last) in str(stop.value) and last.is_file()
    assert earlier.read_bytes() == b"an earlier run's checkpoint"
    saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    assert saved["global_step"] == 3  # the step in progress finished; none started after it

    resumed, trainer = _fit(tmp_path / "run", small_data, cache, ckpt_path="last")  # the newest: last-v1.ckpt
    assert sorted(resumed) == [4, 5] and trainer.global_step == 5
    for step in (4, 5):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, resumed, full)
    assert len({round(v, 6) for v in full.values()}) == 5  # the curve moves: the comparison is not trivial


def test_sigterm_during_the_sanity_check_is_acted_on_at_the_first_step(tmp_path, small_data):  # noqa: F811
    """Lightning's handler is set before the sanity check; ours replaces it from there (before, a SIGTERM in the
    sanity check ended the fit with exit 0 and nothing saved)."""
    with pytest.raises(Preempted):
        _fit(tmp_path / "run", small_data, tmp_path / "cache", sigterm_in_sanity_check=True)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True,
                       mmap=True)
    assert saved["global_step"] == 1


def test_without_the_callback_lightning_stops_mid_window_with_exit_0_and_no_checkpoint(tmp_path, small_data):  # noqa: F811
    """What the callback fixes (negative control): Lightning's own SIGTERM handling."""
    with pytest.raises(SystemExit) as stop:
        _fit(tmp_path / "run", small_data, tmp_path / "cache", sigterm_at_batch=4, preemption=False)
    assert not isinstance(stop.value, Preempted) and stop.value.code in (None, 0)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def _cli(root: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "cli.py", "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "400",
            "--trainer.default_root_dir", str(root), "--data.train_path", str(data), "--data.val_path", "null",
            "--data.max_tokens", "128", "--data.num_workers", "0", "--data.cache_dir", str(root.parent / "cache"),
            "--trainer.val_check_interval", "null", "--trainer.enable_progress_bar", "false", *extra]


def _sigterm_once_training(cmd: list[str], env: dict, mark: Path, log: Path) -> tuple[int, str]:
    """Start `cmd`, wait until its MarkTraining callback wrote `mark` (a step is done: the handler is installed),
    send SIGTERM to the started process, and return its exit code and output."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert mark.exists(), log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_cli_sigterm_exits_143_with_a_checkpoint_that_resumes(tmp_path, small_data):  # noqa: F811
    root, mark, log = tmp_path / "run", tmp_path / "training", tmp_path / "fit.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = _cli(root, small_data, "--trainer.callbacks+=preemption_callbacks.MarkTraining",
               "--trainer.callbacks.path", str(mark))
    code, text = _sigterm_once_training(cmd, env, mark, log)
    assert code == EXIT_CODE, text[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert f"resumable checkpoint: {last}" in text and last.is_file(), text[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    assert 0 < step < 400
    assert not (root / "hf_export").exists()  # a preemption exports nothing: the checkpoint carries the work
    assert not (root / ".qmoe_run.lock").exists()  # the run directory is free for the resume
    # a fresh run's start carries none of the third-party noise it used to (qmoe_lightning.startup_noise)
    for noise in ("Tip:", "DeprecationWarning", "LeafSpec", "exists and is not empty"):
        assert noise not in text, (noise, text[:3000])

    res = subprocess.run(_cli(root, small_data, "--ckpt_path", "last", "--trainer.max_steps", str(step + 2)),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in out, out[-3000:]
    assert (root / "hf_export" / "config.json").is_file()  # trained on to max_steps and exported


@pytest.mark.multiprocess
def test_cli_sigterm_to_the_launching_process_stops_every_expert_parallel_rank(tmp_path, small_data):  # noqa: F811
    """ep=2 on 2 processes started by Lightning from one `cli.py`: SIGTERM reaches the launching process (rank 0)
    only; rank 1 learns of it through the per-step all-reduce, both write their part of the distributed checkpoint at
    the same step, both exit 143, and `--ckpt_path last` trains on from that directory."""
    root, mark, log = tmp_path / "ep", tmp_path / "training", tmp_path / "fit.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    base = [sys.executable, "cli.py", "fit", "--config", "configs/tiny_ep.yaml", "--trainer.default_root_dir",
            str(root), "--data.train_path", str(small_data), "--data.val_path", "null", "--data.max_tokens", "128",
            "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.val_check_interval",
            "null", "--trainer.enable_progress_bar", "false"]
    cmd = base + ["--trainer.max_steps", "400", "--trainer.callbacks+=preemption_callbacks.MarkTraining",
                  "--trainer.callbacks.path", str(mark)]
    code, text = _sigterm_once_training(cmd, env, mark, log)  # to the launching process only, as `kill PID` does
    assert code == EXIT_CODE, text[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file() and (last / ".metadata").is_file(), text[-3000:]
    assert len(list(last.glob("*.distcp"))) == 2  # both ranks wrote their shards
    step = torch.load(last / "meta.pt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 400
    res = subprocess.run(base + ["--ckpt_path", "last", "--trainer.max_steps", str(step + 2)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (root / "hf_export" / "config.json").is_file()
