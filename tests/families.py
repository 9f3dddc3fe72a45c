"""The model families the tests run on: each family of the registry (`qmoe_lightning.models.registry`) -> its tiny
configs, its transformers reference classes and its native classes.

Tests that check the same property for every family are parametrized over `FAMILIES` (their ids name the family:
`[qwen3_5_moe]`, `[qwen3_vl_moe-alt]`); a family added to the registry adds one `TinyFamily` here and gets every one
of them. test_model_parity.py's `test_every_registered_family_has_a_tiny_family` fails until it does, so a new
family cannot silently skip the shared tests. A text-only family (Qwen3-MoE) is a first-class entry: its `native` is
its text class, and `has_vision` selects the cases with images and videos (`each_family_case`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tiny_configs import QWEN3_MOE_VARIANTS, QWEN3_NEXT_VARIANTS, TEXT_VARIANTS, VL_MOE_VARIANTS, make_config, \
    make_hf_model, make_hf_qwen3_moe_model, make_hf_qwen3_next_model, make_hf_vl_moe_model, make_qwen3_moe_config, \
    make_qwen3_next_config, make_vl_moe_config, per_expert_layout

from qmoe_lightning.models.registry import ModelFamily, family_of


def _transposed_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-VL-MoE's published checkpoints hold the fused experts transposed relative to transformers' memory
    ((E, H, 2I) / (E, I, H) instead of (E, 2I, H) / (E, H, I))."""
    return {k: (v.transpose(1, 2).contiguous() if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
                else v) for k, v in state.items()}


@dataclass(frozen=True)
class TinyFamily:
    model_type: str  # the registry's key of the family (its main model_type: the vision-language one if it has one)
    variants: tuple[str, ...]  # names of the tiny configs; "base", "alt" and "wide" in every family
    make_config: Callable  # (variant="base", **text_config overrides) -> transformers config
    make_hf_model: Callable  # (config, seed) -> transformers' model in fp32, eager experts, norms moved off init
    hf_class: str  # transformers' class of `native` (by name: transformers imports lazily)
    seed: int  # seed of the first variant's reference model (the next variants take the next seeds)
    # transformers' in-memory state dict -> the layout of the published checkpoints, which our export writes
    published_layout: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict
    published_per_expert: bool = False  # the published layout holds one tensor per expert (`experts.{e}.*`)
    # the tiny configs whose every parameter's gradient is compared with transformers' at 1e-4
    gradient_variants: tuple[str, ...] = ("base", "alt", "wide")

    def __str__(self) -> str:
        return self.model_type

    @property
    def registered(self) -> ModelFamily:
        return family_of(self.model_type)

    @property
    def has_vision(self) -> bool:
        """The family's main model has a vision tower: the image / video cases run on it."""
        return self.registered.has_vision

    @property
    def native(self) -> type[torch.nn.Module]:
        """The class the family builds by default (the vision-language one, or the text one of a text-only family)."""
        return self.registered.model_class(text_only=False)

    @property
    def native_text(self) -> type[torch.nn.Module] | None:
        return self.registered.text_only

    @property
    def hf_auto_class(self) -> str:
        """transformers' auto class that loads an export of `native`."""
        return "AutoModelForImageTextToText" if self.has_vision else "AutoModelForCausalLM"

    def hf(self):
        import transformers

        return getattr(transformers, self.hf_class)

    def hf_text(self):
        """transformers' text-only class: the architecture a text-only export of the native text model names."""
        import transformers

        return getattr(transformers, self.native_text.hf_architecture())


