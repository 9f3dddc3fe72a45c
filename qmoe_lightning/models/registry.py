"""Model-family registry: a config.json `model_type` -> what the app needs to build, load, adapt and export a model
of that family. Nothing outside `qmoe_lightning/models/` names a family: the app asks `family_of(model_type)`.

Adding a family: one folder under `qmoe_lightning/models/` (native classes built on the shared decoders, MoE block,
packing and kernels: a text-only class subclasses `text_only.TextMoeCausalLM`, a vision-language one
`vision_language.VisionLanguageMoe`; `HFCheckpointMixin` asks for HF_ARCHITECTURE, MODEL_TYPES, TEXT_ONLY,
STATE_DICT_ADAPTER) and one `register(ModelFamily(...))` below. The parallel plan (`parallel.parallelize_model`)
needs no entry: it works on any model with `text_model.layers` of blocks holding `GroupedExperts`.

    family = family_of(config.model_type)
    model_class = family.model_class(text_only=False)      # native class
    config = family.config_from_dict({"text_config": {...}})
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration
from .qwen3_moe import Qwen3MoeForCausalLM
from .qwen3_next import Qwen3NextForCausalLM
from .qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration


@dataclass(frozen=True)
class ModelFamily:
    name: str  # for messages ("Qwen3.5-MoE")
    model_type: str  # config.json model_type of the family's main checkpoints (vision-language ones if it has any)
    # of text-only checkpoints of a vision-language family (their keys are the VL config's text_config)
    text_model_type: str | None
    vision_language: type[nn.Module] | None  # native classes; None: a text-only family
    text_only: type[nn.Module] | None  # None: the family has no text-only model (its VL model trains on text)
    config_class: str  # transformers config class of `model_type` (by name: transformers imports lazily)
    lora_targets: tuple[str, ...]  # what LoRA's `default` target means here (aliases of lora.config.ALIASES)
    supports_mtp: bool = False  # the checkpoints carry a multi-token prediction module (`mtp.*`) the models build

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.model_type,) + ((self.text_model_type,) if self.text_model_type else ())

    @property
    def has_vision(self) -> bool:
        return self.vision_language is not None

    def model_class(self, text_only: bool) -> type[nn.Module]:
        """The native class: the vision-language one, or the text-only one when asked for or the only one."""
        if self.vision_language is None:
            return self.text_only
        if text_only and self.text_only is None:
            raise ValueError(f"text_only: {self.name} has no text-only model (no text-only checkpoints or transformers "
                             "class exist); train the vision-language model on text-only data instead")
        return self.text_only if text_only else self.vision_language

    def config_from_dict(self, spec: dict, where: str = "model_config"):
        """A config from config.json-style keys (`model_type` optional; a text-only type takes text keys)."""
        import transformers

        spec = dict(spec)
        model_type = spec.pop("model_type", self.model_type)
        if model_type == self.text_model_type and self.text_model_type is not None:
            spec = {"text_config": spec}
        elif model_type != self.model_type:
            raise ValueError(f"{where}: model_type {model_type!r} is not {self.name}'s {self.model_types}")
        return getattr(transformers, self.config_class)(**spec)


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for t in family.model_types:
        if t in FAMILIES:
            raise ValueError(f"model_type {t!r} is already registered to {FAMILIES[t].name}")
        FAMILIES[t] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_of(model_type: str | None, where: str = "") -> ModelFamily:
    family = FAMILIES.get(model_type)
    if family is None:
        names = sorted({f.name for f in FAMILIES.values()})
        raise ValueError(f"{where + ': ' if where else ''}model_type {model_type!r} is not supported; expected one "
                         f"of {supported_model_types()} ({', '.join(names)} checkpoints)")
    return family


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family of a native model (any wrapper FSDP2 swapped in included)."""
    for klass in type(model).__mro__:
        for family in FAMILIES.values():
            if klass in (family.vision_language, family.text_only):
                return family
    raise TypeError(f"{type(model).__name__} is not a registered native model class")


def load_config(path: Path, model_types: tuple[str, ...] | None = None, model_name: str = ""):
    """transformers' config of the HF model directory `path`, the one reader of a config.json. Its model_type must
    be a registered family's or, given `model_types` (a model class's MODEL_TYPES, `model_name` the class), one of
    those; an error names the file."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a JSON object: {err}") from None
    if model_types is None:
        family_of(model_type, str(config_file))
    elif model_type not in model_types:  # a class's types are a registered family's: this check includes that one
        raise ValueError(f"{config_file}: model_type {model_type!r} cannot be loaded by {model_name}; expected "
                         f"one of {model_types} (a text-only checkpoint has no vision tower: load it with the "
                         "family's text-only model class)")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def config_from(spec: dict | str | Path, where: str = "model_config"):
    """A config from a dict of config.json keys, a config.json file, or a model directory."""
    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"{where}: {path} does not exist")
        if path.is_dir():
            return load_config(path)  # checks model_type, naming the file
        where, spec = f"{where} {path}", json.loads(path.read_text())
    model_type = spec.get("model_type")
    family = family_of(model_type, where) if model_type is not None else QWEN3_5_MOE
    return family.config_from_dict(spec, where)


QWEN3_5_MOE = register(ModelFamily(
    name="Qwen3.5-MoE",
    model_type="qwen3_5_moe",
    text_model_type="qwen3_5_moe_text",
    vision_language=Qwen3_5MoeForConditionalGeneration,
    text_only=Qwen3_5MoeForCausalLM,
    config_class="Qwen3_5MoeConfig",
    lora_targets=("attention", "linear_attention", "shared_expert", "experts"),
    supports_mtp=True,
))

QWEN3_MOE = register(ModelFamily(
    name="Qwen3-MoE",
    model_type="qwen3_moe",
    text_model_type=None,
    vision_language=None,
    text_only=Qwen3MoeForCausalLM,
    config_class="Qwen3MoeConfig",
    # no dense MLP: the published checkpoints have none, and peft could not load its adapters (lora/peft_export.py)
    lora_targets=("attention", "experts"),
))

QWEN3_NEXT = register(ModelFamily(
    name="Qwen3-Next",
    model_type="qwen3_next",
    text_model_type=None,
    vision_language=None,
    text_only=Qwen3NextForCausalLM,
    config_class="Qwen3NextConfig",
    # no shared expert: peft loads adapters named gate_proj / up_proj / down_proj of a qwen3_next model onto the
    # routed experts (lora/peft_export.py); `shared_expert` can be added with the merged export
    lora_targets=("attention", "linear_attention", "experts"),
    supports_mtp=True,
))

QWEN3_VL_MOE = register(ModelFamily(
    name="Qwen3-VL-MoE",
    model_type="qwen3_vl_moe",
    text_model_type=None,
    vision_language=Qwen3VLMoeForConditionalGeneration,
    text_only=None,
    config_class="Qwen3VLMoeConfig",
    lora_targets=("attention", "dense_mlp", "experts"),
))
