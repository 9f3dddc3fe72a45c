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

from ..rotary import Fp32SafeVisionRotaryEmbedding
from ..vision_language import VisionLanguageMoe
from .state_dict_adapter import Qwen3VLMoeStateDictAdapter
from .text_model import Qwen3VLMoeTextModelBackend


class Qwen3VLMoeModel(nn.Module):
    """Holds the vision tower and the text decoder under transformers' names (`visual`, `language_model`)."""

    def __init__(self, config: Qwen3VLMoeConfig):
        super().__init__()
        self.visual = Qwen3VLMoeVisionModel._from_config(config.vision_config)
        self.visual.rotary_pos_emb = Fp32SafeVisionRotaryEmbedding(config.vision_config)
        self.language_model = Qwen3VLMoeTextModelBackend(config.text_config)


class Qwen3VLMoeForConditionalGeneration(VisionLanguageMoe):
    HF_ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
    MODEL_TYPES = ("qwen3_vl_moe",)
    STATE_DICT_ADAPTER = Qwen3VLMoeStateDictAdapter

    def __init__(self, config: Qwen3VLMoeConfig):
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.model = Qwen3VLMoeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
