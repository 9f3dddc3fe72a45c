"""One rank's training step at the recipe's real shapes, run on fake tensors over a fake process group: the real
model (built on meta by `build.build_for_run`, LoRA and freezing included), the strategy's real `parallelize`
(context parallelism, expert parallelism, activation checkpointing, FSDP2), the LightningModule's real
`training_step`, backward, the step's gradient scaling, the real clip and the real AdamW step. Nothing is allocated:
what is counted is what each op WOULD allocate (`tracking.py`), in the order the step runs.

Choices:
- The micro-batch is one packed row of the recipe's `max_tokens` (rounded up to `pad_to_multiple_of`), four
  documents, every token after a document's first a target (the CE's worst case); text only (see the note on
  images in docs/planning.md).
- A CUDA recipe's Gated DeltaNet keeps what flash-linear-attention's kernel keeps (`kernel_shapes.py`); the rest
  runs the CPU kernels, whose kept tensors are those of the CUDA ones.
- Routing is forced (`fake_runtime.forced_routing`): balanced, or skewed with expert 0 at `hot_factor` times its
  share; expert 0 lives on ep rank 0, so rank 0 is the rank that receives the skew.
- The optimizer takes one step on zero gradients before the tracked step, so the tracked step meets AdamW's state
  as every step after the first does (and DTensor's sharding-propagation cache is warm: its first-time temporaries
  would otherwise be counted). With gradient accumulation the tracked micro-batch is the window's last: the
  gradients of the earlier ones are live through it. The gradients are freed right after each optimizer step
  (`QMoELightningModule.optimizer_step`), so the first micro-batch's forward runs without any.
- Depth: a model of L layers is planned exactly at L layers, or (`num_layers`) at fewer; `plan.py` plans two
  depths one layer period apart and extrapolates linearly to the full depth (every per-layer cost is the same at
  every period of the layer pattern).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

from .fake_runtime import (ConstantIndexFactories, ScalarOracle, SymmetricCountExchange, constant,
                           constant_propagation, forced_routing, grouped_mm_shapes)
from .kernel_shapes import fla_chunk_shapes
from .recipe import Recipe
from .tracking import CATEGORIES, CollectiveBytes, GroupedUnitsTracker, PlainTracker


@dataclass
class StepPlan:
    rank: int
    num_layers: int
    hot_factor: float
    peak_bytes: int
    by_category: dict[str, int]  # the peak's breakdown (CATEGORIES)
    collectives: dict[str, list[int]]  # kind -> [calls, bytes, off-rank bytes]
    assumptions: list[str] = field(default_factory=list)
    seconds: float = 0.0


def with_layers(config, num_layers: int | None):
    """A copy of `config` whose text decoder has its first `num_layers` layers (None: unchanged)."""
    if num_layers is None:
        return config
    config = copy.deepcopy(config)
    text = config.get_text_config()
    if num_layers >= text.num_hidden_layers:
        return config
    text.num_hidden_layers = num_layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types[:num_layers])
    if getattr(text, "mlp_only_layers", None):
        text.mlp_only_layers = [i for i in text.mlp_only_layers if i < num_layers]
    return config


def layer_period(config) -> int:
    """Layers after which the text decoder's pattern repeats (mixer types, dense / sparse MLP)."""
    text = config.get_text_config()
    n = text.num_hidden_layers
    kinds = []
    for i in range(n):
        mixer = (getattr(text, "layer_types", None) or ["full_attention"] * n)[i]
        step = getattr(text, "decoder_sparse_step", 1) or 1
        dense = i in (getattr(text, "mlp_only_layers", None) or []) or (i + 1) % step != 0
        kinds.append((mixer, dense))
    for p in range(1, n + 1):
        if all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def _plan_strategy(recipe: Recipe):
    """The recipe's `ExpertParallelStrategy` with what its `parallelize` needs built on the fake process group: the
    device mesh and the context-parallel group; its device is meta."""
    from qmoe_lightning.parallel.context_parallel import new_context_parallel_group

    args = {k: v for k, v in recipe.strategy.items() if k != "process_group_backend"}
    strategy = _MetaStrategy(**args)
    strategy._device_mesh = strategy.build_device_mesh(recipe.world_size, torch.device("cpu"))
    if strategy.cp_size > 1:
        strategy._context_parallel = new_context_parallel_group(strategy.cp_size, strategy.ep_size)
    return strategy


