"""`--measure`: the recipe trained for real for a few steps, each rank's peak tensor memory of one step measured
(`callbacks.StepMemoryProbe`), beside the plan of the same layout.

The run is `cli.py fit --config <recipe>` with the world size asked for (`--trainer.devices`), three optimizer steps,
no validation, in a temporary run directory; the probe measures the last micro-batch of step 2 (optimizer state
present, as in the planned step). For CPU recipes (small shapes): GPU recipes need their GPUs. `MeasuringRun`
starts the run in the background, so the plan can be computed meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "cli.py"


def measured_batch_index(accumulate_grad_batches: int, steps: int = 3) -> int:
    """The position in each rank's micro-batch order of the one the probe measures (the last of the last step)."""
    return steps * accumulate_grad_batches - 1


class MeasuringRun:
    def __init__(self, recipe_path: str, world_size: int, steps: int = 3, timeout: float = 900):
        if not CLI.is_file():
            raise FileNotFoundError(f"--measure runs {CLI}, which this installation does not have (run the planner "
                                    "from a checkout of the project)")
        self.world_size, self.timeout = world_size, timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="qmoe_measure_"))
        self.out = self.tmp / "memory"
        probe = {"class_path": "callbacks.StepMemoryProbe", "init_args": {"out_dir": str(self.out), "step": steps - 1}}
        self.cmd = [sys.executable, str(CLI), "fit", "--config", str(Path(recipe_path).resolve()),
                    "--trainer.devices", str(world_size), "--trainer.max_steps", str(steps),
                    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(self.tmp / "run"),
                    f"--trainer.callbacks+={json.dumps(probe)}"]
        self.log = open(self.tmp / "run.log", "w")
        self.process = subprocess.Popen(self.cmd, cwd=str(CLI.parent), stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def peaks(self) -> list[int]:
        """Each rank's measured peak bytes (rank order); waits for the run."""
        try:
            code = self.process.wait(timeout=self.timeout)
            self.log.close()
            files = sorted(self.out.glob("measured_rank*.json")) if self.out.is_dir() else []
            if code != 0 or len(files) != self.world_size:
                tail = (self.tmp / "run.log").read_text()[-4000:]
                raise RuntimeError(f"the measuring run failed (exit {code}, {len(files)} of {self.world_size} ranks "
                                   f"measured): {' '.join(self.cmd)}\n{tail}")
            records = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
            return [int(r["peak_bytes"]) for r in records]
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def measure_step(recipe, config, device, steps: int = 3) -> dict:
    """A one-device recipe's training step run for real on `device` (random init, the synthetic row, routing forced
    balanced as planned): the peak bytes of tensors during the last of `steps` steps (`callbacks.step_memory`
    `AllocatorPeak`), the same step `plan_step` plans."""
    import torch

    from callbacks.step_memory import AllocatorPeak

    from .fake_runtime import forced_routing
    from .simulate import build_module, build_optimizer, synthetic_row, training_step

    if recipe.strategy:
        raise ValueError("measure_step runs one-device recipes (no parallel plan); use --measure for the others")
    device = torch.device(device)
    module, built = build_module(recipe, config, device)
    optimizer = build_optimizer(module, recipe)
    row = synthetic_row(recipe, config)
    batch = type(row)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
    with forced_routing(None):
        for i in range(steps):
            if i < steps - 1:
                training_step(module, optimizer, batch, recipe, built.parallelized)
                continue
            state = [v for s in optimizer.state.values() for v in s.values()]
            alive = [*module.model.parameters(), *module.model.buffers(), *state,
                     *(v for _, v in batch.items() if isinstance(v, torch.Tensor))]
            with AllocatorPeak(device, alive) as window:
                training_step(module, optimizer, batch, recipe, built.parallelized)
    return {"peak_bytes": int(window.peak), "device": str(device)}
