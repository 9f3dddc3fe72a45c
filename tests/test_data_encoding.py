"""Encoded samples and packed micro-batches against transformers' processor and get_rope_index, per document."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data_modules.encoding import IGNORE, Encoder, smart_resize
from data_modules.packing import PackDataset, build_micro_batch
from data_modules.processor import load_processor
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _rows(path, n):
    with open(path) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _reference(processor, encoder, row, base_dir):
    """input_ids, mm_token_type_ids, image_grid_thw and assistant labels of one document, by transformers alone."""
    messages, images, _videos = encoder.normalise_messages(row, base_dir)
    text = processor.apply_chat_template(messages, tokenize=False)
    pil = [Image.open(p).convert("RGB") for p in images]
    out = processor(text=[text], images=pil or None, return_tensors="pt")
    # Independent labelling: the template's {% generation %} mask, computed by transformers on the same
    # (expanded) token stream.
    masked = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    ids = out["input_ids"][0]
    assert masked["input_ids"][0] == ids.tolist()
    mask = masked["assistant_masks"][0]
    labels = torch.where(torch.tensor(mask, dtype=torch.bool), ids, torch.full_like(ids, IGNORE))
    return out, labels


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h, w in [(64, 64), (33, 97), (480, 640), (17, 300), (1000, 30)]:
        assert smart_resize(h, w, 32, 1024, 4096) == ref(h, w, 32, 1024, 4096)


def test_encoding_equals_processor(emb):
    processor = load_processor(str(emb.model_dir))
    encoder = Encoder(str(emb.model_dir), max_tokens=512)
    base = str(emb.train_path.parent)
    rows = _rows(emb.train_path, 12)
    assert any(any(isinstance(m["content"], list) for m in r["messages"]) for r in rows), "need image rows"
    for row in rows:
        rec = encoder.encode(row, base)
        ref, ref_labels = _reference(processor, encoder, row, base)
        assert rec["input_ids"] == ref["input_ids"][0].tolist()
        assert rec["labels"] == ref_labels.tolist()
        if "image_grid_thw" in ref:
            assert rec["image_grids"] == ref["image_grid_thw"].tolist()
        decoded = processor.tokenizer.decode([t for t in rec["labels"] if t != IGNORE])
        assert decoded == row["messages"][-1]["content"] + "<|im_end|>"


def test_labels_all_policy(emb):
    encoder = Encoder(str(emb.model_dir), max_tokens=512, labels="all")
    row = _rows(emb.train_path, 1)[0]
    rec = encoder.encode(row, str(emb.train_path.parent))
    ids, labels = rec["input_ids"], rec["labels"]
    assert all(lab == (IGNORE if t == encoder.image_token_id else t) for t, lab in zip(ids, labels))
    text = encoder.encode({"text": "Count to three."}, ".")
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == encoder.eos_id


def test_packed_batch_equals_per_document_reference(emb):
    from transformers import AutoConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeModel

    processor = load_processor(str(emb.model_dir))
    encoder = Encoder(str(emb.model_dir), max_tokens=512)
    base = str(emb.train_path.parent)
    rows = _rows(emb.train_path, 8)
    records = [dict(encoder.encode(r, base), source="x", line=i + 1) for i, r in enumerate(rows)]
    batch = PackDataset(records, None, encoder, pad_to_multiple_of=64)[tuple(range(len(records)))]

    config = AutoConfig.from_pretrained(emb.model_dir)
    with torch.device("meta"):  # get_rope_index needs the config only, not weights
        model = Qwen3_5MoeModel(config)
    cu = batch["cu_seqlens"].tolist()
    assert len(cu) == len(rows) + 2  # documents + the tail padding document
    img_at = 0
    for d, row in enumerate(rows):
        s, e = cu[d], cu[d + 1]
        ref, ref_labels = _reference(processor, encoder, row, base)
        assert batch["input_ids"][0, s:e].tolist() == ref["input_ids"][0].tolist()
        assert batch["mm_token_type_ids"][0, s:e].tolist() == ref["mm_token_type_ids"][0].tolist()
        expected_labels = ref_labels.clone()
        expected_labels[0] = IGNORE  # the packer masks every document's first label
        assert batch["labels"][0, s:e].tolist() == expected_labels.tolist()
        grid = ref.get("image_grid_thw")
        pos, _ = model.get_rope_index(ref["input_ids"], torch.as_tensor(ref["mm_token_type_ids"]), grid, None)
        assert torch.equal(batch["position_ids"][:, :, s:e], pos)
        if grid is not None:
            n = int(grid.prod(-1).sum())
            got = batch["pixel_values"][img_at : img_at + n]
            assert torch.allclose(got, ref["pixel_values"].to(got.dtype))
            img_at += n
    assert img_at == batch["pixel_values"].shape[0]


def test_build_micro_batch_invariants():
    docs = [{"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))} for n in (5, 9, 3)]
    b = build_micro_batch(docs, pad_token_id=0, image_token_id=500, video_token_id=501, pad_to_multiple_of=8,
                          spatial_merge_size=2)
    T = b["input_ids"].shape[1]
    assert T == 24 and T % 8 == 0
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 5, 14, 17, 24]
    assert b["max_seqlen"] == 9
    labels = b["labels"][0]
    assert labels[[0, 5, 14]].tolist() == [IGNORE] * 3  # first label of every document
    assert (labels[17:] == IGNORE).all() and (b["input_ids"][0, 17:] == 0).all()
    assert b["num_label_tokens"] == int((labels != IGNORE).sum()) == 17 - 3
    assert b["position_ids"].shape == (3, 1, 24)
    assert b["position_ids"][0, 0].tolist() == [*range(5), *range(9), *range(3), *range(7)]
    assert b["pixel_values"] is None and b["image_grid_thw"] is None and b["video_grid_thw"] is None
    exact = build_micro_batch(docs[:1], 0, 500, 501, pad_to_multiple_of=5, spatial_merge_size=2)
    assert exact["cu_seqlens"].tolist() == [0, 5]  # no padding document when nothing is padded
