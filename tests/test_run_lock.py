"""One fit / predict at a time per run directory (`qmoe_lightning.run_lock`, taken by cli.py):

- a lock held by a live process (a `sleep` started here) refuses the CLI with exit 2 naming its pid, host and
  start time, before anything is written; a second RunLock on the same directory is refused too;
- a lock left by a process that has ended (or whose pid now belongs to a later process) is taken over with a
  warning naming it; a lock of another host is never judged stale from here;
- the lock is given back when the command ends, also when it fails, and only its own (a take-over's is kept);
- only global rank 0 takes it (the other ranks are started by rank 0 after it holds it).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_app_common import small_data  # noqa: F401  (fixture)

import cli
from qmoe_lightning.run_lock import LOCK_NAME, RunLock, RunLockHeld

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _write_lock(root: Path, pid: int, host: str | None = None, **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time() - 60,
                                "command": "cli.py fit --config other.yaml", **extra}))
    return path


def _fit_args(root: Path, data: Path, cache: Path) -> list[str]:
    return ["fit", "--config", TINY, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--data.train_path", str(data), "--data.val_path", str(data),
            "--data.max_tokens", "128", "--data.num_workers", "0", "--data.cache_dir", str(cache)]


def test_a_live_holder_refuses_the_run_naming_it(tmp_path, live_pid, capsys):
    root = tmp_path / "run"
    lock = _write_lock(root, live_pid)
    before = lock.read_text()
    for sub in ("fit", "predict"):
        with pytest.raises(SystemExit) as exc:
            cli.main([sub, "--config", TINY, "--trainer.default_root_dir", str(root)])
        text = capsys.readouterr().err
        assert exc.value.code == 2, text
        assert f"{root} is in use by another run: pid {live_pid} on host {socket.gethostname()}, started " in text
        assert "cli.py fit --config other.yaml" in text and f"delete {lock}" in text
        assert lock.read_text() == before  # the holder's lock is untouched
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]  # nothing else written


def test_two_locks_on_one_directory(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunLockHeld, match=rf"pid {__import__('os').getpid()} on host"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run"):  # free again
        assert (tmp_path / "run" / LOCK_NAME).exists()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_locks_are_taken_over_and_foreign_hosts_are_not(tmp_path, live_pid):
    told = []
    dead = _dead_pid()
    _write_lock(tmp_path / "a", dead)
    lock = RunLock(tmp_path / "a")
    lock.acquire(warn=told.append)
    assert len(told) == 1 and f"pid {dead} on host" in told[0] and "no longer running" in told[0]
    assert json.loads((tmp_path / "a" / LOCK_NAME).read_text())["pid"] == __import__("os").getpid()
    lock.release()

    # a live pid whose process started at another time than the holder's: the pid was reused
    _write_lock(tmp_path / "b", live_pid, start_tick="1")
    RunLock(tmp_path / "b").acquire(warn=told.append)
    assert len(told) == 2 and f"pid {live_pid}" in told[1]

    # another host's process cannot be checked from here: held, even with a pid that is dead here
    _write_lock(tmp_path / "c", dead, host="elsewhere")
    with pytest.raises(RunLockHeld, match="on host elsewhere"):
        RunLock(tmp_path / "c").acquire(warn=told.append)
    # a lock file left empty (its process died between creating and writing it) is stale once it is old
    empty = tmp_path / "d" / LOCK_NAME
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(RunLockHeld, match="still being written"):
        RunLock(tmp_path / "d").acquire(warn=told.append)
    old = time.time() - 120
    __import__("os").utime(empty, (old, old))
    RunLock(tmp_path / "d").acquire(warn=told.append)
    assert len(told) == 3 and "an unfinished lock file" in told[2]


def test_release_keeps_a_lock_that_another_run_took_over(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    other = _write_lock(tmp_path, 12345)  # replaced meanwhile (e.g. judged stale by another run)
    lock.release()
    assert other.exists()


def test_only_global_rank_zero_takes_it(tmp_path):
    rank1 = SimpleNamespace(global_rank=1, default_root_dir=str(tmp_path))
    assert cli._take_run_lock(rank1, "fit") is None and not (tmp_path / LOCK_NAME).exists()
    rank0 = SimpleNamespace(global_rank=0, default_root_dir=str(tmp_path))
    for sub in ("validate", "test"):  # they write only timestamped files: they may run beside a fit
        assert cli._take_run_lock(rank0, sub) is None
    lock = cli._take_run_lock(rank0, "fit")
    assert (tmp_path / LOCK_NAME).exists()
    lock.release()


def test_a_stale_lock_is_taken_over_by_a_fit_and_every_lock_is_given_back(tmp_path, small_data, capsys):
    root, cache = tmp_path / "run", tmp_path / "cache"
    dead = _dead_pid()
    _write_lock(root, dead)
    app = cli.main(_fit_args(root, small_data, cache))
    assert app.trainer.global_step == 1
    assert f"taking it over" in capsys.readouterr().err
    assert not (root / LOCK_NAME).exists()  # given back at the end

    # a fit that fails is given back too
    with pytest.raises((FileNotFoundError, ValueError), match="missing.jsonl"):
        cli.main([*_fit_args(root, small_data, cache), "--data.train_path", str(tmp_path / "missing.jsonl")])
    assert not (root / LOCK_NAME).exists()
