"""What a run prints besides the progress bar: one block at fit start saying what is trained, one at fit end
saying where everything went; and a progress bar that does not print "Epoch 2/-2".

`RunReport` (global rank 0 prints; nothing is gathered and no collective is called, the other ranks are not there):
- start: the model (architecture, source), parameters total and trainable by group (embeddings and LM head,
  attention, linear attention, routed experts, shared expert, router, vision, LoRA adapters), precision, devices and
  the parallel layout, the data of each split (samples, tokens, packs, non-pad fraction, skipped rows by reason);
- end: checkpoints (directory, last), exports (HF model, PEFT adapter), figures, TensorBoard logs, saved config.
It replaces Lightning's model summary table in the recipes (`enable_model_summary: false`), whose FLOPs column
reads 0 for this model.

`StepProgressBar`: Lightning's progress bar, except that a run bounded by steps (`max_epochs` unset, -1) shows
"Epoch N" instead of "Epoch N/-2" (the rich bar's `max_epochs - 1`).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from qmoe_lightning.lora.apply import group_of

_BASE = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar  # what Lightning itself would pick


@runtime_checkable
class ReportsOutputs(Protocol):
    """A callback that writes files says where in the end-of-run block (`output_line` formats a line)."""

    def output_lines(self) -> list[str]: ...


def output_line(what: str, where) -> str:
    return f"  {what:<13} {where}"


class StepProgressBar(_BASE):
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{max(len(description), len(getattr(self, 'validation_description', '')))}}"


def parameter_groups(model) -> tuple[Counter, Counter]:
    """(total, trainable) parameter counts by group, from parameter names (native model): the LoRA report's groups
    (`lora.apply.group_of`) plus adapters, embeddings / LM head, the MTP module and routers on lines of their own."""
    total, trainable = Counter(), Counter()
    for name, p in model.named_parameters():
        if "lora_" in name:
            group = "LoRA adapters"
        elif "embed_tokens" in name or name.startswith("lm_head"):
            group = "embeddings / LM head"
        elif name.startswith("mtp."):
            group = "multi-token prediction"
        elif name.endswith("mlp.gate.weight"):
            group = "router"
        else:
            group = group_of(name).replace("_", " ")  # routed experts, shared expert, attention, ..., other
        total[group] += p.numel()
        if p.requires_grad:
            trainable[group] += p.numel()
    return total, trainable


def _m(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


class RunReport(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            rank_zero_info(self.start_block(trainer, pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            rank_zero_info(self.end_block(trainer))

    @staticmethod
    def start_block(trainer, pl_module) -> str:
        from data_modules.datamodule import MultimodalPackingDataModule
        from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

        model = pl_module.model
        hp = pl_module.hparams
        arch = model.hf_architecture()
        runtime = type(model).__name__  # e.g. FSDPQwen3_5Moe... once FSDP2 has wrapped it
        lines = [f"== run: {arch} from {hp.get('pretrained') or hp.get('model_config')}"
                 + (f" (as {runtime})" if runtime != arch else "")]
        total, trainable = parameter_groups(model)
        note = " (expert parallel: this rank's expert slices)" if pl_module.parallelized else ""
        lines.append(f"parameters: {_m(sum(total.values()))} total, {_m(sum(trainable.values()))} trainable{note}")
        for group in sorted(total, key=lambda g: -total[g]):
            lines.append(f"  {group:<22}{_m(total[group]):>12} {_m(trainable[group]):>12} trainable")
        strategy = trainer.strategy
        layout = f"{type(strategy).__name__}"
        if isinstance(strategy, ExpertParallelStrategy):
            layout += f" (ep {strategy.ep_size}, replicate {strategy.replicate})"
        lines.append(f"precision {trainer.precision}; {trainer.num_nodes} node(s) x {trainer.num_devices} "
                     f"{type(trainer.accelerator).__name__.replace('Accelerator', '').lower()} device(s); {layout}")
        lines.append(f"optimizer: AdamW lr {hp.get('lr')}, warmup {hp.get('warmup_steps')} steps, "
                     f"max_steps {trainer.max_steps}, accumulate {trainer.accumulate_grad_batches}")
        dm = trainer.datamodule
        for split in ("train", "val"):
            ds = None
            if isinstance(dm, MultimodalPackingDataModule):
                ds = dm.train_dataset if split == "train" else dm.val_dataset
            if ds is None:
                continue
            stats = dict(dm.stats.get(split, {}))
            skipped = {k: v for k, v in stats.items() if k not in ("ok", "truncated", "from_train_fraction")}
            lines.append(f"{split} data: {stats.get('ok', 0)} samples, {ds.num_tokens:,} tokens, {len(ds)} packs of "
                         f"{dm.max_tokens} (non-pad {ds.fill:.3f}); skipped {sum(skipped.values())}"
                         f"{' ' + str(skipped) if skipped else ''}; truncated {stats.get('truncated', 0)}")
        return "\n".join(lines)

    @staticmethod
    def end_block(trainer) -> str:
        lines = [f"== run finished at step {trainer.global_step}; outputs:"]
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                last = f"  (last: {os.path.basename(cb.last_model_path)})" if cb.last_model_path else ""
                lines.append(output_line("checkpoints", f"{cb.dirpath}{last}"))
        for cb in trainer.callbacks:
            if isinstance(cb, ReportsOutputs):
                lines += cb.output_lines()
        # the logger's own directory: `trainer.log_dir` broadcasts (a collective), and only rank 0 is here
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
        if log_dir:
            lines.append(f"  logs          {log_dir} (tensorboard --logdir {log_dir})")
        return "\n".join(lines)
