"""`build_model`: the one pipeline every model of the app is made by.

Fixed order: meta construction -> dtype -> [weights, on the full model] -> LoRA -> freezing -> parallelisation
(the strategy's `parallelize`: EP -> activation checkpointing -> FSDP2) -> [weights, rank-local] -> LoRA init.
Which of the two weight steps runs is decided once, from what is given:
- full: no parallel plan, or a random init. The whole model is materialised and filled (streamed from the
  checkpoint, or `init_weights` under `init_seed`), LoRA is applied to the loaded weights and the plan, if any,
  comes last. A random init is defined on the full tensors, so one seed gives one model whatever the layout.
- rank-local: a parallel plan and a checkpoint. LoRA and the plan are applied on meta, then every rank
  materialises its shards and reads only those from the safetensors (`parallel.loading`): no rank ever holds the
  full model. The adapters are initialised afterwards by `init_lora_parallel`, bitwise what `apply_lora` gives on
  the full model with the same seed.

The result carries where the weights came from (`CheckpointSource`: the directory of the companion files and the
typed load report with the `mtp.*` tensors to copy through), which exporters receive as an argument, and the
parameter counts taken before parallelisation (global sizes).

`build_for_run` is what `QMoELightningModule.configure_model` calls: the module's hyperparameters and the trainer's
precision, device and strategy turned into `build_model`'s arguments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .lora import LoraConfig, LoraReport, apply_lora
from .models.checkpoint import CheckpointSource, load_hf_weights
from .models.mtp import MtpConfig
from .parallel.loading import init_lora_parallel, init_mtp_parallel, load_hf_weights_parallel


@dataclass
class BuiltModel:
    model: nn.Module
    checkpoint: Path | None  # the weights' checkpoint directory (None: random init)
    source: CheckpointSource  # directory None and report None for a random init without a processor source
    parallelized: bool
    rank_local: bool  # the weights were read shard by shard
    num_parameters: int  # global (unsharded) counts
    num_trainable: int
    lora_report: LoraReport | None
    seconds: float

    def summary(self, rank: int = 0) -> str:
        """One line for the log: class, origin, device, sizes (and what this rank read when rank-local)."""
        m, report = self.model, self.source.report
        origin = self.checkpoint or "config"
        how = ""
        if self.rank_local and report is not None and report.rank_local:
            read = report.rank_local
            how = (f", rank-local (rank {rank} read {read['read_elements'] / 1e6:.2f}M of "
                   f"{read['checkpoint_elements'] / 1e6:.2f}M checkpoint elements)")
        device = next((p.device for p in m.parameters()), torch.device("cpu"))
        return (f"model {m.hf_architecture()} from {origin} on {device} in {self.seconds:.1f}s{how}: "
                f"{self.num_parameters / 1e6:.2f}M parameters, {self.num_trainable / 1e6:.2f}M trainable")


def build_model(
    model_class: type[nn.Module],
    config,
    *,
    checkpoint: Path | None = None,
    processor_dir: Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device = torch.device("cpu"),
    lora: LoraConfig | dict | None = None,
    freeze: Callable[[nn.Module], None] | None = None,
    parallelize: Callable[[nn.Module], nn.Module] | None = None,
    activation_checkpointing: bool = False,
    init_seed: int = 0,
    model_kwargs: dict | None = None,
    mtp_random_init: bool = False,
) -> BuiltModel:
    """Build `model_class(config)` on `device` in `dtype` (None: fp32; A_log / dt_bias / inv_freq stay fp32).
    device "meta": shapes only (LoRA, freezing and the parallel plan applied, no weights; `qmoe_lightning.plan`).

    checkpoint: HF directory to load (strict), or None for the random init seeded by `init_seed`.
    processor_dir: whose tokenizer / processor files exports copy (default: `checkpoint`).
    freeze: called on the model after LoRA and before parallelisation (sets requires_grad).
    parallelize: the strategy's plan (`ExpertParallelStrategy.parallelize`); None: a single-device model.
    activation_checkpointing: recompute every decoder block in backward, routing replayed (the blocks' own; a
        plan can switch it on as well).
    model_kwargs: the model class's own options (`mtp_layers`, `mtp_loss_scale`).
    mtp_random_init: a checkpoint without `mtp.*` leaves the MTP module to a random init, seeded by `init_seed`
        (rank-local: each rank keeps its slice of the same full init). Not with LoRA: the random MTP base would stay
        frozen, and adapter-only checkpoints would not hold it.
    """
    t0 = time.perf_counter()
    lora = LoraConfig.from_any(lora)  # the YAML section may arrive as a dict
    with torch.device("meta"):
        model = model_class(config, **(model_kwargs or {}))
    if dtype is not None:
        model.to(dtype)
    shapes_only = device.type == "meta"  # the memory planner: parallelised, never materialised or filled
    rank_local = parallelize is not None and checkpoint is not None and not shapes_only
    cuda = [device] if device.type == "cuda" else []
    report = None
    if parallelize is not None and model.config.tie_word_embeddings:
        raise NotImplementedError("tie_word_embeddings under a parallel plan (FSDP2 / expert parallelism) is not "
                                  "supported: the tie would not survive sharding; no published Qwen3.5-MoE / "
                                  "Qwen3-VL-MoE checkpoint ties them")
    if shapes_only:
        checkpoint = None
    elif not rank_local:
        model.to_empty(device=device)
        model.tie_weights()
        model.reset_buffers()
        if checkpoint is not None:
            report = load_hf_weights(model, checkpoint, mtp_missing_ok=mtp_random_init)
            _init_mtp_if_missing(model, report, cuda, init_seed)
        else:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(init_seed)
                model.init_weights()
    model.set_activation_checkpointing(bool(activation_checkpointing))
    lora_report = None
    if lora is not None:
        # on meta (rank-local), the adapters get their values from init_lora_parallel after loading: the seeding
        # inside apply_lora must not move the device RNG here
        with torch.random.fork_rng(devices=cuda, enabled=rank_local):
            lora_report = apply_lora(model, lora)  # freezes the base, adds adapters
    if freeze is not None:
        freeze(model)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if parallelize is not None:
        model = parallelize(model)
    if rank_local:
        model.to_empty(device=device)
        model.reset_buffers()
        report = load_hf_weights_parallel(model, checkpoint, mtp_missing_ok=mtp_random_init)
        if report.mtp_random_init:
            init_mtp_parallel(model, init_seed)  # == the single-process init of the same seed
        if lora is not None:
            init_lora_parallel(model, lora.init_seed)  # == apply_lora on the full model
    if lora is not None and report is not None and report.mtp_random_init:
        raise ValueError(f"mtp.init: random with LoRA: {checkpoint} has no mtp.* tensors, and a randomly initialised MTP "
                         "module would stay frozen under LoRA (and adapter-only checkpoints would not hold it). Train "
                         "the MTP module in a full fine-tuning run first, or disable model.mtp")
    directory = processor_dir if processor_dir is not None else checkpoint
    return BuiltModel(model, checkpoint, CheckpointSource(directory, report), parallelize is not None, rank_local,
                      n_total, n_train, lora_report, time.perf_counter() - t0)


def _init_mtp_if_missing(model: nn.Module, report, cuda: list, seed: int) -> None:
    """The checkpoint had no `mtp.*` and a random init was asked for: initialise the MTP module alone."""
    if report is None or not report.mtp_random_init:
        return
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model.init_weights(model.mtp)


def build_for_run(hparams, trainer, config=None) -> BuiltModel:
    """The model of a `QMoELightningModule` with these hyperparameters (see its docstring) under `trainer` (None:
    fp32 on the CPU, one device): the checkpoint of `pretrained` (or a random init from `model_config`), the
    family's vision-language or text-only class, MTP when enabled, LoRA, freezing, and the strategy's parallel plan
    when it has one (`ExpertParallelStrategy.parallelize`). `config` given: that model without any checkpoint (the
    memory planner, whose strategy's device is meta: shapes only)."""
    from .embedded import resolve_path
    from .models.checkpoint import resolve_checkpoint_dir
    from .models.registry import config_from, family_of, load_config
    from .parallel.strategy import ExpertParallelStrategy

    hp = hparams
    checkpoint = None
    if config is None and hp.pretrained is not None:
        checkpoint = resolve_checkpoint_dir(resolve_path(hp.pretrained, "model", hp.embedded_cache_dir))
        config = load_config(checkpoint)
    elif config is None:
        config = config_from(hp.model_config)
    family = family_of(config.model_type)
    mtp = MtpConfig.from_any(hp.mtp)
    mtp_on = mtp is not None and mtp.enabled
    model_kwargs = {}
    if mtp_on:
        if not family.supports_mtp:
            raise ValueError(f"mtp.enabled: {family.name} has no multi-token prediction module (its checkpoints "
                             "carry none); disable model.mtp")
        model_kwargs = dict(mtp_layers=mtp.depths(config.get_text_config()), mtp_loss_scale=mtp.loss_scale)
    strategy = trainer.strategy if trainer is not None else None
    precision = str(trainer.precision) if trainer is not None else "32-true"
    processor = resolve_path(hp.processor_source, "model", hp.embedded_cache_dir) if hp.processor_source else None
    return build_model(
        family.model_class(text_only=hp.text_only), config, model_kwargs=model_kwargs,
        mtp_random_init=mtp_on and mtp.init == "random",
        checkpoint=checkpoint, processor_dir=Path(processor) if processor else None,
        dtype=precision_dtype(precision),
        device=strategy.root_device if strategy is not None else torch.device("cpu"),
        lora=hp.lora,
        freeze=lambda model: freeze_parameters(model, vision_tower=hp.freeze_vision_tower, router=hp.freeze_router,
                                               embeddings=hp.freeze_embeddings),
        # ExpertParallelStrategy's plan (EP + activation checkpointing + FSDP2); other strategies have none
        parallelize=strategy.parallelize if isinstance(strategy, ExpertParallelStrategy) else None,
        activation_checkpointing=hp.activation_checkpointing, init_seed=hp.init_seed)


def precision_dtype(precision: str) -> torch.dtype | None:
    """The parameters' dtype under a Lightning precision setting (None: fp32, as built)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(precision))


def freeze_parameters(model: nn.Module, *, vision_tower: bool, router: bool, embeddings: bool) -> None:
    """requires_grad off for the vision tower (`model.visual.*`), the routers (`*.mlp.gate.weight`) and / or the input
    embeddings (and the LM head when tied)."""
    from lightning.pytorch.utilities import rank_zero_info

    frozen = 0
    for name, p in model.named_parameters():
        if ((vision_tower and name.startswith("model.visual.")) or (router and name.endswith("mlp.gate.weight"))
                or (embeddings and name.endswith("embed_tokens.weight"))):
            p.requires_grad_(False)
            frozen += p.numel()
    if frozen:
        rank_zero_info(f"frozen: {frozen / 1e6:.2f}M parameters")
