"""Native models: one folder per family (`qwen3_5_moe/`, `qwen3_moe/`, `qwen3_next/`, `qwen3_vl_moe/`), the parts they share beside
it (the forward tail, the text-only and vision-language forwards, the decoder backends, attention, the MoE block,
packing, kernels, norms, rotary, checkpoint I/O and the HF adapter, the packed batch), and the registry that maps
config.json `model_type`s to families (`registry.py`)."""

from .causal_lm import MoeOutput
from .qwen3_5_moe import (Qwen3_5MoeBlock, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration,
                          Qwen3_5MoeStateDictAdapter, Qwen3_5MoeTextModelBackend)
from .qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeStateDictAdapter
from .qwen3_next import Qwen3NextForCausalLM, Qwen3NextStateDictAdapter
from .qwen3_vl_moe import (Qwen3VLMoeBlock, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeStateDictAdapter,
                           Qwen3VLMoeTextModelBackend)

__all__ = [
    "MoeOutput",
    "Qwen3_5MoeBlock",
    "Qwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeStateDictAdapter",
    "Qwen3_5MoeTextModelBackend",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeStateDictAdapter",
    "Qwen3NextForCausalLM",
    "Qwen3NextStateDictAdapter",
    "Qwen3VLMoeBlock",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3VLMoeStateDictAdapter",
    "Qwen3VLMoeTextModelBackend",
]
