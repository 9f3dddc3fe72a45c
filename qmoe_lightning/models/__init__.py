"""Native Qwen3.5-MoE models (text decoder re-implemented; transformers' vision tower reused)."""

from .modeling import MoeOutput, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration
from .state_dict_adapter import Qwen3_5MoeStateDictAdapter
from .text_model import Qwen3_5MoeBlock, Qwen3_5MoeTextModelBackend

__all__ = [
    "MoeOutput",
    "Qwen3_5MoeBlock",
    "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeStateDictAdapter",
    "Qwen3_5MoeTextModelBackend",
]
