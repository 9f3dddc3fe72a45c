"""The decoder of the hybrid families (Qwen3.5-MoE, Qwen3-Next): `HybridMoeBlock`s under a `HybridDecoderBackend`.

Layer: `h += mixer(input_layernorm(h)); h += mlp(post_attention_layernorm(h))`, the mixer being Gated DeltaNet
(`linear_attn`, `gated_deltanet.py`) or gated full attention (`self_attn`) per `config.layer_types`; the MLP the
shared sparse MoE block with its sigmoid-gated shared expert. Every norm is zero-centred (`w + 1`).

What a family sets on its block subclass:
- `GROUPED_PROJECTIONS`: the Gated DeltaNet projections fused per key head as its checkpoints hold them
  (Qwen3-Next's `in_proj_qkvz` / `in_proj_ba`) instead of apart (Qwen3.5's `in_proj_qkv` / `in_proj_z` / ...);
- `DENSE_LAYERS`: the config's `mlp_only_layers` / `decoder_sparse_step` make some layers a dense SwiGLU MLP
  (`intermediate_size`), transformers' rule (`decoder.is_sparse_layer`); Qwen3.5's config has neither: all MoE.
The MTP block (`mtp_block_factory`) is a full-attention MoE block of the same class whatever the layer rules say.
"""

from __future__ import annotations

from functools import partial

from .attention import gated_attention
from .decoder import DecoderBackend, DecoderBlock, is_sparse_layer, moe_or_dense_mlp
from .gated_deltanet import GatedDeltaNet
from .norms import ZeroCenteredRMSNorm


class HybridMoeBlock(DecoderBlock):
    GROUPED_PROJECTIONS: bool = False
    DENSE_LAYERS: bool = False

    def __init__(self, config, layer_idx: int, layer_type: str | None = None, mtp: bool = False):
        """layer_type: override `config.layer_types[layer_idx]`; mtp: the block of MTP depth `layer_idx` (full
        attention, MoE)."""
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = "full_attention" if mtp else (layer_type or config.layer_types[layer_idx])
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, grouped_projections=self.GROUPED_PROJECTIONS)
        elif self.layer_type == "full_attention":
            self.self_attn = gated_attention(config)
        else:
            raise ValueError(f"layer {layer_idx}: unknown layer type {self.layer_type!r}")
        self.mlp = moe_or_dense_mlp(config, mtp or not self.DENSE_LAYERS or is_sparse_layer(config, layer_idx))
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attach_routing_replay()

    def _forward(self, h, rope, info):
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            h = h + self.linear_attn(x, info)
        else:
            h = h + self.self_attn(x, rope, info)
        return self._mlp_residual(h)


def mtp_block_factory(block_class: type[HybridMoeBlock]):
    """`(config, depth) -> block` of MTP depth `depth` (`mtp.layers.{depth}`), for `mtp.MultiTokenPredictor`."""
    return partial(block_class, mtp=True)


class HybridDecoderBackend(DecoderBackend):
    def __init__(self, config, block_class: type[HybridMoeBlock] = HybridMoeBlock):
        super().__init__(config, block_class, ZeroCenteredRMSNorm)

    @property
    def min_context_slice(self) -> int:
        """The Gated DeltaNet conv reads the K-1 tokens before each slice (the halo exchange)."""
        return max(self.config.linear_conv_kernel_dim - 1, 1)
