"""Qwen3.5-MoE text decoder: `Qwen3_5MoeBlock`s (token mixer + sparse MoE) and `Qwen3_5MoeTextModelBackend`.

Layer: `h += mixer(input_layernorm(h)); h += moe(post_attention_layernorm(h))`, the mixer being Gated DeltaNet
(`linear_attn`) or gated full attention (`self_attn`) per `config.layer_types`. Every layer is MoE.

The backend takes embeddings (the multimodal splice happens outside), 3-D positions and one `SequenceInfo`
computed once per forward, and returns the final hidden states plus, per layer, the router logits and the top-k
expert indices (the aux loss and the expert-load statistics are computed from those by the caller).
No collectives here: parallelism is applied from outside (`qmoe_lightning/parallel`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe import RoutingReplay, SparseMoE
from ..norms import ZeroCenteredRMSNorm
from ..packing import SequenceInfo
from ..rotary import Fp32SafeTextRotaryEmbedding
from .attention import GatedAttention
from .gated_deltanet import GatedDeltaNet


class Qwen3_5MoeBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        elif self.layer_type == "full_attention":
            self.self_attn = GatedAttention(config)
        else:
            raise ValueError(f"layer {layer_idx}: unknown layer type {self.layer_type!r}")
        self.mlp = SparseMoE(config)
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # activation checkpointing: the block recomputes itself in backward, routing replayed (see moe.py). Inside
        # the block's own forward, so that an FSDP2 wrapper of the block gathers its parameters around it once.
        self.checkpointing = False
        self.routing_replay = RoutingReplay()
        self.mlp.gate.replay = self.routing_replay

    def forward(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._forward(h, rope, info)
        cache: list = []  # this call's routing, recorded in forward, replayed in the recompute
        return torch.utils.checkpoint.checkpoint(self._forward, h, rope, info, use_reentrant=False,
                                                 context_fn=lambda: self.routing_replay.phases(cache))

    def _forward(self, h, rope, info):
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            h = h + self.linear_attn(x, info)
        else:
            h = h + self.self_attn(x, rope, info)
        out, router_logits, indices = self.mlp(self.post_attention_layernorm(h))
        return h + out, router_logits, indices


class Qwen3_5MoeTextModelBackend(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Qwen3_5MoeBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Fp32SafeTextRotaryEmbedding(config)

    @property
    def gradient_checkpointing(self) -> bool:
        """Every block recomputes itself in backward (routing replayed: see `Qwen3_5MoeBlock`)."""
        return all(layer.checkpointing for layer in self.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for layer in self.layers:
            layer.checkpointing = bool(value)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, info: SequenceInfo
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """inputs_embeds (B, T, H), position_ids (3, B, T) -> hidden (B, T, H), router logits, top-k indices."""
        rope = self.rotary_emb(inputs_embeds, position_ids)
        h = inputs_embeds
        all_logits, all_indices = [], []
        for layer in self.layers:
            h, logits, indices = layer(h, rope, info)
            all_logits.append(logits)
            all_indices.append(indices)
        return self.norm(h), all_logits, all_indices
