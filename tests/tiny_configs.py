"""Tiny Qwen3.5-MoE configs for CPU parity tests (run in milliseconds), and helpers shared by the tests."""

from __future__ import annotations

import copy

import torch
from transformers import Qwen3_5MoeConfig

VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64)

BASE_TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4,
                 layer_types=["linear_attention"] * 3 + ["full_attention"],
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32, max_position_embeddings=1024, router_aux_loss_coef=0.001,
                 rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.5,
                                      mrope_section=[2, 1, 1], mrope_interleaved=True))

# three text variants: layer patterns, head counts, GQA ratios, partial rotary factors, experts/top-k
TEXT_VARIANTS = {
    "base": {},
    "alt": dict(num_hidden_layers=5, layer_types=["full_attention", "linear_attention", "linear_attention",
                                                   "full_attention", "linear_attention"],
                num_attention_heads=8, num_key_value_heads=1, head_dim=8, linear_num_key_heads=1,
                linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=32, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=16, shared_expert_intermediate_size=48,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                     mrope_section=[1, 0, 0], mrope_interleaved=True)),
    "wide": dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
                 hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                 linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=32, linear_value_head_dim=16,
                 linear_conv_kernel_dim=3, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=24,
                 shared_expert_intermediate_size=32,
                 rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=1.0,
                                      mrope_section=[6, 5, 5], mrope_interleaved=True)),
}

IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def make_config(variant: str = "base", **overrides) -> Qwen3_5MoeConfig:
    text = copy.deepcopy(BASE_TEXT)
    text.update(copy.deepcopy(TEXT_VARIANTS[variant]))
    text.update(overrides)
    vision = dict(VISION, out_hidden_size=text["hidden_size"])
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **IDS)


def make_hf_model(config: Qwen3_5MoeConfig, seed: int = 0):
    """transformers' model in fp32 with its torch fallbacks and the eager (per-expert loop) experts."""
    from transformers import Qwen3_5MoeForConditionalGeneration as HF

    torch.manual_seed(seed)
    config = copy.deepcopy(config)
    model = HF(config).float().eval()
    model.config.text_config._experts_implementation = "eager"
    model.config._experts_implementation = "eager"
    # make norms / gates non-trivial: transformers initialises zero-centred norm weights at 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def image_tokens(grid_thw, merge: int = 2) -> int:
    t, h, w = grid_thw
    return t * h * w // (merge * merge)
