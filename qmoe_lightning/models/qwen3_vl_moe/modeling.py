"""Qwen3-VL-MoE top-level model: `Qwen3VLMoeForConditionalGeneration` (text + image + video).

Everything but the decoder blocks and the checkpoint names is shared with Qwen3.5-MoE: the forward contract
(`PackedBatch` or transformers' keyword arguments plus `cu_seqlens`; `MoeOutput`), losses, packing, mRoPE positions
(the same get_rope_index semantics: videos split into one grid per frame), the splice, and the deepstack path
(`vision_language.VisionLanguageMoe`). The vision tower is transformers' own `Qwen3VLMoeVisionModel` (with its
deepstack mergers), its rotary swapped for the fp32-safe one. Qwen3-VL-MoE has no text-only checkpoints and no
text-only transformers class: text-only data trains this model (the vision tower idles, or runs on a placeholder
under FSDP2).
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen3VLMoeConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from ..vision_language import VisionLanguageBackbone, VisionLanguageMoe
from .state_dict_adapter import Qwen3VLMoeStateDictAdapter
from .text_model import Qwen3VLMoeTextModelBackend


class Qwen3VLMoeForConditionalGeneration(VisionLanguageMoe):
    HF_ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
    MODEL_TYPES = ("qwen3_vl_moe",)
    STATE_DICT_ADAPTER = Qwen3VLMoeStateDictAdapter

    def __init__(self, config: Qwen3VLMoeConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.model = VisionLanguageBackbone(config, Qwen3VLMoeVisionModel, Qwen3VLMoeTextModelBackend)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tie_weights()
