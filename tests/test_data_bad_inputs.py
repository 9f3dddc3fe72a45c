"""Bad input is skipped and counted per reason (never a crash, never silent); strict mode names file:line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from data_modules import MultimodalPackingDataModule
from qmoe_lightning.embedded import ensure_embedded_default


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def _chat(q="What is two plus two?", a="four", image=None):
    content = [{"type": "image", "image": image}, {"type": "text", "text": q}] if image else q
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": a}]}


@pytest.fixture(autouse=True)
def no_video_decoder(monkeypatch):
    """These tests describe a machine without PyAV (the project does not depend on it): an encoded video file is then
    a bad sample `video_decoder_missing`. Decoding with PyAV is tested in test_data_video.py where it is installed."""
    import data_modules.video

    monkeypatch.setattr(data_modules.video, "decoder_available", lambda: False)


def _video(ref, q="What happens?", a="nothing"):
    content = [{"type": "video", "video": ref}, {"type": "text", "text": q}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": a}]}


@pytest.fixture()
def data_dir(tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    # Not a decodable video: counted as video_decoder_missing without PyAV, corrupt_video with it.
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return tmp_path


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _dm(emb, tmp_path, train, **kw):
    kw.setdefault("max_tokens", 256)
    return MultimodalPackingDataModule(model_path=str(emb.model_dir), train_path=train, val_path=None,
                                       num_workers=0, pad_to_multiple_of=16, cache_dir=str(tmp_path / "cache"), **kw)


BAD_LINES = {
    "invalid_json": '{"messages": [',
    "missing_image": _chat(image="nope.png"),
    "corrupt_image": _chat(image="corrupt.png"),
    "missing_role": {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
    "missing_content": {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    "no_targets": {"messages": [{"role": "user", "content": "no answer here"}]},
    "bad_schema": {"messages": "not a list"},
    "missing_video": _video(["ok.png", "nope.png"]),
    "corrupt_video": _video(["ok.png", "corrupt.png"]),
    "video_too_short": _video(["ok.png"]),
    "video_decoder_missing": _video("clip.mp4"),
}


@pytest.mark.slow
def test_every_bad_kind_is_skipped_and_counted(emb, data_dir):
    good = [_chat(), _chat(image="ok.png"), {"text": "Count to three."}]
    lines = good[:1] + list(BAD_LINES.values()) + good[1:] + [_chat(q="x " * 400)]
    train = _write_jsonl(data_dir / "train.jsonl", lines)
    (data_dir / "empty.jsonl").write_text("\n")
    dm = _dm(emb, data_dir, [str(train), str(data_dir / "empty.jsonl")], too_long="drop")
    dm.setup("fit")
    stats = dm.stats["train"]
    expected = {k: 1 for k in BAD_LINES} | {"too_long": 1, "empty_file": 1, "ok": 3}
    assert stats == expected
    batches = list(dm.train_dataloader())
    assert sum(b["num_documents"] for b in batches) == 3


def test_too_long_truncate_keeps_targets_and_counts(emb, data_dir):
    long_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "four " * 300}]}
    train = _write_jsonl(data_dir / "t.jsonl", [_chat(), long_row])
    dm = _dm(emb, data_dir, str(train), too_long="truncate", max_tokens=128)
    dm.setup("fit")
    assert dm.stats["train"] == {"ok": 2, "truncated": 1}
    assert max(len(p) for p in dm.train_dataset.plan.packs(0)) >= 1
    assert all(n <= 128 for n in dm.train_dataset.records["num_tokens"])


def test_truncation_never_cuts_an_image(emb, data_dir):
    from data_modules.encoding import IGNORE, Encoder

    row = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"},
                        {"role": "user", "content": [{"type": "text", "text": "look"},
                                                     {"type": "image", "image": "ok.png"}]},
                        {"role": "assistant", "content": "red"}]}
    full = Encoder(str(emb.model_dir), max_tokens=512).encode(row, str(data_dir))
    enc = Encoder(str(emb.model_dir), max_tokens=512)
    first_image = full["input_ids"].index(enc.image_token_id)
    enc.max_tokens = first_image + 2  # the cut lands inside the image's 4 tokens
    cut = enc.encode(row, str(data_dir))
    assert cut["truncated"] and cut["images"] == [] and cut["image_grids"] == []
    assert enc.image_token_id not in cut["input_ids"]
    assert cut["input_ids"] == full["input_ids"][: first_image - 1]  # its <|vision_start|> went too
    kept = enc.processor.tokenizer.decode([t for t in cut["labels"] if t != IGNORE])
    assert kept == "four<|im_end|>"


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_strict_fails_at_first_bad_with_file_line(emb, data_dir, kind):
    train = _write_jsonl(data_dir / "s.jsonl", [_chat(), _chat(), BAD_LINES[kind], _chat()])
    dm = _dm(emb, data_dir, str(train), strict=True)
    with pytest.raises(ValueError, match=rf"s\.jsonl:3: {kind}"):
        dm.setup("fit")


def test_strict_names_empty_file(emb, data_dir):
    (data_dir / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl:0: empty_file"):
        _dm(emb, data_dir, str(data_dir / "empty.jsonl"), strict=True).setup("fit")


def test_empty_dataset_after_filtering_says_why(emb, data_dir):
    train = _write_jsonl(data_dir / "bad.jsonl", ['{"oops', BAD_LINES["missing_role"]])
    with pytest.raises(ValueError, match=r"train dataset is empty after filtering.*invalid_json=1.*missing_role=1"):
        _dm(emb, data_dir, str(train)).setup("fit")


def test_json_parquet_and_saved_dataset_sources(emb, data_dir):
    import datasets

    rows = [_chat(), _chat(image="ok.png"), _chat(q="Repeat after me: apple", a="apple")]
    (data_dir / "rows.json").write_text(json.dumps(rows))
    flat = [{"messages": json.dumps(r["messages"])} for r in rows]  # parquet: messages as a JSON string
    datasets.Dataset.from_list(flat).to_parquet(str(data_dir / "rows.parquet"))
    datasets.Dataset.from_list(flat).save_to_disk(str(data_dir / "saved"))
    for spec in (str(data_dir / "rows.json"), str(data_dir / "rows.parquet"), str(data_dir / "saved"),
                 str(data_dir / "rows.*")):
        dm = _dm(emb, data_dir, spec)
        dm.setup("fit")
        assert dm.stats["train"]["ok"] == (6 if "*" in spec else 3), spec


def test_invalid_utf8_is_counted_per_row_and_strict_names_the_line(emb, data_dir):
    good = json.dumps(_chat()).encode()
    bad = json.dumps(_chat(a="caf__")).encode().replace(b"caf__", b"caf\xe9\xff")  # latin-1 bytes, not UTF-8
    jsonl = data_dir / "latin1.jsonl"
    jsonl.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    dm = _dm(emb, data_dir, str(jsonl))
    dm.setup("fit")
    assert dm.stats["train"] == {"invalid_utf8": 1, "ok": 2}  # never trained as U+FFFD
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: invalid_utf8: byte 0xe9 at column \d+"):
        _dm(emb, data_dir, str(jsonl), strict=True).setup("fit")
    array = data_dir / "latin1.json"
    array.write_bytes(b"[" + b",\n".join([good, bad, good, good]) + b"]")
    dm = _dm(emb, data_dir, str(array))
    dm.setup("fit")
    assert dm.stats["train"] == {"invalid_utf8": 1, "ok": 3}  # one bad byte used to drop the whole array as one row
    with pytest.raises(ValueError, match=r"latin1.json:2: invalid_utf8"):
        _dm(emb, data_dir, str(array), strict=True).setup("fit")


def test_sharegpt_rows_and_role_aliases_encode_like_messages(emb, data_dir):
    from data_modules.encoding import Encoder

    enc = Encoder(str(emb.model_dir), max_tokens=256)
    ref = enc.encode(_chat(), str(data_dir))
    sharegpt = {"conversations": [{"from": "human", "value": "What is two plus two?"},
                                  {"from": "gpt", "value": "four"}]}
    aliased = {"messages": [{"role": "human", "content": "What is two plus two?"},
                            {"role": "gpt", "content": "four"}]}
    for row in (sharegpt, aliased):
        got = enc.encode(row, str(data_dir))
        assert got["input_ids"] == ref["input_ids"] and got["labels"] == ref["labels"]


def test_unknown_roles_are_counted_not_trained(emb, data_dir):
    narrator = {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "upon"}]}
    train = _write_jsonl(data_dir / "roles.jsonl", [_chat(), narrator, _chat()])
    dm = _dm(emb, data_dir, str(train))
    dm.setup("fit")
    assert dm.stats["train"] == {"bad_role": 1, "ok": 2}
    with pytest.raises(ValueError, match=r"roles.jsonl:2: bad_role: message 0 has role 'narrator'"):
        _dm(emb, data_dir, str(train), strict=True).setup("fit")


def test_truncated_jpeg_fails_at_preparation_not_in_training(emb, data_dir):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    (data_dir / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut
    train = _write_jsonl(data_dir / "jpeg.jsonl", [_chat(image="ok.png"), _chat(image="cut.jpg")])
    dm = _dm(emb, data_dir, str(train))
    dm.setup("fit")
    assert dm.stats["train"] == {"corrupt_image": 1, "ok": 1}  # counted at preparation (the summary said 0)
    with pytest.raises(ValueError, match=r"jpeg.jsonl:2: corrupt_image: .*cut.jpg"):
        _dm(emb, data_dir, str(train), strict=True).setup("fit")


def test_transparent_images_are_composited_on_white_like_the_processor(emb, data_dir):
    import torch

    from data_modules.encoding import Encoder
    from data_modules.packing import PackDataset

    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red ...
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))  # ... and an opaque blue half
    rgba.save(data_dir / "alpha.png")
    enc = Encoder(str(emb.model_dir), max_tokens=256)
    rec = dict(enc.encode(_chat(image="alpha.png"), str(data_dir)), source="x", line=1)
    got = PackDataset([rec], None, enc, pad_to_multiple_of=1)[(0,)]["pixel_values"]
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    ip = enc.processor.image_processor
    assert torch.equal(got, ip([white], return_tensors="pt", **enc.image_size_kwargs())["pixel_values"])
    dropped = ip([rgba.convert("RGB")], return_tensors="pt", **enc.image_size_kwargs())["pixel_values"]
    assert not torch.equal(got, dropped)  # what the loader did before: alpha dropped, red shows


def test_invalid_json_names_the_column_in_the_line(emb, data_dir):
    cut = '{"messages": [{"role": "user"'  # a row cut short: the error is at its end, column 30
    train = _write_jsonl(data_dir / "cut.jsonl", [_chat(), cut])
    with pytest.raises(ValueError, match=r"cut.jsonl:2: invalid_json: Expecting ',' delimiter at column 30$"):
        _dm(emb, data_dir, str(train), strict=True).setup("fit")  # said "column 1" (of the line after it)
    crlf = data_dir / "crlf.jsonl"
    crlf.write_bytes(json.dumps(_chat()).encode() + b"\r\n" + b'{"messages": [1,\r\n')  # Windows line ends
    with pytest.raises(ValueError, match=r"crlf.jsonl:2: invalid_json: Expecting value at column 17$"):
        _dm(emb, data_dir, str(crlf), strict=True).setup("fit")


@pytest.mark.parametrize("item, reason, what", [
    ({"type": "image", "image": "https://example.com/cat.png"}, "missing_image", "image 'https://example.com/cat.png'"),
    ({"type": "image", "image": "HTTP://example.com/cat.png"}, "missing_image", "image 'HTTP://example.com/cat.png'"),
    ({"type": "video", "video": "http://example.com/clip.mp4"}, "missing_video", "video 'http://example.com/clip.mp4'"),
    ({"type": "video", "video": ["ok.png", "https://example.com/f.png"]}, "missing_video",
     "video frame 'https://example.com/f.png'"),
])
def test_urls_are_refused_saying_they_are_not_fetched(emb, data_dir, item, reason, what):
    row = {"messages": [{"role": "user", "content": [item, {"type": "text", "text": "what?"}]},
                        {"role": "assistant", "content": "x"}]}
    train = _write_jsonl(data_dir / "url.jsonl", [_chat(), row])
    dm = _dm(emb, data_dir, str(train))
    dm.setup("fit")
    assert dm.stats["train"] == {reason: 1, "ok": 1}
    # was "file not found: <data dir>/https://..."
    with pytest.raises(ValueError, match=rf"url.jsonl:2: {reason}: message 0: {what}: URLs are not fetched; "
                                         r"download the file and give its path$"):
        _dm(emb, data_dir, str(train), strict=True).setup("fit")


def test_a_role_that_is_not_a_string_is_a_bad_role_saying_so(emb, data_dir):
    numeric = {"messages": [{"role": 5, "content": "hi"}, {"role": "assistant", "content": "x"}]}
    empty = {"messages": [{"role": "", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    train = _write_jsonl(data_dir / "roles.jsonl", [_chat(), numeric, empty])
    dm = _dm(emb, data_dir, str(train))
    dm.setup("fit")
    assert dm.stats["train"] == {"bad_role": 1, "missing_role": 1, "ok": 1}  # both were "missing_role: has no role"
    with pytest.raises(ValueError, match=r"roles.jsonl:2: bad_role: message 0 has role 5 \(int\); a role is a string"):
        _dm(emb, data_dir, str(train), strict=True).setup("fit")


def test_a_utf8_bom_does_not_cost_the_first_row(emb, data_dir):
    bom = b"\xef\xbb\xbf"
    jsonl = data_dir / "bom.jsonl"
    jsonl.write_bytes(bom + b"\n".join(json.dumps(r).encode() for r in (_chat(), _chat(a="five"))) + b"\n")
    array = data_dir / "bom.json"
    array.write_bytes(bom + json.dumps([_chat(), _chat(a="five"), _chat(a="six")]).encode())
    for path, rows in ((jsonl, 2), (array, 3)):  # was invalid_json for the first row (JSONL) / the file (JSON)
        dm = _dm(emb, data_dir, str(path), strict=True)
        dm.setup("fit")
        assert dm.stats["train"] == {"ok": rows}, path


def test_image_paths_resolve_from_the_data_file_and_may_be_absolute_or_climb(emb, data_dir):
    sub = data_dir / "sub"
    sub.mkdir()
    train = _write_jsonl(sub / "rel.jsonl", [_chat(image="../ok.png"), _chat(image=str(data_dir / "ok.png"))])
    dm = _dm(emb, data_dir, str(train), strict=True)
    dm.setup("fit")
    assert dm.stats["train"] == {"ok": 2}
    assert dm.train_dataset.records["images"] == [[str(sub / "../ok.png")], [str(data_dir / "ok.png")]]
