"""Test-only Lightning callbacks, importable by `cli.py` subprocesses (the tests put this directory on PYTHONPATH)."""

from __future__ import annotations

import lightning.pytorch as pl


class CrashAtStep(pl.Callback):
    """Raise on every rank when optimizer step `step` begins: a crash after `step` completed steps (all ranks fail
    together, so none is left waiting in a collective)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"CrashAtStep: simulated crash at step {self.step}")


class DumpGradients(pl.Callback):
    """Save the full gradients of the first `steps` optimizer steps to `<default_root_dir>/grads_step{s}.pt`
    (rank 0 writes; every rank takes part in the gathers).

    Taken where the optimizer would see them minus clipping: after the module's global token normalisation
    (`on_before_optimizer_step`), before `configure_gradient_clipping`. Clipping and AdamW hide scaling bugs (a 2x
    expert gradient comes out of clip + Adam as the same update), so the multi-process tests compare these tightly.
    Expert-parallel tensors are gathered through their global (E, ...) views, FSDP2 shards by `full_tensor()`."""

    def __init__(self, steps: int = 1):
        self.steps = steps

    def setup(self, trainer, pl_module, stage) -> None:
        clip = pl_module.configure_gradient_clipping

        def dump_then_clip(optimizer, *args, **kwargs):
            if trainer.global_step < self.steps:
                self._dump(trainer, pl_module)
            return clip(optimizer, *args, **kwargs)

        pl_module.configure_gradient_clipping = dump_then_clip  # Lightning looks the hook up on the instance

    def _dump(self, trainer, pl_module) -> None:
        import os

        import torch

        from qmoe_lightning.parallel.state import expert_keys, full_tensor, global_view, is_expert_parallel_model

        model = pl_module.model
        keys = expert_keys(model) if is_expert_parallel_model(model) else {}
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = global_view(p.grad, keys[name]) if name in keys else p.grad
            grads[name] = full_tensor(g).detach().clone()
        if trainer.global_rank == 0:
            torch.save(grads, os.path.join(trainer.default_root_dir, f"grads_step{trainer.global_step}.pt"))


class DumpBalancingBias(pl.Callback):
    """At the end of fit, every rank saves its routers' balancing biases ((L, E), the module's router order) to
    `<default_root_dir>/bias_rank{r}.pt`. Checks on the way that the bias is a plain fp32 tensor, not a DTensor:
    FSDP2 does not shard buffers, so each rank holds a whole replica (which the test compares across ranks)."""

    def on_train_end(self, trainer, pl_module) -> None:
        import os

        import torch
        from torch.distributed.tensor import DTensor

        biases = [r.expert_bias for r in pl_module.model.routers()]
        assert all(not isinstance(b, DTensor) and b.dtype == torch.float32 for b in biases), biases
        torch.save(torch.stack([b.detach().cpu() for b in biases]),
                   os.path.join(trainer.default_root_dir, f"bias_rank{trainer.global_rank}.pt"))


class RecordStepLosses(pl.Callback):
    """Rank 0 writes every optimizer step's train loss (`last_step.loss`: the token-weighted CE of the step over all
    ranks), the last validation's metrics and the last logged expert-load statistics (`experts/*` from
    callbacks.ExpertLoadStats, `moe/*` from callbacks.MoEAuxLossLogger, when the run has them) to `<default_root_dir>/step_losses.json` at the end of fit:
    {"steps": {step: loss}, "val": {name: value}, "experts": {name: value}}."""

    def __init__(self):
        self.losses, self.val, self.experts = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.last_step
        if step is not None:
            self.losses[step.index] = step.loss
        self.experts.update({k: float(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith(("experts/", "moe/"))})

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            import json
            import os

            with open(os.path.join(trainer.default_root_dir, "step_losses.json"), "w") as f:
                json.dump({"steps": self.losses, "val": self.val, "experts": self.experts}, f)
