"""LoRA for the native models (both families): Linear targets, per-expert adapters on the grouped experts, merged and
PEFT-format exports.

    report = apply_lora(model, LoraConfig(rank=16, alpha=32, targets=["all-linear"], expert_rank=8))
    print(report.table())                         # trainable parameters per group; routed experts always listed
    save_peft_adapter(model, "hf_adapter", base_model_name_or_path=source)   # peft.PeftModel.from_pretrained
    save_merged_pretrained(model, "hf_export")    # merged weights, transformers / our from_pretrained
"""

from .apply import (GROUPS, LoraReport, apply_lora, check_adapter_state_dict, group_of, has_lora, is_adapter_key,
                    keep_adapters_only, lora_modules, reset_lora_parameters, resolve_targets, summarize)
from .config import ALIASES, DEFAULT_TARGETS, LoraConfig
from .experts import LoRAGroupedExperts
from .linear import LoRALinear
from .merge import MergedStateDict, merge_lora_, save_merged_pretrained
from .peft_export import experts_from_peft, experts_to_peft, peft_adapter_state, save_peft_adapter

__all__ = [
    "ALIASES", "DEFAULT_TARGETS", "GROUPS", "LoRAGroupedExperts", "LoRALinear", "LoraConfig", "LoraReport",
    "MergedStateDict", "apply_lora", "check_adapter_state_dict", "experts_from_peft", "experts_to_peft", "group_of",
    "has_lora", "is_adapter_key", "keep_adapters_only", "lora_modules", "merge_lora_", "peft_adapter_state",
    "reset_lora_parameters", "resolve_targets", "save_merged_pretrained", "save_peft_adapter", "summarize",
]
