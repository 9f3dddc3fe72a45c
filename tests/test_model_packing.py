"""Packed rows (cu_seqlens): every document gets exactly the logits it gets alone; nothing leaks across boundaries.

The first section runs on every registered family (families.py; ids name the family and the tiny config): each
document of a packed row of text, image and video documents (text documents only for a text-only family) == itself
alone == transformers alone, the loss and expert counts are per-document sums, and, for families with vision, the
path FSDP2 uses (one vision tower call) changes nothing. A text-only family also gets the negative control of its
attention: the same row without cu_seqlens is one long document, and the documents after the first change. The rest
runs on Qwen3.5-MoE, whose Gated DeltaNet carries a state that must not pass a boundary; Qwen3-VL-MoE's deepstack
features following their document in a reordered row are tested in test_model_qwen3_vl_moe.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import each_family, each_family_case, reference_pair
from tiny_configs import PACKED_DOCS, TEXT_PACKED_DOCS, make_config, make_hf_model, pack, text_doc, vision_doc

from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
from qmoe_lightning.models.mrope_positions import mrope_position_ids_packed
from qmoe_lightning.models.parallel_context import ParallelContext

TOL = 1e-4
DOC_SEEDS = {"long_text": 20, "image_at_boundary": 40, "text_docs": 60}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(family, variant) -> (transformers model, native model loaded from its save_pretrained directory), each built on
    first use."""
    built = {}

    def get(family, variant):
        if (family.model_type, variant) not in built:
            built[family.model_type, variant] = reference_pair(family, variant,
                                                               tmp_path_factory.mktemp(f"{family}_{variant}"))
        return built[family.model_type, variant]

    return get


def _docs(name: str) -> list[dict]:
    if name in TEXT_PACKED_DOCS:  # input_ids only: what a text-only model and transformers' causal LM take
        return [text_doc(n, seed=DOC_SEEDS[name] + i) for i, n in enumerate(TEXT_PACKED_DOCS[name])]
    return [vision_doc(p, seed=DOC_SEEDS[name] + i) for i, p in enumerate(PACKED_DOCS[name])]


def _packed_docs(family) -> list[str]:
    return list(PACKED_DOCS) if family.has_vision else list(TEXT_PACKED_DOCS)


# ---- every family ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant,docs_name", each_family_case(_packed_docs, lambda f: ("base", "wide")))
def test_each_document_gets_its_alone_logits(pairs, family, variant, docs_name):
    hf, nat = pairs(family, variant)
    docs = _docs(docs_name)
    row = pack(docs)
    assert all(int(n) % 64 for n in row["cu_seqlens"][1:] - row["cu_seqlens"][:-1])
    with torch.no_grad():
        packed = nat(**row, labels=row["input_ids"].clone())
        cu = row["cu_seqlens"].tolist()
        ce_sum, n_sum = 0.0, 0
        for i, doc in enumerate(docs):
            piece = packed.logits[:, cu[i]: cu[i + 1]]
            alone = nat(**doc, labels=doc["input_ids"])
            assert (piece - alone.logits).abs().max() <= TOL, f"document {i} differs from its solo forward"
            assert (piece - hf(**doc).logits).abs().max() <= TOL, f"document {i} differs from transformers alone"
            ce_sum += alone.ce_loss * alone.num_label_tokens
            n_sum += int(alone.num_label_tokens)
    # the last token of a document never predicts the first token of the next
    assert int(packed.num_label_tokens) == n_sum
    assert torch.allclose(packed.ce_loss * packed.num_label_tokens, ce_sum, rtol=1e-5)


@pytest.mark.parametrize("family", each_family())
def test_packed_loss_and_expert_counts_are_per_document_sums(pairs, family):
    _, nat = pairs(family, "base")
    docs = _docs(_packed_docs(family)[0])
    row = pack(docs)
    labels = row["input_ids"].clone()
    if "mm_token_type_ids" in row:
        labels[row["mm_token_type_ids"] != 0] = -100
    else:  # a text row: leave some targets out (their logits still run through the experts)
        labels[0, ::7] = -100
    with torch.no_grad():
        packed = nat(**row, labels=labels)
        cu = row["cu_seqlens"].tolist()
        ce_sum, n_sum, counts = 0.0, 0, 0
        for i, doc in enumerate(docs):
            alone = nat(**doc, labels=labels[:, cu[i] : cu[i + 1]])
            ce_sum += alone.ce_loss * alone.num_label_tokens
            n_sum += int(alone.num_label_tokens)
            counts = counts + alone.expert_token_counts
    assert int(packed.num_label_tokens) == n_sum
    assert torch.allclose(packed.ce_loss, ce_sum / n_sum, atol=1e-5)
    assert torch.equal(packed.expert_token_counts, counts)


