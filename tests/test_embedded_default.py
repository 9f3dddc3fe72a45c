"""The embedded default builds without downloads, deterministically, and is self-consistent."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from qmoe_lightning.embedded import ensure_embedded_default, resolve_path
from qmoe_lightning.embedded.synthetic import COLORS, tokenizer_corpus
from qmoe_lightning.embedded.tokenizer import SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="session")
def emb(tmp_path_factory):
    return ensure_embedded_default(tmp_path_factory.getbasetemp() / "qmoe_embedded")


def test_tokenizer_is_deterministic():
    a = train_tokenizer(tokenizer_corpus(1234), 512).to_str()
    b = train_tokenizer(tokenizer_corpus(1234), 512).to_str()
    assert hashlib.sha256(a.encode()).digest() == hashlib.sha256(b.encode()).digest()


def test_config_ids_match_tokenizer_and_processor(emb):
    from transformers import AutoConfig

    from data_modules.processor import load_processor

    config = AutoConfig.from_pretrained(emb.model_dir)
    proc = load_processor(str(emb.model_dir))
    tok = proc.tokenizer
    assert config.model_type == "qwen3_5_moe"
    assert config.text_config.vocab_size == len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert config.image_token_id == ids["<|image_pad|>"] and config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert type(proc).__name__.startswith("Qwen3VL")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                                  {"type": "text", "text": "hi"}]}],
                                    tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("a red circle")["input_ids"]) == "a red circle"


def test_idempotent_and_sentinel(emb):
    again = ensure_embedded_default(emb.root.parent)
    assert again == emb
    assert resolve_path("embedded", "train", emb.root.parent) == str(emb.train_path)
    assert resolve_path("/some/file.jsonl", "train") == "/some/file.jsonl"


def test_dataset_answers_are_in_the_pixels(emb):
    rows = [json.loads(line) for line in open(emb.val_path)]
    image_rows = [r for r in rows if r["meta"]["kind"].startswith("image_")]
    assert 0.5 < len(image_rows) / len(rows) < 0.9
    # the question text carries no colour or shape name: only the image can answer it
    for r in image_rows:
        question = " ".join(i.get("text", "") for i in r["messages"][0]["content"])
        assert not any(c in question for c in COLORS)
    for r in image_rows[:40]:
        if r["meta"]["kind"] != "image_color":
            continue
        path = emb.val_path.parent / next(i["image"] for i in r["messages"][0]["content"] if i["type"] == "image")
        img = Image.open(path).convert("RGB")
        counts = dict((px, n) for n, px in img.getcolors(maxcolors=64 * 64))
        assert counts.get(tuple(COLORS[r["meta"]["answer"]]), 0) > 50


def test_model_loads_and_runs(emb):
    import torch
    from transformers import Qwen3_5MoeForConditionalGeneration

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(emb.model_dir).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert out.logits.shape == (1, 4, model.config.text_config.vocab_size)


def test_position_answers_are_where_the_shape_is(emb):
    from qmoe_lightning.embedded.synthetic import POSITION_QUESTIONS

    rows = [json.loads(line) for line in open(emb.val_path)]
    seen = {kind: set() for kind in POSITION_QUESTIONS}
    for r in rows:
        kind = r["meta"]["kind"].removeprefix("image_")
        if kind not in POSITION_QUESTIONS:
            continue
        question, answers = POSITION_QUESTIONS[kind]
        assert question in [i.get("text") for i in r["messages"][0]["content"]]
        path = emb.val_path.parent / next(i["image"] for i in r["messages"][0]["content"] if i["type"] == "image")
        img = Image.open(path).convert("RGB")
        w, h = img.size
        colours = {tuple(c) for c in COLORS.values()}
        xs, ys = zip(*[(x, y) for x in range(w) for y in range(h) if img.getpixel((x, y)) in colours])
        coord, extent = (xs, w) if kind == "left_right" else (ys, h)
        second = min(coord) >= extent // 2  # the whole shape in the second half, or the whole shape in the first
        assert second or max(coord) < extent // 2, (path, min(coord), max(coord))
        assert r["meta"]["answer"] == answers[second]
        seen[kind].add(r["meta"]["answer"])
    assert all(seen[k] == set(POSITION_QUESTIONS[k][1]) for k in seen)  # both answers of each kind occur


def test_embedded_qwen3_vl_moe_is_built_beside_it_deterministically(emb, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from qmoe_lightning.embedded import ensure_embedded_model

    path = resolve_path("embedded:qwen3_vl_moe", "model", emb.root.parent)
    assert path == str(emb.root / "model-qwen3_vl_moe")
    assert resolve_path("embedded:qwen3_vl_moe", "train", emb.root.parent) == str(emb.train_path)  # the same data
    assert ensure_embedded_model("qwen3_vl_moe", emb.root.parent) == emb.root / "model-qwen3_vl_moe"  # idempotent
    config, base = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(emb.model_dir)
    assert config.model_type == "qwen3_vl_moe"
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(config, key) == getattr(base, key)  # the shared tokenizer's ids
    assert config.text_config.vocab_size == base.text_config.vocab_size
    assert (emb.root / "model-qwen3_vl_moe" / "tokenizer.json").read_bytes() == (emb.model_dir / "tokenizer.json") \
        .read_bytes()
    # a second build writes the same weights
    from qmoe_lightning.embedded.builder import _build_vl_moe_model

    _build_vl_moe_model(emb.model_dir, tmp_path / "again")
    a = load_file(emb.root / "model-qwen3_vl_moe" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    with pytest.raises(ValueError, match="no embedded model 'llama'"):
        resolve_path("embedded:llama", "model", emb.root.parent)
