"""`MoEAuxLossLogger`: the router load-balancing loss of every optimizer step, in total and per layer.

- `moe/aux_loss`: the model's `aux_loss` (all layers pooled, transformers' formula), mean over the micro-batches
  of the step on all ranks.
- `moe/aux_loss_layer_{l}` (and `moe/aux_loss_layer_max`): the same formula applied to one layer's router,
  computed from that layer's router logits and top-k picks (`RouterStats.per_layer_aux_loss`), mean over the
  micro-batches of the step on all ranks. A single layer's value is 1.0 for a perfectly uniform router and grows
  to num_experts / top_k when every token goes to the same experts.

The module only collects router statistics when a callback says it reads them (`ReadsRouterStats.needs_router_stats`), because it
means returning the router logits from the forward. The values come from the module's read-only summary of the
last optimizer step (`last_step`), logged once per step at the end of its last micro-batch.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from qmoe_lightning.global_sums import GlobalSums
from qmoe_lightning.router_stats import ReadsRouterStats, moe_layer_indices

from .module_contract import require_qmoe_module


class MoEAuxLossLogger(ReadsRouterStats, pl.Callback):
    def __init__(self, per_layer: bool = True, log_every_n_steps: int = 1):
        """
        Args:
            per_layer: also log one value per MoE layer (moe/aux_loss_layer_{l}).
            log_every_n_steps: log every n optimizer steps.
        """
        self.per_layer = per_layer
        self.log_every_n_steps = max(1, log_every_n_steps)
        self._last_index = 0

    @property
    def needs_router_stats(self) -> bool:  # the module collects them for the steps' summaries
        return self.per_layer

    def setup(self, trainer, pl_module, stage: str) -> None:
        require_qmoe_module(pl_module, self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        win = pl_module.last_step
        if win is None or win.index <= self._last_index:  # no new optimizer step since the last batch
            return
        self._last_index = win.index
        if trainer.global_step % self.log_every_n_steps:
            return
        metrics = {}
        sums = GlobalSums(pl_module.device, aux=torch.stack(win.aux_values).double().sum(),
                          micro_batches=len(win.aux_values))
        if self.per_layer and win.router_stats:
            stats = win.router_stats
            cp = pl_module.context_parallel_group
            if cp is not None:
                # each rank holds its slice's statistics; a layer's aux is a product of the row's sums, so the row's
                # are summed first (every rank of the group then holds the row's value, counted once per rank like
                # the aux values above)
                flat = cp.all_reduce_sum(torch.stack([s.flat() for s in stats]))
                stats = [s.unflat(f) for s, f in zip(stats, flat)]
            sums.add("layers", torch.stack([s.per_layer_aux_loss() for s in stats]).sum(0))
        sums = sums.reduced(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        n = sums["micro_batches"].clamp_min(1)
        metrics["moe/aux_loss"] = sums["aux"] / n
        if "layers" in sums:
            layers = sums["layers"] / n
            for layer, v in zip(moe_layer_indices(pl_module, len(layers)), layers.tolist()):
                metrics[f"moe/aux_loss_layer_{layer}"] = v
            metrics["moe/aux_loss_layer_max"] = float(layers.max())
        pl_module.log_dict({k: float(v) for k, v in metrics.items()})