@pytest.mark.parametrize("family", each_family(lambda f: f.has_vision))
def test_always_run_vision_changes_nothing(pairs, family, monkeypatch):
    """`always_run_vision` (set under FSDP so every rank runs the same modules): images + video in one tower call,
    a zero placeholder when there is no image; logits equal the default path, and the tower gets (zero) gradients
    from a text-only batch."""
    torch.manual_seed(0)
    model = family.native.from_config(family.make_config())
    both = copy.deepcopy(model)
    both.parallel = ParallelContext(always_run_vision=True)
    cfg = model.config
    merge, row = cfg.vision_config.spatial_merge_size, 3 * 2 * 16 * 16
    img_grid, vid_grid = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 2, 4]])
    n_img, n_vid = 16 // merge ** 2, 16 // merge ** 2
    ids = torch.randint(10, 400, (1, 40))
    ids[0, 3:3 + n_img] = cfg.image_token_id
    ids[0, 20:20 + n_vid] = cfg.video_token_id
    kw = dict(input_ids=ids, pixel_values=torch.randn(16, row), image_grid_thw=img_grid,
              pixel_values_videos=torch.randn(16, row), video_grid_thw=vid_grid)
    torch.testing.assert_close(both(**kw).logits, model(**kw).logits, rtol=0, atol=1e-5)
    text = torch.randint(10, 400, (1, 24))
    out_a, out_b = model(input_ids=text, labels=text), both(input_ids=text, labels=text)
    assert torch.equal(out_a.logits, out_b.logits)
    out_b.loss.backward()
    grads = [p.grad for p in both.model.visual.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    # and on the loaded model, documents with mm_token_type_ids: text, a video before an image, two images
    _, nat = pairs(family, "base")
    for case in ([37], [2, ("video", (2, 2, 2)), 3, ("image", (1, 2, 4)), 3],
                 [3, ("image", (1, 4, 4)), 4, ("image", (1, 6, 8)), 6]):
        batch = vision_doc(case, seed=5)
        with torch.no_grad():
            two = nat(**batch).logits
            monkeypatch.setattr(nat, "parallel", ParallelContext(always_run_vision=True))
            one = nat(**batch).logits
            monkeypatch.setattr(nat, "parallel", None)
        assert (one - two).abs().max() <= 1e-6, case


@pytest.mark.parametrize("family", each_family(lambda f: not f.has_vision))
def test_without_cu_seqlens_the_documents_would_see_each_other(pairs, family):
    """Negative control of the packed tests of a text-only (attention-only) family: the same row without cu_seqlens is
    one long document; the first document is unchanged (causal), every later one differs from itself alone."""
    _, nat = pairs(family, "base")
    docs = _docs("text_docs")
    row = pack(docs)
    cu = row.pop("cu_seqlens").tolist()
    with torch.no_grad():
        packed = nat(**row, cu_seqlens=torch.tensor(cu, dtype=torch.int32)).logits
        leaky = nat(**row).logits
    assert (packed[:, : cu[1]] - leaky[:, : cu[1]]).abs().max() <= TOL
    for i in range(1, len(docs)):
        assert (packed[:, cu[i]: cu[i + 1]] - leaky[:, cu[i]: cu[i + 1]]).abs().max() > 1e-2, f"document {i}"


# ---- Qwen3.5-MoE: the Gated DeltaNet state ends at a boundary ------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_hf_model(make_config("base"), seed=11)
    path = tmp_path_factory.mktemp("packed")
    hf.save_pretrained(path)
    return hf, Qwen3_5MoeForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def docs():
    return _docs("long_text")


def test_resetting_positions_alone_would_leak(models, docs):
    """Negative control: the same row without cu_seqlens (positions restart, state does not) changes doc 2."""
    _, nat = models
    row = pack(docs[1:3])
    cu = row.pop("cu_seqlens")
    with torch.no_grad():
        good = nat(**row, cu_seqlens=cu)
        # the positions restart at the second document (what cu_seqlens would give), the state is not reset
        pos = mrope_position_ids_packed(row["mm_token_type_ids"][0], cu, row.get("image_grid_thw"), None, 2)
        leaky = nat(**row, position_ids=pos)
    s = int(cu[1])
    assert (good.logits[:, :s] - leaky.logits[:, :s]).abs().max() <= TOL  # first document is unaffected
    assert (good.logits[:, s:] - leaky.logits[:, s:]).abs().max() > 1e-2  # the second one would see the first


def test_packed_gradients_equal_sum_of_document_gradients(models, docs):
    """In float64: fp32 delta-rule gradients of dt_bias / A_log are small sums of large cancelling terms, so
    summation order alone moves them by ~1e-4 relative; fp64 removes that noise (norms and rotary still run in fp32: ~1e-7) and leaves only real leaks (>= 1e-2)."""
    import copy

    _, nat = models
    nat = copy.deepcopy(nat).double().train()
    text_docs = [docs[1], docs[3]]
    row = pack(text_docs)
    labels = row["input_ids"].clone()
    nat.zero_grad()
    nat(**row, labels=labels, num_items_in_batch=1).ce_loss.backward()
    packed = {n: p.grad.clone() for n, p in nat.named_parameters() if p.grad is not None}
    nat.zero_grad()
    for doc in text_docs:
        nat(**doc, labels=doc["input_ids"].clone(), num_items_in_batch=1).ce_loss.backward()
    for n, p in nat.named_parameters():
        if n in packed:
            scale = p.grad.abs().max().clamp_min(1e-6)
            assert (packed[n] - p.grad).abs().max() / scale <= 1e-6, n


def test_tail_padding_is_left_out_of_aux_loss_and_expert_counts(models, docs):
    """The data module pads a packed row at the tail as its own document and marks it with attention_mask=0."""
    _, nat = models
    row = pack(docs[1:2])
    n = row["input_ids"].shape[1]
    padded = dict(row, input_ids=torch.cat([row["input_ids"], torch.zeros(1, 13, dtype=torch.long)], 1),
                  mm_token_type_ids=torch.cat([row["mm_token_type_ids"], torch.zeros(1, 13, dtype=torch.long)], 1),
                  cu_seqlens=torch.tensor([0, n, n + 13], dtype=torch.int32))
    mask = torch.ones(1, n + 13, dtype=torch.long)
    mask[0, n:] = 0
    with torch.no_grad():
        plain = nat(**row)
        masked = nat(**padded, attention_mask=mask)
    assert torch.equal(masked.expert_token_counts, plain.expert_token_counts)
    assert torch.allclose(masked.aux_loss, plain.aux_loss, atol=1e-6)
    assert (masked.logits[:, :n] - plain.logits).abs().max() <= TOL


def test_restarting_position_ids_without_cu_seqlens_pack_like_transformers(models):
    """transformers' convention: text positions that restart mark packed documents (its attention gets a block-diagonal
    mask; its torch Gated DeltaNet would still carry state across them, so the reference is each document alone)."""
    hf, nat = models
    torch.manual_seed(3)
    lengths = [13, 30, 7]
    ids = torch.randint(0, 400, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 13, 43, 50], dtype=torch.int32)
    with torch.no_grad():
        by_positions = nat(input_ids=ids, position_ids=pos).logits
        by_cu = nat(input_ids=ids, cu_seqlens=cu).logits
        bounds = cu.tolist()
        for a, b in zip(bounds, bounds[1:]):
            assert (by_positions[:, a:b] - hf(input_ids=ids[:, a:b]).logits).abs().max() <= TOL
    assert (by_positions - by_cu).abs().max() == 0
    with pytest.raises(ValueError, match="position_ids restart inside rows of a batch of several rows"):
        nat(input_ids=ids.expand(2, -1), position_ids=pos.expand(2, -1))
