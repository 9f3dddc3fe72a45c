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
- Nothing non-finite is written: the writers refuse a tensor holding NaN / inf (`check_finite`, naming it), and the
  callbacks check the whole model on every rank first (`refuse_nonfinite_model`, one flag all-reduced: all ranks
  refuse together, none is left waiting in a collective); the previous export stays as it was.
- Files and directories follow the umask: safetensors creates its files 0600 whatever the umask, so other users
  of a shared machine could not read an export.
- What a user adds to an export survives the next export into it (a model card `README.md`, notes, a folder): the
  marker lists the files the export wrote (with a sha256 of each file that is not a `.safetensors`), and before the
  swap every path of the previous export that is not one of ours is carried into the new export (hard links where
  the file system allows, else copies; the previous export keeps its own until it is removed after the swap, so a
  crash at any step leaves the user's files in the export under the final name). The carried names are logged.
  Ours: listed in the previous marker (and, for the hashed files, unchanged: a file of ours the user edited counts
  as the user's); a marker without a list (older exports) counts the export's own file kinds as ours (`*.safetensors`,
  `*.safetensors.index.json`, config / tokenizer / processor / chat-template files, `adapter_*`, `qmoe_lora.json`).
  So shards of an older export with more shards are never carried. A user's file whose name the new export writes
  itself (an edited `config.json`) cannot stay under that name: the new export's file takes it and the user's
  version is kept beside it as `NAME.user` (`NAME.user2`, ... if taken), with a warning naming both.

`_after(step)` is called after each step of a swap; tests replace it to kill the process there.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".qmoe_export"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


# the file kinds an export of ours writes: what a marker without a file list (older exports) counts as ours
_OWN_NAMES = frozenset((
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "qmoe_lora.json",
))


class NonFiniteError(RuntimeError):
    """Weights, a loss or gradients hold NaN / inf: nothing is trained on or written from them."""


def check_finite(name: str, tensor, where: str) -> None:
    """Raise NonFiniteError naming `name` if the floating tensor `tensor` holds NaN or inf."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = tensor.detach().float()
        raise NonFiniteError(f"refusing to write {where}: tensor {name!r} {tuple(tensor.shape)} holds "
                             f"{int(bad.isnan().sum())} NaN and {int(bad.isinf().sum())} inf values (the weights "
                             "diverged); the previous export, if any, is left as it was")


def nonfinite_tensors(model) -> list[str]:
    """Names of the floating parameters and buffers of `model` whose local values (a DTensor's shard on this rank)
    hold NaN or inf."""
    import torch

    bad = []
    for kind in (model.named_parameters, model.named_buffers):
        for name, t in kind():
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
                bad.append(name)
    return bad


def refuse_nonfinite_model(model, where: str) -> None:
    """Raise NonFiniteError on every rank if any rank holds a non-finite weight of `model`. Under torch.distributed
    all ranks must call it together (one all-reduce of a flag on the default group, then the names are gathered
    for the message), as they call the collective export or checkpoint that follows."""
    import torch
    import torch.distributed as dist

    bad = nonfinite_tensors(model)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        flag = torch.tensor(float(len(bad)), device=device)
        dist.all_reduce(flag)
        if float(flag) == 0:
            return
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, bad[:5])
        bad = sorted({n for names in every for n in names})
    elif not bad:
        return
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise NonFiniteError(f"refusing to write {where}: the model's weights hold NaN / inf ({shown}); the previous "
                         "checkpoint / export, if any, is left as it was")


def _after(step: str) -> None:
    """Test hook: called after each step of a swap ("written", "exchanged", "parked", "placed", "cleaned")."""


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def temp_dir(out_dir: Path, kind: str = "tmp") -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{_host()}-{os.getpid()}"


def is_export(path: Path) -> bool:
    return (path / MARKER).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path) -> dict:
    # weights are not hashed (gigabytes, and nobody edits them by hand); the small text files are
    if path.name.endswith(".safetensors"):
        return {"size": path.stat().st_size}
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def export_files(directory: Path) -> dict[str, dict]:
    """Relative path -> fingerprint of every file under `directory` but the marker (what an export wrote)."""
    directory = Path(directory)
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.relative_to(directory).as_posix() != MARKER:
            out[p.relative_to(directory).as_posix()] = _fingerprint(p)
    return out


def write_marker(directory: Path, kind: str, files: dict[str, dict] | None = None) -> None:
    """The marker: what the export is and the files it wrote (`export_files`; None: listed from `directory`)."""
    files = export_files(directory) if files is None else files
    (directory / MARKER).write_text(json.dumps({"written_by": "qmoe_lightning", "kind": kind, "files": files},
                                               indent=1, sort_keys=True) + "\n")


def _is_own_kind(name: str) -> bool:
    """A file name an export of ours writes (for markers without a file list)."""
    return (name in _OWN_NAMES or name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
            or name.startswith("adapter_"))


def _ours(export: Path) -> callable:
    """Predicate on a relative path of the export at `export`: did the export write it (unchanged since)?"""
    try:
        marker = json.loads((export / MARKER).read_text())
        files = marker.get("files") if isinstance(marker, dict) else None
    except (OSError, ValueError):
        files = None
    if not isinstance(files, dict):  # an older export: its own file kinds, top level only
        return lambda rel: "/" not in rel and _is_own_kind(rel)

    def ours(rel: str) -> bool:
        want = files.get(rel)
        if not isinstance(want, dict):
            return False
        path = export / rel
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size != want.get("size"):
                return False
            return "sha256" not in want or _sha256(path) == want["sha256"]  # edited by the user: theirs
        except OSError:
            return False

    return ours


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no space, no time for a large file); a copy where the file system has none."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _place_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _free_name(directory: Path, name: str) -> str:
    candidate, n = f"{name}.user", 1
    while (directory / candidate).exists() or (directory / candidate).is_symlink():
        n += 1
        candidate = f"{name}.user{n}"
    return candidate


def carry_over(previous: Path, new: Path) -> tuple[list[str], dict[str, str]]:
    """Link or copy into `new` every path of the export `previous` that it did not write itself (see the module
    doc). Returns the carried relative paths and {user's path: name it is kept under} for names the new export
    writes too. Nothing in `previous` changes."""
    ours = _ours(previous)
    carried, renamed = [], {}

    def walk(src_dir: Path, rel_dir: str) -> None:
        for src in sorted(src_dir.iterdir()):
            rel = rel_dir + src.name
            if rel == MARKER:
                continue
            dst = new / rel
            taken = dst.exists() or dst.is_symlink()
            if src.is_dir() and not src.is_symlink():
                if taken and dst.is_dir() and not dst.is_symlink():
                    walk(src, rel + "/")  # a folder the new export writes into too: file by file
                    continue
                if not taken and any(ours(p.relative_to(previous).as_posix()) for p in src.rglob("*")):
                    dst.mkdir()  # holds files of ours: only the others are carried
                    walk(src, rel + "/")
                    if not any(dst.iterdir()):
                        dst.rmdir()
                    continue
            elif ours(rel):
                continue  # written by the previous export: the new one replaces or drops it
            if taken:
                kept = _free_name(dst.parent, src.name)
                _place_copy(src, dst.parent / kept)
                renamed[rel] = rel_dir + kept
            else:
                _place_copy(src, dst)
                carried.append(rel + "/" if src.is_dir() and not src.is_symlink() else rel)

    walk(previous, "")
    return carried, renamed


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


@contextlib.contextmanager
def staged_export(out_dir: str | os.PathLike, kind: str) -> Iterator[tuple[Path, Path]]:
    """Write an export of `kind` into a staging directory beside `out_dir` (yields (staging, out_dir)); when the block
    ends without an exception the staging is swapped into place (`swap_into_place`), on any exception it is removed
    and the previous export stays. Refuses an `out_dir` that is not a previous export; clears a killed export's
    debris first (`recover`)."""
    out_dir = check_export_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    tmp = temp_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp, out_dir
        swap_into_place(tmp, out_dir, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, out_dir: Path, kind: str) -> None:
    """Mark `tmp` as an export, give it the umask's modes, carry the user's files of the previous export into it
    and make it `out_dir` (see the module doc)."""
    files = export_files(tmp)
    write_marker(tmp, kind, files)
    follow_umask(tmp)  # before the carry-over: the user's files keep their own modes
    if out_dir.exists():
        check_export_target(out_dir)
        carried, renamed = carry_over(out_dir, tmp)
        if carried:
            from lightning.pytorch.utilities import rank_zero_info  # shown like the export's own line (INFO)

            rank_zero_info(f"{out_dir}: kept {len(carried)} path(s) that are not part of the export: "
                           f"{', '.join(carried)}")
        for rel, kept in renamed.items():
            log.warning("%s: %s is not the file the previous export wrote (added or edited by hand) and this export "
                        "writes its own %s; the hand-made version is kept as %s", out_dir, rel, rel, kept)
    _after("written")
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        _after("placed")
        return
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
