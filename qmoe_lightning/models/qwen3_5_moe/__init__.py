"""Qwen3.5-MoE (and Qwen3.6-MoE): the shared hybrid decoder (gated attention, Gated DeltaNet, the MoE block) with
Qwen3.5's projection layout, transformers' vision tower reused, and the HF <-> native state-dict adapter. Registered
in `registry.py`."""

from .modeling import Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration
from .state_dict_adapter import Qwen3_5MoeStateDictAdapter
from .text_model import Qwen3_5MoeBlock, Qwen3_5MoeTextModelBackend

__all__ = ["Qwen3_5MoeBlock", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration",
           "Qwen3_5MoeStateDictAdapter", "Qwen3_5MoeTextModelBackend"]
