"""Shared fixtures/helpers of the application tests, plus unit tests of the schedule, optimizer groups and the
answer-accuracy metric.

The application tests run the real stack on the embedded tiny checkpoint with a small JSONL written per test
(a few coloured-shape image questions and text rows), so a step takes well under a second on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qmoe_lightning.embedded import ensure_embedded_default
from qmoe_lightning.evaluation import document_answer_correct, next_token_targets
from qmoe_lightning.optim import build_adamw, param_groups, warmup_cosine

# ---------------------------------------------------------------------------------------------- helpers


def embedded_model_dir() -> str:
    return str(ensure_embedded_default().model_dir)


def write_small_dataset(root: Path, n_rows: int = 24, seed: int = 0) -> Path:
    """JSONL of image questions (coloured shapes) and text rows, images next to it."""
    from qmoe_lightning.embedded.synthetic import COLORS, SHAPES, draw_shape

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n_rows):
            if i % 3 != 2:
                color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
                name = f"images/{i:03d}.png"
                draw_shape(rng, color, shape, 64).save(root / name)
                q, a = ("What color is the shape?", color) if i % 2 else ("What shape is in the image?", shape)
                row = {"messages": [
                    {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": q}]},
                    {"role": "assistant", "content": a}]}
            else:
                n = rng.randint(1, 5)
                row = {"messages": [{"role": "user", "content": f"Count to {n}."},
                                    {"role": "assistant", "content": " ".join(str(k) for k in range(1, n + 1))}]}
            f.write(json.dumps(row) + "\n")
    return path


def write_text_dataset(root: Path, n_rows: int = 48, seed: int = 0) -> Path:
    """JSONL of text questions only (counting and adding), for the text-only families."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n_rows):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            q, answer = ((f"Count to {a}.", " ".join(str(k) for k in range(1, a + 1))) if i % 2
                         else (f"What is {a} plus {b}?", str(a + b)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def make_datamodule(data_path: Path, cache_dir: Path, max_tokens: int = 256, **kwargs):
    from data_modules.datamodule import MultimodalPackingDataModule

    kw = dict(model_path="embedded", train_path=str(data_path), val_path=str(data_path), max_tokens=max_tokens,
              pad_to_multiple_of=32, num_workers=0, seed=0, cache_dir=str(cache_dir))
    kw.update(kwargs)
    return MultimodalPackingDataModule(**kw)


def make_trainer(root: Path, max_steps: int, callbacks=(), **kwargs):
    import lightning.pytorch as pl

    kw = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=str(root), log_every_n_steps=1)
    kw.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **kw)


@pytest.fixture
def small_data(tmp_path):
    return write_small_dataset(tmp_path / "data")


# ---------------------------------------------------------------------------------------------- unit tests


def test_warmup_cosine_schedule_shape():
    vals = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(25)]
    assert vals[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear warmup, never exactly 0
    assert vals[4] == pytest.approx(1.0)  # peak right after warmup
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))  # monotone cosine decay
    assert vals[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert vals[20] == pytest.approx(0.1) and vals[24] == pytest.approx(0.1)  # floor, flat afterwards


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen parameters are left out entirely
    groups = param_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and decayed == {id(model[0].weight)}
    assert {id(p) for p in groups[1]["params"]} == {id(model[0].bias), id(model[1].bias)}
    assert groups[1]["weight_decay"] == 0.0
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert opt.defaults["fused"] in (None, False)  # CPU parameters: no fused kernel


def test_next_token_targets_do_not_cross_documents():
    labels = torch.tensor([[-100, 5, 6, -100, 8, 9, -100]])
    cu = torch.tensor([0, 3, 6, 7], dtype=torch.int32)
    t = next_token_targets(labels, cu)
    # position 2 (last of doc 0) must not predict doc 1's first token; 5 likewise
    assert t.tolist() == [[5, 6, -100, 8, 9, -100, -100]]


def test_document_answer_correct_exact_match_per_document():
    # doc0: image doc, targets at positions 0,1 -> [5, 6]; doc1: text doc, targets at 3,4 -> [8, 9]
    labels = torch.tensor([[-100, 5, 6, -100, 8, 9]])
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    types = torch.tensor([[1, 0, 0, 0, 0, 0]])
    correct, visual = document_answer_correct(torch.tensor([5, 6, 8, 7]), labels, cu, types)
    assert correct.tolist() == [True, False] and visual.tolist() == [True, False]
    correct, _ = document_answer_correct(torch.tensor([5, 0, 8, 9]), labels, cu, types)
    assert correct.tolist() == [False, True]
    with pytest.raises(ValueError, match="predictions"):
        document_answer_correct(torch.tensor([5, 6]), labels, cu, types)
