"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B; Instruct and Thinking): the text decoder on the shared core
(plain GQA attention, the shared MoE block or a dense MLP per layer, deepstack), transformers' vision tower reused,
and the state-dict adapter for the published and transformers-saved layouts. Registered in `registry.py`."""

from .modeling import Qwen3VLMoeForConditionalGeneration
from .state_dict_adapter import Qwen3VLMoeStateDictAdapter
from .text_model import Qwen3VLMoeBlock, Qwen3VLMoeTextModelBackend

__all__ = ["Qwen3VLMoeBlock", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeStateDictAdapter",
           "Qwen3VLMoeTextModelBackend"]
