"""`apply_lora(model, cfg) -> LoraReport`: freeze the base, swap targeted modules for LoRA ones, report per group.

What it does, in order:
1. Resolves every target / exclusion string (config.py) against the candidate modules: every `nn.Linear` and every
   `GroupedExperts` (routed experts). A string that matches no candidate raises `ValueError` naming it (and the
   kinds of names that exist), so a typo never trains something else or nothing.
2. Freezes every base parameter (`requires_grad=False`), then replaces each selected module by `LoRALinear` /
   `LoRAGroupedExperts`, which hold the SAME base Parameter objects (no copy; base state-dict keys unchanged) and
   add `lora_*` parameters, the only trainable ones. A is initialised under `cfg.init_seed` (a forked RNG) so the
   adapter init does not depend on what ran before.
3. Returns a `LoraReport`: trainable parameters and adapted modules per group (routed experts, shared expert,
   attention, linear attention, vision, other), which targets matched what, and a printable table in which the
   routed experts always have their own line ("NOT adapted" when no expert adapter exists): the silent-miss guard.

Lightning-checkpoint helpers live here too: adapter-only state dicts (`lora_*` keys) and a check that a checkpoint
holds every adapter the model has. The routers' balancing bias (`model.router_balancing: bias`, moe.py) travels
with the adapters: LoRA freezes the router weights, but the bias is not trained by gradients, it keeps balancing
the frozen router, and `pretrained` cannot give it back on resume.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from qmoe_lightning.models.moe import GroupedExperts, is_balancing_bias_key
from qmoe_lightning.models.registry import family_of_model

from .config import ALIASES, LoraConfig, spec_matches
from .experts import LoRAGroupedExperts
from .linear import LoRALinear

GROUPS = ("routed_experts", "shared_expert", "dense_mlp", "attention", "linear_attention", "vision", "other")
_ADAPTER_KEY = re.compile(r"(^|\.)(\w+_)?lora_[AB]$")


def group_of(name: str) -> str:
    """Group of a module or parameter name (native names)."""
    if re.search(r"(^|\.)mlp\.experts(\.|$)", name):
        return "routed_experts"
    if ".mlp.shared_expert" in name:  # shared_experts.* and shared_expert_gate
        return "shared_expert"
    if ".self_attn." in name:
        return "attention"
    if ".linear_attn." in name:
        return "linear_attention"
    if name.startswith("model.visual.") or ".visual." in name:
        return "vision"
    if re.search(r"\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)(\.|$)", name):
        return "dense_mlp"
    return "other"


def is_adapter_key(key: str) -> bool:
    """True for LoRA parameter names (`...q_proj.lora_A`, `...experts.gate_and_up_lora_B`), any prefix."""
    return _ADAPTER_KEY.search(key) is not None


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAGroupedExperts))}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAGroupedExperts)) for m in model.modules())


@dataclass
class LoraReport:
    trainable: dict[str, int]  # group -> trainable parameters
    modules: dict[str, int]  # group -> adapted modules
    base_params: dict[str, int]  # group -> base parameters in the model (adapted or not)
    expert_modules_in_model: int
    matched: dict[str, list[str]]  # target string -> adapted module names it matched
    excluded: dict[str, list[str]]  # exclusion string -> module names it removed
    adapted: list[str] = field(default_factory=list)
    frozen: int = 0

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())

    def table(self) -> str:
        """Per-group trainable table, printed at fit start."""
        lines = [f"{'LoRA group':<18}{'modules':>8}{'trainable':>14}{'base params':>15}"]
        for g in GROUPS:
            if g != "routed_experts" and not self.base_params.get(g):  # a group this family does not have
                continue
            note = ""
            if g == "routed_experts" and self.modules.get(g, 0) == 0 and self.expert_modules_in_model:
                note = f"   NOT adapted ({self.expert_modules_in_model} expert blocks left frozen)"
            lines.append(f"{g:<18}{self.modules.get(g, 0):>8}{self.trainable.get(g, 0):>14,}"
                         f"{self.base_params.get(g, 0):>15,}{note}")
        lines.append(f"{'total':<18}{sum(self.modules.values()):>8}{self.total_trainable:>14,}"
                     f"{sum(self.base_params.values()):>15,}   (base frozen: {self.frozen:,})")
        return "\n".join(lines)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, GroupedExperts)) and not isinstance(m, (LoRALinear, LoRAGroupedExperts))}


def _match(spec: str, names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    if spec == "all-linear":  # language-model Linears (no lm_head) + the routed experts
        return [n for n in names if re.fullmatch(ALIASES["all-linear"], n)]
    if spec == "vision":
        return [n for n in names if re.fullmatch(ALIASES["vision"], n) and isinstance(modules[n], nn.Linear)]
    return [n for n in names if spec_matches(spec, n)]


def _no_match_error(spec: str, what: str, names: list[str]) -> ValueError:
    leaves = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    sample = ", ".join(leaves[:40]) + (" ..." if len(leaves) > 40 else "")
    return ValueError(
        f"lora {what} {spec!r} matched no Linear or routed-expert module of {len(names)} candidates. Use an alias "
        f"({', '.join(ALIASES)}), a module-name suffix, or 're:<regex>' over full names. Candidates: {sample}"
    )


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """-> (selected module names in model order, per-target matches, per-exclusion matches). Raises on no match."""
    modules = _candidates(model)
    names = list(modules)
    matched = {}
    for spec, required in _expand_default(model, cfg.targets):
        hit = _match(spec, names, modules)
        if not hit and not required:
            continue  # a family default this model lacks (Qwen3-VL-MoE's dense_mlp when every layer is sparse)
        if not hit:
            raise _no_match_error(spec, "target", names)
        matched[spec] = hit
    excluded = {}
    for spec in cfg.exclude:
        hit = _match(spec, names, modules)
        if not hit:
            raise _no_match_error(spec, "exclusion", names)
        excluded[spec] = hit
    out = set().union(*matched.values()) - set().union(set(), *excluded.values())
    selected = [n for n in names if n in out]
    if not selected:
        raise ValueError(f"lora: the exclusions {cfg.exclude} removed every target of {cfg.targets}")
    matched = {s: [n for n in hit if n in out] for s, hit in matched.items()}
    return selected, matched, excluded


def _expand_default(model: nn.Module, specs: list[str]) -> list[tuple[str, bool]]:
    """`default` -> the model family's default targets (registry), in place. -> (target, must match): a target the
    user named must match a module; a family default may be absent from this model (a config without dense layers)."""
    if "default" not in specs:
        return [(spec, True) for spec in specs]
    try:
        family = family_of_model(model)
    except TypeError:
        raise ValueError(f"lora.targets 'default': {type(model).__name__} is not a registered model family; name the "
                         "targets (aliases, suffixes or re: regexes)") from None
    out = []
    for spec in specs:
        out += [t for t in (family.lora_targets if spec == "default" else (spec,)) if t not in out]
    return [(t, t in specs) for t in out]


def apply_lora(model: nn.Module, cfg: LoraConfig | dict) -> LoraReport:
    """Freeze `model`, add adapters on the targets of `cfg` (in place). See the module doc."""
    cfg = LoraConfig.from_any(cfg)
    if cfg is None:
        raise ValueError("apply_lora needs a LoRA config")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; apply_lora runs once per model")
    selected, matched, excluded = resolve_targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=[torch.device("cuda", i) for i in cuda], enabled=cfg.init_seed is not None):
        if cfg.init_seed is not None:
            torch.manual_seed(cfg.init_seed)
        for name in selected:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = parent.get_submodule(child)
            if isinstance(base, GroupedExperts):
                dtype = cfg.adapter_dtype_for(base.gate_and_up_projs.dtype)
                new = LoRAGroupedExperts(base, cfg.r_experts, cfg.alpha_experts, cfg.expert_projections, dtype)
            else:
                new = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.adapter_dtype_for(base.weight.dtype))
            new.train(base.training)
            setattr(parent, child, new)
    report = summarize(model)
    report.matched, report.excluded = matched, excluded
    return report


def reset_lora_parameters(model: nn.Module, seed: int | None = 0) -> None:
    """(Re)initialise every adapter (A random, B zero) under `seed`. For models built on the meta device: call it
    after `to_empty` / `init_weights` (the base init does not know the adapters)."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=[torch.device("cuda", i) for i in cuda], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for m in lora_modules(model).values():
            m.reset_lora_parameters()


