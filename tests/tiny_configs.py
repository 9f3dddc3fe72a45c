"""Tiny Qwen3.5-MoE, Qwen3-VL-MoE, Qwen3-MoE and Qwen3-Next configs for CPU parity tests (run in milliseconds), and helpers shared
by the tests (documents with images / videos, packed rows, transformers' gradient of a native parameter)."""

from __future__ import annotations

import copy

import torch
from transformers import Qwen3_5MoeConfig, Qwen3MoeConfig, Qwen3NextConfig, Qwen3VLMoeConfig

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

    return _reference_model(HF, config, seed)


def _reference_model(hf_class, config, seed: int):
    """`hf_class(config)` in fp32, eager (per-expert loop) experts, every norm weight moved off its initial value
    (0 for zero-centred norms, 1 for plain ones) so that the norms are tested, not skipped."""
    torch.manual_seed(seed)
    model = hf_class(copy.deepcopy(config)).float().eval()
    model.config.get_text_config()._experts_implementation = "eager"  # the text config (a text-only config: itself)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def image_tokens(grid_thw, merge: int = 2) -> int:
    t, h, w = grid_thw
    return t * h * w // (merge * merge)


def vision_doc(pieces: list, seed: int = 0):
    """pieces: ints (that many random text tokens), ("image", (t,h,w)) or ("video", (t,h,w)).

    Returns input_ids (1, T), mm_token_type_ids (1, T), and per modality (pixels, grids)."""
    g = torch.Generator().manual_seed(seed)
    ids, types = [], []
    pix = {"image": [], "video": []}
    grids = {"image": [], "video": []}
    for p in pieces:
        if isinstance(p, int):
            ids += torch.randint(0, 400, (p,), generator=g).tolist()
            types += [0] * p
            continue
        kind, grid = p
        token = IDS["image_token_id"] if kind == "image" else IDS["video_token_id"]
        t, h, w = grid
        frames = [(1, h, w)] * t if kind == "video" else [grid]
        for j, fg in enumerate(frames):
            if kind == "video":  # Qwen3.5 / Qwen3-VL separate frames with timestamp text
                ids += [7, 8]
                types += [0, 0]
            ids += [IDS["vision_start_token_id"]] + [token] * image_tokens(fg) + [IDS["vision_end_token_id"]]
            types += [0] + [1 if kind == "image" else 2] * image_tokens(fg) + [0]
        pix[kind].append(torch.randn(t * h * w, 3 * 2 * 16 * 16, generator=g))
        grids[kind].append(list(grid))
    out = dict(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]))
    if pix["image"]:
        out["pixel_values"] = torch.cat(pix["image"])
        out["image_grid_thw"] = torch.tensor(grids["image"])
    if pix["video"]:
        out["pixel_values_videos"] = torch.cat(pix["video"])
        out["video_grid_thw"] = torch.tensor(grids["video"])
    return out


def hf_grad_of(hf_model, native_name: str) -> torch.Tensor:
    """transformers' gradient for a native parameter name, in the native layout (both families hold experts as
    (E, 2I, H) / (E, H, I) in memory)."""
    name = native_name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    if name.endswith("gate_and_up_projs"):
        return hf_model.get_parameter(name.replace("gate_and_up_projs", "gate_up_proj")).grad.transpose(1, 2)
    if name.endswith("down_projs"):
        return hf_model.get_parameter(name.replace("down_projs", "down_proj")).grad.transpose(1, 2)
    return hf_model.get_parameter(name).grad


# ---- Qwen3-VL-MoE ---------------------------------------------------------------------------------------------------
# 2I != H and I != H everywhere: the published and transformers' expert layouts have different shapes
VL_MOE_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=16,
                     temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64,
                     deepstack_visual_indexes=[0, 2])
VL_MOE_BASE_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1],
                        max_position_embeddings=1024, router_aux_loss_coef=0.001, rms_norm_eps=1e-6,
                        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2],
                                             mrope_interleaved=True))
# deepstack indexes, sparse step / mlp_only_layers, GQA ratios, experts / top-k, mRoPE sections vary
VL_MOE_VARIANTS = {
    "base": ({}, {}),
    "alt": (dict(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=1, head_dim=8, num_experts=16,
                 num_experts_per_tok=4, moe_intermediate_size=20, decoder_sparse_step=2, mlp_only_layers=[],
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 1],
                                      mrope_interleaved=True)),
            dict(deepstack_visual_indexes=[1])),
    "wide": (dict(num_hidden_layers=3, hidden_size=96, intermediate_size=80, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=32, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=40,
                  mlp_only_layers=[], rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                           mrope_section=[6, 5, 5], mrope_interleaved=True)),
             dict(deepstack_visual_indexes=[0, 1, 2])),
}


