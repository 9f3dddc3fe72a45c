"""What only Qwen3-VL-MoE has, native == transformers' Qwen3VLMoeForConditionalGeneration (fp32, eager experts) on
its three tiny configs: dense MLP layers (sparse step / mlp_only_layers) and the deepstack visual features (a negative
control without them, the mergers' gradients, the features following their document when the documents of a packed
row change places). The properties every family shares (logits, loss, aux loss, positions, gradients of every
parameter, packed rows, ...) are tested in test_model_parity.py and test_model_packing.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, reference_pair
from tiny_configs import PACKED_DOCS, VL_MOE_VARIANTS, pack, vision_doc

TOL = 1e-4
FAMILY = FAMILIES["qwen3_vl_moe"]

TWO_IMAGES = [3, ("image", (1, 4, 4)), 4, ("image", (1, 6, 8)), 6]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """variant -> (transformers model, native model loaded from transformers' save_pretrained directory)."""
    return {v: reference_pair(FAMILY, v, tmp_path_factory.mktemp(f"vl_{v}")) for v in VL_MOE_VARIANTS}


def test_tiny_configs_cover_dense_layers_and_deepstack(pairs):
    kinds = {v: [layer.is_moe for layer in nat.text_model.layers] for v, (_, nat) in pairs.items()}
    assert kinds["base"] == [True, False, True, True]  # mlp_only_layers=[1]
    assert kinds["alt"] == [False, True, False, True, False]  # decoder_sparse_step=2
    assert all(kinds["wide"])
    assert pairs["alt"][1].text_model.moe_layers == [1, 3]
    assert [len(nat.model.visual.deepstack_merger_list) for _, nat in pairs.values()] == [2, 1, 3]


def test_without_deepstack_the_logits_differ(pairs, monkeypatch):
    """Negative control: the visual features injected after the first decoder layers are what makes the match."""
    hf, nat = pairs["base"]
    batch = vision_doc(TWO_IMAGES, seed=3)
    with torch.no_grad():
        ref = hf(**batch).logits
        real = nat._vision_embeds
        monkeypatch.setattr(nat, "_vision_embeds", lambda p, g: (real(p, g)[0], []))
        assert (nat(**batch).logits - ref).abs().max() > 100 * TOL


@pytest.mark.parametrize("variant", ["base", "alt"])
def test_deepstack_mergers_get_gradients(pairs, variant):
    """test_model_parity's gradient check compares every gradient with transformers', and a merger past the decoder's
    depth gets none in both; here a merger the decoder does use must get a nonzero one (on the same document)."""
    _, nat = pairs[variant]
    nat = copy.deepcopy(nat).train()
    batch = vision_doc([6, ("image", (1, 4, 6)), 20, ("video", (2, 2, 4)), 11], seed=4)
    labels = batch["input_ids"].clone()
    labels[0, :4] = -100
    nat(**batch, labels=labels, output_router_logits=True).loss.backward()
    assert any("deepstack_merger_list" in n and p.grad.abs().max() > 0 for n, p in nat.named_parameters())


def test_packed_row_with_documents_reordered_still_matches(pairs):
    """The deepstack features follow their own document when the image / video documents change places."""
    _, nat = pairs["alt"]
    docs = [vision_doc(p, seed=60 + i) for i, p in enumerate(PACKED_DOCS["image_at_boundary"])]
    order = [3, 2, 0, 4, 1]
    row = pack([docs[i] for i in order])
    with torch.no_grad():
        packed = nat(**row).logits
        cu = row["cu_seqlens"].tolist()
        for j, i in enumerate(order):
            assert (packed[:, cu[j]: cu[j + 1]] - nat(**docs[i]).logits).abs().max() <= TOL
