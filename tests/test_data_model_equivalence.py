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


def _video_rows(tmp_path):
    """Two short frame-list videos (one with a relative frame directory) for the packed-vs-alone check."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n, (h, w) in (("va", 3, (48, 64)), ("vb", 4, (64, 64))):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name / f"{i:02d}.png")
    va = [str(tmp_path / "va" / f"{i:02d}.png") for i in range(3)]
    return [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": va, "fps": 2},
                                                   {"type": "text", "text": "What color is the shape?"}]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "What shape is in the image?"},
                                                   {"type": "video", "video": "vb"}]},
                      {"role": "assistant", "content": "a blue circle"}]},
    ]


@pytest.mark.parametrize("with_video", [False, True])
def test_packed_equals_per_document(emb, tmp_path, with_video):
    """Per-document logits of a packed row equal each document's own forward (fp32, 1e-4); with_video packs two
    frame-list video documents between image and text documents (pixel_values_videos / video_grid_thw in order)."""
    torch.manual_seed(0)
    model = models.Qwen3_5MoeForConditionalGeneration.from_pretrained(str(emb.model_dir)).float().eval()
    encoder = Encoder(str(emb.model_dir), max_tokens=512)
    base = str(emb.train_path.parent)
    with open(emb.train_path) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(6))]
    records = [dict(encoder.encode(r, base), source="x", line=i + 1) for i, r in enumerate(rows)]
    if with_video:
        videos = [dict(encoder.encode(r, str(tmp_path)), source="v", line=i + 1)
                  for i, r in enumerate(_video_rows(tmp_path))]
        records = records[:2] + videos[:1] + records[2:4] + videos[1:]
    packed = PackDataset(records, None, encoder, pad_to_multiple_of=64)[tuple(range(len(records)))]
    singles = [PackDataset(records, None, encoder, pad_to_multiple_of=1)[(i,)] for i in range(len(records))]
    keys = ("input_ids", "labels", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "cu_seqlens")
    if with_video:
        assert packed["video_grid_thw"].shape[0] == 2 and packed["pixel_values_videos"] is not None

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
