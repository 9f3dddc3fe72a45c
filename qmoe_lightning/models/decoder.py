"""What every decoder of ours shares: the block's checkpointing with routing replay (`DecoderBlock`), the backend
that runs embeddings through the blocks (`DecoderBackend`) and the deepstack injection of visual features
(`Deepstack`). Families subclass the block (their token mixer and MLP) and pick their final norm.

Block contract: `block(h, rope, info) -> (h, router_logits | None, top-k indices | None)`; a block without a router
(a dense MLP layer of Qwen3-VL-MoE) returns None twice. The backend returns the router outputs of the MoE blocks
only, in layer order: the aux loss and the expert statistics see exactly the layers that route
(`DecoderBackend.moe_layers` says which decoder layers those rows are).

Deepstack (Qwen3-VL): after decoder layer j < len(deepstack.embeds), the j-th deepstack feature of every visual
token is added to the hidden state at that token's position. The positions are flat indices into (B*T); the
addition is one `index_add`, the same single add per element as transformers' `h[mask] + feature`.
No collectives here: parallelism is applied from outside (`qmoe_lightning/parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .moe import RoutingReplay, SparseMoE, SwiGLUMLP
from .packing import SequenceInfo
from .rotary import Fp32SafeTextRotaryEmbedding


def is_sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule for families with dense layers among the MoE ones (Qwen3-MoE, Qwen3-VL-MoE, Qwen3-Next):
    a layer is MoE unless listed in `mlp_only_layers`, when the model has experts and `(layer + 1) %
    decoder_sparse_step == 0`."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


@dataclass
class Deepstack:
    positions: torch.Tensor  # (n,) flat indices into B*T of the visual tokens
    embeds: list[torch.Tensor]  # per deepstack layer j: (n, H), row i added at positions[i]

    def add(self, h: torch.Tensor, j: int) -> torch.Tensor:
        B, T, H = h.shape
        return h.reshape(B * T, H).index_add(0, self.positions, self.embeds[j].to(h.dtype)).view(B, T, H)


class DecoderBlock(nn.Module):
    """Base of the decoder blocks: `_forward(h, rope, info)` is the layer; activation checkpointing recomputes it in
    backward with the routing of the forward replayed (see moe.py). The checkpoint sits inside the block's own
    forward, so that an FSDP2 wrapper of the block gathers its parameters around it once."""

    mlp: nn.Module  # the family's MLP: a SparseMoE, or a dense MLP on the layers a config keeps dense
    post_attention_layernorm: nn.Module  # the norm before the MLP (`_mlp_residual`)

    def __init__(self):
        super().__init__()
        self.checkpointing = False  # `MoeCausalLM.set_activation_checkpointing` switches it
        self.routing_replay = RoutingReplay()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, SparseMoE)

    def attach_routing_replay(self) -> None:
        """Call at the end of `__init__`: the block's router (if any) replays this block's routing."""
        if self.is_moe:
            self.mlp.gate.replay = self.routing_replay

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo):
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._forward(h, rope, info)
        cache: list = []  # this call's routing, recorded in forward, replayed in the recompute
        return torch.utils.checkpoint.checkpoint(self._forward, h, rope, info, use_reentrant=False,
                                                 context_fn=lambda: self.routing_replay.phases(cache))

    def _forward(self, h, rope, info):
        raise NotImplementedError

    def _mlp_residual(self, h: torch.Tensor):
        """`h + mlp(post_attention_layernorm(h))` and the router outputs (None, None for a dense MLP)."""
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return h + self.mlp(x), None, None
        out, router_logits, indices = self.mlp(x)
        return h + out, router_logits, indices


def moe_or_dense_mlp(config, sparse: bool) -> nn.Module:
    """The block's MLP: the shared sparse MoE block, or a dense SwiGLU MLP of `intermediate_size`."""
    return SparseMoE(config) if sparse else SwiGLUMLP(config.hidden_size, config.intermediate_size)


class DecoderBackend(nn.Module):
    """embed_tokens, layers (`block_class(config, i)`), final `norm`, one rotary for all layers."""

    def __init__(self, config, block_class: type[DecoderBlock], norm_class: type[nn.Module]):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(block_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Fp32SafeTextRotaryEmbedding(config)

    # tokens each rank's slice of a row split by context parallelism must hold at least (a family whose layers read
    # tokens before the slice, as a causal conv does, says how many it needs)
    min_context_slice: int = 1

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer index of each row of the router outputs / expert counts."""
        return [i for i, layer in enumerate(self.layers) if layer.is_moe]

    @property
    def gradient_checkpointing(self) -> bool:
        """Every block recomputes itself in backward (routing replayed: see `DecoderBlock`)."""
        return all(layer.checkpointing for layer in self.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for layer in self.layers:
            layer.checkpointing = bool(value)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self, inputs_embeds: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], info: SequenceInfo,
        deepstack: Deepstack | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """inputs_embeds (B, T, H), rope = `self.rotary_emb(inputs_embeds, position_ids (3, B, T))` (the caller's:
        the MTP block reuses it) -> hidden (B, T, H), router logits and top-k indices of the MoE layers."""
        h = inputs_embeds
        all_logits, all_indices = [], []
        for j, layer in enumerate(self.layers):
            h, logits, indices = layer(h, rope, info)
            if logits is not None:
                all_logits.append(logits)
                all_indices.append(indices)
            if deepstack is not None and j < len(deepstack.embeds):
                h = deepstack.add(h, j)
        return self.norm(h), all_logits, all_indices
