"""Qwen3-VL-MoE text decoder: `Qwen3VLMoeBlock`s and `Qwen3VLMoeTextModelBackend`.

Layer: `h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))`. Attention is plain GQA with
standard q/k RMSNorm and interleaved mRoPE over the whole head (`attention.plain_attention`). The MLP is the shared
sparse MoE block (softmax router, renormalised top-k, no shared expert) on the layers transformers makes sparse --
`layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0` -- and a dense SwiGLU MLP
(`intermediate_size`) elsewhere. Norms are standard RMSNorms. Deepstack features are added by the shared backend.
"""

from __future__ import annotations

from ..attention import plain_attention
from ..decoder import DecoderBackend, DecoderBlock
from ..moe import SparseMoE, SwiGLUMLP
from ..norms import RMSNorm


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule (Qwen3VLMoeTextDecoderLayer)."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


class Qwen3VLMoeBlock(DecoderBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = plain_attention(config)
        if is_sparse_layer(config, layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attach_routing_replay()

    def _forward(self, h, rope, info):
        h = h + self.self_attn(self.input_layernorm(h), rope, info)
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(x), None, None
        out, router_logits, indices = self.mlp(x)
        return h + out, router_logits, indices


class Qwen3VLMoeTextModelBackend(DecoderBackend):
    def __init__(self, config):
        super().__init__(config, Qwen3VLMoeBlock, RMSNorm)
