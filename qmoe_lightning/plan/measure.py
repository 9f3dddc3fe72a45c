"""`--measure`: the recipe trained for real for a few steps, each rank's peak tensor memory of one step measured
(`callbacks.StepMemoryProbe`), beside the plan of the same layout.

The run is `cli.py fit --config <recipe>` with the world size asked for (`--trainer.devices`), three optimizer steps,
no validation, in a temporary run directory; the probe measures the last micro-batch of step 2 (optimizer state
present, as in the planned step). For CPU recipes (small shapes): GPU recipes need their GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "cli.py"


def measure_peaks(recipe_path: str, world_size: int, steps: int = 3, timeout: float = 900) -> list[int]:
    """Each rank's measured peak bytes (rank order)."""
    if not CLI.is_file():
        raise FileNotFoundError(f"--measure runs {CLI}, which this installation does not have (run the planner from a "
                                "checkout of the project)")
    with tempfile.TemporaryDirectory(prefix="qmoe_measure_") as tmp:
        out = Path(tmp) / "memory"
        probe = {"class_path": "callbacks.StepMemoryProbe", "init_args": {"out_dir": str(out), "step": steps - 1}}
        cmd = [sys.executable, str(CLI), "fit", "--config", recipe_path, "--trainer.devices", str(world_size),
               "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(Path(tmp) / "run"), f"--trainer.callbacks+={json.dumps(probe)}"]
        done = subprocess.run(cmd, cwd=str(CLI.parent), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        files = sorted(out.glob("measured_rank*.json")) if out.is_dir() else []
        if done.returncode != 0 or len(files) != world_size:
            raise RuntimeError(f"the measuring run failed (exit {done.returncode}, {len(files)} of {world_size} ranks "
                               f"measured): {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        records = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
        return [int(r["peak_bytes"]) for r in records]
