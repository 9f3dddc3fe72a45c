"""The decoder of the attention-only families (Qwen3-MoE, Qwen3-VL-MoE): `AttentionMoeBlock`s under a
`AttentionDecoderBackend`.

Layer: `h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))`. Attention is plain GQA with
standard q/k RMSNorm and the rotary over the whole head (`attention.plain_attention`; mRoPE where the config has
sections, plain RoPE otherwise). The MLP is the shared sparse MoE block (softmax router, top-k renormalised as the
config's `norm_topk_prob` says, no shared expert) on the layers transformers makes sparse (`decoder.is_sparse_layer`)
and a dense SwiGLU MLP (`intermediate_size`) elsewhere. Norms are standard RMSNorms. Deepstack features (Qwen3-VL)
are added by the shared backend.
"""

from __future__ import annotations

from .attention import plain_attention
from .decoder import DecoderBackend, DecoderBlock, is_sparse_layer, moe_or_dense_mlp
from .norms import RMSNorm


class AttentionMoeBlock(DecoderBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = plain_attention(config)
        self.mlp = moe_or_dense_mlp(config, is_sparse_layer(config, layer_idx))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attach_routing_replay()

    def _forward(self, h, rope, info):
        return self._mlp_residual(h + self.self_attn(self.input_layernorm(h), rope, info))


class AttentionDecoderBackend(DecoderBackend):
    def __init__(self, config, block_class: type[AttentionMoeBlock] = AttentionMoeBlock):
        super().__init__(config, block_class, RMSNorm)
