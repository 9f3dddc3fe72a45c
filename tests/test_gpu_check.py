"""The one-call GPU check (bench/gpu/check.py) in its CPU --dry-run mode: every step and every code path that does not
need CUDA runs here, so the script a GPU session runs in its single device call cannot rot unnoticed. Plus the
negative controls: a step that raises and a step that hangs past its budget are recorded, and the steps after them
still report."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu" / "check.py"
STEPS = {"facts", "parity", "cp_kernels", "fit", "bench", "kernels", "memory"}


def run_check(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    path = out / "gpu_check.json"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_dry_run_reports_every_section_with_finite_figures(tmp_path):
    proc, report = run_check(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report["mode"] == "dry_run"
    assert report["failures"] == [], report["failures"]
    assert report["spy_not_found"] == []  # every function the kernel-path spy wraps still exists
    assert set(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step.get("error"), step["result"].get("errors"))
        values = list(numbers(step["result"]))
        assert values and all(math.isfinite(v) for v in values), name

    parity = report["steps"]["parity"]["result"]
    for family, tiny in FAMILIES.items():  # every registered family, text-only included
        vision = tiny.has_vision
        for dtype in ("fp32", "bf16"):
            entry = parity[f"{family}/{dtype}"]
            assert set(entry["cases"]) == ({"text", "image", "video"} if vision else {"text"})
            assert entry["within_tolerance"], (family, dtype, entry["max_abs_logit_diff"])
            packed = entry["packed"]
            assert packed["documents"] == (5 if vision else 6) and packed["tokens"] > 0
            if dtype == "fp32":  # CPU fp32 is the tests' tight parity
                assert entry["max_abs_logit_diff"] <= 1e-4 and packed["max_abs_logit_diff_vs_native_alone"] <= 1e-4
        assert parity[f"{family}/fp32"]["paths"]["attention"] != "none"
    assert parity["qwen3_5_moe/fp32"]["paths"]["delta_rule"] == "torch"  # no fla on CPU

    cpk = report["steps"]["cp_kernels"]["result"]  # context parallelism's kernel calls vs fp64, fp32 on CPU
    assert cpk["dtype"] == "fp32" and cpk["errors"] == []
    assert cpk["within_tolerance"] and cpk["out_of_tolerance"] == [], cpk["out_of_tolerance"]
    assert cpk["paths"] == {"attention": ["sdpa"], "delta_rule": ["torch"]} and cpk["paths_as_expected"]
    attention = cpk["attention"]["D16"]
    assert attention["whole_row"]["rel_err"] <= 1e-5
    for cp in (2, 4):
        entry = attention[f"cp{cp}/model_path"]
        assert entry["path"] == "sdpa" and len(entry["per_rank"]) == cp, entry
        assert entry["within_tolerance"] and entry["rel_err"] <= 1e-5 and entry["max_abs_err"] <= 1e-5
        assert entry["max_abs_diff_vs_whole_row_same_dtype"] <= 1e-5
    assert max(r["segments"] for r in attention["cp4/model_path"]["per_rank"]) > 1  # segments cut at slice edges
    assert attention["negative_control_upper_left_rel_err"] > 0.1  # the comparison sees a causal misalignment
    delta = cpk["delta_rule"]
    for case in ("packed_with_state", "wide_values", "transition"):
        assert delta[case]["path"] == "torch"
        for part in ("out", "final_state", "final_state_B", "final_state_M"):
            if part in delta[case] and "within_tolerance" in delta[case][part]:
                assert delta[case][part]["within_tolerance"] and delta[case][part]["rel_err"] <= 1e-4, (case, part)
    assert delta["packed_with_state"]["documents"] == 5 and delta["wide_values"]["value_width"] == 2 * delta["dv"]
    assert "out" not in delta["transition"] and delta["transition"]["documents"] == 1
    assert delta["affine_carry"]["rel_err"] <= 1e-4 and delta["affine_carry"]["m_s0_share"] > 1e-2
    assert min(delta["packed_with_state"]["initial_state_effect"].values()) > 0.1  # the state is seen
    for case in ("packed_with_state", "transition"):
        grads = delta["gradients"][case]
        assert grads["within_tolerance"] and grads["rel_err"] <= 1e-4, grads
    assert "initial_state" in delta["gradients"]["packed_with_state"]

    fit = report["steps"]["fit"]["result"]
    assert fit["returncode"] == 0 and fit["steps_logged"] == 2
    assert fit["tokens_per_s_median_last10"] > 0 and len(fit["last_losses"]) == 2

    bench = report["steps"]["bench"]["result"]
    assert set(bench["summary"]) == {"1024", "2048"}
    for row, s in bench["summary"].items():
        assert s["native_tokens_per_s"] > 0 and s["native_mfu"] > 0 and s["native_peak_memory_gib"] > 0
        assert s["speedup_vs_transformers_padded"] > 0 and s["speedup_vs_transformers_packed_leaky"] > 0
        assert s["ce_diff_native_packed_vs_transformers_padded"] < 1e-2  # bf16, same weights, same documents
        assert bench["variants"][f"native_packed/{row}"]["tokens"] == int(row)
    assert all(v != "none" for v in bench["paths"].values()), bench["paths"]  # the spy saw every op
    assert bench["transformers_load"] == {"missing": [], "unexpected": []}
    assert bench["profile"]["top"] and bench["profile"]["total_ms"] > 0

    memory = report["steps"]["memory"]["result"]  # the planner against the same step run for real (CPU here)
    assert memory["precision"] == "32-true" and memory["paths"]["delta_rule"] == "torch"
    assert abs(memory["measured_over_planned"] - 1) <= 0.15, memory
    assert report["summary"]["memory"]["measured_over_planned"] == memory["measured_over_planned"]

    kernels = report["steps"]["kernels"]["result"]
    for op in ("delta_rule", "causal_conv", "attention", "experts_gate_up"):
        assert len(kernels[op]) >= 2 and all(v["fwd_bwd_ms"] > 0 for v in kernels[op].values()), op
    assert kernels["delta_rule"]["model_path"]["max_abs_diff_vs_torch_reference"] == 0  # same path on CPU

    assert set(report["summary"]) == {"parity", "cp_kernels", "fit", "bench", "bench_paths", "memory", "disabled_paths"}
    assert report["summary"]["cp_kernels"]["within_tolerance"] is True
    assert report["disabled_paths"] == []
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f"== {name}" in log for name in STEPS)
    assert (tmp_path / "out" / "fit.log").exists()


@pytest.mark.slow
def test_a_failing_and_a_hanging_step_are_recorded_and_later_steps_still_report(tmp_path):
    """Negative controls: parity raises at its start, fit hangs past a 2 s budget (the alarm must end it: on the device
    a hang would otherwise eat the whole call); facts before them and kernels after them still give figures."""
    proc, report = run_check(tmp_path / "out", "--only", "facts,parity,fit,kernels", "--fail-step", "parity,fit:hang",
                             "--step-budget", "fit=2")
    assert proc.returncode == 1
    steps = report["steps"]
    assert steps["parity"]["status"] == "error" and "injected failure" in steps["parity"]["error"]
    assert steps["fit"]["status"] == "timeout" and steps["fit"]["seconds"] < 30
    assert [f["step"] for f in report["failures"]] == ["parity", "fit"]
    assert "bench" not in steps
    for name in ("facts", "kernels"):
        assert steps[name]["status"] == "ok", steps[name].get("error")
        assert all(math.isfinite(v) for v in numbers(steps[name]["result"]))
    assert steps["kernels"]["result"]["attention"]["model_path"]["fwd_bwd_ms"] > 0


def test_rows_are_exact_and_padded_micro_batches_respect_their_cap():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for total in (1024, 4096, 16384):
        lengths = check.row_lengths(total)
        assert sum(lengths) == total and len(lengths) > 1 and min(lengths) > 0
        groups = check._slot_groups(lengths, total)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) * max(lengths[i] for i in g) <= total for g in groups)


def test_cp_kernels_flags_a_causal_misalignment_and_an_ignored_initial_state(monkeypatch):
    """Negative control of the cp_kernels step, in process on CPU: upper-left causal masks for the segments whose keys
    start on an earlier rank, and a delta rule that drops its initial state, must both come out of tolerance."""
    import time

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    ctx = {"device": torch.device("cpu"), "mode": "dry_run", "fla_visible": False,
           "step_deadline": time.monotonic() + 60}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as check.py's dry run: tiny ops, OpenMP on a shared 2-core machine is 10x slower
    try:
        _cp_kernels_negative_control(check, ctx, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _cp_kernels_negative_control(check, ctx, monkeypatch):
    import torch.nn.functional as F

    from qmoe_lightning.models import context_parallel, kernels

    res: dict = {}
    check.step_cp_kernels(res, ctx)  # unpatched: within tolerance
    assert res["within_tolerance"] and res["errors"] == [], res["errors"]

    def upper_left(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    stateless = kernels.chunk_gated_delta_rule_with_state
    monkeypatch.setattr(context_parallel, "lower_right_causal_attention", upper_left)
    monkeypatch.setattr(kernels, "chunk_gated_delta_rule_with_state",
                        lambda q, k, v, g, beta, layout, initial_state=None, output_final_state=False:
                        stateless(q, k, v, g, beta, layout, None, output_final_state))
    res = {}
    check.step_cp_kernels(res, ctx)
    assert not res["within_tolerance"]
    bad = set(res["out_of_tolerance"])
    assert {"attention/D16/cp2/model_path", "attention/D16/cp4/model_path"} <= bad, bad
    assert {"delta_rule/packed_with_state/out", "delta_rule/packed_with_state/final_state",
            "delta_rule/wide_values/final_state", "delta_rule/transition/final_state_M",
            "delta_rule/affine_carry", "delta_rule/gradients/packed_with_state"} <= bad, bad
    assert res["attention"]["D16"]["whole_row"]["rel_err"] <= 1e-5  # the whole row does not cross slices


@pytest.mark.gpu
def test_the_check_on_this_gpu(tmp_path):
    """`pytest -m gpu` on a CUDA machine: the real check as `bash bench/gpu/run.sh` runs it (skipped without a GPU,
    conftest). Every step ends ok with finite figures, and parity (fp32 and bf16, both families, packed rows) and the
    context-parallel kernel calls are within their tolerances."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0 and report["failures"] == [], (report["failures"], proc.stderr[-3000:])
    assert report["mode"] != "dry_run" and set(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step.get("error"))
        assert all(math.isfinite(v) for v in numbers(step["result"])), name
    parity = report["steps"]["parity"]["result"]
    assert all(parity[f"{family}/{dtype}"]["within_tolerance"]
               for family in FAMILIES for dtype in ("fp32", "bf16")), parity
    assert report["summary"]["cp_kernels"]["within_tolerance"] is True
