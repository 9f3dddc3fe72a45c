"""The seams between features: a pairwise (covering-array) matrix of short fits through the real application.

Factors and values:
    family     qwen3_5_moe, qwen3_vl_moe, qwen3_moe, qwen3_next (the last two text only: their rows train on text rows)
    precision  32-true, bf16-mixed, bf16-true
    mode       full, lora (LoRA on the family's default targets, the routed experts' per-expert adapters included)
    layout     1 process, ep=2 (expert parallelism, 2 processes), cp=2 (context parallelism, 2 processes)
    extras     none, mtp (multi-token prediction; the families with an MTP module: Qwen3.5-MoE, Qwen3-Next),
               ac (activation checkpointing with routing replay), bias (aux-loss-free balancing:
               `router_balancing: bias`)
Every pair of values of two factors appears in at least one row (`test_rows_cover_every_pair` checks it; MTP only
with the families that have it). A row may switch on more than one extra: it then covers each of them (and an extra's
pairs with the other extras); "none" is a row with no extra. The 2-process rows are at their floor: each
multi-process layout must meet all four families, so at least 4 rows per layout whatever the rest (the three
precisions and the four extras fit in them). Several extras in a row keep a family's rows at their floor instead:
Qwen3-Next has one row per layout, 3 rows for its 4 extras.

Each row is one `cli.py fit` of STEPS optimizer steps on a small JSONL (image questions and text; text questions only
for a text-only family; 3 packs of 256 tokens) with only the callbacks the checks need. 1-process rows run in this
process (`cli.main`, one torch thread: on a shared 2-core machine two OpenMP threads per process made a step ~50x
slower); 2-process rows start both ranks of `cli.py` at once as torchrun does (tests/rank_launcher.py; gloo).
Checks, every row:
- the train loss of every step finite and the last below the first (lr LR, no warmup: full fine-tuning fell by
  0.5-0.85 nats in 3 steps, LoRA by 0.08-0.25 (B starts at zero, so step 1 moves only B); Qwen3-Next's rows fell
  further, 1.73 in full, 0.35-0.37 with LoRA; the three packs' losses before training differ by < 0.02);
- the Hugging Face export finite and loaded by transformers (`AutoModelForImageTextToText`, `AutoModelForCausalLM`
  for a text-only family); for LoRA rows also the PEFT adapter, loaded by `peft.PeftModel.from_pretrained` onto the
  transformers base model;
- rows marked `resume`: the checkpoint of step STEPS - 1 resumed for one step gives the uninterrupted run's last
  loss within RESUME_RTOL. The resumed step repeats the same operations on the same restored weights, optimizer
  state and pack, so it is bitwise the same in fp32 and in both bf16 modes (bf16-mixed restores the fp32 masters,
  bf16-true the bf16 weights it trained; seen bitwise on all 9 rows that resumed when this was written, and on
  Qwen3-Next's); the 1e-6 only allows for a reduction order that a restored process might pick differently. Every
  1-process row resumes, and so do one row of ep=2 and two of cp=2 (one with LoRA: its distributed checkpoint holds
  the adapters only).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rank_launcher import launch_ranks
from safetensors.torch import load_file
from test_app_common import write_small_dataset, write_text_dataset

import cli
from qmoe_lightning.models.registry import family_of

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
LR = 1e-2
RESUME_RTOL = 1e-6
LORA = json.dumps(dict(rank=4, alpha=8, expert_rank=2))  # default targets: experts included in every family

FACTORS = {
    "family": ("qwen3_5_moe", "qwen3_vl_moe", "qwen3_moe", "qwen3_next"),
    "precision": ("32-true", "bf16-mixed", "bf16-true"),
    "mode": ("full", "lora"),
    "layout": ("1", "ep2", "cp2"),
    "extras": ("none", "mtp", "ac", "bias"),
}


@dataclass(frozen=True)
class Row:
    family: str
    precision: str
    mode: str
    layout: str
    extras: tuple[str, ...] = ()
    resume: bool = False

    @property
    def id(self) -> str:
        fam = {"qwen3_5_moe": "q35", "qwen3_vl_moe": "vl", "qwen3_moe": "q3", "qwen3_next": "qn"}[self.family]
        return "-".join([fam, self.precision, self.mode, self.layout, "+".join(self.extras) or "none"])

    def values(self) -> list[tuple[str, str]]:
        """(factor, value) of the row; one ("extras", e) per extra switched on, ("extras", "none") without."""
        own = [(f, getattr(self, f)) for f in ("family", "precision", "mode", "layout")]
        return own + [("extras", e) for e in (self.extras or ("none",))]


Q35, VL, Q3, QN = "qwen3_5_moe", "qwen3_vl_moe", "qwen3_moe", "qwen3_next"
# families whose rows train on the text dataset (no vision tower), and those with an MTP module, as registered
TEXT_ONLY = tuple(f for f in FACTORS["family"] if not family_of(f).has_vision)
WITH_MTP = tuple(f for f in FACTORS["family"] if family_of(f).supports_mtp)
ROWS = [
    # 1 process
    Row(Q35, "bf16-mixed", "full", "1", (), resume=True),  # `cli.py fit --config configs/tiny.yaml` in bf16-mixed
    Row(Q35, "bf16-mixed", "lora", "1", ("mtp",), resume=True),
    Row(Q35, "bf16-true", "full", "1", ("mtp",), resume=True),
    Row(Q35, "32-true", "full", "1", ("ac",), resume=True),
    Row(Q35, "32-true", "lora", "1", ("bias",), resume=True),
    Row(VL, "bf16-mixed", "lora", "1", (), resume=True),
    Row(VL, "bf16-true", "lora", "1", ("ac",), resume=True),
    Row(Q3, "32-true", "full", "1", ("ac",), resume=True),
    Row(Q3, "bf16-mixed", "lora", "1", (), resume=True),
    Row(QN, "32-true", "lora", "1", ("mtp", "bias"), resume=True),
    # ep=2
    Row(Q35, "32-true", "lora", "ep2", ("mtp",)),
    Row(VL, "bf16-mixed", "full", "ep2", ("ac", "bias"), resume=True),
    Row(Q3, "bf16-true", "full", "ep2", ()),
    Row(QN, "bf16-mixed", "lora", "ep2", ("ac",)),
    # cp=2
    Row(VL, "32-true", "lora", "cp2", ()),
    Row(Q35, "bf16-mixed", "full", "cp2", ("mtp", "ac"), resume=True),
    Row(Q3, "bf16-true", "lora", "cp2", ("bias",), resume=True),
    Row(QN, "bf16-true", "full", "cp2", ()),
]


def _allowed(a: tuple[str, str], b: tuple[str, str]) -> bool:
    # MTP: only the families with an MTP module
    return not any({a, b} == {("family", f), ("extras", "mtp")} for f in FACTORS["family"] if f not in WITH_MTP)


def test_rows_cover_every_pair():
    wanted = {frozenset([(fa, va), (fb, vb)])
              for fa, fb in itertools.combinations(FACTORS, 2)
              for va in FACTORS[fa] for vb in FACTORS[fb] if _allowed((fa, va), (fb, vb))}
    covered = set()
    for row in ROWS:
        assert row.family in WITH_MTP or "mtp" not in row.extras, row.id
        for value in row.values():
            assert value[1] in FACTORS[value[0]], (row.id, value)
        covered |= {frozenset(p) for p in itertools.combinations(row.values(), 2) if p[0][0] != p[1][0]}
    missing = sorted(tuple(sorted(p)) for p in wanted - covered)
    assert not missing, missing
    assert len({r.id for r in ROWS}) == len(ROWS)
    # multi-process rows at their floor: every multi-process layout meets every family and every precision
    floor = max(len(FACTORS["family"]), len(FACTORS["precision"]))
    for layout in ("ep2", "cp2"):
        assert sum(r.layout == layout for r in ROWS) == floor


# ------------------------------------------------------------------------------------------------ running a row


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The data (written once), one data cache shared by the rows, one torch thread for the in-process fits."""
    base = tmp_path_factory.mktemp("matrix")
    data = {"multimodal": write_small_dataset(base / "data"), "text": write_text_dataset(base / "text")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base, data
    torch.set_num_threads(threads)


def _callbacks(row: Row) -> str:
    cbs = [{"class_path": "ep_test_callbacks.RecordStepLosses"},
           {"class_path": "callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": STEPS - 1, "save_top_k": -1}},
           {"class_path": "callbacks.HFExport"}]
    if row.mode == "lora":
        cbs.append({"class_path": "callbacks.LoraExport"})
    return json.dumps(cbs)


