"""`StepMemoryProbe`: one training step's peak tensor memory on this rank, measured at the allocator, written as JSON.

What the memory planner's `--measure` compares its prediction with (`qmoe_lightning/plan`). A CPU run has no
allocator statistics like `torch.cuda.max_memory_allocated`, so the step runs under torch's profiler with
`profile_memory=True`, whose `[memory]` events are the CPU allocator's allocations and frees (signed byte counts) in
order; their largest running sum is the step's peak growth. The profiler reports no free of a block allocated before
it started, so what lives across steps is counted from the tensors instead: the peak is

    (parameters + buffers + optimizer state + the micro-batch, unique storages at the step's start)
    + (the largest running sum of the allocator's events during the step).

Gradients alive at the start (accumulated over earlier micro-batches of the window) are re-created inside the window
(cloned, the originals dropped), so the allocator sees them and their free. On CUDA the allocator's own peak
(`torch.cuda.max_memory_allocated`, reset at the step's start) is used.

The measured micro-batch is the last of the optimizer step `step` (0-based global step), where the optimizer state
exists and accumulated gradients are live: the step the planner plans.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class AllocatorPeak:
    """The peak bytes of tensors while inside, on `device` (see the module doc): CUDA: the allocator's own peak (reset
    at entry); CPU: `alive` (the tensors that live across the block, counted from their storages at entry) plus the
    largest running sum of the CPU allocator's events inside. `.peak` after the block."""

    def __init__(self, device: torch.device, alive=()):
        self.device, self.alive, self.peak, self.growth = torch.device(device), list(alive), None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self.baseline = _unique_bytes(self.alive)
            self.alive = []
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return False
        self._profiler.__exit__(*exc)
        events = [e for e in self._profiler.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        running = growth = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += e.nbytes()
            growth = max(growth, running)
        self.growth, self.peak = growth, self.baseline + growth
        return False


class StepMemoryProbe(Callback):
    def __init__(self, out_dir: str, step: int = 2):
        """
        Args:
            out_dir: where `measured_rank{r}.json` is written (one file per rank).
            step: the optimizer step (0-based) whose last micro-batch is measured.
        """
        self.out_dir, self.step = Path(out_dir), int(step)
        self._window: AllocatorPeak | None = None

    def _is_measured(self, trainer, batch_idx: int) -> bool:
        return trainer.global_step == self.step and (batch_idx + 1) % trainer.accumulate_grad_batches == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._is_measured(trainer, batch_idx):
            return
        params = [p for p in pl_module.parameters()]
        grads = [(p, p.grad) for p in params if p.grad is not None]
        for p, _ in grads:
            p.grad = None
        state = [v for opt in trainer.optimizers for s in opt.state.values() for v in s.values()]
        fields = batch.items() if hasattr(batch, "items") else []
        self._window = AllocatorPeak(next(iter(params)).device,
                                     [*params, *pl_module.buffers(), *state, *(v for _, v in fields)])
        self._window.__enter__()
        for p, g in grads:  # re-created inside the window: the allocator then sees their free
            p.grad = g.clone()
        del grads

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._window is None:  # (global_step has moved on by now: the start decided)
            return
        window, self._window = self._window, None
        window.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "step": self.step,
                  "baseline_bytes": getattr(window, "baseline", None), "growth_bytes": window.growth,
                  "peak_bytes": window.peak}
        (self.out_dir / f"measured_rank{trainer.global_rank}.json").write_text(json.dumps(record))
