"""PEFT-format adapter export (`hf_adapter/`): what `peft.PeftModel.from_pretrained(transformers_model, dir)` loads.

Files: `adapter_config.json` (a PEFT `LoraConfig`) and `adapter_model.safetensors`, written into a temporary
sibling directory swapped into place by `qmoe_lightning.export_dir` (only a previous export is replaced; a crash
at any moment leaves the previous export or the new one).

Names: transformers' module names (native `shared_experts` -> `shared_expert`, everything else unchanged), keys
`base_model.model.<module>.lora_A.weight (r, in)` / `.lora_B.weight (out, r)`, as `PeftModel.save_pretrained` writes.

Routed experts use PEFT's `target_parameters` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), whose layout
was checked against peft 0.21.2 `ParamWrapper` (not taken from notes): for an HF expert parameter (E, out, in)
(gate_up_proj (E, 2I, H), down_proj (E, H, I)), `lora_A.weight` is (r*E, in) with expert e on ROWS e*r:(e+1)*r,
but `lora_B.weight` is (out, r*E) with expert e on the STRIDED columns e, E+e, 2E+e, ... (PEFT reshapes it as
(out, r, E)). From the native A (E, in, r) / B (E, r, out):
    lora_A.weight = A.transpose(1, 2).reshape(E*r, in)        lora_B.weight = B.permute(2, 1, 0).reshape(out, r*E)
PEFT wraps the two parameters of one experts module in nested `ParamWrapper`s, in registration order: the first
targeted (gate_up_proj) is innermost, so with both targeted gate_up's keys are `experts.base_layer.lora_A.weight`
and down's are `experts.lora_A.weight`.

Multi-token prediction: transformers has no MTP module, so adapters on `mtp.*` (which the default targets include
when MTP trains) are not part of the PEFT adapter; they are merged into the `mtp.*` tensors of the merged export.

Config choices:
- `target_modules` is the list of leaf names (`q_proj`) when every Linear with that leaf name is adapted, and of
  full module names otherwise (exclusions, partial targets): PEFT matches list entries as dot-boundary suffixes, so
  a leaf name would adapt modules that were excluded here.
- `target_parameters` applies to every layer; an experts module left without adapter here (excluded) is written
  with zero A and B, which PEFT loads with no missing keys and which adds exactly nothing.
- Experts with their own rank / alpha: `rank_pattern` / `alpha_pattern` keyed by `mlp.experts.gate_up_proj` etc.
- `lora_dropout` is written as 0: dropout is a training-time choice, and PEFT refuses `target_parameters` with
  dropout; inference is identical.

Footgun: for some model types (Qwen3-MoE, Qwen3-Next: transformers v5 fused their experts) peft rewrites every
`target_modules` entry named `gate_proj` / `up_proj` / `down_proj` (bare or dotted) into the experts' fused parameters,
because such adapters were once per-expert ones. An adapter on a dense MLP layer or on the shared expert of those
models therefore cannot be named so that peft loads it where it belongs: `check_peft_expressible` refuses it, before training when
`callbacks.LoraExport` is configured (exclude the dense MLP from the LoRA targets, or use the merged export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qmoe_lightning.export_dir import check_finite, staged_export
from qmoe_lightning.models.checkpoint import full_cpu_tensor
from qmoe_lightning.models.moe import GroupedExperts

from .apply import group_of, lora_modules
from .experts import LoRAGroupedExperts
from .linear import LoRALinear

PREFIX = "base_model.model."
# native projection name -> HF parameter name, in the HF module's registration order (PEFT's nesting order)
HF_EXPERT_PARAMS = {"gate_up": "gate_up_proj", "down": "down_proj"}


def hf_module_name(native: str) -> str:
    return native.replace(".mlp.shared_experts.", ".mlp.shared_expert.")


def experts_to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native A (E, in, r), B (E, r, out) -> PEFT lora_A.weight (r*E, in), lora_B.weight (out, r*E)."""
    E, n_in, r = A.shape
    out = B.shape[-1]
    return A.transpose(1, 2).reshape(E * r, n_in).contiguous(), B.permute(2, 1, 0).reshape(out, r * E).contiguous()


