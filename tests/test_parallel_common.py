"""Shared harness of the multi-process (gloo, CPU) parallel tests: start N workers that meet at a rendezvous store
held by the test process, join them with a timeout (a hung collective kills the group instead of hanging the test
run) and load what each rank saved. Also checks the harness itself: a worker failure surfaces its traceback in the
parent.

The store listens in the parent from before the workers start until they are joined. Picking a free port, closing
it and letting rank 0 bind it seconds later (after the workers' imports) is a race: seen on a loaded machine as
rank 0's "EADDRINUSE: address already in use" (another socket took the port in between), and a rank >= 1 that
retries its connect to the not-yet-listening port can even be handed that port as its own source port and connect
to itself.

Workers are module-level functions of the test files (children import them by module name; the tests dir is on
sys.path via conftest, which multiprocessing passes on), forked from the preloaded server of preloaded_processes.py.
A worker's output goes to rank{r}.log in the run's directory, and its tail is in the error report.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

sys.modules.setdefault("fla", None)  # as conftest: spawned children import transformers' torch fallbacks
sys.modules.setdefault("causal_conv1d", None)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import preloaded_processes  # noqa: E402
from preloaded_processes import enter_child  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    enter_child(str(Path(out_dir) / f"rank{rank}.log"))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    result = fn(rank, world, *args)  # an exception: multiprocessing prints its traceback into the log, exit 1
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_workers(fn, world: int, out_dir, *args, timeout: float = 120.0) -> list:
    """Run fn(rank, world, *args) on `world` gloo processes; returns each rank's (torch.save-able) result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("rank*.pt"), *out_dir.glob("rank*.log")]:
        old.unlink()
    ctx = preloaded_processes.context()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the OS picks the port, held
    procs = [ctx.Process(target=_entry, args=(r, world, store.port, str(out_dir), fn, args)) for r in range(world)]
    try:
        hung = preloaded_processes.run_to_end(procs, timeout)
    finally:
        del store
    errors = "\n".join(f"rank {r} (exit {p.exitcode}):\n{_tail(out_dir / f'rank{r}.log')}"
                       for r, p in enumerate(procs) if p.exitcode != 0)
    if hung:
        raise TimeoutError(f"ranks {hung} killed: still running {timeout}s in, or {preloaded_processes.GRACE_S:.0f}s "
                           f"after another rank failed\n{errors}")
    if errors:
        raise RuntimeError(f"worker failure, exit codes {[p.exitcode for p in procs]}\n{errors}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _fails_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.multiprocess
def test_harness_reports_worker_errors(tmp_path):
    with pytest.raises((RuntimeError, TimeoutError), match="boom on rank 1"):
        run_workers(_fails_on_rank1, 2, tmp_path, timeout=60)


def _segfaults(rank, world):
    import ctypes

    ctypes.string_at(0)


@pytest.mark.multiprocess
def test_a_worker_dying_of_a_signal_reports_its_stack(tmp_path):
    """The forked workers keep the faulthandler (PYTHONFAULTHANDLER, conftest) and write to their own log."""
    with pytest.raises(RuntimeError) as failure:
        run_workers(_segfaults, 2, tmp_path, timeout=60)
    assert "exit codes [-11, -11]" in str(failure.value)
    assert "Segmentation fault" in str(failure.value) and "in _segfaults" in str(failure.value), failure.value



def test_a_crashing_child_prints_its_stack():
    """conftest sets PYTHONFAULTHANDLER=1 for every process the tests start: a rank dying of SIGSEGV leaves its
    Python stack in the captured stderr, not only returncode -11 and its peers' "Connection closed by peer"."""
    import subprocess

    code = "import ctypes\ndef crash():\n    ctypes.string_at(0)\ncrash()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "in crash" in proc.stderr, proc.stderr


def test_launcher_variables_are_put_back():
    """Lightning's `ddp_spawn` writes MASTER_PORT into the parent's environment (test_app_ddp runs it in the test
    process); conftest puts it back after each test, so later runs do not all inherit that one stale port."""
    from conftest import launcher_env_restored

    before = {k: os.environ.get(k) for k in ("MASTER_PORT", "PL_GLOBAL_SEED")}  # a session fixture may have set them
    with launcher_env_restored():
        os.environ["MASTER_PORT"] = "1"
        os.environ["PL_GLOBAL_SEED"] = "7"
    assert {k: os.environ.get(k) for k in before} == before
