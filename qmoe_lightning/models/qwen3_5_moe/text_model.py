"""Qwen3.5-MoE text decoder: the shared hybrid decoder (`models/hybrid_decoder.py`: Gated DeltaNet or gated
attention per `config.layer_types`, every layer MoE with a gated shared expert, zero-centred norms) with the Gated
DeltaNet projections apart (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`), as Qwen3.5's checkpoints hold them.
"""

from __future__ import annotations

from ..hybrid_decoder import HybridDecoderBackend, HybridMoeBlock, mtp_block_factory


class Qwen3_5MoeBlock(HybridMoeBlock):
    GROUPED_PROJECTIONS = False
    DENSE_LAYERS = False


class Qwen3_5MoeTextModelBackend(HybridDecoderBackend):
    def __init__(self, config):
        super().__init__(config, Qwen3_5MoeBlock)


mtp_block = mtp_block_factory(Qwen3_5MoeBlock)