def experts_from_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `experts_to_peft`."""
    E = num_experts
    r = lora_A.shape[0] // E
    A = lora_A.reshape(E, r, -1).transpose(1, 2).contiguous()
    B = lora_B.reshape(lora_B.shape[0], r, E).permute(2, 1, 0).contiguous()
    return A, B


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    # every module with that leaf name, whatever its type: PEFT would also try to wrap e.g. the vision tower's
    # `patch_embed.proj` (a Conv3d) for a leaf `proj` meant for `attn.proj`
    all_names = [n for n, _ in model.named_modules() if not _is_mtp(n)]
    adapted_set = set(adapted)
    out = []
    for leaf in sorted({n.rpartition(".")[2] for n in adapted}):
        same_leaf = [n for n in all_names if n.rpartition(".")[2] == leaf]
        if all(n in adapted_set for n in same_leaf):
            out.append(leaf)
        else:
            out.extend(sorted(hf_module_name(n) for n in adapted if n.rpartition(".")[2] == leaf))
    return out


def peft_renamed_targets(model_type: str) -> set[str]:
    """The `target_modules` names peft rewrites into fused expert parameters when it loads an adapter onto a
    transformers model of `model_type` (empty: it takes them as they are)."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # an older peft: no rewriting
        return set()
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    return set(_MOE_TARGET_MODULE_MAPPING.get(pattern) or {}) if pattern is not None else set()


def check_peft_expressible(model: nn.Module) -> None:
    """Refuse Linear adapters that peft would load somewhere else (see the module doc's footgun)."""
    renamed = peft_renamed_targets(model.config.model_type)
    moved = sorted(n for n, m in lora_modules(model).items()
                   if isinstance(m, LoRALinear) and not _is_mtp(n) and n.rpartition(".")[2] in renamed)
    if moved:
        groups = sorted({group_of(n) for n in moved})  # the LoRA aliases of the same names: dense_mlp, shared_expert
        raise ValueError(
            f"a PEFT adapter cannot hold the LoRA adapters of {', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''}: "
            f"peft loads adapters named {sorted(renamed)} onto the fused experts of a {model.config.model_type} model, "
            f"not onto these modules ({', '.join(groups)}). Leave {' and '.join(groups)} out of model.lora.targets "
            "(the family's default targets do), or drop callbacks.LoraExport and use the merged export "
            "(callbacks.HFExport)")


