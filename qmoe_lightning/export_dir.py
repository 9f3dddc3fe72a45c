"""Export directories that never lose anything: what may be replaced, how it is replaced, what a crash leaves.

An export (HF model directory, PEFT adapter) is written into a temporary sibling and swapped into place. Rules:
- Only an export of ours is ever replaced: every export holds the marker file `.qmoe_export` (JSON: what it is).
  An existing non-empty directory without it (a run directory, `.`, a user's folder, an export of another tool)
  is an error naming the path; `check_export_target` says so before training starts, and also refuses a target
  that contains the run directory (its checkpoints and logs would be inside the export).
- The swap leaves the old or the new export under the final name at every instant: on Linux one
  `renameat2(RENAME_EXCHANGE)` exchanges the two directories atomically; elsewhere two renames, and a crash between
  them (no directory under the final name, the previous one parked as `.NAME.old-HOST-PID`) is repaired by the
  next `recover` (the previous export is put back).
- Temporaries are named `.NAME.tmp-HOST-PID` / `.NAME.old-HOST-PID`; `recover` (called before every export and when
  the callbacks start) deletes those of processes of this host that no longer run: a killed export leaves a
  model-sized directory behind otherwise. Other hosts' temporaries (shared file systems) are left alone.
- Files and directories follow the umask: safetensors creates its files 0600 whatever the umask, so other users
  of a shared machine could not read an export.

`_after(step)` is called after each step of a swap; tests replace it to kill the process there.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".qmoe_export"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _after(step: str) -> None:
    """Test hook: called after each step of a swap ("written", "exchanged", "parked", "placed", "cleaned")."""


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def temp_dir(out_dir: Path, kind: str = "tmp") -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{_host()}-{os.getpid()}"


def is_export(path: Path) -> bool:
    return (path / MARKER).is_file()


def write_marker(directory: Path, kind: str) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": "qmoe_lightning", "kind": kind}) + "\n")


def check_export_target(out_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Path:
    """Raise ValueError if writing an export to `out_dir` could destroy something that is not an export of ours."""
    out = Path(out_dir).resolve()
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if run == out or out in run.parents:
            raise ValueError(f"export directory {out} contains the run directory {run} (checkpoints, logs, configs "
                             "would be replaced by the export); give the export its own directory, e.g. the "
                             "default <default_root_dir>/hf_export")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"export directory {out} exists and is not a directory")
        if any(out.iterdir()) and not is_export(out):
            raise ValueError(f"refusing to replace {out}: it exists, is not empty and is not an export written by "
                             f"qmoe_lightning (no {MARKER} file); choose another directory or move it away")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out_dir: str | os.PathLike) -> list[Path]:
    """Repair what crashed exports of this host left next to `out_dir`; returns the paths removed or restored."""
    out = Path(out_dir).resolve()
    if not out.parent.is_dir():
        return []
    done = []
    host = _host()
    for kind in ("old", "tmp"):  # an old export first: it goes back under the final name if that is missing
        prefix = f".{out.name}.{kind}-{host}-"
        for p in sorted(out.parent.glob(prefix + "*")):
            pid = p.name[len(prefix):]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists() and is_export(p):
                os.replace(p, out)  # the crash came between parking the old export and placing the new one
            else:
                shutil.rmtree(p, ignore_errors=True)
            done.append(p)
    return done


def prepare_target(out_dir: str | os.PathLike, run_dir: str | os.PathLike, repair: bool) -> Path:
    """What an export callback does at fit start: check the target (on every rank, so that all raise together
    rather than leaving the others waiting in a collective) and, where `repair` (rank 0), clear crash debris."""
    out = check_export_target(out_dir, run_dir)
    if repair:
        for p in recover(out):
            log.warning("removed or restored %s, left by an export that was killed", p)
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def swap_into_place(tmp: Path, out_dir: Path, kind: str) -> None:
    """Mark `tmp` as an export, give it the umask's modes and make it `out_dir` (see the module doc)."""
    write_marker(tmp, kind)
    follow_umask(tmp)
    _after("written")
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        _after("placed")
        return
    check_export_target(out_dir)
    if _exchange(tmp, out_dir):  # tmp now holds the previous export
        _after("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)
        _after("cleaned")
        return
    old = temp_dir(out_dir, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    _after("parked")
    os.replace(tmp, out_dir)
    _after("placed")
    shutil.rmtree(old, ignore_errors=True)
    _after("cleaned")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """chmod `root` and everything under it to what the umask gives new files (0666) and directories (0777)."""
    mask = _umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small output file (predictions.jsonl) through a temporary sibling and one rename: a crash leaves the
    previous file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{_host()}-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
