"""Native model == transformers (fp32, torch fallbacks, eager experts) on tiny configs.

Covers: three text configs (layer patterns, head counts, GQA ratios, partial rotary, experts/top-k), padded
batches, one image, two images of different sizes, a video; loss, aux loss and every parameter's gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_configs import TEXT_VARIANTS, assert_gradients_match, make_config, make_hf_model, vision_doc

from qmoe_lightning.models import Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration

TOL = 1e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """variant -> (transformers model, native model loaded from its save_pretrained directory)."""
    out = {}
    for variant in TEXT_VARIANTS:
        hf = make_hf_model(make_config(variant), seed=len(out))
        path = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(path)
        out[variant] = (hf, Qwen3_5MoeForConditionalGeneration.from_pretrained(path).eval(), path)
    return out


@pytest.mark.parametrize("variant", list(TEXT_VARIANTS))
def test_text_logits_loss_aux_match(pairs, variant):
    hf, nat, _ = pairs[variant]
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (2, 53))
    labels = ids.clone()
    labels[0, :9] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=labels, output_router_logits=True)
        out = nat(input_ids=ids, labels=labels, output_router_logits=True)
    assert (ref.logits - out.logits).abs().max() <= TOL
    assert torch.allclose(ref.aux_loss, out.aux_loss, atol=1e-5, rtol=0)
    assert torch.allclose(ref.loss, out.loss, atol=1e-5, rtol=0)


def test_padded_batch_matches(pairs):
    hf, nat, _ = pairs["base"]
    torch.manual_seed(2)
    ids = torch.randint(0, 400, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 31:] = 0
    mask[2, 17:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
        out = nat(input_ids=ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    assert (ref.logits[real] - out.logits[real]).abs().max() <= TOL
    assert torch.allclose(ref.aux_loss, out.aux_loss, atol=1e-5, rtol=0)
    # padding is excluded from the expert counts: every real token picks top_k experts in every layer
    cfg = nat.text_config
    assert out.expert_token_counts.shape == (cfg.num_hidden_layers, cfg.num_experts)
    assert (out.expert_token_counts.sum(1) == int(real.sum()) * cfg.num_experts_per_tok).all()


MULTIMODAL_CASES = {
    "one_image": [5, ("image", (1, 4, 6)), 9],
    "two_images": [3, ("image", (1, 4, 4)), 4, ("image", (1, 6, 8)), 6],
    "video": [4, ("video", (2, 4, 4)), 5],
    "image_and_video": [2, ("image", (1, 2, 4)), 3, ("video", (2, 2, 2)), 3],
}


@pytest.mark.parametrize("case", list(MULTIMODAL_CASES))
@pytest.mark.parametrize("variant", ["base", "alt"])
def test_multimodal_logits_match(pairs, case, variant):
    hf, nat, _ = pairs[variant]
    batch = vision_doc(MULTIMODAL_CASES[case], seed=3)
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        ref = hf(**batch, labels=labels, output_router_logits=True)
        out = nat(**batch, labels=labels, output_router_logits=True)
        # positions computed by the native model equal transformers' get_rope_index
        ref_pos, _ = hf.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
            None if "video_grid_thw" not in batch else batch["video_grid_thw"].clone(),
        )
        out_pos = nat(**batch, position_ids=ref_pos)
    assert (ref.logits - out.logits).abs().max() <= TOL
    assert (out_pos.logits - out.logits).abs().max() == 0
    assert torch.allclose(ref.loss, out.loss, atol=1e-5, rtol=0)
    assert torch.allclose(ref.aux_loss, out.aux_loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["base", "wide"])
def test_every_parameter_gradient_matches(pairs, variant):
    hf, nat, _ = pairs[variant]
    hf, nat = copy.deepcopy(hf).train(), copy.deepcopy(nat).train()
    batch = vision_doc([6, ("image", (1, 4, 6)), 20, ("image", (1, 2, 2)), 11], seed=4)
    labels = batch["input_ids"].clone()
    labels[0, :4] = -100
    ref = hf(**batch, labels=labels, output_router_logits=True)
    out = nat(**batch, labels=labels, output_router_logits=True)
    ref.loss.backward()
    out.loss.backward()
    assert assert_gradients_match(hf, nat, TOL) == len(list(nat.parameters()))


def test_causal_lm_matches_vl_text_path_and_loads_vl_checkpoint(pairs):
    hf, nat, path = pairs["alt"]
    text = Qwen3_5MoeForCausalLM.from_pretrained(path).eval()
    assert text.checkpoint_source.report.skipped.get("vision", 0) > 0  # vision tower counted, not silently dropped
    assert not any(n.startswith("model.visual") for n, _ in text.named_parameters())
    ids = torch.randint(0, 400, (2, 30))
    with torch.no_grad():
        ref = hf(input_ids=ids)
        out = text(input_ids=ids)
    assert (ref.logits - out.logits).abs().max() <= TOL


def test_label_logits_only_and_num_items_in_batch(pairs):
    _, nat, _ = pairs["base"]
    ids = torch.randint(0, 400, (1, 70))
    labels = ids.clone()
    labels[0, :30] = -100
    with torch.no_grad():
        full = nat(input_ids=ids, labels=labels)
        sparse = nat(input_ids=ids, labels=labels, label_logits_only=True)
        summed = nat(input_ids=ids, labels=labels, num_items_in_batch=100)
    assert sparse.logits.shape == (40, nat.text_config.vocab_size)  # targets at positions 29..68
    assert int(full.num_label_tokens) == 40
    assert torch.allclose(full.loss, sparse.loss, atol=1e-6)
    assert (sparse.logits - full.logits[0, 29:69]).abs().max() <= 1e-6
    assert torch.allclose(summed.loss, full.loss * 40 / 100, atol=1e-6)


def test_no_target_gives_zero_loss_not_nan(pairs):
    _, nat = pairs["base"][:2]
    ids = torch.randint(0, 400, (1, 12))
    for kw in ({}, {"label_logits_only": True}, {"return_logits": False}):
        out = nat(input_ids=ids, labels=torch.full_like(ids, -100), **kw)
        assert out.ce_loss.item() == 0.0 and int(out.num_label_tokens) == 0


def test_fused_lm_loss_matches_logits_path_with_gradients(pairs):
    _, nat, _ = pairs["base"]
    nat = copy.deepcopy(nat).train()
    ids = torch.randint(0, 400, (1, 90))
    labels = ids.clone()
    labels[0, :25] = -100
    row = dict(input_ids=ids, labels=labels, cu_seqlens=torch.tensor([0, 40, 90], dtype=torch.int32))
    ref = nat(**row)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in nat.named_parameters() if p.grad is not None}
    nat.zero_grad()
    fused = nat(**row, return_logits=False)
    fused.loss.backward()
    assert fused.logits is None
    assert torch.allclose(fused.loss, ref.loss, atol=1e-6)
    for n, p in nat.named_parameters():
        if n in ref_grads:
            assert (p.grad - ref_grads[n]).abs().max() <= 1e-4 * ref_grads[n].abs().max().clamp_min(1e-6), n


def test_bad_forward_inputs_raise_clear_errors(pairs):
    _, nat, _ = pairs["base"]
    batch = vision_doc([3, ("image", (1, 4, 4)), 3])
    bad = dict(batch, image_grid_thw=torch.tensor([[1, 4, 8]]), pixel_values=torch.randn(32, 1536))
    with pytest.raises(ValueError, match="placeholder tokens"):
        nat(**bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        nat(input_ids=torch.zeros(1, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected forward argument"):
        nat(input_ids=torch.zeros(1, 4, dtype=torch.long), attn_mask=None)
