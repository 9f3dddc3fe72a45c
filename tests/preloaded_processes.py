"""The process context of every multi-process test: children forked from a forkserver that imported torch,
transformers' modeling modules, Lightning and the project (cli.py's whole import graph) once per test session.

A fresh interpreter spent ~4 s (gloo workers) to ~7 s (a `cli.py` rank) importing those before a second or two of
work, and on a 2-core machine the ranks' imports competed: imports were most of the suite's multi-process time.
Forking from the server gives each child the state of a process that has only imported (no threads, no process
group, no tensors computed), which is what a fresh interpreter has after its imports.

Footguns, handled by the users of this context:
- The server keeps the environment of this process at the moment the first child started: a child takes its
  launcher variables (MASTER_PORT, RANK, ...) as arguments and sets them itself.
- The server's stdout / stderr are whatever pytest's capture held at that moment: a child sends its output to
  files of its own (fd level, so a faulthandler stack lands there too).
- A child inherits "forkserver" as its start method: `enter_child` puts the platform default back.

`run_to_end` starts a group of children and ends it as torchrun ends a failed one.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import torch.multiprocessing as mp

_PRELOAD = ["test_parallel_common", "tiny_configs", "rank_launcher", "cli", "qmoe_lightning.models",
            "qmoe_lightning.parallel.strategy", "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
            "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe"]


GRACE_S = 60.0  # after a child failed, how long the others may take to fail or finish on their own


def context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs: one list for every user
    return ctx


def enter_child(stdout: str, stderr: str | None = None) -> None:
    """First thing in a child: send fd 1 to `stdout` and fd 2 to `stderr` (default: the same file), appending
    (sys.stdout / sys.stderr write through them), and give multiprocessing back the platform's default start method.
    multiprocessing set this child's to "forkserver" (its parent's); left so, a DataLoader worker of the child would
    start a new server of its own, a fresh interpreter importing everything: seconds per worker that
    `python cli.py` (fork) never spends."""
    sys.stdout.flush()
    sys.stderr.flush()
    for target, path in ((1, stdout), (2, stderr or stdout)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    multiprocessing.set_start_method(None, force=True)


def run_to_end(procs: list, timeout: float) -> list[int]:
    """Start `procs` and wait until every one has ended, `timeout` s at most; once one has failed the others get
    GRACE_S to end on their own (a test that fails on every rank), then are killed, as torchrun ends a failed group.
    -> the indices of the children still running at the end, which were killed."""
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.1)
    finally:
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for i in hung:
            procs[i].kill()
            procs[i].join(10)
    return hung
