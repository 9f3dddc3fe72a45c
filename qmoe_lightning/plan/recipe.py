"""A training recipe (the YAML `cli.py fit --config` takes) read for planning: the layout (world size, ep / cp /
replicate, precision, activation checkpointing), the module's hyperparameters, the micro-batch size, and the model's
config.json.

The recipe is read as the YAML it is (no trainer is built: a GPU recipe must plan on a machine without GPUs). The
model's config comes from `model.pretrained` without downloading weights: a local directory's config.json, the
embedded default (built once into its cache as for training), or for a hub id the copy of that config.json shipped
in `known_configs/` (the published configs of the models the shipped recipes name), else its config.json alone from
the hub.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KNOWN_CONFIGS = Path(__file__).parent / "known_configs"
_STRATEGY = "qmoe_lightning.parallel.strategy.ExpertParallelStrategy"


@dataclass
class Recipe:
    path: str
    world_size: int
    accelerator: str  # "gpu" or "cpu"
    precision: str
    strategy: dict | None  # ExpertParallelStrategy's init_args; None: one device, no plan
    model: dict  # QMoELightningModule's arguments
    max_tokens: int
    pad_to_multiple_of: int
    gradient_clip_val: float | None
    router_stats: bool  # a callback reads the routers' statistics (the forward then returns the router logits)
    accumulate_grad_batches: int = 1
    data: dict = field(default_factory=dict)  # MultimodalPackingDataModule's arguments

    @property
    def ep_size(self) -> int:
        return int((self.strategy or {}).get("ep_size", 1))

    @property
    def cp_size(self) -> int:
        return int((self.strategy or {}).get("cp_size", 1))

    @property
    def replicate(self) -> int:
        return int((self.strategy or {}).get("replicate", 1))

    @property
    def on_gpu(self) -> bool:
        return self.accelerator in ("gpu", "cuda")

    def describe(self) -> str:
        s = self.strategy or {}
        layout = (f"ep {self.ep_size} x efsdp {self.world_size // (self.ep_size * self.replicate)}"
                  + (f" x replicate {self.replicate}" if self.replicate > 1 else "")
                  + (f", cp {self.cp_size}" if self.cp_size > 1 else "")) if self.strategy else "one device"
        lora = ", LoRA" if self.model.get("lora") else ""
        ac = ", activation checkpointing" if s.get("activation_checkpointing") or \
            self.model.get("activation_checkpointing") else ""
        mp = ", bf16 compute / fp32 masters" if s.get("mixed_precision") else ""
        return (f"{self.world_size} rank(s), {layout}, {self.precision}{mp}{lora}{ac}, "
                f"{self.max_tokens} tokens per micro-batch")

    def data_available(self) -> bool:
        """Can the recipe's training data be read here (the embedded set, or an existing path)?"""
        path = self.data.get("train_path", "embedded")
        paths = path if isinstance(path, list) else [path]
        return all(p == "embedded" or Path(str(p)).expanduser().exists() for p in paths)


def read_recipe(path: str | Path, world_size: int | None = None) -> Recipe:
    """The recipe at `path`; `world_size` overrides devices x num_nodes."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the recipe ({err})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ValueError(f"{path}: not a training recipe (expected a YAML mapping with a `model:` section)")
    trainer, data = cfg.get("trainer") or {}, cfg.get("data") or {}
    devices = trainer.get("devices", 1)
    if not isinstance(devices, int):
        raise ValueError(f"{path}: trainer.devices is {devices!r}; the planner needs a number of devices")
    world = world_size or devices * int(trainer.get("num_nodes", 1))
    strategy = trainer.get("strategy")
    init_args = None
    if isinstance(strategy, dict):
        if strategy.get("class_path") != _STRATEGY:
            raise ValueError(f"{path}: strategy {strategy.get('class_path')}: the planner knows {_STRATEGY} "
                             "(or no strategy: one device)")
        init_args = dict(strategy.get("init_args") or {})
    elif strategy not in (None, "auto") or world > 1:
        raise ValueError(f"{path}: {world} processes without {_STRATEGY}: nothing to plan (the app trains several "
                         "processes through that strategy)")
    callbacks = trainer.get("callbacks") or []
    return Recipe(
        path=str(path), world_size=world, accelerator=str(trainer.get("accelerator", "cpu")),
        precision=str(trainer.get("precision", "32-true")), strategy=init_args, model=dict(cfg["model"]),
        max_tokens=int(data.get("max_tokens", 4096)), pad_to_multiple_of=int(data.get("pad_to_multiple_of") or 1),
        gradient_clip_val=trainer.get("gradient_clip_val"), router_stats=_reads_router_stats(callbacks),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1), data=dict(data))


def _reads_router_stats(callbacks: list) -> bool:
    """Does one of the recipe's callbacks make the training forward return the router logits?"""
    from qmoe_lightning.router_stats import ReadsRouterStats

    for cb in callbacks:
        if not isinstance(cb, dict) or "class_path" not in cb:
            continue
        module, _, name = cb["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, ReadsRouterStats):
            if cls(**(cb.get("init_args") or {})).needs_router_stats:
                return True
    return False


def known_config_file(hub_id: str) -> Path:
    return KNOWN_CONFIGS / (hub_id.replace("/", "--") + ".json")


def model_config(recipe: Recipe):
    """transformers' config of the recipe's model (see the module doc for where it comes from)."""
    from qmoe_lightning.models.registry import config_from, load_config

    m = recipe.model
    pretrained = m.get("pretrained", "embedded")
    if pretrained is None:
        return config_from(m.get("model_config"))
    if str(pretrained).startswith("embedded"):
        from qmoe_lightning.embedded import resolve_path

        return load_config(Path(resolve_path(pretrained, "model", m.get("embedded_cache_dir"))))
    local = Path(str(pretrained)).expanduser()
    if local.is_dir():
        return load_config(local)
    known = known_config_file(str(pretrained))
    if known.is_file():
        return config_from(json.loads(known.read_text()))
    try:
        from huggingface_hub import hf_hub_download

        return load_config(Path(hf_hub_download(str(pretrained), "config.json")).parent)
    except Exception as err:  # offline, gated, or not a model id
        raise FileNotFoundError(f"{recipe.path}: model.pretrained {pretrained!r}: no local directory, no shipped copy "
                                f"of its config.json ({known.name} in {KNOWN_CONFIGS}), and the hub did not give its "
                                f"config.json ({type(err).__name__}: {err}). Pass a local directory holding "
                                "config.json") from None