def make_vl_moe_config(variant: str = "base", **overrides) -> Qwen3VLMoeConfig:
    text_over, vision_over = VL_MOE_VARIANTS[variant]
    text = copy.deepcopy(VL_MOE_BASE_TEXT)
    text.update(copy.deepcopy(text_over))
    text.update(overrides)
    vision = dict(VL_MOE_VISION, out_hidden_size=text["hidden_size"], **vision_over)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **IDS)


def make_hf_vl_moe_model(config: Qwen3VLMoeConfig, seed: int = 0):
    """transformers' Qwen3VLMoeForConditionalGeneration in fp32 with the eager (per-expert loop) experts, norms
    perturbed away from their initial 1."""
    from transformers import Qwen3VLMoeForConditionalGeneration as HF

    return _reference_model(HF, config, seed)


# documents of the packed-row tests (`vision_doc` pieces): lengths not multiples of 64
PACKED_DOCS = {
    # text-only and image documents, one spanning three delta-rule chunks, a video last
    "long_text": [
        [5, ("image", (1, 4, 6)), 60],
        [131],
        [3, ("image", (1, 4, 4)), 11, ("image", (1, 6, 8)), 14],
        [45],
        [2, ("video", (2, 4, 4)), 9],
    ],
    # text, image and video documents; an image right at a document boundary
    "image_at_boundary": [
        [5, ("image", (1, 4, 6)), 60],
        [71],
        [2, ("video", (2, 4, 4)), 9],
        [("image", (1, 6, 8)), 3, ("image", (1, 2, 2)), 14],
        [45],
    ],
}


def pack(docs: list[dict]) -> dict:
    """Documents (`vision_doc` or `text_doc` outputs) -> one packed row with cu_seqlens, token types (when the
    documents have them), pixels and grids concatenated in order."""
    row = {"input_ids": torch.cat([d["input_ids"] for d in docs], 1)}
    if all("mm_token_type_ids" in d for d in docs):
        row["mm_token_type_ids"] = torch.cat([d["mm_token_type_ids"] for d in docs], 1)
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        with_it = [d for d in docs if pix in d]
        if with_it:
            row[pix] = torch.cat([d[pix] for d in with_it])
            row[grid] = torch.cat([d[grid] for d in with_it])
    lengths = torch.tensor([d["input_ids"].shape[1] for d in docs])
    row["cu_seqlens"] = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return row


def assert_gradients_match(hf_model, native, tol: float) -> int:
    """Every native parameter's gradient equals transformers' (after both backwards); returns how many were compared.

    A tensor's scale is its largest |g|, floored at 1e-3 of the largest gradient of the model: A_log / dt_bias
    gradients nearly cancel to ~1e-6, where only fp32 rounding noise of ~1e-10 is left; a scaling bug on them would
    still move them by their own size, far above `tol` of the floor. A parameter transformers gives no gradient
    (e.g. a deepstack merger past the decoder's depth) must get none (or zeros) here."""
    refs = {name: hf_grad_of(hf_model, name) for name, _ in native.named_parameters()}
    largest = max(g.abs().max() for g in refs.values() if g is not None)
    checked = 0
    for name, p in native.named_parameters():
        g_ref = refs[name]
        if g_ref is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None, f"{name}: no gradient"
        scale = torch.maximum(g_ref.abs().max(), 1e-3 * largest)
        assert ((p.grad - g_ref).abs().max() / scale) <= tol, f"{name}: gradient differs"
        checked += 1
    return checked


# ---- Qwen3-MoE (text-only) ------------------------------------------------------------------------------------------
# head_dim given (and != hidden / heads) or omitted (transformers then takes hidden / heads); dense MLP layers by
# mlp_only_layers and by decoder_sparse_step; norm_topk_prob on and off; tied embeddings in one config. 2I != H
# everywhere, so a transposed expert tensor cannot pass for the right one.
QWEN3_MOE_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
                      max_position_embeddings=1024, router_aux_loss_coef=0.001, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e6))
