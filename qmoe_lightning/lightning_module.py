"""`QMoELightningModule`: the training objective of a native MoE model (any registered family) on packed
micro-batches, and the Lightning hooks that take its optimizer steps.

Where the parts live: the model is built by `build.build_for_run` (meta device, the checkpoint streamed in, LoRA,
freezing, the strategy's parallel plan); the step's token-count normalisation by `step_window.py` (each micro-batch
returns its UNNORMALISED sum, the window's global target count rescales the gradients before clipping: the gradient
of one big batch whatever the split); non-finite and empty steps by `step_guard.py`; DeepSeek-V3's bias balancing by
`models.moe.update_balancing_bias_`; evaluation sums by `evaluation.py`; generation by `generation.py`, its rows
written by `callbacks.PredictionWriter`; `train/tokens_per_s` and the data / model check by callbacks the CLI adds
(`TokensPerSecond`, `DataMatchesModel`). docs/usage.md has the configuration keys, docs/mtp.md and
docs/balancing.md the two optional objectives.

The objective of a micro-batch: CE_sum + aux_coef * n_targets * aux (`router_balancing` aux_loss or both) +
mtp.loss_scale * mean over depths of the MTP CE sums (with `mtp.enabled`), all divided by the step's global target
count afterwards. Under `router_balancing: bias` the aux term is left out (still computed and logged) and every
router's expert bias moves after each step from the window's global expert counts (the same update on every rank).

Logged: train/loss (token-weighted CE of the step), train/aux_loss (mean of the model's aux over micro-batches),
train/lr, train/grad_norm (before clipping), train/target_tokens; with balancing by bias experts/bias_abs_max and
experts/bias_abs_mean (after the step's update); val/loss, val/image_acc, val/text_acc, val/answer_acc (exact-match
greedy answers, `evaluation.py`). With MTP: train/mtp_loss (per-token MTP CE, mean over depths),
train/mtp_loss_depth{d}, val/mtp_loss, val/mtp_acc_depth{d}, val/mtp_acceptance (docs/mtp.md).
"""

from __future__ import annotations

import functools
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from .evaluation import EvaluationAccumulator
from .generation import GenerationOptions
from .lora import LoraConfig
from .models.batch import PackedBatch
from .models.moe import update_balancing_bias_
from .models.mtp import MtpConfig
from .optim import build_adamw, warmup_cosine_scheduler
from .parallel.clip import clip_gradients
from .router_stats import ReadsRouterStats
from .step_guard import (NonFiniteTrainingError, SkippedSteps, StepGuard, StepVerdict,  # noqa: F401  (re-exported)
                         nonfinite_gradient_groups, parameter_group)
from .step_window import StepSummary, StepWindow, scale_gradients_

__all__ = ["NonFiniteTrainingError", "QMoELightningModule", "StepSummary"]


