"""Rotary embeddings whose inv_freq stays fp32 when the model is cast to bf16.

Text: interleaved multimodal RoPE (mRoPE) over a partial rotary dim. For frequency index j (rd/2 of them) the
position comes from the H axis if `j % 3 == 1 and j < 3 * section[1]`, the W axis if `j % 3 == 2 and
j < 3 * section[2]`, else the T axis; then `cat(freqs, freqs)` (rotate_half layout). cos/sin are computed in fp32
and cast to the activation dtype, as transformers does.

Vision: transformers' vision tower is reused; only its rotary module is swapped for `Fp32SafeVisionRotaryEmbedding`
so `inv_freq` survives `.to(bfloat16)` (as NeMo Automodel's Fp32Safe* rotary classes).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionRotaryEmbedding

from .norms import KeepFp32Mixin


def head_dim_of(config) -> int:
    """The attention head size: `head_dim` where the config has one (Qwen3.5 and Qwen3-VL declare it; a Qwen3-MoE
    config may leave it out), else hidden_size / heads, as transformers falls back."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def text_rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """(inv_freq (rd/2,) fp32, attention_scaling) for a text config (any family)."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim_of(config) * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type.startswith("dynamic"):
        raise NotImplementedError(f"rope_type {rope_type!r} changes with sequence length; not supported for training")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


# transformers' fallback when a config's rope_parameters carry no mrope_section (its text rotary classes)
DEFAULT_MROPE_SECTION = {"qwen3_vl_moe_text": [24, 20, 20], "qwen3_5_moe_text": [11, 11, 10]}


def interleaved_mrope_index(num_freqs: int, mrope_section: list[int]) -> torch.Tensor:
    """(rd/2,) long: which position axis (0=T, 1=H, 2=W) drives each frequency."""
    axis = torch.zeros(num_freqs, dtype=torch.long)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset : 3 * mrope_section[dim] : 3] = dim
    return axis


class Fp32SafeTextRotaryEmbedding(KeepFp32Mixin, nn.Module):
    _fp32_names = ("inv_freq",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        inv_freq, axis, self.attention_scaling = self._rope_buffers(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("freq_axis", axis, persistent=False)

    @staticmethod
    def _rope_buffers(config) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(inv_freq (rd/2,) fp32, axis of each frequency (rd/2,) long, attention scaling)."""
        inv_freq, scaling = text_rope_inv_freq(config)
        section = config.rope_parameters.get("mrope_section") or DEFAULT_MROPE_SECTION.get(config.model_type)
        axis = interleaved_mrope_index(inv_freq.numel(), section) if section else torch.zeros(inv_freq.numel())
        return inv_freq, axis.long(), scaling

    def reset_parameters(self) -> None:
        """Recompute the buffers (after meta-device init + to_empty they hold garbage)."""
        inv_freq, axis, _ = self._rope_buffers(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self.freq_axis = axis.to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (3, B, T) -> cos, sin (B, T, rd) in x.dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (3, B, T, rd/2)
        axis = self.freq_axis.to(x.device).view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, axis).squeeze(0)  # (B, T, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Fp32SafeVisionRotaryEmbedding(KeepFp32Mixin, Qwen3_5MoeVisionRotaryEmbedding):
    _fp32_names = ("inv_freq", "original_inv_freq")

    def reset_parameters(self) -> None:
        inv_freq, _ = self.compute_axial_rope_parameters(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self.original_inv_freq = inv_freq.clone().to(self.inv_freq.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, rd), rd <= D: rotate the first rd dims, pass the rest through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