def summarize(model: nn.Module) -> LoraReport:
    """Per-group trainable / base parameter counts of `model` as it is now (any time, e.g. at fit start)."""
    trainable, base, frozen = Counter(), Counter(), 0
    for name, p in model.named_parameters():
        if is_adapter_key(name) or p.requires_grad:
            if p.requires_grad:
                trainable[group_of(name)] += p.numel()
        else:
            base[group_of(name)] += p.numel()
            frozen += p.numel()
    mods = Counter(group_of(n) for n in lora_modules(model))
    n_experts = sum(isinstance(m, GroupedExperts) for m in model.modules())
    return LoraReport(trainable=dict(trainable), modules=dict(mods), base_params=dict(base),
                      expert_modules_in_model=n_experts, matched={}, excluded={},
                      adapted=list(lora_modules(model)), frozen=frozen)


# ---------------------------------------------------------------------- Lightning checkpoints
def kept_with_adapters(key: str) -> bool:
    """What an adapter-only checkpoint holds: the adapters and the routers' balancing bias (module doc)."""
    return is_adapter_key(key) or is_balancing_bias_key(key)


def keep_adapters_only(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Filter a (Lightning) state dict to its adapter keys (and balancing biases), in place; returns it. Raises if
    no adapter is left."""
    if not any(is_adapter_key(k) for k in state_dict):
        raise ValueError("keep_adapters_only: the state dict holds no LoRA adapter (apply_lora not run?)")
    for k in [k for k in state_dict if not kept_with_adapters(k)]:
        del state_dict[k]
    return state_dict


def check_adapter_state_dict(state_dict: dict[str, torch.Tensor], module: nn.Module) -> None:
    """Raise unless `state_dict` holds every adapter tensor (and balancing bias) of `module` (same names) and
    nothing else."""
    want = {k for k in module.state_dict() if kept_with_adapters(k)}
    have = set(state_dict)
    missing, unexpected = sorted(want - have), sorted(k for k in have - want)
    if missing or unexpected:
        raise ValueError(f"LoRA checkpoint does not match the model's adapters: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}); was it written with "
                         "the same lora config (and model.router_balancing)?")
