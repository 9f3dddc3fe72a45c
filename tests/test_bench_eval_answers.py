"""The answer judge of the learning benchmarks (`bench/eval_answers.py`) and the data of the outside position task
(`bench/bench_position_task.py`): candidates per kind, blank images, and answers that really are in the pixels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_position_task import write_split  # noqa: E402
from eval_answers import _blank_images, accuracy_by_kind, evaluate  # noqa: E402


def test_position_task_answers_are_balanced_and_in_the_pixels(tmp_path):
    path = write_split(tmp_path, "val", 40, seed=3)
    rows = [json.loads(line) for line in open(path)]
    assert sorted(r["meta"]["answer"] for r in rows) == ["left"] * 20 + ["right"] * 20
    for r in rows:
        img = Image.open(tmp_path / r["messages"][0]["content"][0]["image"]).convert("RGB")
        red = [x for x in range(64) for y in range(64) if img.getpixel((x, y)) == (220, 40, 40)]
        blue = [x for x in range(64) for y in range(64) if img.getpixel((x, y)) == (40, 80, 220)]
        assert red and blue
        assert (max(red) < min(blue)) == (r["meta"]["answer"] == "left")


def test_accuracy_by_kind_and_blank_images(tmp_path):
    results = [{"kind": "a", "answer": "x", "prediction": "x", "candidates": 2},
               {"kind": "a", "answer": "y", "prediction": "x", "candidates": 2},
               {"kind": "b", "answer": "z", "prediction": "z", "candidates": 4}]
    assert accuracy_by_kind(results) == {"a": (0.5, 2, 0.5), "b": (1.0, 1, 0.25)}
    path = write_split(tmp_path, "val", 2, seed=0)
    row = json.loads(path.read_text().splitlines()[0])
    blank = _blank_images(row, tmp_path, tmp_path)
    item = blank["messages"][0]["content"][0]
    img = Image.open(item["image"])
    assert img.size == (64, 64) and len(img.getcolors()) == 1  # one grey, nothing to see
    assert blank["messages"][1] == row["messages"][1] and blank["meta"] == row["meta"]


def test_evaluate_scores_every_candidate_with_transformers(tmp_path):
    from qmoe_lightning.embedded import ensure_embedded_default

    emb = ensure_embedded_default()
    path = write_split(tmp_path, "val", 6, seed=1)
    out = evaluate(str(emb.model_dir), str(path), blank=True)
    (acc, n, chance), = out["real"].values()
    assert n == 6 and chance == 0.5 and 0.0 <= acc <= 1.0
    assert set(out["blank"]) == set(out["real"])
    with pytest.raises(ValueError, match="no rows"):
        evaluate(str(emb.model_dir), str(path), kinds=("text_",))
