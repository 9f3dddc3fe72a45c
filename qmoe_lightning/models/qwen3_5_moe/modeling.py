"""Qwen3.5-MoE top-level models: `Qwen3_5MoeForConditionalGeneration` (text + image + video) and
`Qwen3_5MoeForCausalLM` (text only).

Forward takes a `PackedBatch` (`model(batch, **options)`) or transformers' keyword arguments plus `cu_seqlens` (one
packed row of documents) and returns `MoeOutput` with `logits`, `loss` (labels given), `aux_loss` and per-layer
`expert_token_counts`: the shared tail (`causal_lm.MoeCausalLM`) and vision-language forward
(`vision_language.VisionLanguageMoe`) say how. What is Qwen3.5's own: the decoder's projection layout (`text_model.py`), the vision
tower (transformers' `Qwen3_5MoeVisionModel`, as NeMo Automodel reuses it, its rotary swapped for an fp32-safe
one), the checkpoint names (`state_dict_adapter.py`) and a text-only model.
"""

from __future__ import annotations

from torch import nn
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

from ..norms import ZeroCenteredRMSNorm
from ..text_only import TextMoeCausalLM
from ..vision_language import VisionLanguageBackbone, VisionLanguageMoe
from .state_dict_adapter import Qwen3_5MoeStateDictAdapter
from .text_model import Qwen3_5MoeTextModelBackend, mtp_block


class Qwen3_5MoeForCausalLM(TextMoeCausalLM):
    """Text-only model. Loads text-only and VL checkpoints (the vision tower's tensors are skipped, and counted)."""

    HF_ARCHITECTURE = "Qwen3_5MoeForCausalLM"
    MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_5_moe")
    STATE_DICT_ADAPTER = Qwen3_5MoeStateDictAdapter

    def __init__(self, config: Qwen3_5MoeTextConfig | Qwen3_5MoeConfig, mtp_layers: int = 0,
                 mtp_loss_scale: float = 0.1):
        """mtp_layers: build the multi-token prediction module (`mtp.*`) with this many depths (0: none)."""
        super().__init__()
        if isinstance(config, Qwen3_5MoeConfig):
            config = config.text_config
        self.config = self.text_config = config
        self.model = Qwen3_5MoeTextModelBackend(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.add_mtp(mtp_layers, mtp_loss_scale, mtp_block, ZeroCenteredRMSNorm)


class Qwen3_5MoeForConditionalGeneration(VisionLanguageMoe):
    HF_ARCHITECTURE = "Qwen3_5MoeForConditionalGeneration"
    MODEL_TYPES = ("qwen3_5_moe",)  # a text-only checkpoint has no vision tower: Qwen3_5MoeForCausalLM loads it
    STATE_DICT_ADAPTER = Qwen3_5MoeStateDictAdapter

    def __init__(self, config: Qwen3_5MoeConfig, mtp_layers: int = 0, mtp_loss_scale: float = 0.1):
        """mtp_layers: build the multi-token prediction module (`mtp.*`) with this many depths (0: none)."""
        super().__init__()
        self.config = config
        self.text_config = config.text_config
        self.model = VisionLanguageBackbone(config, Qwen3_5MoeVisionModel, Qwen3_5MoeTextModelBackend)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tie_weights()
        self.add_mtp(mtp_layers, mtp_loss_scale, mtp_block, ZeroCenteredRMSNorm)

