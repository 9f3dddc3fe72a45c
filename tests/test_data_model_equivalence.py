"""A packed micro-batch through the native model equals per-document forwards (fp32, <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from data_modules.encoding import Encoder
from data_modules.packing import PackDataset
from qmoe_lightning.embedded import ensure_embedded_default

models = pytest.importorskip("qmoe_lightning.models")


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def test_packed_equals_per_document(emb):
    torch.manual_seed(0)
    model = models.Qwen3_5MoeForConditionalGeneration.from_pretrained(str(emb.model_dir)).float().eval()
    encoder = Encoder(str(emb.model_dir), max_tokens=512)
    base = str(emb.train_path.parent)
    with open(emb.train_path) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(6))]
    records = [dict(encoder.encode(r, base), source="x", line=i + 1) for i, r in enumerate(rows)]
    ds = PackDataset(records, [list(range(len(records)))], encoder, pad_to_multiple_of=64)
    packed = ds[0]
    singles = [PackDataset(records, [[i]], encoder, pad_to_multiple_of=1)[0] for i in range(len(records))]
    keys = ("input_ids", "labels", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "cu_seqlens")

    def run(batch):
        with torch.no_grad():
            return model(**{k: batch[k] for k in keys}, max_seqlen=batch["max_seqlen"])

    out = run(packed)
    cu = packed["cu_seqlens"].tolist()
    total_loss, total_targets = 0.0, 0
    for d, single in enumerate(singles):
        ref = run(single)
        got = out.logits[0, cu[d] : cu[d + 1]]
        assert got.shape == ref.logits[0].shape
        torch.testing.assert_close(got, ref.logits[0], atol=1e-4, rtol=0)
        total_loss += float(ref.ce_loss if ref.ce_loss is not None else ref.loss) * single["num_label_tokens"]
        total_targets += single["num_label_tokens"]
    assert total_targets == packed["num_label_tokens"]
    # Cross-entropy: token mean over every document's targets == target-weighted mean of per-document losses
    # (the router aux loss is pooled over a different token set per layout, so it is excluded here).
    assert int(out.num_label_tokens) == packed["num_label_tokens"]
    ce = out.ce_loss if out.ce_loss is not None else out.loss
    assert abs(float(ce) - total_loss / total_targets) <= 1e-4
