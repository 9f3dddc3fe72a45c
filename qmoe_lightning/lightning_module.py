"""`QMoELightningModule`: fine-tunes a native model (Qwen3.5-MoE, Qwen3-VL-MoE) on packed micro-batches.

Model construction (`configure_model`, so Lightning runs it under the strategy's init context): the model is built
on the meta device, materialised empty on the target device (bf16 directly under `bf16-true`, so a large model is
never held in fp32) and then filled by streaming the safetensors of `pretrained`, or randomly initialised from
`model_config`. `pretrained: embedded` selects the bundled tiny checkpoint (`qmoe_lightning.embedded`). Under
`ExpertParallelStrategy` with a checkpoint, LoRA and the parallelisation (EP + FSDP2) are applied on meta and each
rank then reads only its own expert slices and rows (`parallel/loading.py`): no rank ever holds the full model.

Loss normalisation (the notable choice): the objective of one optimizer step is
    sum over all micro-batches and data-parallel ranks of CE_sum / N_global
    + aux_coef * sum over micro-batches of n_i * aux_i / N_global
where N_global counts the target tokens of the whole accumulation window on all ranks. That is the gradient of
one big batch made of every micro-batch, whatever the split. N_global is only known once the window is complete,
so each micro-batch returns the UNNORMALISED sum (CE_sum_i + aux_coef * n_i * aux_i); Lightning divides it by
`accumulate_grad_batches` and DDP averages over ranks; `on_before_optimizer_step` all-reduces the window's token
count and multiplies the gradients by `accumulate_grad_batches * world_size / N_global` before clipping and the
optimizer. (The aux term is weighted by each micro-batch's target tokens so the same single rescale is exact for it
too.) Callbacks' `on_before_optimizer_step` run BEFORE this rescale (Lightning calls callbacks first); read
gradients in `configure_gradient_clipping` or later.

Non-finite steps (`nonfinite`: stop / skip) and steps without any target token: `step_guard.py`; every rank takes
the same decision from global values.

Multi-token prediction (`mtp: {enabled: true}`, Qwen3.5-MoE): the checkpoint's `mtp.*` module trains beside the
model and each micro-batch adds `mtp.loss_scale * mean over depths of its MTP CE sum`, normalised by the same
global target count N_global as the main CE (as NeMo Automodel; depth d has a few targets fewer per document).

Expert load balancing (`router_balancing`): `aux_loss` (default) adds the aux term above; `bias` is DeepSeek-V3's
aux-loss-free balancing instead: every router gets a per-expert bias (a fp32 buffer, `models/moe.py`) that only
shifts which experts are SELECTED, never the gate weights, and the aux term is left out of the loss (still computed
and logged); `both` does both. After each optimizer step, the expert pick counts of the whole accumulation window
on all data-parallel ranks ((L, E), summed in the same all-reduce as the token count, so exact integers and the same
on every rank) move each layer's bias by `balancing_bias_rate * sign(mean load - load)`: every rank applies the
identical update to its (replicated, never sharded) copy. The bias is in Lightning and distributed checkpoints
(adapter-only LoRA checkpoints included) but not in HF exports: the Hugging Face router has none, so an exported
model (and `cli.py predict`, which generates with transformers) routes by the probabilities alone.

Logged: train/loss (token-weighted CE of the step), train/aux_loss (mean of the model's aux over micro-batches),
train/lr, train/grad_norm (before clipping), train/tokens_per_s (all ranks, wall time between optimizer steps);
with balancing by bias experts/bias_abs_max and experts/bias_abs_mean (after the step's update, over layers and
experts); val/loss, val/image_acc, val/text_acc (exact-match greedy answers, see `evaluation.py`). With MTP:
train/mtp_loss (per-token MTP CE, mean over depths) and train/mtp_loss_depth{d} (d = 1..D), val/mtp_loss,
val/mtp_acc_depth{d} (top-1 accuracy of depth d, counted from 1, whose target is d tokens after the next one) and
val/mtp_acceptance (how often depth 1's argmax equals the main model's argmax one step later: the
speculative-decoding acceptance rate of a one-token draft).

Predict (`cli.py predict`): the model is handed to transformers' `generate` in memory (`generation.py`: tensors
shared, LoRA merged) and every prompt of `data.predict_path` is answered; `<default_root_dir>/predictions.jsonl`
gets one row per prompt and the exact-match accuracy is printed (image / text apart, as val/image_acc and
val/text_acc). One process only: a model sharded over several processes is exported and served instead.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from .evaluation import document_answer_correct, evaluation_metrics, evaluation_sums
from .generation import GenerationOptions
from .global_sums import GlobalSums
from .lora import LoraConfig
from .models.batch import PackedBatch
from .models.mtp import MtpConfig
from .optim import build_adamw, warmup_cosine_scheduler
from .parallel.strategy import ExpertParallelStrategy
from .router_stats import RouterStats
from .step_guard import (NonFiniteTrainingError, SkippedSteps, StepGuard, StepVerdict,  # noqa: F401  (re-exported)
                         nonfinite_gradient_groups, parameter_group)


@dataclass
class _StepWindow:
    """Sums over the micro-batches of the optimizer step in progress (this rank); the module's own."""

    ce_sum: torch.Tensor | float = 0.0
    n_targets: torch.Tensor | float = 0.0
    aux_sum: torch.Tensor | float = 0.0
    tokens: int = 0
    micro_batches: int = 0
    aux_values: list[torch.Tensor] = field(default_factory=list)  # model aux loss of each micro-batch
    expert_counts: torch.Tensor | float = 0.0  # (L, E) top-k picks of real tokens, when balancing by bias
    router_stats: list[RouterStats] = field(default_factory=list)  # per micro-batch, when collected
    mtp_ce: torch.Tensor | float = 0.0  # (D,) MTP CE sums per depth
    mtp_n: torch.Tensor | float = 0.0  # (D,) MTP targets per depth


