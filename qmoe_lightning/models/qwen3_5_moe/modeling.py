"""Qwen3.5-MoE top-level models: `Qwen3_5MoeForConditionalGeneration` (text + image + video) and
`Qwen3_5MoeForCausalLM` (text only).

Forward takes a `PackedBatch` (`model(batch, **options)`) or transformers' keyword arguments plus `cu_seqlens` (one
packed row of documents) and returns `MoeOutput` with `logits`, `loss` (labels given), `aux_loss` and per-layer
`expert_token_counts`: the shared tail (`causal_lm.MoeCausalLM`) and vision-language forward
(`vision_language.VisionLanguageMoe`) say how. What is Qwen3.5's own: the decoder (`text_model.py`), the vision
tower (transformers' `Qwen3_5MoeVisionModel`, as NeMo Automodel reuses it, its rotary swapped for an fp32-safe
one), the checkpoint names (`state_dict_adapter.py`) and a text-only model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

from ..batch import PackedBatch
from ..causal_lm import MoeCausalLM, MoeOutput, reject_unknown
from ..mtp import MultiTokenPredictor
from ..norms import ZeroCenteredRMSNorm
from ..packing import build_sequence_info
from ..vision_language import VisionLanguageBackbone, VisionLanguageMoe
from .state_dict_adapter import Qwen3_5MoeStateDictAdapter
from .text_model import Qwen3_5MoeTextModelBackend, mtp_block


class Qwen3_5MoeForCausalLM(MoeCausalLM):
    """Text-only model. Loads text-only and VL checkpoints (the vision tower's tensors are skipped, and counted)."""

    HF_ARCHITECTURE = "Qwen3_5MoeForCausalLM"
    MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_5_moe")
    TEXT_ONLY = True
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
        _add_mtp(self, config, mtp_layers, mtp_loss_scale)

    @property
    def text_model(self) -> Qwen3_5MoeTextModelBackend:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        label_logits_only: bool = False,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_logits: bool = True,
        mm_token_type_ids: torch.Tensor | None = None,
        mtp_metrics: bool = False,
        **unused,
    ) -> MoeOutput:
        if isinstance(input_ids, PackedBatch):  # model(batch, num_items_in_batch=..., ...)
            return self._forward_batch(input_ids, dict(locals()))
        # the packed batches of the DataModule carry the token types (all 0 in text-only data) and, for image rows,
        # pixels: a text-only model accepts the former and refuses anything visual instead of ignoring it
        vision = sorted(k for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
                        if unused.pop(k, None) is not None)
        if vision or (mm_token_type_ids is not None and bool((mm_token_type_ids != 0).any())):
            raise ValueError(f"{type(self).HF_ARCHITECTURE} is text-only, but the batch holds images or videos "
                             f"({', '.join(vision) or 'image / video token types'}): train the vision-language "
                             "model on it, or give text-only data")
        reject_unknown(unused)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        info = build_sequence_info(B, T, inputs_embeds.device, cu_seqlens, attention_mask, max_seqlen, position_ids)
        positions = self._text_positions(position_ids, info)
        return self._decode_and_head(
            inputs_embeds, positions, info, labels=labels, output_router_logits=output_router_logits,
            label_logits_only=label_logits_only, logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch, return_logits=return_logits, mtp_metrics=mtp_metrics,
        )


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
        _add_mtp(self, config.text_config, mtp_layers, mtp_loss_scale)


def _add_mtp(model: nn.Module, text_config, layers: int, loss_scale: float) -> None:
    model.mtp = MultiTokenPredictor(text_config, layers, mtp_block, ZeroCenteredRMSNorm) if layers else None
    model.mtp_loss_scale = loss_scale