FAMILIES: dict[str, TinyFamily] = {f.model_type: f for f in (
    # transformers saves the experts per expert (`experts.{e}.gate_proj.weight`); the published checkpoints and our
    # export hold them fused in transformers' in-memory layout
    # "alt" has no gradient check: its A_log gradients nearly cancel, and transformers' delta rule, which runs in fp32
    # whatever the model's dtype, differs from ours by ~1e-4 of the floor there (summation order), at the tolerance
    TinyFamily("qwen3_5_moe", tuple(TEXT_VARIANTS), make_config, make_hf_model, "Qwen3_5MoeForConditionalGeneration",
               seed=0, gradient_variants=("base", "wide")),
    TinyFamily("qwen3_vl_moe", tuple(VL_MOE_VARIANTS), make_vl_moe_config, make_hf_vl_moe_model,
               "Qwen3VLMoeForConditionalGeneration", seed=10, published_layout=_transposed_experts),
    # text-only; transformers saves the experts per expert, as the published checkpoints and our export hold them
    TinyFamily("qwen3_moe", tuple(QWEN3_MOE_VARIANTS), make_qwen3_moe_config, make_hf_qwen3_moe_model,
               "Qwen3MoeForCausalLM", seed=20, published_layout=per_expert_layout, published_per_expert=True),
    # text-only, hybrid: Qwen3.5's decoder with the grouped Gated DeltaNet projections, dense layers, experts per
    # expert. "alt" has no gradient check, as Qwen3.5's: layer 2's A_log / dt_bias gradients nearly cancel; against
    # our fp64 gradient, transformers' (its delta rule in fp32) is off by 2.8e-3 of that parameter's largest, ours
    # in fp32 by 1.1e-3, which is 2e-4 of the test's floor
    TinyFamily("qwen3_next", tuple(QWEN3_NEXT_VARIANTS), make_qwen3_next_config, make_hf_qwen3_next_model,
               "Qwen3NextForCausalLM", seed=30, published_layout=per_expert_layout, published_per_expert=True,
               gradient_variants=("base", "wide")),
)}


def each_family(where: Callable[[TinyFamily], bool] = lambda f: True) -> list:
    """`pytest.param`s of the families (`where` selects, e.g. those with a text-only model), ids their model_type."""
    return [pytest.param(f, id=f.model_type) for f in FAMILIES.values() if where(f)]


def each_family_variant(variants: Callable[[TinyFamily], tuple[str, ...]] = lambda f: f.variants) -> list:
    """`pytest.param(family, variant)` of every family and every tiny config of it (or those `variants` names)."""
    return [pytest.param(f, v, id=f"{f.model_type}-{v}") for f in FAMILIES.values() for v in variants(f)]


def each_family_case(cases: Callable[[TinyFamily], list[str]],
                     variants: Callable[[TinyFamily], tuple[str, ...]] = lambda f: f.variants) -> list:
    """`pytest.param(family, variant, case)` of every family, tiny config and the cases `cases(family)` selects for it
    (the vision cases for families with vision only), ids `family-variant-case`."""
    return [pytest.param(f, v, c, id=f"{f.model_type}-{v}-{c}")
            for f in FAMILIES.values() for v in variants(f) for c in cases(f)]


def reference_pair(family: TinyFamily, variant: str, path):
    """(transformers model of the tiny `variant`, native model loaded from its save_pretrained directory `path`)."""
    hf = family.make_hf_model(family.make_config(variant), seed=family.seed + family.variants.index(variant))
    hf.save_pretrained(path)
    return hf, family.native.from_pretrained(path).eval()


def native_slots_of(adapter, published: dict[str, tuple[int, ...]], native: torch.nn.Module) -> dict[str, set]:
    """Read a published key set (name -> shape, on meta) through `adapter`: every tensor must land in a native tensor
    of `native`, no slot (expert, columns) twice, and every native tensor must be filled. -> native key -> slots."""
    want = {k: tuple(v.shape) for k, v in native.state_dict().items()}
    slots: dict[str, set] = {}
    for key, shape in published.items():
        for a in adapter.convert_single_tensor_from_hf(key, torch.empty(shape, device="meta")):
            assert a.native_key in want, key
            slot = (a.expert, None if a.cols is None else (a.cols.start, a.cols.stop))
            assert slot not in slots.setdefault(a.native_key, set()), f"{key}: {a.slot} written twice"
            slots[a.native_key].add(slot)
    assert set(slots) == set(want)
    return slots
