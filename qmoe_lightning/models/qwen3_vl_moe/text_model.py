"""Qwen3-VL-MoE text decoder: the shared attention-only decoder (`attention_decoder.py`: GQA with q/k RMSNorm,
MoE or dense MLP per `decoder_sparse_step` / `mlp_only_layers`, RMSNorm) with interleaved mRoPE over the whole head
(the config's `mrope_section`); deepstack features are added by the shared backend. Named here so that module
reprs and checkpoints say which family they are."""

from __future__ import annotations

from ..attention_decoder import AttentionDecoderBackend, AttentionMoeBlock


class Qwen3VLMoeBlock(AttentionMoeBlock):
    pass


class Qwen3VLMoeTextModelBackend(AttentionDecoderBackend):
    def __init__(self, config):
        super().__init__(config, Qwen3VLMoeBlock)