class _MetaStrategy(ExpertParallelStrategy):
    @property
    def root_device(self):
        return torch.device("meta")


def _row_length(recipe: Recipe) -> int:
    m = max(recipe.pad_to_multiple_of, 1)
    return -(-recipe.max_tokens // m) * m


def synthetic_row(recipe: Recipe, config, documents: int = 4):
    """The synthetic packed micro-batch (real tensors on the CPU): `max_tokens` ordinary text tokens in `documents`
    documents, every token after a document's first a target."""
    from qmoe_lightning.models.batch import PackedBatch

    T = _row_length(recipe)
    with _disable_current_modes():  # real tensors, also inside the planner's modes
        g = torch.Generator().manual_seed(0)
        vocab = min(config.get_text_config().vocab_size, 1000)  # ordinary text tokens, no special ids
        ids = torch.randint(0, vocab, (1, T), generator=g)
        step = T // documents
        cu = torch.tensor([min(i * step, T) for i in range(documents)] + [T], dtype=torch.int32)
        labels = ids.clone()
        labels[0, cu[:-1].long()] = -100  # a document's first token is no target
        mask = torch.ones(1, T, dtype=torch.long)
        longest, targets = int((cu[1:] - cu[:-1]).max()), int((labels != -100).sum())
    return PackedBatch(input_ids=ids, labels=labels, cu_seqlens=cu, max_seqlen=longest, attention_mask=mask,
                       num_label_tokens=targets, num_documents=documents)


def data_batches(recipe: Recipe, rank: int, count: int = 8) -> list:
    """The first `count` training micro-batches data-parallel rank `rank` draws from the recipe's data (real
    tensors), as the DataModule gives them to the step."""
    from data_modules import MultimodalPackingDataModule

    data = {k: v for k, v in recipe.data.items()}
    m = recipe.model
    data.setdefault("model_path", m.get("processor_source") or m.get("pretrained") or "embedded")
    data["num_workers"] = 0
    dm = MultimodalPackingDataModule(**data, rank=rank, world_size=recipe.world_size // recipe.cp_size)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == count:
            break
    return out


def largest(batches: list):
    """The micro-batch with the most image / video patches, then the most tokens."""
    def size(b):
        patches = sum(0 if t is None else t.shape[0] for t in (b.pixel_values, b.pixel_values_videos))
        return patches, b.input_ids.numel(), b.num_label_tokens
    return max(batches, key=size)


def _as_fake(mode: FakeTensorMode, batch):
    """A real PackedBatch with every tensor in `mode`: integer ones as constants, float ones as plain fakes."""
    import dataclasses

    values = {}
    with _disable_current_modes():
        for f in dataclasses.fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, torch.Tensor):
                v = constant(mode, v) if not v.is_floating_point() else mode.from_tensor(v)
            values[f.name] = v
    return type(batch)(**values)


def build_module(recipe: Recipe, config, device: torch.device):
    """The LightningModule of the recipe with its model built by the app's builder: on meta under the recipe's
    parallel plan (the planner: the fake process group must exist), or on `device` with a random init (a real step
    of a one-device recipe)."""
    from qmoe_lightning.build import build_for_run
    from qmoe_lightning.lightning_module import QMoELightningModule

    strategy = _plan_strategy(recipe) if recipe.strategy else SimpleNamespace(root_device=device)
    trainer = SimpleNamespace(strategy=strategy, precision=recipe.precision)
    module = QMoELightningModule(**recipe.model)
    built = build_for_run(module.hparams, trainer, config=config)
    module.model, module.parallelized = built.model, built.parallelized
    module._collect_router_stats = recipe.router_stats
    if module.balances_by_bias:
        for router in module.model.routers():
            router.enable_balancing_bias()
    return module, built


def build_optimizer(module, recipe: Recipe):
    from qmoe_lightning.optim import build_adamw

    hp = module.hparams
    return build_adamw(module.model, hp.lr, hp.weight_decay, hp.betas, hp.eps, fused=True if recipe.on_gpu else None)


def training_step(module, optimizer, batch, recipe: Recipe, parallelized: bool) -> None:
    """One micro-batch that ends an optimizer step, in the order Lightning runs it with this module: the training
    step (under autocast for a "-mixed" precision, as Lightning's precision plugin runs it), backward, the step's
    gradient scaling, the clip, the AdamW step, the gradients freed."""
    from qmoe_lightning.parallel.clip import clip_gradients
    from qmoe_lightning.step_window import scale_gradients_

    mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(recipe.precision)
    device = next(module.model.parameters()).device
    with torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
        loss = module.training_step(batch, 0)
    loss.backward()
    del loss
    module._window = None
    scale_gradients_(optimizer, 1.0)
    clip_gradients(module.model, optimizer, parallelized, recipe.gradient_clip_val, None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plan_step(recipe: Recipe, config, rank: int = 0, hot_factor: float = 1.0,
              num_layers: int | None = None, batch=None) -> StepPlan:
    """Rank `rank`'s training step (see the module doc) on `batch` (a real PackedBatch, e.g. from `data_batches`;
    None: the synthetic text row)."""
    t0 = time.perf_counter()
    config = with_layers(config, num_layers)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=rank, world_size=recipe.world_size)
    try:
        module, built = build_module(recipe, config, torch.device("meta"))
        model = module.model
        mode = FakeTensorMode()
        with constant_propagation(), mode:
            mode.allow_non_fake_inputs = True
            model.to_empty(device="cpu")
            mode.allow_non_fake_inputs = False
            optimizer = build_optimizer(module, recipe)
            with ConstantIndexFactories(mode), SymmetricCountExchange(mode):
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if recipe.accumulate_grad_batches > 1:  # the window's last micro-batch: the earlier ones' gradients
                    for p in model.parameters():
                        if p.requires_grad:
                            p.grad = torch.zeros_like(p)
                batch = _as_fake(mode, synthetic_row(recipe, config) if batch is None else batch)
                if built.parallelized:
                    tracker = GroupedUnitsTracker(model, optimizer)
                    tracker.track_inputs(tuple(v for _, v in batch.items() if isinstance(v, torch.Tensor)))
                else:
                    tracker = PlainTracker()
                    tracker.track_external(model, optimizer)
                collectives, oracle = CollectiveBytes(), ScalarOracle(1)
                kernels = fla_chunk_shapes() if recipe.on_gpu else contextlib.nullcontext()
                with forced_routing(mode, hot_factor), grouped_mm_shapes(), kernels, tracker.labelling_fused_ce(), \
                        tracker, collectives, oracle:
                    training_step(module, optimizer, batch, recipe, built.parallelized)
        by_category = tracker.peak_by_category()
        peak = sum(snap.get("Total", 0) for snap in tracker.get_tracker_snapshot("peak").values())
        assumptions = [f"{site} (a value computed from data): assumed true" for site in sorted(oracle.sites)]
        return StepPlan(rank, config.get_text_config().num_hidden_layers, hot_factor, peak,
                        {k: by_category[k] for k in CATEGORIES}, {k: list(v) for k, v in collectives.stats.items()},
                        assumptions, time.perf_counter() - t0)
    finally:
        dist.destroy_process_group()
