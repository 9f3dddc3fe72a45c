"""Run a multi-process `cli.py` with every rank started at once, as torchrun's agent does, each rank forked from
the preloaded server (preloaded_processes.py) and running cli.py as `__main__`.

`python cli.py fit --trainer.devices N` lets Lightning start ranks 1..N-1, and it does so only after rank 0 has
imported everything and parsed its config; the ranks' imports then run one after the other. On the tiny test runs
the imports are most of the wall time (~7 s per interpreter on an idle 2-core machine, a step well under a
second): a 2-process run took 13.7 s that way, 8.7 s with both interpreters started together, ~3 s forked from
the server that already imported cli.py's modules. A rank runs what `python cli.py ARGS` runs after its imports
(cli.py executed as `__main__`, sys.argv, working directory and sys.path[0] as python sets them, its exit code,
and its own stdout / stderr), with the variables torchrun gives its workers (`TORCHELASTIC_RUN_ID` makes
Lightning use its TorchElastic environment and start nothing itself): the launch users take on clusters. The
tests about Lightning's own launcher (the acceptance runs of EP and cp=2, SIGTERM to the launching process) run
`python cli.py` in a process of its own.

The rendezvous store is held by this process for the whole run (`TORCHELASTIC_USE_AGENT_STORE`: every rank
connects as a client, as under torchrun): a port picked free, closed and bound by rank 0 seconds later is a race on
a busy machine. When one rank fails the others get a grace period to fail on their own (a crash test raises on
every rank), then are killed, as torchrun kills a failed group; a hung run is killed at the timeout.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import preloaded_processes

ROOT = Path(__file__).resolve().parents[1]


def launch_ranks(cli_args: list[str], world: int, env: dict | None = None, timeout: float = 600.0,
                 cwd: Path = ROOT, nodes: int = 1, scheduler: str = "torchrun") -> subprocess.CompletedProcess:
    """Run `python cli.py *cli_args` as `world` ranks started together, `world / nodes` per node; -> one
    CompletedProcess: the first failing rank's return code (0 when all succeed), each rank's stdout / stderr one after
    the other, headed by its rank.

    scheduler "torchrun": the variables torchrun's agents give their workers (Lightning's TorchElastic environment);
    "slurm": those `srun` gives its tasks (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, ...: Lightning's
    SLURM environment), MASTER_ADDR / MASTER_PORT as an sbatch script exports them."""
    if world % nodes:
        raise ValueError(f"{world} ranks do not split over {nodes} nodes")
    per_node = world // nodes
    env = dict(os.environ if env is None else env)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the OS picks the port, held
    # every rank connects to the held store as a client (a torch variable, read whatever the scheduler)
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    if scheduler == "torchrun":
        common.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(per_node), ROLE_WORLD_SIZE=str(world),
                      TORCHELASTIC_RUN_ID=uuid.uuid4().hex)
    elif scheduler == "slurm":
        common.update(SLURM_NTASKS=str(world), SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NNODES=str(nodes),
                      SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_ID=str(uuid.uuid4().int % 10**6),
                      SLURM_JOB_NAME="qmoe-fit", SLURM_NODELIST="127.0.0.1")
    else:
        raise ValueError(f"scheduler must be 'torchrun' or 'slurm', got {scheduler!r}")
    ctx = preloaded_processes.context()
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        procs = []
        for r in range(world):
            node, local = divmod(r, per_node)
            if scheduler == "torchrun":
                ids = dict(RANK=str(r), LOCAL_RANK=str(local), GROUP_RANK=str(node), NODE_RANK=str(node),
                           ROLE_RANK=str(r))
            else:
                ids = dict(SLURM_PROCID=str(r), SLURM_LOCALID=str(local), SLURM_NODEID=str(node))
            rank_env = {**{k: v for k, v in env.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
                        **common, **ids}
            procs.append(ctx.Process(target=_run_rank, args=(cli_args, rank_env, str(cwd), f"{logs}/{r}.out",
                                                             f"{logs}/{r}.err")))
        try:
            preloaded_processes.run_to_end(procs, timeout)  # a killed rank's exit code says so (-9)
        finally:
            del store
        stdout, stderr = [], []
        for r, p in enumerate(procs):
            for name, parts in (("out", stdout), ("err", stderr)):
                log = Path(logs, f"{r}.{name}")
                text = log.read_text(errors="replace") if log.exists() else "(no output: the rank ended before it)\n"
                parts.append(f"----- rank {r} (exit {p.exitcode})\n{text}")
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    return subprocess.CompletedProcess(cli_args, failed[0] if failed else 0, "".join(stdout), "".join(stderr))


def _run_rank(cli_args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked rank: what `python cli.py *cli_args` does after its imports."""
    preloaded_processes.enter_child(out, err)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS"):  # read by torch when it was imported (in the server, without it)
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if env.get("PYTHONWARNINGS") in ("ignore", "default", "error", "always"):  # the bare actions the tests pass
        warnings.simplefilter(env["PYTHONWARNINGS"])
    os.chdir(cwd)
    sys.argv = ["cli.py", *cli_args]
    sys.path[:0] = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    runpy.run_path("cli.py", run_name="__main__")  # SystemExit / an exception: the process's exit code