def _args(row: Row, root: Path, data: Path, cache: Path) -> list[str]:
    config = {"1": "tiny.yaml", "ep2": "tiny_ep.yaml", "cp2": "tiny_cp.yaml"}[row.layout]
    args = ["--config", str(ROOT / "configs" / config), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(STEPS), "--trainer.precision", row.precision,
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.callbacks", _callbacks(row),
            "--data.train_path", str(data), "--data.val_path", str(data), "--data.max_tokens", "256",
            "--data.num_workers", "0", "--data.cache_dir", str(cache),
            "--model.lr", str(LR), "--model.warmup_steps", "0"]
    if row.family != Q35:
        args += ["--model.pretrained", f"embedded:{row.family}"]
    if row.mode == "lora":
        args += ["--model.lora", LORA]
    if "mtp" in row.extras:
        args += ["--model.mtp", json.dumps({"enabled": True})]
    if "bias" in row.extras:
        args += ["--model.router_balancing", "bias"]
    if "ac" in row.extras:
        where = "model" if row.layout == "1" else "trainer.strategy"
        args += [f"--{where}.activation_checkpointing", "true"]
    return args


def _fit(row: Row, root: Path, data: dict[str, Path], cache: Path, *extra: str) -> dict[int, float]:
    """One fit of `row` into `root` (+ extra arguments); -> {step: train loss} of the steps it ran."""
    rows = data["text" if row.family in TEXT_ONLY else "multimodal"]
    args = [*_args(row, root, rows, cache), *extra]
    if row.layout == "1":
        cli.main(["fit", *args])
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
        proc = launch_ranks(["fit", *args], 2, env=env)
        assert proc.returncode == 0, f"{row.id}: exit {proc.returncode}\n{proc.stderr[-5000:]}"
    steps = json.loads((root / "step_losses.json").read_text())["steps"]
    return {int(k): v for k, v in steps.items()}


