"""Native model == transformers (fp32, torch fallbacks, eager experts) on the tiny configs of every registered family
(families.py; ids name the family and the tiny config: `[qwen3_vl_moe-alt-video]`).

Covers: three tiny configs per family (layer patterns, head counts, GQA ratios, partial rotary, experts / top-k,
dense layers, deepstack indexes, mRoPE sections, norm_topk_prob, tied embeddings), text, a padded batch of rows, and
for families with vision one image, two images of different sizes, a video, an image beside a video in both orders;
loss, aux loss, expert counts, positions and every parameter's gradient; the loss options (label_logits_only,
num_items_in_batch, fused loss) and the errors of bad inputs (a text-only family refuses images); the text-only model
of a vision-language family that has one. A text-only family (Qwen3-MoE) runs every text case on its causal-LM class
against transformers' (`TinyFamily.has_vision` selects the cases). Packed rows are tested in test_model_packing.py;
what only one family has in test_model_qwen3_vl_moe.py (deepstack, dense layers), test_model_qwen3_moe.py (dense
layers, norm_topk_prob), test_model_packing.py (Qwen3.5's Gated DeltaNet state) and test_model_mtp.py (Qwen3.5's MTP).
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, each_family, each_family_case, reference_pair
from tiny_configs import assert_gradients_match, text_doc, vision_doc

from qmoe_lightning.models.registry import family_of, supported_model_types

TOL = 1e-4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(family, variant) -> (transformers model, native model loaded from its save_pretrained directory, directory),
    each built on first use (a run of one family's tests builds no other family's models)."""
    built = {}

    def get(family, variant):
        if (family.model_type, variant) not in built:
            path = tmp_path_factory.mktemp(f"{family}_{variant}")
            built[family.model_type, variant] = (*reference_pair(family, variant, path), path)
        return built[family.model_type, variant]

    return get


def test_every_registered_family_has_a_tiny_family():
    """A family added to the registry gets every shared test only through an entry in families.py."""
    assert {family_of(t).model_type for t in supported_model_types()} == set(FAMILIES)


def _text_batch():
    """Two rows of text, the first one's targets starting at position 9."""
    torch.manual_seed(1)
    ids = torch.randint(0, 400, (2, 53))
    labels = ids.clone()
    labels[0, :9] = -100
    return dict(input_ids=ids), labels


CASES = {
    "text": [37],
    "one_image": [5, ("image", (1, 4, 6)), 9],
    "two_images": [3, ("image", (1, 4, 4)), 4, ("image", (1, 6, 8)), 6],
    "video": [4, ("video", (2, 4, 4)), 5],
    "image_and_video": [2, ("image", (1, 2, 4)), 3, ("video", (2, 2, 2)), 3],
    "video_then_image": [2, ("video", (2, 2, 2)), 3, ("image", (1, 2, 4)), 3],
}
TEXT_CASES = ["text_batch", "text"]


def _cases(family) -> list[str]:
    return ["text_batch", *CASES] if family.has_vision else TEXT_CASES


def _doc(family, case: str, seed: int) -> dict:
    """The document of a `CASES` entry; a text-only family gets its text as input_ids alone (transformers' causal-LM
    class takes no token types)."""
    if family.has_vision:
        return vision_doc(CASES[case], seed=seed)
    (length,) = CASES[case]
    return text_doc(length, seed=seed)


@pytest.mark.parametrize("family,variant,case", each_family_case(_cases))
def test_logits_loss_aux_and_positions_match(pairs, family, variant, case):
    hf, nat, _ = pairs(family, variant)
    if case == "text_batch":
        batch, labels = _text_batch()
    else:
        batch = _doc(family, case, seed=3)
        labels = batch["input_ids"].clone()
        labels[0, :3] = -100
    with torch.no_grad():
        ref = hf(**batch, labels=labels, output_router_logits=True)
        out = nat(**batch, labels=labels, output_router_logits=True)
    assert (ref.logits - out.logits).abs().max() <= TOL
    assert torch.allclose(ref.loss, out.loss, atol=1e-5, rtol=0)
    assert torch.allclose(ref.aux_loss, out.aux_loss, atol=1e-5, rtol=0)
    cfg = nat.text_config
    # one row per MoE layer (dense layers have none); every token picks top_k experts in each
    assert out.expert_token_counts.shape == (len(nat.text_model.moe_layers), cfg.num_experts)
    assert (out.expert_token_counts.sum(1) == batch["input_ids"].numel() * cfg.num_experts_per_tok).all()
    if "mm_token_type_ids" in batch and (batch["mm_token_type_ids"] != 0).any():
        # positions computed by the native model equal transformers' get_rope_index
        video = batch.get("video_grid_thw")
        ref_pos, _ = hf.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             batch.get("image_grid_thw"), None if video is None else video.clone())
        with torch.no_grad():
            assert torch.equal(nat(**batch, position_ids=ref_pos).logits, out.logits)


