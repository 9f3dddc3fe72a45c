"""Start every rank of a multi-process `cli.py` run at once, as torchrun's agent does.

`python cli.py fit --trainer.devices N` lets Lightning start ranks 1..N-1, and it does so only after rank 0 has
imported everything and parsed its config; the ranks' imports then run one after the other. On the tiny test runs
the imports are most of the wall time (~7 s per interpreter on an idle 2-core machine, a step well under a
second), so that launch roughly doubled a 2-process test. `launch_ranks` starts all N interpreters together with
the variables torchrun gives its workers (`TORCHELASTIC_RUN_ID` makes Lightning use its TorchElastic environment
and start nothing itself), which is also the launch users take on clusters. The tests that are about Lightning's
own launcher (the acceptance runs of EP and CP, SIGTERM to the launching process) keep `python cli.py` alone.

The rendezvous store is held by this process for the whole run (`TORCHELASTIC_USE_AGENT_STORE`: every rank
connects as a client, as under torchrun): a port picked free, closed and bound by rank 0 seconds later is a race on
a busy machine. When one rank fails the others get a grace period to fail on their own (a crash test raises on
every rank), then are killed, as torchrun kills a failed group; a hung run is killed at the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 60.0  # after a rank failed, how long the others may take to fail or finish on their own


def launch_ranks(cli_args: list[str], world: int, env: dict | None = None, timeout: float = 600.0,
                 cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python cli.py *cli_args` as `world` ranks started together; -> one CompletedProcess: the first failing
    rank's return code (0 when all succeed), each rank's stdout / stderr one after the other, headed by its rank."""
    env = dict(os.environ if env is None else env)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the OS picks the port, held
    common = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE=str(world),
                  LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", NODE_RANK="0", ROLE_RANK="0", ROLE_WORLD_SIZE=str(world),
                  TORCHELASTIC_RUN_ID=uuid.uuid4().hex, TORCHELASTIC_USE_AGENT_STORE="True")
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        outs = [(open(Path(logs) / f"{r}.out", "w+"), open(Path(logs) / f"{r}.err", "w+")) for r in range(world)]
        procs = [subprocess.Popen([sys.executable, "cli.py", *cli_args], cwd=cwd, stdout=o, stderr=e,
                                  env={**env, **common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)})
                 for r, (o, e) in enumerate(outs)]
        try:
            _wait(procs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            del store
        stdout, stderr = [], []
        for r, (o, e) in enumerate(outs):
            for f, parts in ((o, stdout), (e, stderr)):
                f.seek(0)
                parts.append(f"----- rank {r} (exit {procs[r].returncode})\n{f.read()}")
                f.close()
    failed = [p.returncode for p in procs if p.returncode != 0]
    return subprocess.CompletedProcess(cli_args, failed[0] if failed else 0, "".join(stdout), "".join(stderr))


def _wait(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.1)
