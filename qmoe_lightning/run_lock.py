"""`RunLock`: one run at a time per run directory (`<default_root_dir>/.qmoe_run.lock`).

Two fits (or a fit and a predict) started into the same `default_root_dir` would write into each other's
checkpoints, config.yaml, exports and predictions. The CLI takes this lock before anything is written (global
rank 0 only, before the other ranks are started) and gives it back when the command ends, also on an exception.

- The lock file is created with O_CREAT | O_EXCL (atomic: of two runs starting together exactly one gets it) and
  holds the holder's pid, host, start time, process start tick (Linux) and command line as JSON.
- A lock left by a process that no longer runs on this host (a run that was killed: SIGKILL, out of memory, a
  crashed node's restart) is taken over with a warning. "No longer runs" is `kill(pid, 0)` failing, or the pid now
  belonging to a process started at another time (pid reuse, checked through /proc where there is one). The stale
  file is first renamed to a name of this process's own and checked to still be the one judged stale, so two runs
  taking over the same stale lock cannot both win.
- A lock held by a live process, or by any process on another host (it cannot be checked from here), refuses the
  run with `RunLockHeld`, which names the holder and the file to delete if the holder is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".qmoe_run.lock"


class RunLockHeld(RuntimeError):
    """Another run holds the run directory's lock."""


def _start_tick(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may contain spaces and parentheses


def _alive(pid: int, start_tick: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_tick(pid)
    return not (start_tick and now and now != start_tick)  # the pid was reused by a later process


def _describe(holder: dict) -> str:
    if not holder:
        return "a run whose lock file is still being written"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) \
        else "an unknown time"
    cmd = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {when}{cmd}"


class RunLock:
    def __init__(self, root: str | os.PathLike, command: str | None = None):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.command = command if command is not None else " ".join(sys.argv)
        self._token: str | None = None

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: judged by its age below

    def _stale(self, holder: dict, path: Path) -> bool:
        if not holder:  # a holder is written right after the file is created: an empty one that old was never
            try:        # completed (the process died in between)
                return time.time() - path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        return not _alive(holder["pid"], holder.get("start_tick"))

    def acquire(self, warn=None) -> None:
        """Take the lock, or raise `RunLockHeld` naming the live holder. warn(message): where a take-over is told
        (default: stderr)."""
        warn = warn or (lambda msg: sys.stderr.write(f"warning: {msg}\n"))
        self.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "start_tick": _start_tick(os.getpid()), "command": self.command}
        token = json.dumps(me)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if not self._stale(holder, self.path):
                    raise RunLockHeld(
                        f"{self.root} is in use by another run: {_describe(holder)} holds {self.path}. Wait for it "
                        "to finish or use another --trainer.default_root_dir; if that run is no longer running (on "
                        f"another host this cannot be checked from here), delete {self.path}") from None
                self._take_over(holder, warn)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(token)
            self._token = token
            return
        raise RunLockHeld(f"could not take {self.path}: it kept changing hands (other runs starting into "
                          f"{self.root}?)")

    def _take_over(self, holder: dict, warn) -> None:
        mine = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, mine)
        except FileNotFoundError:
            return  # another run took it over first
        if self._read(mine) != holder:  # a fresh lock of a run that took it over meanwhile: put it back
            try:
                os.link(mine, self.path)
            except FileExistsError:
                pass
            os.unlink(mine)
            return
        os.unlink(mine)
        what = _describe(holder) if holder else "an unfinished lock file"
        warn(f"{self.path} was left by a run that is no longer running ({what}); taking it over")

    def release(self) -> None:
        """Give the lock back (only this run's own: never a lock that another run took over meanwhile)."""
        if self._token is None:
            return
        try:
            if self.path.read_text() == self._token:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._token = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
