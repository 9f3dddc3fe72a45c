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
from .decoder import DecoderBackend, DecoderBlock, is_sparse_layer
from .moe import SparseMoE, SwiGLUMLP
from .norms import RMSNorm


class AttentionMoeBlock(DecoderBlock):
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


class AttentionDecoderBackend(DecoderBackend):
    def __init__(self, config, block_class: type[AttentionMoeBlock] = AttentionMoeBlock):
        super().__init__(config, block_class, RMSNorm)
