"""`PredictionWriter`: what `cli.py predict` leaves behind: `<default_root_dir>/predictions.jsonl` (one row per prompt,
from the module's `predict_step`) and one line of exact match per kind.

The CLI adds it to every run that names no writer of its own (a fit never calls it). The file is replaced
atomically at the end of the epoch: an interrupted predict leaves the previous file whole. `summary` keeps the
counts of the last predict (`prediction_summary`) for the caller.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from qmoe_lightning.export_dir import write_text_atomic


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "predictions.jsonl") -> None:
        """filename: written under the trainer's default_root_dir."""
        super().__init__(write_interval="batch")
        self.filename = filename
        self.rows: list[dict] = []
        self.summary: dict | None = None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        self.rows.append(prediction)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows, self.rows = self.rows, []
        path = Path(trainer.default_root_dir) / self.filename
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.summary = summary = prediction_summary(rows)
        parts = [f"predict: {len(rows)} prompts -> {path}"]
        if summary["failed"]:
            parts.append(f"{summary['failed']} could not be answered (the reason is in their rows' error)")
        if summary["judged"]:
            by_kind = ", ".join(f"{k} {v['correct']}/{v['judged']} = {v['acc']:.4f}"
                                for k, v in summary["kinds"].items())
            parts.append(f"exact match {summary['correct']}/{summary['judged']} = {summary['acc']:.4f} ({by_kind})")
        if summary["unfinished"]:
            parts.append(f"{summary['unfinished']} answers hit max_new_tokens before an end token")
        rank_zero_info("; ".join(parts))


def prediction_summary(rows: list[dict]) -> dict:
    """Exact-match counts of predictions.jsonl rows: overall and per kind as validation groups them ("image":
    image or video in the prompt, as val/image_acc; "text": as val/text_acc)."""
    judged = [r for r in rows if r.get("correct") is not None]
    kinds = {}
    for name in ("image", "text"):
        mine = [r for r in judged if (r["kind"] == "text") == (name == "text")]
        if mine:
            correct = sum(r["correct"] for r in mine)
            kinds[name] = {"correct": correct, "judged": len(mine), "acc": correct / len(mine)}
    correct = sum(r["correct"] for r in judged)
    return {"prompts": len(rows), "judged": len(judged), "correct": correct,
            "acc": correct / len(judged) if judged else None, "kinds": kinds,
            "failed": sum(1 for r in rows if r.get("error")),
            "unfinished": sum(1 for r in rows if r.get("finished") is False)}