@pytest.mark.parametrize("family", each_family())
def test_padded_batch_matches(pairs, family):
    hf, nat, _ = pairs(family, "base")
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
    # padding is excluded from the expert counts: every real token picks top_k experts in every MoE layer
    cfg = nat.text_config
    assert out.expert_token_counts.shape == (len(nat.text_model.moe_layers), cfg.num_experts)
    assert (out.expert_token_counts.sum(1) == int(real.sum()) * cfg.num_experts_per_tok).all()


GRADIENT_DOCS = {
    "two_images": [6, ("image", (1, 4, 6)), 20, ("image", (1, 2, 2)), 11],
    "image_and_video": [6, ("image", (1, 4, 6)), 20, ("video", (2, 2, 4)), 11],
}
# a text-only family: one document, and the two-row batch (targets of the first row starting late)
TEXT_GRADIENT_DOCS = ["text", "text_batch"]


@pytest.mark.parametrize("family,variant,doc", each_family_case(
    lambda f: list(GRADIENT_DOCS) if f.has_vision else TEXT_GRADIENT_DOCS, lambda f: f.gradient_variants))
def test_every_parameter_gradient_matches(pairs, family, variant, doc):
    hf, nat, _ = pairs(family, variant)
    hf, nat = copy.deepcopy(hf).train(), copy.deepcopy(nat).train()
    if doc == "text_batch":
        batch, labels = _text_batch()
    else:
        batch = vision_doc(GRADIENT_DOCS[doc], seed=4) if family.has_vision else text_doc(57, seed=4)
        labels = batch["input_ids"].clone()
        labels[0, :4] = -100
    ref = hf(**batch, labels=labels, output_router_logits=True)
    out = nat(**batch, labels=labels, output_router_logits=True)
    ref.loss.backward()
    out.loss.backward()
    assert assert_gradients_match(hf, nat, TOL) == len(list(nat.parameters()))


@pytest.mark.parametrize("family", each_family(lambda f: f.has_vision and f.native_text is not None))
def test_text_only_model_matches_vl_text_path_and_loads_vl_checkpoint(pairs, family):
    hf, nat, path = pairs(family, "alt")
    text = family.native_text.from_pretrained(path).eval()
    assert text.checkpoint_source.report.skipped.get("vision", 0) > 0  # vision tower counted, not silently dropped
    assert not any(n.startswith("model.visual") for n, _ in text.named_parameters())
    ids = torch.randint(0, 400, (2, 30))
    with torch.no_grad():
        ref = hf(input_ids=ids)
        out = text(input_ids=ids)
    assert (ref.logits - out.logits).abs().max() <= TOL


@pytest.mark.parametrize("family", each_family())
def test_label_logits_only_and_num_items_in_batch(pairs, family):
    _, nat, _ = pairs(family, "base")
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


@pytest.mark.parametrize("family", each_family())
def test_no_target_gives_zero_loss_not_nan(pairs, family):
    _, nat, _ = pairs(family, "base")
    ids = torch.randint(0, 400, (1, 12))
    for kw in ({}, {"label_logits_only": True}, {"return_logits": False}):
        out = nat(input_ids=ids, labels=torch.full_like(ids, -100), **kw)
        assert out.ce_loss.item() == 0.0 and int(out.num_label_tokens) == 0


@pytest.mark.parametrize("family", each_family())
def test_fused_lm_loss_matches_logits_path_with_gradients(pairs, family):
    _, nat, _ = pairs(family, "base")
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


@pytest.mark.parametrize("family", each_family())
def test_bad_forward_inputs_raise_clear_errors(pairs, family):
    _, nat, _ = pairs(family, "base")
    batch = vision_doc([3, ("image", (1, 4, 4)), 3])
    if family.has_vision:
        bad = dict(batch, image_grid_thw=torch.tensor([[1, 4, 8]]), pixel_values=torch.randn(32, 1536))
        with pytest.raises(ValueError, match="placeholder tokens"):
            nat(**bad)
    else:
        # a text-only model refuses images rather than training on their placeholder tokens as text
        with pytest.raises(ValueError, match="is text-only, but the batch holds images or videos"):
            nat(**batch)
        with pytest.raises(ValueError, match="is text-only"):  # image token types without pixels too
            nat(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"])
        # while all-zero token types (what the data module gives a text row) are accepted and change nothing
        text = vision_doc([23], seed=6)
        with torch.no_grad():
            assert torch.equal(nat(**text).logits, nat(input_ids=text["input_ids"]).logits)
    with pytest.raises(ValueError, match="cu_seqlens"):
        nat(input_ids=torch.zeros(1, 10, dtype=torch.long), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected forward argument"):
        nat(input_ids=torch.zeros(1, 4, dtype=torch.long), attn_mask=None)
