"""`TextMoeCausalLM`: the forward of every text-only native model (Qwen3.5-MoE's text model, Qwen3-MoE, ...).

A family's text-only class subclasses it and builds, in its `__init__`, `self.model` (its `DecoderBackend`, as
transformers names it), `self.lm_head`, `self.config` / `self.text_config` (its text config) and optionally its MTP
module. The forward: token embeddings, the packed layout (`cu_seqlens`) or the padding mask, text positions (the
three mRoPE axes equal, which is plain RoPE for a family without mRoPE), then the shared tail
(`MoeCausalLM._decode_and_head`). The DataModule's packed batches carry token types (all 0 for text) and, for image
rows, pixels: a text-only model accepts the former and refuses anything visual instead of ignoring it.
"""

from __future__ import annotations

import torch

from .batch import PackedBatch
from .causal_lm import MoeCausalLM, MoeOutput, reject_unknown
from .decoder import DecoderBackend
from .packing import build_sequence_info

VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class TextMoeCausalLM(MoeCausalLM):
    TEXT_ONLY = True
    model: DecoderBackend

    @property
    def text_model(self) -> DecoderBackend:
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
        vision = sorted(k for k in VISION_INPUTS if unused.pop(k, None) is not None)
        if vision or (mm_token_type_ids is not None and bool((mm_token_type_ids != 0).any())):
            raise ValueError(f"{type(self).HF_ARCHITECTURE} is text-only, but the batch holds images or videos "
                             f"({', '.join(vision) or 'image / video token types'}): train a vision-language "
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