class QMoELightningModule(pl.LightningModule):
    """Fine-tuning of a native MoE model (vision-language or text-only) on packed micro-batches."""

    def __init__(
        self,
        pretrained: str | None = "embedded",
        model_config: dict | str | None = None,
        text_only: bool = False,
        processor_source: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        aux_loss_coef: float | None = None,
        router_balancing: Literal["aux_loss", "bias", "both"] = "aux_loss",
        balancing_bias_rate: float = 1e-3,
        freeze_vision_tower: bool = False,
        freeze_router: bool = False,
        freeze_embeddings: bool = False,
        activation_checkpointing: bool = False,
        label_logits_only: bool = True,
        init_seed: int = 0,
        embedded_cache_dir: str | None = None,
        lora: LoraConfig | None = None,
        generation: GenerationOptions | None = None,
        mtp: MtpConfig | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        nonfinite_max_skips: int = 5,
    ):
        """
        Args:
            pretrained: Hugging Face model directory or hub id ("org/name") to fine-tune (Qwen3.5-MoE or
                Qwen3-VL-MoE), "embedded" for the bundled tiny Qwen3.5-MoE checkpoint, "embedded:qwen3_vl_moe" for
                the bundled tiny Qwen3-VL-MoE one. None: random init from `model_config`.
            model_config: used when `pretrained` is None: config.json keys as a dict (its `model_type` picks the
                family, default qwen3_5_moe), or a path to a config.json / a directory holding one.
            text_only: build the family's text-only model (no vision tower) instead of the vision-language one.
            processor_source: directory whose tokenizer/processor files are copied into HF exports
                (default: the `pretrained` directory).
            lr: peak AdamW learning rate.
            weight_decay: AdamW weight decay for matrices (norms, biases, A_log, dt_bias are never decayed).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: optimizer steps of linear warmup.
            min_lr_ratio: the cosine decays to lr * min_lr_ratio.
            total_steps: optimizer steps of the schedule; default the trainer's estimated stepping batches
                (max_steps, or epochs x batches / accumulation).
            aux_loss_coef: coefficient of the router load-balancing loss; default the config's
                router_aux_loss_coef (0.001 for Qwen3.5-MoE). 0 disables it. Ignored (the aux loss is only logged)
                when `router_balancing` is "bias".
            router_balancing: how expert loads are balanced: "aux_loss" (the load-balancing loss, as transformers),
                "bias" (DeepSeek-V3's aux-loss-free balancing: a per-expert routing bias for the top-k selection,
                moved after every step towards equal loads; no aux term in the loss) or "both". See the module doc.
            balancing_bias_rate: the bias step per optimizer step (DeepSeek-V3: 1e-3), in units of router
                probability: an expert above its layer's mean load loses this much, one below gains it.
            freeze_vision_tower: do not train `model.visual.*`.
            freeze_router: do not train the routers (`*.mlp.gate.weight`).
            freeze_embeddings: do not train the input embeddings (and the LM head if tied).
            activation_checkpointing: recompute every decoder block in backward (less memory, ~30% more compute).
            label_logits_only: compute the LM head only at target positions, fused with the CE in row chunks during
                training (no (T, vocab) fp32 logits at all).
            init_seed: seed of the random init when `pretrained` is None.
            embedded_cache_dir: where the embedded default is built (default ~/.cache/qmoe_lightning).
            lora: LoRA adapters (`qmoe_lightning.lora.LoraConfig`: rank, alpha, targets, expert_rank, ...). When
                set, the base model is frozen, only the adapters train, and checkpoints hold the adapters (plus
                optimizer state) only; HF exports are merged. None: full fine-tuning.
            generation: decoding options of `cli.py predict` (`qmoe_lightning.generation.GenerationOptions`:
                max_new_tokens, temperature, top_p, seed); None: greedy, 64 new tokens. Not a training setting:
                a resume ignores it.
            mtp: multi-token prediction (`qmoe_lightning.models.mtp.MtpConfig`: enabled, num_layers, loss_scale,
                init). Enabled, the checkpoint's `mtp.*` module trains beside the model (Qwen3.5-MoE) and exports
                write it back; None / disabled: `mtp.*` tensors are copied through unchanged.
            nonfinite: what a step with a NaN / inf loss or gradient norm does: "stop" (the run ends with an error
                naming the step, the quantity and the parameter groups; nothing of that step is saved or exported)
                or "skip" (the optimizer step is dropped: weights, optimizer state and LR schedule stay as they
                were; counted as train/nonfinite_skips). Steps without any target token are always skipped
                (train/empty_steps).
            nonfinite_max_skips: with nonfinite "skip", how many non-finite steps in a row are skipped; one more
                stops the run as "stop" does.
        """
        super().__init__()
        if pretrained is None and model_config is None:
            raise ValueError("give `pretrained` (a model directory, hub id or 'embedded') or `model_config`")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if router_balancing not in ("aux_loss", "bias", "both"):
            raise ValueError(f"router_balancing must be 'aux_loss', 'bias' or 'both', got {router_balancing!r}")
        if not balancing_bias_rate >= 0.0:
            raise ValueError(f"balancing_bias_rate must be >= 0, got {balancing_bias_rate}")
        self.step_guard = StepGuard(nonfinite, nonfinite_max_skips, lr)  # checks both values
        self.save_hyperparameters()
        self.model = None
        self.checkpoint_source = None  # where the weights came from (companion files, mtp.* passthrough): exports
        self.parallelized = False  # the model is EP / FSDP2-parallelised (set by configure_model; read by callbacks)
        self.last_step: StepSummary | None = None  # the last optimizer step taken (callbacks read it)
        self._window: StepWindow | None = None  # the optimizer step in progress
        # router statistics cost output_router_logits: collected when a callback reads them (`ReadsRouterStats`),
        # decided at fit start
        self._collect_router_stats = False
        self._evaluation = EvaluationAccumulator()
        self._verdict: StepVerdict | None = None  # the step between on_before_optimizer_step and the optimizer
        self._hold_schedule = False  # the last step was skipped: the LR schedule does not advance
        self._predictor = None  # cli.py predict: the transformers model answering the prompts

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:  # configure_model runs again for validate/test after fit
            return
        from .build import build_for_run

        built = build_for_run(self.hparams, self._trainer)
        self.model, self.checkpoint_source, self.parallelized = built.model, built.source, built.parallelized
        if self.balances_by_bias:
            # after loading: an HF checkpoint has no bias (it starts at 0); a Lightning / distributed checkpoint
            # restores it later like any buffer. Not sharded by FSDP2 (a buffer): a plain replica on every rank
            for router in self.model.routers():
                router.enable_balancing_bias()
        if built.lora_report is not None:
            rank_zero_info("LoRA adapters:\n" + built.lora_report.table())
            self.strict_loading = False  # checkpoints hold the adapters only
        rank_zero_info(built.summary(self._trainer.global_rank if self._trainer is not None else 0))

    @property
    def balances_by_bias(self) -> bool:
        return self.hparams.get("router_balancing", "aux_loss") in ("bias", "both")

    @property
    def aux_loss_coef(self) -> float:
        """The aux term's weight in the training loss: 0 when balancing by bias alone."""
        if self.hparams.get("router_balancing", "aux_loss") == "bias":
            return 0.0
        if self.hparams.aux_loss_coef is not None:
            return float(self.hparams.aux_loss_coef)
        return float(self.model.text_config.router_aux_loss_coef or 0.0)

    def forward(self, batch: PackedBatch | dict, **kwargs):
        return self.model(_packed(batch), **kwargs)

    @property
    def context_parallel_group(self):
        """The ranks sharing each packed row (the strategy's cp_size > 1), else None."""
        return self.model.context_parallel_group()

    # ------------------------------------------------------------------ training
    @property
    def step_in_progress(self) -> bool:
        """Micro-batches of an optimizer step not taken yet (gradient accumulation): weights are mid-update."""
        return self._window is not None

    def on_fit_start(self) -> None:
        self._collect_router_stats = any(isinstance(cb, ReadsRouterStats) and cb.needs_router_stats
                                         for cb in self.trainer.callbacks)
        self._window = None

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        batch = _packed(batch)
        # label_logits_only: LM head + CE fused over target rows (no (T, vocab) logits; training never reads them)
        out = self(batch, num_items_in_batch=1, return_logits=not self.hparams.label_logits_only,
                   output_router_logits=self._collect_router_stats)
        n = out.num_label_tokens.to(out.ce_loss.dtype)
        coef = self.aux_loss_coef
        # the aux term weighs the whole row's targets (under context parallelism the aux's gradient is this rank's
        # share of the row's aux, and its weight the row's count on every rank)
        loss = out.ce_loss + coef * out.row_label_tokens.to(n.dtype) * out.aux_loss if coef else out.ce_loss
        if out.mtp is not None:  # CE sums (num_items_in_batch=1): rescaled by N_global with the rest
            loss = loss + self.model.mtp_loss_scale * out.mtp.ce.mean()
        cp = self.context_parallel_group
        if self._window is None:
            self._window = StepWindow()
        self._window.add(out, batch.real_tokens / (cp.size if cp is not None else 1),  # a split row counted once
                         expert_counts=self.balances_by_bias, router_stats=self._collect_router_stats)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Normalise the accumulated gradients by the global target-token count of the step (`step_window.py`)."""
        win, self._window = self._window, None
        mtp = self.model.mtp
        routers = self.model.routers() if self.balances_by_bias else []
        shape = (len(routers), routers[0].expert_bias.numel()) if routers else None
        totals = win.reduce(self.device, self._sum_over_ranks, mtp.num_depths if mtp is not None else 0, shape)
        index = self.trainer.global_step + 1
        # global values: every rank reaches the same verdict (`step_guard.py`)
        self._verdict = StepVerdict(index, empty=totals.n_targets == 0, bad_loss=totals.nonfinite_losses(),
                                    bias_update=(routers, totals.expert_counts) if routers else None)
        scale_gradients_(optimizer, totals.normalisation_factor(self.trainer.accumulate_grad_batches,
                                                                self.trainer.world_size))
        self.last_step = win.summary(index, totals)
        self.log("train/loss", self.last_step.loss, prog_bar=True)
        self.log("train/aux_loss", totals.aux_mean)
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)
        self.log("train/target_tokens", totals.n_targets)
        per_depth = totals.mtp_loss_per_depth()
        if per_depth:
            self.log("train/mtp_loss", sum(per_depth) / len(per_depth), prog_bar=True)
            if len(per_depth) > 1:
                for d, value in enumerate(per_depth, 1):
                    self.log(f"train/mtp_loss_depth{d}", value)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip (and log the norm), then take the step (applying the deferred balancing-bias update) or skip it, or
        stop the run (`step_guard.py`: the same decision on every rank)."""
        verdict, self._verdict = self._verdict, None
        if verdict is not None and verdict.empty:  # nothing to learn from: no norm, no optimizer step
            self.step_guard.empty_step(verdict)
            self._skip_step(optimizer)
            return
        norm = clip_gradients(self.model, optimizer, self.parallelized, gradient_clip_val, gradient_clip_algorithm)
        if norm is not None:
            self.log("train/grad_norm", norm.float())
        groups = functools.partial(nonfinite_gradient_groups, self.model, optimizer, self._sum_over_ranks,
                                   self.device)
        if not self.step_guard.take(verdict, norm, groups):
            self._skip_step(optimizer)
        elif verdict is not None and verdict.bias_update is not None:
            bias = update_balancing_bias_(*verdict.bias_update, float(self.hparams.balancing_bias_rate))
            self.log("experts/bias_abs_max", bias.max())
            self.log("experts/bias_abs_mean", bias.mean())

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once. Lightning zeroes them only inside the NEXT step's
        closure, after its forward: every forward would run beside a full set of stale gradients (one more copy of
        the trainable parameters at the step's peak; `python -m qmoe_lightning.plan` measured it)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def _skip_step(self, optimizer) -> None:
        """No optimizer step: AdamW updates (and decays) only parameters with a gradient, so without any it
        changes neither the weights nor its state; the LR schedule is held for this step (`lr_scheduler_step`)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._hold_schedule = True
        self.log("train/nonfinite_skips", float(self.step_guard.skipped.nonfinite))
        self.log("train/empty_steps", float(self.step_guard.skipped.empty))

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if self._hold_schedule:  # the optimizer step was skipped: the schedule stays where it was
            self._hold_schedule = False
            return
        super().lr_scheduler_step(scheduler, metric)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["qmoe_skipped_steps"] = self.step_guard.skipped.state()
        # with LoRA the frozen base is `pretrained` itself: storing it in every checkpoint would only cost disk
        if self.hparams.lora is not None and self.model is not None:
            from .lora import keep_adapters_only

            keep_adapters_only(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.step_guard.skipped = SkippedSteps.from_state(checkpoint.get("qmoe_skipped_steps"))
        # distributed checkpoints (ExpertParallelStrategy) hold no "state_dict" here: the strategy has loaded the
        # tensors itself and checked them against the model (missing trainable / unexpected tensors raise there)
        if self.hparams.lora is not None and self.model is not None and "state_dict" in checkpoint:
            from .lora import check_adapter_state_dict

            prefix = "model."
            adapters = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
            check_adapter_state_dict(adapters, self.model)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_adamw(self.model, hp.lr, hp.weight_decay, hp.betas, hp.eps)
        total = hp.total_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine_scheduler(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: PackedBatch) -> None:
        batch = _packed(batch)
        mtp = self.model.mtp
        out = self(batch, num_items_in_batch=1, label_logits_only=True, output_router_logits=False,
                   mtp_metrics=mtp is not None)
        self._evaluation.add(out, batch, self.device, mtp.num_depths if mtp is not None else 0,
                             self.context_parallel_group)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        # already global: no further sync
        self.log_dict(self._evaluation.metrics("val", self._sum_over_ranks), prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._evaluation.metrics("test", self._sum_over_ranks), prog_bar=True)

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        """`cli.py predict`: the model handed to transformers' `generate` in memory (`generation.py`: tensors shared,
        LoRA merged), in one process (generation needs the whole model on one device)."""
        from .generation import Predictor, transformers_model

        trainer = self.trainer
        if trainer.world_size > 1:
            raise RuntimeError(
                f"cli.py predict runs in one process (this run has {trainer.world_size}): generation needs the whole "
                "model on one device. Run it with --trainer.devices 1 (and --trainer.num_nodes 1) on the export "
                "(--model.pretrained <default_root_dir>/hf_export), or serve the export with vLLM / transformers.")
        fetch = None
        if self.parallelized:  # FSDP2 / expert-parallel on one process: full tensors
            from .parallel.state import full_tensor_fetcher

            fetch = full_tensor_fetcher(self.model)
        tokenizer = trainer.datamodule.encoder.processor.tokenizer
        self._predictor = Predictor(transformers_model(self.model, fetch), tokenizer,
                                    GenerationOptions.from_any(self.hparams.generation))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One predictions.jsonl row (`Predictor.prediction_row`; `callbacks.PredictionWriter` writes them)."""
        return self._predictor.prediction_row(batch)

    def on_predict_epoch_end(self) -> None:
        self._predictor = None  # frees the transformers model's cache and merged tensors


def _packed(batch: PackedBatch | dict) -> PackedBatch:
    """The DataModule's batches are PackedBatch already; a dict (tests, hand-made batches) is checked into one."""
    return batch if isinstance(batch, PackedBatch) else PackedBatch.from_dict(batch)
