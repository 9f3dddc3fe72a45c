"""Qwen3.5-MoE text decoder: `Qwen3_5MoeBlock`s (token mixer + sparse MoE) and `Qwen3_5MoeTextModelBackend`.

Layer: `h += mixer(input_layernorm(h)); h += moe(post_attention_layernorm(h))`, the mixer being Gated DeltaNet
(`linear_attn`) or gated full attention (`self_attn`) per `config.layer_types`. Every layer is MoE (with a gated
shared expert); every norm is zero-centred. The backend and the block's checkpointing are the shared ones
(`models/decoder.py`).
"""

from __future__ import annotations

from ..attention import gated_attention
from ..decoder import DecoderBackend, DecoderBlock
from ..moe import SparseMoE
from ..norms import ZeroCenteredRMSNorm
from .gated_deltanet import GatedDeltaNet


class Qwen3_5MoeBlock(DecoderBlock):
    def __init__(self, config, layer_idx: int, layer_type: str | None = None):
        """layer_type: override `config.layer_types[layer_idx]` (the MTP layer is always full attention)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = layer_type or config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        elif self.layer_type == "full_attention":
            self.self_attn = gated_attention(config)
        else:
            raise ValueError(f"layer {layer_idx}: unknown layer type {self.layer_type!r}")
        self.mlp = SparseMoE(config)
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attach_routing_replay()

    def _forward(self, h, rope, info):
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            h = h + self.linear_attn(x, info)
        else:
            h = h + self.self_attn(x, rope, info)
        out, router_logits, indices = self.mlp(self.post_attention_layernorm(h))
        return h + out, router_logits, indices


def mtp_block(config, depth: int) -> Qwen3_5MoeBlock:
    """The decoder block of MTP depth `depth` (`mtp.layers.{depth}`): a full-attention MoE block."""
    return Qwen3_5MoeBlock(config, depth, "full_attention")


class Qwen3_5MoeTextModelBackend(DecoderBackend):
    def __init__(self, config):
        super().__init__(config, Qwen3_5MoeBlock, ZeroCenteredRMSNorm)

    @property
    def min_context_slice(self) -> int:
        """The Gated DeltaNet conv reads the K-1 tokens before each slice (the halo exchange)."""
        return max(self.config.linear_conv_kernel_dim - 1, 1)