def _check_export(row: Row, root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if row.family in TEXT_ONLY else AutoModelForImageTextToText
    export = root / "hf_export"
    tensors = {}
    for f in sorted(export.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"{row.id}: no export in {export}"
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{row.id}: non-finite exported tensors {bad[:5]}"
    model = auto.from_pretrained(export)
    assert all(torch.isfinite(p).all() for p in model.parameters()), row.id
    if row.mode == "lora":
        from peft import PeftModel

        from qmoe_lightning.embedded.builder import ensure_embedded_model

        base_dir = ensure_embedded_model(row.family)
        adapted = PeftModel.from_pretrained(auto.from_pretrained(base_dir),
                                            str(root / "hf_adapter"))
        lora = {n: p for n, p in adapted.named_parameters() if "lora_" in n}
        assert lora and all(torch.isfinite(p).all() for p in lora.values()), row.id
        assert any("experts" in n for n in lora), f"{row.id}: no expert adapter in the PEFT export"


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=pytest.mark.slow if r.layout == "1" else
                                              pytest.mark.multiprocess) for r in ROWS])
def test_row(row, workspace):
    base, data = workspace
    root, cache = base / row.id, base / "cache"
    losses = _fit(row, root, data, cache)
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert losses[STEPS] < losses[1], f"{row.id}: the loss did not fall: {losses}"
    _check_export(row, root)
    if row.resume:
        ckpt = sorted((root / "checkpoints").glob(f"*step={STEPS - 1}*"))
        assert len(ckpt) == 1, list((root / "checkpoints").iterdir())
        resumed = _fit(row, base / f"{row.id}-resumed", data, cache, "--ckpt_path", str(ckpt[0]))
        assert list(resumed) == [STEPS], resumed
        assert abs(resumed[STEPS] - losses[STEPS]) <= RESUME_RTOL * abs(losses[STEPS]), (resumed, losses)
