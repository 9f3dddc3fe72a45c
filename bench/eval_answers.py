"""Held-out answer accuracy per question kind, judged by transformers on an exported model.

For every row of a JSONL file whose `meta` holds {"kind", "answer"} (the embedded data and
`bench/bench_position_task.py` write such rows), every candidate answer of that kind (the distinct answers of the
kind in the whole file) is scored by transformers' `AutoModelForImageTextToText` loaded from the export: the
summed log probability of the assistant turn (the answer and its end-of-turn token) after the prompt, one
document per forward (`AutoModelForCausalLM` for a text-only export). The prediction is the best-scoring
candidate; chance is 1 / number of candidates. `--kinds text_` scores the text questions instead of the image ones.

`--blank` repeats the image questions with every image replaced by a uniform grey image of the same size: a model
that reads the pixels drops to chance there; one that learnt the answer prior (or the document length) does not.

Inputs are made by the project's own encoder (the chat template and image processor exactly as transformers'
processor applies them, tested in tests/test_data_encoding.py); the numbers come from transformers alone.

Usage: python bench/eval_answers.py EXPORT_DIR DATA.jsonl [--blank] [--limit N] [--kinds PREFIX ...]
       (DATA `embedded`: the embedded default's held-out split)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _with_answer(row: dict, answer: str) -> dict:
    messages = [dict(m) for m in row["messages"]]
    assert messages[-1]["role"] == "assistant", "the last turn must be the assistant's answer"
    messages[-1]["content"] = answer
    return {"messages": messages}


def _blank_images(row: dict, base: Path, out: Path) -> dict:
    """The row with every image replaced by a uniform grey image of the same size (written under `out`)."""
    from PIL import Image

    messages = []
    for m in row["messages"]:
        content = m["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                if item.get("type") == "image":
                    src = Path(item["image"]) if Path(item["image"]).is_absolute() else base / item["image"]
                    with Image.open(src) as im:
                        size = im.size
                    blank = out / f"blank_{size[0]}x{size[1]}.png"
                    if not blank.exists():
                        Image.new("RGB", size, (120, 120, 120)).save(blank)
                    item = dict(item, image=str(blank))
                items.append(item)
            content = items
        messages.append(dict(m, content=content))
    return dict(row, messages=messages)


def answers_by_kind(rows: list[dict]) -> dict[str, list[str]]:
    candidates: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        kind, answer = row["meta"]["kind"], row["meta"]["answer"]
        if answer not in candidates[kind]:
            candidates[kind].append(answer)
    return candidates


def score_rows(export: str, rows: list[dict], base: Path, candidates: dict[str, list[str]]) -> list[dict]:
    """Per row: {"kind", "answer", "prediction", "candidates"}; transformers does the scoring."""
    import inspect

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from data_modules.encoding import Encoder
    from data_modules.packing import PackDataset

    encoder = Encoder(export, max_tokens=4096)
    auto = AutoModelForImageTextToText if encoder.has_vision else AutoModelForCausalLM
    model = auto.from_pretrained(export, dtype=torch.float32).eval()
    accepted = set(inspect.signature(model.forward).parameters)
    results = []
    for n, row in enumerate(rows):
        kind = row["meta"]["kind"]
        scores = []
        for cand in candidates[kind]:
            rec = dict(encoder.encode(_with_answer(row, cand), str(base)), source="eval", line=n + 1)
            batch = PackDataset([rec], None, encoder, pad_to_multiple_of=1)[(0,)]
            inputs = {k: batch[k] for k in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                                            "pixel_values_videos", "video_grid_thw")
                      if batch.get(k) is not None and k in accepted}
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()  # (T, V)
            labels = batch["labels"][0]
            targets = labels[1:]
            logp = torch.log_softmax(logits[:-1], -1)
            keep = targets != -100
            scores.append(float(logp[keep].gather(-1, targets[keep, None]).sum()))
        best = candidates[kind][max(range(len(scores)), key=scores.__getitem__)]
        results.append({"kind": kind, "answer": row["meta"]["answer"], "prediction": best,
                        "candidates": len(candidates[kind])})
    return results


def accuracy_by_kind(results: list[dict]) -> dict[str, tuple[float, int, float]]:
    """kind -> (accuracy, number of rows, chance)."""
    by = defaultdict(list)
    for r in results:
        by[r["kind"]].append(r)
    return {k: (sum(r["prediction"] == r["answer"] for r in v) / len(v), len(v), 1.0 / v[0]["candidates"])
            for k, v in sorted(by.items())}


def evaluate(export: str, data: str, blank: bool = False, limit: int | None = None,
             kinds: tuple[str, ...] = ("image_",)) -> dict[str, dict]:
    """{"real": accuracy_by_kind, "blank": ... (if asked)} over the rows whose kind starts with one of `kinds`."""
    from qmoe_lightning.embedded import resolve_path

    data = resolve_path(data, "val")
    base = Path(data).parent
    with open(data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "meta" in r and r["meta"]["kind"].startswith(kinds)]
    if not rows:
        raise ValueError(f"{data}: no rows with meta.kind starting with {kinds}")
    candidates = answers_by_kind(rows)  # from every row of the kind, also when only the first `limit` are scored
    rows = rows[:limit]
    out = {"real": accuracy_by_kind(score_rows(export, rows, base, candidates))}
    if blank:
        with tempfile.TemporaryDirectory() as tmp:
            blanks = [_blank_images(r, base, Path(tmp)) for r in rows]
            out["blank"] = accuracy_by_kind(score_rows(export, blanks, base, candidates))
    return out


def format_table(result: dict[str, dict]) -> str:
    lines = [f"{'kind':<20} {'n':>4} {'chance':>7} " + " ".join(f"{name:>7}" for name in result)]
    for kind in result["real"]:
        acc, n, chance = result["real"][kind]
        lines.append(f"{kind:<20} {n:>4} {chance:>7.2f} " + " ".join(f"{result[name][kind][0]:>7.2f}"
                                                                      for name in result))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="Hugging Face model directory (e.g. runs/tiny/hf_export)")
    ap.add_argument("data", help="JSONL with meta.kind / meta.answer per row, or `embedded` (its held-out split)")
    ap.add_argument("--blank", action="store_true", help="also score with blank images")
    ap.add_argument("--limit", type=int, default=None, help="first N rows (of the selected kinds) only")
    ap.add_argument("--kinds", nargs="+", default=["image_"], help="question kinds scored, by prefix (default image_)")
    args = ap.parse_args()
    print(format_table(evaluate(args.export, args.data, args.blank, args.limit, tuple(args.kinds))))


if __name__ == "__main__":
    main()
