"""Multi-token prediction (MTP): the `mtp.*` module of Qwen3.5-MoE checkpoints, trained beside the main model.

What inference engines run (followed here: vLLM `qwen3_5_mtp.py` / `qwen3_next_mtp.py` and SGLang `qwen3_5_mtp.py`;
Megatron-LM's `multi_token_prediction.py` computes the same), for depth d = 0 .. D-1 at position t:

    x   = fc(cat[pre_fc_norm_embedding(embed(tok[t + d + 1])), pre_fc_norm_hidden(h_d[t])])     (embedding first)
    y   = layers[d](x)          one full-attention decoder block of the family (gated attention + MoE + shared expert)
    h_{d+1}[t] = norm(y)        -> logits with the model's own LM head; depth d predicts tok[t + d + 2]

h_0 is the main model's final hidden state AFTER its final norm; the next depth takes the previous depth's output
after `mtp.norm` (the tensor its logits come from). The embedding is the main model's table, at multimodal
positions the spliced vision embedding (what vLLM / SGLang feed). The MTP layer's attention uses the main model's
positions of t, not of t + d + 1 (vLLM, SGLang and Megatron do; NeMo Automodel shifts them, which only differs
around images and videos): the same rotary tensors as the main decoder. The norms are the family's (zero-centred
for Qwen3.5, as vLLM's GemmaRMSNorm).

Packed rows: the embedding of t + d + 1 is taken only from t's own document (zero beyond it), and a target only from
t's own document (`lm_loss.future_token_targets`), so a packed row's MTP loss is the sum of its documents' alone --
the gap NeMo's packed VLM path has (its targets cross document boundaries).

The MTP layer's router is not part of the aux loss or the expert statistics (those are the main decoder's layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .lm_loss import document_ids
from .packing import SequenceInfo
from .settings import section_from


class MultiTokenPredictor(nn.Module):
    """`mtp.*`: fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.{d} (one per depth), norm."""

    def __init__(self, config, num_layers: int, block_factory, norm_class: type[nn.Module]):
        super().__init__()
        self._recipe = (config, num_layers, block_factory, norm_class)  # `unparallelised_copy`
        H = config.hidden_size
        self.num_depths = num_layers
        self.pre_fc_norm_embedding = norm_class(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = norm_class(H, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(block_factory(config, d) for d in range(num_layers))
        self.norm = norm_class(H, eps=config.rms_norm_eps)

    def unparallelised_copy(self) -> MultiTokenPredictor:
        """A new module of the same structure on the meta device (full tensors: for a seeded init of a sharded one)."""
        with torch.device("meta"):
            return MultiTokenPredictor(*self._recipe)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope, info: SequenceInfo, depth: int):
        """embeds (B, T, H) of tok[t + d + 1], hidden (B, T, H) -> h_{d+1} (B, T, H) (normed)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        y, _, _ = self.layers[depth](x, rope, info)
        return self.norm(y)


def shifted_embeddings(embeds: torch.Tensor, info: SequenceInfo, offset: int) -> torch.Tensor:
    """(B, T, H) -> (B, T, H): position t gets embeds[t + offset] from t's own document (a real token), else 0."""
    B, T, _ = embeds.shape
    out = torch.zeros_like(embeds)
    if offset >= T:
        return out
    out[:, : T - offset] = embeds[:, offset:]
    keep = torch.zeros(B, T, dtype=torch.bool, device=embeds.device)
    if info.packed:
        doc = document_ids(info.cu_seqlens, T, embeds.device)
        keep[:, : T - offset] = ((doc[offset:] == doc[: T - offset]) & (doc[offset:] >= 0)).unsqueeze(0)
    elif info.token_mask is not None:
        keep[:, : T - offset] = info.token_mask[:, offset:].bool()
    else:
        keep[:, : T - offset] = True
    return out * keep.unsqueeze(-1).to(out.dtype)


@dataclass
class MtpConfig:
    """The YAML `model.mtp` section.

    Args:
        enabled: train the checkpoint's MTP module beside the main model (Qwen3.5-MoE; the export writes it back).
        num_layers: MTP depths (one decoder block each); default the config's `mtp_num_hidden_layers` (1 in the
            published checkpoints).
        loss_scale: loss = main + loss_scale * mean over depths of the MTP cross-entropy (0.1 as Megatron / NeMo).
        init: "checkpoint" (the `mtp.*` tensors must be there) or "random" (a checkpoint without them starts the
            module from the model's random init; with them, they are loaded).
    """

    enabled: bool = False
    num_layers: int | None = None
    loss_scale: float = 0.1
    init: str = "checkpoint"

    def __post_init__(self) -> None:
        if self.init not in ("checkpoint", "random"):
            raise ValueError(f"mtp.init must be 'checkpoint' or 'random', got {self.init!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"mtp.num_layers must be >= 1, got {self.num_layers}")
        if self.loss_scale < 0:
            raise ValueError(f"mtp.loss_scale must be >= 0, got {self.loss_scale}")

    @classmethod
    def from_any(cls, value) -> MtpConfig | None:
        return None if value is None else section_from(cls, value, "mtp")

    def depths(self, text_config) -> int:
        return int(self.num_layers or getattr(text_config, "mtp_num_hidden_layers", None) or 1)


@dataclass
class MtpOutput:
    ce: torch.Tensor  # (D,) summed CE per depth, divided by the main loss's normaliser
    num_targets: torch.Tensor  # (D,) targets per depth
    correct: torch.Tensor | None = None  # (D,) top-1 hits per depth (with metrics)
    accepted: torch.Tensor | None = None  # () depth-0 argmax == the main model's argmax one step later
    accept_total: torch.Tensor | None = None  # () positions the acceptance is counted over
    hidden_states: tuple[torch.Tensor, ...] = ()  # per depth h_{d+1} (B, T, H): logits = lm_head(h)