QWEN3_MOE_VARIANTS = {
    "base": {},
    # MoE on layers 1 and 3 only; head_dim omitted (64 / 8 = 8); one kv head for 8 query heads; weights are the
    # softmax probabilities of the top 4 (not renormalised)
    "alt": dict(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=1, head_dim=None, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=20, decoder_sparse_step=2, mlp_only_layers=[],
                norm_topk_prob=False, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
    # the first layer dense; top-1 (renormalised: weight 1); lm_head tied to the embedding
    "wide": dict(num_hidden_layers=3, hidden_size=96, intermediate_size=80, num_attention_heads=6,
                 num_key_value_heads=3, head_dim=32, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=40,
                 mlp_only_layers=[0], tie_word_embeddings=True,
                 rope_parameters=dict(rope_type="default", rope_theta=1e4)),
}


def make_qwen3_moe_config(variant: str = "base", **overrides) -> Qwen3MoeConfig:
    spec = copy.deepcopy(QWEN3_MOE_BASE)
    spec.update(copy.deepcopy(QWEN3_MOE_VARIANTS[variant]))
    spec.update(overrides)
    if spec["head_dim"] is None:  # omitted, not None: transformers' getattr(config, "head_dim", hidden // heads)
        del spec["head_dim"]
    return Qwen3MoeConfig(**spec)


def make_hf_qwen3_moe_model(config: Qwen3MoeConfig, seed: int = 0):
    """transformers' Qwen3MoeForCausalLM in fp32 with eager attention and the eager (per-expert loop) experts, norms
    perturbed away from their initial 1."""
    from transformers import Qwen3MoeForCausalLM as HF

    model = _reference_model(HF, config, seed)
    model.config._attn_implementation = "eager"  # read at every forward: the plain softmax(QK^T)V reference
    return model


# ---- Qwen3-Next (text-only) -----------------------------------------------------------------------------------------
# value heads per key head r = 2 / 3 / 1 (the grouped in_proj_qkvz / in_proj_ba layouts differ with r); dense MLP
# layers by mlp_only_layers and by decoder_sparse_step; norm_topk_prob on and off; partial and full plain rotary;
# tied embeddings in one config; conv kernels 4 and 3.
QWEN3_NEXT_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       layer_types=["linear_attention"] * 3 + ["full_attention"],
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=24, shared_expert_intermediate_size=32, decoder_sparse_step=1,
                       mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=1024,
                       router_aux_loss_coef=0.001, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25))
QWEN3_NEXT_VARIANTS = {
    "base": {},
    # MoE on layers 1 and 3 only (decoder_sparse_step 2): a dense linear-attention layer and a dense attention one
    "alt": dict(num_hidden_layers=5, layer_types=["full_attention", "linear_attention", "linear_attention",
                                                   "full_attention", "linear_attention"],
                num_attention_heads=8, num_key_value_heads=1, head_dim=8, linear_num_key_heads=2,
                linear_num_value_heads=6, linear_key_head_dim=8, linear_value_head_dim=12, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=20, shared_expert_intermediate_size=48,
                decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5)),
    "wide": dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"],
                 hidden_size=96, intermediate_size=80, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                 linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=32, linear_value_head_dim=16,
                 linear_conv_kernel_dim=3, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=40,
                 mlp_only_layers=[0], tie_word_embeddings=True,
                 rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=1.0)),
}


def make_qwen3_next_config(variant: str = "base", **overrides) -> Qwen3NextConfig:
    spec = copy.deepcopy(QWEN3_NEXT_BASE)
    spec.update(copy.deepcopy(QWEN3_NEXT_VARIANTS[variant]))
    spec.update(overrides)
    return Qwen3NextConfig(**spec)


def make_hf_qwen3_next_model(config: Qwen3NextConfig, seed: int = 0):
    """transformers' Qwen3NextForCausalLM in fp32 with eager attention, its torch fallbacks of the conv and delta
    rule and the eager (per-expert loop) experts, norms perturbed away from their initial 0 / 1."""
    from transformers import Qwen3NextForCausalLM as HF

    model = _reference_model(HF, config, seed)
    model.config._attn_implementation = "eager"
    return model


def text_doc(length: int, seed: int = 0) -> dict:
    """A text document as a text-only model (and transformers' causal-LM class) takes it: input_ids (1, length)."""
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(0, 400, (length,), generator=g)[None])


# documents of the packed-row tests of text-only families: lengths not multiples of 64, one longer than 128
TEXT_PACKED_DOCS = {
    "text_docs": [65, 131, 11, 45, 1, 29],
}


def per_expert_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused in-memory experts (`experts.gate_up_proj` (E, 2I, H), gate rows first, `experts.down_proj`
    (E, H, I)) -> one nn.Linear weight per expert and projection (`experts.{e}.{gate,up,down}_proj.weight`): what
    transformers' save_pretrained writes and the published Qwen3-MoE checkpoints hold. Views, no copies (works on
    meta tensors)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out
