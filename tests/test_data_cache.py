"""The preprocessing cache follows the images it references, not only the data file; media that break during the run
are dropped in the worker and counted, and a pack left without documents is a zero-target micro-batch."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from PIL import Image

from data_modules import MultimodalPackingDataModule
from data_modules.encoding import IGNORE
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _chat(image, q="What colour is this?", a="red"):
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]},
                         {"role": "assistant", "content": a}]}


def _png(path, size=(64, 64), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)


def _corrupt(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png any more")


def _dm(emb, tmp_path, train, **kw):
    return MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=str(train), val_path=None,
                                       num_workers=0, pad_to_multiple_of=16, max_tokens=256,
                                       cache_dir=str(tmp_path / "cache"), shuffle=False, **kw)


def _verdicts(dm):
    """line -> skip reason ('' for ok) of every row, from the encoded stage as the start report counts it."""
    from data_modules.sources import encode_files

    encoded, _ = encode_files(dm.train_path, dm._encoder(str(dm.model_path)), dm.cache_dir)
    return {rec["line"]: (rec["skip_reason"], rec["image_grids"]) for rec in encoded}


def test_verdicts_and_counts_follow_the_images_not_the_stale_cache(emb, tmp_path, monkeypatch):
    for name in ("a.png", "c.png", "d.png"):
        _png(tmp_path / name)
    train = tmp_path / "train.jsonl"  # written once: its size and mtime never change below
    train.write_text("".join(json.dumps(_chat(n)) + "\n" for n in ("a.png", "b.png", "c.png", "d.png")))
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.stats["train"] == {"missing_image": 1, "ok": 3}
    first = _verdicts(dm)
    assert first[2][0] == "missing_image"

    _corrupt(tmp_path / "a.png")  # ok -> corrupt
    _png(tmp_path / "b.png")  # missing -> fixed
    os.remove(tmp_path / "c.png")  # ok -> deleted
    _png(tmp_path / "d.png", size=(128, 32))  # still ok, but another size: another grid
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    # the old cache key (the data file's size and mtime only) reported {"missing_image": 1, "ok": 3} again
    assert dm.stats["train"] == {"corrupt_image": 1, "missing_image": 1, "ok": 2}
    now = _verdicts(dm)
    assert [now[line][0] for line in (1, 2, 3, 4)] == ["corrupt_image", "", "missing_image", ""]
    assert now[4][1] != first[4][1]  # the grid of the resized image is re-planned, not the stale one
    assert sorted(dm.train_dataset.records["line"]) == [2, 4]

    # a third start with nothing changed reuses the caches: nothing is encoded again
    from data_modules.encoding import Encoder

    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.stats["train"] == {"corrupt_image": 1, "missing_image": 1, "ok": 2} and calls == []


def test_only_the_rows_of_a_changed_image_are_encoded_again(emb, tmp_path, monkeypatch):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    train = tmp_path / "train.jsonl"
    rows = [_chat("a.png"), _chat("b.png"), _chat("b.png", q="And this?"), {"text": "plain text"}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _dm(emb, tmp_path, train).setup("fit")
    os.remove(tmp_path / "b.png")

    from data_modules.encoding import Encoder

    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, row, base: calls.append(row) or real(self, row, base))
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.stats["train"] == {"missing_image": 2, "ok": 2}
    assert [r["messages"][0]["content"][0]["image"] for r in calls] == ["b.png", "b.png"]


def test_a_pack_whose_images_all_break_after_planning_is_a_zero_target_batch_and_counted(emb, tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(_chat(n)) + "\n" for n in ("a.png", "b.png", "c.png")))
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.train_dataset.plan.num_packs == 1  # the three documents share one pack
    os.remove(tmp_path / "a.png")  # gone
    _png(tmp_path / "b.png", size=(128, 32))  # another size than planned
    _corrupt(tmp_path / "c.png")  # no longer decodes
    batches = list(dm.train_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch.num_documents == 0 and batch.documents == [] and batch.num_label_tokens == 0
    assert bool((batch.labels == IGNORE).all()) and batch.pixel_values is None
    assert batch.input_ids.shape[1] == 16 and batch.cu_seqlens.tolist() == [0, 16] and batch.real_tokens == 0
    assert int(batch.attention_mask.sum()) == 0
    assert batch.decode_skips == {"missing_image": 1, "image_changed": 1, "corrupt_image": 1}
    batch = pickle.loads(pickle.dumps(batch))  # how a DataLoader worker hands it to the main process
    dm.on_before_batch_transfer(batch, 0)  # what Lightning calls in the main process
    assert dm.decode_skips == {"train": {"missing_image": 1, "image_changed": 1, "corrupt_image": 1}}


def test_a_partly_broken_pack_keeps_the_rest_and_names_only_kept_documents(emb, tmp_path):
    for name in ("a.png", "b.png"):
        _png(tmp_path / name)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(_chat(n)) + "\n" for n in ("a.png", "b.png")))
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    pack = dm.train_dataset.plan.packs(0)[0]
    os.remove(tmp_path / "a.png")
    batch = dm.train_dataset[tuple(pack)]
    kept = [i for i in pack if dm.train_dataset.records[i]["images"] == [str(tmp_path / "b.png")]]
    assert batch.num_documents == 1 and batch.documents == kept and batch.num_label_tokens > 0
    assert batch.decode_skips == {"missing_image": 1}
    # strict: the same drop is an error naming file:line (the image was fine at preparation)
    _png(tmp_path / "a.png")
    strict = _dm(emb, tmp_path, train, strict=True)
    strict.setup("fit")
    os.remove(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"train.jsonl:1: missing_image"):
        strict.train_dataset[tuple(pack)]


def test_media_paths_cover_images_videos_frame_directories_and_sharegpt(tmp_path):
    from data_modules.encoding import media_paths

    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("0002.png", "0001.png", "notes.txt"):
        (frames / name).write_bytes(b"")
    row = {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "image", "image": "https://example.com/x.png"},
        {"type": "video", "video": "frames"}, {"type": "video", "video": ["f1.png", "/abs/f2.png"]},
        {"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "hi"}, "junk"]}, 5]}
    base = str(tmp_path)
    assert media_paths(row, base) == [f"{base}/a.png", f"{base}/frames", f"{base}/frames/0001.png",
                                      f"{base}/frames/0002.png", f"{base}/f1.png", "/abs/f2.png", f"{base}/clip.mp4"]
    sharegpt = {"conversations": [{"from": "human", "value": [{"type": "image", "image": "a.png"}]}]}
    assert media_paths(sharegpt, base) == [f"{base}/a.png"]
    as_string = {"messages": json.dumps(row["messages"][:1])}
    assert media_paths(as_string, base) == media_paths(row, base)
    assert media_paths({"text": "plain"}, base) == [] and media_paths([1], base) == []


def test_a_frame_removed_from_a_video_directory_changes_the_verdict(emb, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(2):
        _png(frames / f"{k:04d}.png", colour=(10 * k, 0, 0))
    row = {"messages": [{"role": "user", "content": [{"type": "video", "video": "frames"},
                                                     {"type": "text", "text": "What happens?"}]},
                        {"role": "assistant", "content": "nothing"}]}
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(row) + "\n" + json.dumps(_chat("a.png")) + "\n")
    _png(tmp_path / "a.png")
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.stats["train"] == {"ok": 2}
    os.remove(frames / "0001.png")  # one frame left: shorter than temporal_patch_size
    dm = _dm(emb, tmp_path, train)
    dm.setup("fit")
    assert dm.stats["train"] == {"video_too_short": 1, "ok": 1}