def peft_adapter_state(model: nn.Module, fetch=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (adapter_config dict without base path, safetensors dict with PEFT keys).

    `fetch(state-dict key)`: how an adapter tensor is read; for a sharded model
    `parallel.state.full_tensor_fetcher(model)`, called on every rank in the same order (collectives)."""
    if fetch is None:
        state = model.state_dict()
        fetch = state.__getitem__
    mods = {n: m for n, m in lora_modules(model).items() if not _is_mtp(n)}
    if not mods:
        raise ValueError("the model has no LoRA adapters to export (outside the MTP module)")
    check_peft_expressible(model)
    linear = {n: m for n, m in mods.items() if isinstance(m, LoRALinear)}
    experts = {n: m for n, m in mods.items() if isinstance(m, LoRAGroupedExperts)}
    ranks = {m.rank for m in linear.values()}
    alphas = {m.alpha for m in linear.values()}
    e_ranks = {m.rank for m in experts.values()}
    e_alphas = {m.alpha for m in experts.values()}
    e_projs = {m.projections for m in experts.values()}
    if len(ranks) > 1 or len(alphas) > 1 or len(e_ranks) > 1 or len(e_alphas) > 1 or len(e_projs) > 1:
        raise ValueError("PEFT export supports one rank/alpha for Linear targets and one for experts")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in linear.items():
        key = PREFIX + hf_module_name(name)
        tensors[f"{key}.lora_A.weight"] = full_cpu_tensor(fetch(f"{name}.lora_A")).contiguous()
        tensors[f"{key}.lora_B.weight"] = full_cpu_tensor(fetch(f"{name}.lora_B")).contiguous()

    target_parameters: list[str] = []
    rank_pattern, alpha_pattern = {}, {}
    if experts:
        r_e, alpha_e, projs = e_ranks.pop(), e_alphas.pop(), e_projs.pop()
        target_parameters = [f"mlp.experts.{HF_EXPERT_PARAMS[p]}" for p in HF_EXPERT_PARAMS if p in projs]
        for name, m in model.named_modules():
            if not isinstance(m, GroupedExperts) or _is_mtp(name):
                continue
            ordered = [p for p in HF_EXPERT_PARAMS if p in projs]  # innermost wrapper first
            pairs = m.adapter_pairs() if isinstance(m, LoRAGroupedExperts) else {}
            E, (H, I2) = m.num_experts, m.gate_and_up_projs.shape[1:]  # E global, also for an ep shard
            shapes = {"gate_up": (H, I2), "down": (I2 // 2, H)}
            for depth, proj in enumerate(ordered):
                if proj in pairs:
                    prefix = "gate_and_up_lora" if proj == "gate_up" else "down_lora"
                    A, B = (full_cpu_tensor(fetch(f"{name}.{prefix}_{ab}")) for ab in "AB")
                else:  # excluded layer: zero adapter, loads without missing keys and adds nothing
                    n_in, n_out = shapes[proj]
                    dtype = next(iter(next(iter(experts.values())).adapter_pairs().values()))[0].dtype
                    A, B = torch.zeros(E, n_in, r_e, dtype=dtype), torch.zeros(E, r_e, n_out, dtype=dtype)
                lora_A, lora_B = experts_to_peft(A, B)
                key = PREFIX + hf_module_name(name) + "." + "base_layer." * (len(ordered) - 1 - depth)
                tensors[f"{key}lora_A.weight"] = lora_A
                tensors[f"{key}lora_B.weight"] = lora_B
    if linear:
        r, alpha = ranks.pop(), alphas.pop()
        if target_parameters and r_e != r:
            rank_pattern = {t: r_e for t in target_parameters}
        if target_parameters and alpha_e != alpha:
            alpha_pattern = {t: alpha_e for t in target_parameters}
    else:
        r, alpha = r_e, alpha_e
    config = dict(
        peft_type="LORA", task_type=None, r=int(r), lora_alpha=_num(alpha), lora_dropout=0.0,
        target_modules=_target_modules(model, list(linear)), target_parameters=target_parameters,
        rank_pattern=rank_pattern, alpha_pattern={k: _num(v) for k, v in alpha_pattern.items()},
        bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
        inference_mode=True, modules_to_save=None, layers_to_transform=None, layers_pattern=None,
        exclude_modules=None, revision=None, lora_bias=False,
    )
    return config, tensors


def _is_mtp(name: str) -> bool:
    return name == "mtp" or name.startswith("mtp.")


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None,
                      fetch=None, write: bool = True, lora_config=None) -> Path | None:
    """Write `hf_adapter/` (adapter_config.json + adapter_model.safetensors) atomically. Returns the directory.
    lora_config: the run's `LoraConfig`, kept as `qmoe_lora.json` (training-time settings PEFT has no field for).

    Sharded models: call on every rank with `fetch=full_tensor_fetcher(model)`, `write=(rank == 0)`."""
    config, tensors = peft_adapter_state(model, fetch)
    if not write:
        return None
    for key, tensor in tensors.items():  # diverged adapters: the previous export stays
        check_finite(key, tensor, f"the adapter export {out_dir}")
    config["base_model_name_or_path"] = None if base_model_name_or_path is None else str(base_model_name_or_path)
    try:
        import peft

        config["peft_version"] = peft.__version__
    except ImportError:
        pass
    with staged_export(out_dir, "peft_adapter") as (tmp, out_dir):
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if lora_config is not None:  # provenance: settings PEFT has no field for (its LoraConfig rejects them)
            (tmp / "qmoe_lora.json").write_text(json.dumps(dict(vars(lora_config)), indent=2))
    return out_dir