@dataclass(frozen=True)
class StepSummary:
    """What the last optimizer step did: `QMoELightningModule.last_step`, read by callbacks (never written).

    `index` is the step's number (the trainer's global step after it: 1 for the first step of a run, resumes
    continue the count): a callback that must see each step once keeps the last index it handled."""

    index: int
    loss: float  # token-weighted CE of the step, all ranks
    global_targets: float  # target tokens of the step, all ranks
    aux_values: tuple[torch.Tensor, ...]  # the model's aux loss of each of this rank's micro-batches
    router_stats: tuple[RouterStats, ...]  # per micro-batch of this rank, when a callback asked for them


class QMoELightningModule(pl.LightningModule):
    """Fine-tuning of a native vision-language MoE model (either family; text-only Qwen3.5-MoE too) on packed
    micro-batches."""

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
        self._window: _StepWindow | None = None  # the optimizer step in progress
        # router statistics cost output_router_logits: collected when a callback says it reads them
        # (`needs_router_stats = True`), decided at fit start
        self._collect_router_stats = False
        self._t_prev: float | None = None  # end of the last optimizer step (tokens/s)
        self._t_pause: float | None = None  # start of an in-fit validation (not training time)
        self._eval_sums: GlobalSums | None = None
        self._verdict: StepVerdict | None = None  # the step between on_before_optimizer_step and the optimizer
        self._hold_schedule = False  # the last step was skipped: the LR schedule does not advance

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:  # configure_model runs again for validate/test after fit
            return
        from .build import build_model
        from .models.checkpoint import resolve_checkpoint_dir
        from .models.registry import config_from, family_of, load_config

        hp = self.hparams
        trainer = self._trainer
        precision = str(trainer.precision) if trainer is not None else "32-true"
        checkpoint = None
        if hp.pretrained is not None:
            checkpoint = resolve_checkpoint_dir(self._resolve_embedded(hp.pretrained))
            config = load_config(checkpoint)
        else:
            config = config_from(hp.model_config)
        family = family_of(config.model_type)
        model_class = family.model_class(text_only=hp.text_only)
        mtp = MtpConfig.from_any(hp.mtp)
        model_kwargs = {}
        if mtp is not None and mtp.enabled:
            if not family.supports_mtp:
                raise ValueError(f"mtp.enabled: {family.name} has no multi-token prediction module (its checkpoints "
                                 "carry none); disable model.mtp")
            model_kwargs = dict(mtp_layers=mtp.depths(getattr(config, "text_config", config)),
                                mtp_loss_scale=mtp.loss_scale)
        built = build_model(
            model_class, config, model_kwargs=model_kwargs,
            mtp_random_init=mtp is not None and mtp.enabled and mtp.init == "random",
            checkpoint=checkpoint,
            processor_dir=Path(self._resolve_embedded(hp.processor_source)) if hp.processor_source else None,
            dtype={"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision),
            device=trainer.strategy.root_device if trainer is not None else torch.device("cpu"),
            lora=hp.lora, freeze=self._apply_freezing,
            # ExpertParallelStrategy's plan (EP + activation checkpointing + FSDP2); other strategies have none
            parallelize=(trainer.strategy.parallelize if trainer is not None
                         and isinstance(trainer.strategy, ExpertParallelStrategy) else None),
            activation_checkpointing=hp.activation_checkpointing, init_seed=hp.init_seed)
        self.model, self.checkpoint_source, self.parallelized = built.model, built.source, built.parallelized
        if self.balances_by_bias:
            # after loading: an HF checkpoint has no bias (it starts at 0); a Lightning / distributed checkpoint
            # restores it later like any buffer. Not sharded by FSDP2 (a buffer): a plain replica on every rank
            for router in self._routers():
                router.enable_balancing_bias()
        if built.lora_report is not None:
            rank_zero_info("LoRA adapters:\n" + built.lora_report.table())
            self.strict_loading = False  # checkpoints hold the adapters only
        rank_zero_info(built.summary(trainer.global_rank if trainer is not None else 0))

    def _resolve_embedded(self, value):
        from qmoe_lightning.embedded import resolve_path

        return resolve_path(value, "model", self.hparams.embedded_cache_dir)

    def _apply_freezing(self, model) -> None:
        hp = self.hparams
        frozen = 0
        for name, p in model.named_parameters():
            freeze = ((hp.freeze_vision_tower and name.startswith("model.visual."))
                      or (hp.freeze_router and name.endswith("mlp.gate.weight"))
                      or (hp.freeze_embeddings and name.endswith("embed_tokens.weight")))
            if freeze:
                p.requires_grad_(False)
                frozen += p.numel()
        if frozen:
            rank_zero_info(f"frozen: {frozen / 1e6:.2f}M parameters")

    @property
    def balances_by_bias(self) -> bool:
        return self.hparams.get("router_balancing", "aux_loss") in ("bias", "both")

    def _routers(self) -> list:
        """The routers in the order of the model's expert counts' rows (its MoE layers)."""
        text = self.model.text_model
        return [text.layers[i].mlp.gate for i in text.moe_layers]

    @property
    def aux_loss_coef(self) -> float:
        """The aux term's weight in the training loss: 0 when balancing by bias alone."""
        if self.hparams.get("router_balancing", "aux_loss") == "bias":
            return 0.0
        if self.hparams.aux_loss_coef is not None:
            return float(self.hparams.aux_loss_coef)
        return float(getattr(self.model.text_config, "router_aux_loss_coef", 0.0) or 0.0)

    def forward(self, batch: PackedBatch | dict, **kwargs):
        return self.model(_packed(batch), **kwargs)

    # ------------------------------------------------------------------ training
    @property
    def step_in_progress(self) -> bool:
        """Micro-batches of an optimizer step not taken yet (gradient accumulation): weights are mid-update."""
        return self._window is not None

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        batch = _packed(batch)
        if self._window is None:
            self._window = _StepWindow()
        win = self._window
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
            win.mtp_ce = win.mtp_ce + out.mtp.ce.detach().double()
            win.mtp_n = win.mtp_n + out.mtp.num_targets.double()
        win.ce_sum = win.ce_sum + out.ce_loss.detach()
        win.n_targets = win.n_targets + n.detach()
        win.aux_sum = win.aux_sum + out.aux_loss.detach()
        win.aux_values.append(out.aux_loss.detach())
        win.tokens += batch.real_tokens / self.context_parallel_size  # the cp ranks of a row count it once
        win.micro_batches += 1
        if self.balances_by_bias:
            win.expert_counts = win.expert_counts + out.expert_token_counts.detach()
        if self._collect_router_stats and out.router_logits is not None:
            win.router_stats.append(RouterStats.from_router_outputs(out.router_logits, out.expert_token_counts,
                                                                    out.token_mask))
        return loss

    @property
    def context_parallel_group(self):
        """The ranks sharing each packed row (the strategy's cp_size > 1), else None."""
        return self.model.context_parallel_group()

    @property
    def context_parallel_size(self) -> int:
        cp = self.context_parallel_group
        return cp.size if cp is not None else 1

    def on_train_start(self) -> None:
        self._t_prev = time.perf_counter()

    def on_fit_start(self) -> None:
        self._check_data_processor()
        self._collect_router_stats = any(getattr(cb, "needs_router_stats", False) for cb in self.trainer.callbacks)
        self._window = None

    def on_test_start(self) -> None:
        self._check_data_processor()

    def _check_data_processor(self) -> None:
        """The DataModule's token ids must index this model's embedding, and its vision placeholders must be the
        ids the model replaces: a tokenizer of another model trains on garbage ids without any error otherwise."""
        enc = getattr(getattr(self.trainer, "datamodule", None), "encoder", None)
        if enc is None or self.model is None:
            return
        config = self.model.config
        text = getattr(config, "text_config", config)
        vocab, rows = len(enc.processor.tokenizer), int(text.vocab_size)
        problems = []
        if vocab > rows:
            problems.append(f"its tokenizer has {vocab} tokens but the model embeds {rows}")
        for name in ("image_token_id", "video_token_id"):
            want = getattr(config, name, None)
            if want is not None and getattr(enc, name) != want:
                problems.append(f"its {name} is {getattr(enc, name)}, the model's is {want}")
        if problems:
            raise ValueError(f"data.model_path {enc.model_dir} does not fit model.pretrained "
                             f"{self.hparams.pretrained}: {'; '.join(problems)}. Leave data.model_path unset (it then "
                             "follows the model) or point it at the model's own processor.")

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Normalise the accumulated gradients by the global target-token count of the step (see module doc)."""
        win, self._window = self._window, None
        sums = GlobalSums(self.device, n_targets=win.n_targets, ce=win.ce_sum, aux=win.aux_sum, tokens=win.tokens,
                          micro_batches=win.micro_batches)
        mtp = self.model.mtp
        depths = mtp.num_depths if mtp is not None else 0
        if depths:  # per-depth MTP CE sums and targets ride along in the same all-reduce
            sums.add("mtp_ce", win.mtp_ce, (depths,))
            sums.add("mtp_n", win.mtp_n, (depths,))
        routers = self._routers() if self.balances_by_bias else []
        if routers:  # the window's pick counts ride along in the same all-reduce (integers: exact in float64)
            shape = (len(routers), routers[0].expert_bias.numel())
            counts = torch.as_tensor(win.expert_counts)
            if counts.dim() and tuple(counts.shape) != shape:
                raise RuntimeError(f"expert counts of shape {tuple(counts.shape)} for {len(routers)} routers of "
                                   f"{shape[1]} experts: the model's count rows must be its MoE decoder layers, in "
                                   "order")
            sums.add("expert_counts", counts, shape)  # a window without micro-batch: 0
        sums = sums.reduced(self._sum_over_ranks)
        n_global, ce_global, aux_global = sums.value("n_targets"), sums.value("ce"), sums.value("aux")
        # global values: every rank reaches the same verdict (see the module doc)
        bad_loss = [f"{what} {value}" for what, value in (("loss", ce_global), ("aux loss", aux_global))
                    if not math.isfinite(value)]
        if depths and not bool(torch.isfinite(torch.cat([sums["mtp_ce"], sums["mtp_n"]])).all()):
            bad_loss.append("mtp loss " + ", ".join(f"{v:g}" for v in sums["mtp_ce"].tolist()))
        self._verdict = StepVerdict(self.trainer.global_step + 1, empty=n_global == 0, bad_loss=bad_loss,
                                     bias_update=(routers, sums["expert_counts"]) if routers else None)
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(n_global, 1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.last_step = StepSummary(self.trainer.global_step + 1, ce_global / max(n_global, 1.0), n_global,
                                     tuple(win.aux_values), tuple(win.router_stats))
        now = time.perf_counter()
        dt = now - (self._t_prev or now)
        self._t_prev = now
        self.log("train/loss", self.last_step.loss, prog_bar=True)
        self.log("train/aux_loss", aux_global / max(sums.value("micro_batches"), 1.0))
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)
        self.log("train/target_tokens", n_global)
        if dt > 0:
            self.log("train/tokens_per_s", sums.value("tokens") / dt, prog_bar=True)
        if depths:
            per_depth = (sums["mtp_ce"] / sums["mtp_n"].clamp_min(1.0)).tolist()
            self.log("train/mtp_loss", sum(per_depth) / len(per_depth), prog_bar=True)
            if len(per_depth) > 1:
                for d, value in enumerate(per_depth, 1):
                    self.log(f"train/mtp_loss_depth{d}", value)

    @torch.no_grad()
    def _update_balancing_bias(self, routers: list, counts: torch.Tensor) -> None:
        """bias += rate * sign(mean load - load) per layer, from the step's global (L, E) counts. Every rank holds
        the same counts and the same bias, so every rank computes the same fp32 result: the replicas never drift.
        Applied before the optimizer step, which does not read the bias: the next forward is the first to see it."""
        from .models.moe import balancing_bias_delta

        delta = balancing_bias_delta(counts, float(self.hparams.balancing_bias_rate))
        for router, d in zip(routers, delta):
            router.expert_bias.add_(d.to(router.expert_bias))
        bias = torch.stack([r.expert_bias for r in routers]).abs()
        self.log("experts/bias_abs_max", bias.max())
        self.log("experts/bias_abs_mean", bias.mean())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip (and log the norm), then take the step (applying the deferred balancing-bias update) or skip it, or
        stop the run (`step_guard.py`: the same decision on every rank)."""
        verdict, self._verdict = self._verdict, None
        if verdict is not None and verdict.empty:  # nothing to learn from: no norm, no optimizer step
            self.step_guard.empty_step(verdict)
            self._skip_step(optimizer)
            return
        norm = self._clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        groups = functools.partial(nonfinite_gradient_groups, self.model, optimizer, self._sum_over_ranks,
                                   self.device)
        if not self.step_guard.take(verdict, norm, groups):
            self._skip_step(optimizer)
        elif verdict is not None and verdict.bias_update is not None:
            self._update_balancing_bias(*verdict.bias_update)

    def _clip(self, optimizer, gradient_clip_val, gradient_clip_algorithm) -> torch.Tensor | None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        by_value = str(gradient_clip_algorithm or "norm").lower().endswith("value")
        max_norm = gradient_clip_val if gradient_clip_val and not by_value else float("inf")
        # the total norm (before clipping) is returned and logged; clipping happens when max_norm < inf and the norm
        # is finite (scaling by a NaN coefficient would spread one group's NaN to every gradient, and such a step
        # is never taken: `step_guard`)
        if self.parallelized:  # mixed EP / FSDP meshes: torch's clip cannot stack them (a NaN norm scales nothing)
            from .parallel.clip import clip_grad_norm_

            norm = clip_grad_norm_(self.model, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if math.isfinite(max_norm) and bool(torch.isfinite(norm)):
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        if by_value and gradient_clip_val and bool(torch.isfinite(norm)):
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        self.log("train/grad_norm", norm.float())
        return norm

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

    def on_validation_start(self) -> None:
        self._t_pause = time.perf_counter()
        self._check_data_processor()  # `cli.py validate` (cheap: a length and two ids)

    def on_validation_end(self) -> None:
        # validation inside an epoch must not count as training time in tokens/s
        if self._t_prev is not None and self._t_pause is not None:
            self._t_prev += time.perf_counter() - self._t_pause

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
        cp = self.context_parallel_group
        guesses = out.logits.argmax(-1) if out.logits is not None else None
        if cp is not None and guesses is not None:
            # every rank holds the greedy answers of its slice's targets; in rank order they are the row's, which
            # one rank of the group counts
            guesses = cp.gather_rows(guesses)
            guesses = guesses if cp.rank == 0 else guesses[:0]
        correct = visual = None
        if guesses is not None and guesses.shape[0] > 0 and batch.get("cu_seqlens") is not None:
            correct, visual = document_answer_correct(guesses, batch["labels"], batch["cu_seqlens"],
                                                      batch.get("mm_token_type_ids"))
        sums = evaluation_sums(self.device, out.ce_loss.detach(), out.num_label_tokens, correct, visual,
                               out.mtp, mtp.num_depths if mtp is not None else 0)
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums

    def _eval_epoch_end(self, prefix: str) -> None:
        if self._eval_sums is None:
            return
        sums = self._eval_sums.reduced(self._sum_over_ranks)
        self._eval_sums = None
        self.log_dict(evaluation_metrics(sums, prefix), prog_bar=True)  # already global: no further sync

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        from .generation import Predictor, transformers_model

        trainer = self.trainer
        if trainer.world_size > 1:
            raise RuntimeError(
                f"cli.py predict runs in one process (this run has {trainer.world_size}): generation needs the whole "
                "model on one device. Run it with --trainer.devices 1 (and --trainer.num_nodes 1) on the export "
                "(--model.pretrained <default_root_dir>/hf_export), or serve the export with vLLM / transformers.")
        self._check_data_processor()
        fetch = None
        if self.parallelized:  # FSDP2 / expert-parallel on one process: full tensors
            from .parallel.state import full_tensor_fetcher

            fetch = full_tensor_fetcher(self.model)
        options = GenerationOptions.from_any(self.hparams.generation)
        tokenizer = trainer.datamodule.encoder.processor.tokenizer
        self._predictor = Predictor(transformers_model(self.model, fetch), tokenizer, options)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One predictions.jsonl row (`callbacks.PredictionWriter` writes them): prompt_id, source, kind, answer,
        reference, correct (None without a reference), finished, new_tokens, error (why a row could not be
        answered; None otherwise)."""
        row = {k: batch[k] for k in ("prompt_id", "source", "kind")}
        if batch.get("error") is not None:
            row.update(answer=None, reference=batch["reference"], correct=None, finished=None, new_tokens=0,
                       error=batch["error"])
        else:
            result = self._predictor.answer(batch, batch["index"])
            row.update(answer=result["answer"], reference=batch["reference"], correct=result["correct"],
                       finished=result["finished"], new_tokens=result["new_tokens"], error=None)
        return row

    def on_predict_epoch_end(self) -> None:
        self._predictor = None  # frees the transformers model's cache and merged tensors

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def _packed(batch: PackedBatch | dict) -> PackedBatch:
    """The DataModule's batches are PackedBatch already; a dict (tests, hand-made batches) is checked into one."""
    return batch if isinstance(batch, PackedBatch) else PackedBatch.from_dict(batch)
