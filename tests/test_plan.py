"""The memory planner (`python -m qmoe_lightning.plan`): its prediction against each rank's measured peak on the tiny
recipes, its extrapolation in depth against planning every layer, its forced routing and count exchange, every
shipped GPU recipe planned and fitting its GPUs, and its errors.

The measured side is a real `cli.py fit` of the recipe (three steps, 1 / 2 / 4 processes) with
`callbacks.StepMemoryProbe`: the CPU allocator's events during one step plus what lives across steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qmoe_lightning.plan.__main__ import HEADER_START, main as plan_main, update_header
from qmoe_lightning.plan.fake_runtime import forced_indices
from qmoe_lightning.plan.plan import GiB, plan_recipe, planning_depths
from qmoe_lightning.plan.recipe import read_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GPU_RECIPES = sorted(p.name for p in CONFIGS.glob("qwen*.yaml"))


_MEASURED: dict = {}


def _measured_against_plan(config: str, world: int, **override) -> tuple[list[int], list[int]]:
    """(planned, measured) peak bytes per rank; the real run goes on while the plan is computed, and is reused by
    another test of the same recipe and world size."""
    from qmoe_lightning.plan.measure import MeasuringRun, measured_batch_index

    run = None if (config, world) in _MEASURED else MeasuringRun(str(CONFIGS / config), world)
    recipe = read_recipe(CONFIGS / config, world)
    recipe.model.update(override)
    plan = plan_recipe(recipe, skew=None, batch="data",
                       batch_index=measured_batch_index(recipe.accumulate_grad_batches))
    if run is not None:
        _MEASURED[config, world] = run.peaks()
    return plan["peak_bytes_per_rank"], _MEASURED[config, world]


@pytest.mark.multiprocess
@pytest.mark.parametrize("config,world", [("tiny.yaml", 1), ("tiny_lora.yaml", 1), ("tiny_ep.yaml", 2),
                                          ("tiny_ep.yaml", 4), ("tiny_cp.yaml", 2)])
def test_plan_agrees_with_the_measured_peak_of_every_rank(config, world):
    planned, measured = _measured_against_plan(config, world)
    assert len(planned) == len(measured) == world
    ratios = [m / p for m, p in zip(measured, planned)]
    assert all(abs(r - 1) <= 0.15 for r in ratios), (planned, measured, ratios)


@pytest.mark.slow
def test_a_bf16_mixed_plan_runs_the_step_under_autocast_and_agrees(tmp_path):
    """bf16-mixed: the planned step runs under autocast as Lightning's precision plugin runs it (bf16 activations:
    below the fp32 plan of the same recipe) and agrees with the measured peak."""
    import yaml

    from qmoe_lightning.plan.measure import MeasuringRun, measured_batch_index

    spec = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    spec["trainer"]["precision"] = "bf16-mixed"
    path = tmp_path / "tiny_bf16_mixed.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = MeasuringRun(str(path), 1)
    index = measured_batch_index(1)
    mixed = plan_recipe(read_recipe(path), skew=None, batch="data", batch_index=index)
    fp32 = plan_recipe(read_recipe(CONFIGS / "tiny.yaml"), skew=None, batch="data", batch_index=index)
    measured = run.peaks()[0]
    assert mixed["by_category_bytes"]["activations"] < fp32["by_category_bytes"]["activations"]
    assert abs(measured / mixed["peak_bytes_per_rank"][0] - 1) <= 0.15, (mixed["peak_bytes_per_rank"], measured)


@pytest.mark.slow
def test_a_plan_of_another_configuration_does_not_agree():
    """Negative control: planned with activation checkpointing, measured without, the comparison must fail."""
    planned, measured = _measured_against_plan("tiny.yaml", 1, activation_checkpointing=True)
    assert measured[0] / planned[0] > 1.15, (planned, measured)


def _deep_recipe(tmp_path: Path, layers: int) -> Path:
    from tiny_configs import BASE_TEXT

    spec = dict(BASE_TEXT, model_type="qwen3_5_moe_text", num_hidden_layers=layers,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 4))
    path = tmp_path / "deep.yaml"
    path.write_text(json.dumps({
        # planned for CUDA (no GPU needed): the Gated DeltaNet as fla's kernel keeps it, seconds faster per layer
        "trainer": {"accelerator": "gpu", "devices": 2, "precision": "bf16-true", "gradient_clip_val": 1.0,
                    "strategy": {"class_path": "qmoe_lightning.parallel.strategy.ExpertParallelStrategy",
                                 "init_args": {"ep_size": 2, "activation_checkpointing": True}}},
        "model": {"pretrained": None, "model_config": spec, "text_only": True},
        "data": {"max_tokens": 256, "pad_to_multiple_of": 64}}))
    return path


@pytest.mark.slow
def test_depth_extrapolation_equals_planning_every_layer(tmp_path):
    """Planned at two depths one layer period apart and continued linearly == planned at the full depth."""
    recipe = read_recipe(_deep_recipe(tmp_path, 12))
    from qmoe_lightning.plan.recipe import model_config

    assert planning_depths(model_config(recipe)) == (4, 8)  # Qwen3.5's period: 3 Gated DeltaNet + 1 attention
    extrapolated = plan_recipe(recipe, batch="synthetic", skew=None)
    full = plan_recipe(recipe, batch="synthetic", skew=None, full_depth=True)
    assert extrapolated["planned_layers"] == [4, 8] and full["planned_layers"] == [12]
    for key in ("all_to_all_bytes_per_micro_batch",):
        assert extrapolated[key] == pytest.approx(full[key], rel=0.01), key
    assert extrapolated["peak_bytes_per_rank"][0] == pytest.approx(full["peak_bytes_per_rank"][0], rel=0.01)
    for cat, value in full["by_category_bytes"].items():
        assert extrapolated["by_category_bytes"][cat] == pytest.approx(value, rel=0.02, abs=2 ** 16), cat


@pytest.mark.parametrize("tokens,experts,k", [(64, 8, 2), (100, 16, 4), (7, 4, 3)])
def test_forced_routing_is_balanced_or_skewed_as_asked(tokens, experts, k):
    balanced = forced_indices(tokens, experts, k)
    counts = torch.bincount(balanced.flatten(), minlength=experts)
    assert counts.max() - counts.min() <= 1
    assert all(len(set(row.tolist())) == k for row in balanced)  # a token never picks one expert twice
    skewed = forced_indices(tokens, experts, k, hot_factor=2.0)
    hot = torch.bincount(skewed.flatten(), minlength=experts)
    share = tokens * k / experts
    assert hot[0] == pytest.approx(min(2 * share, tokens), abs=1.0)  # at most once per token
    assert hot.sum() == tokens * k
    assert all(len(set(row.tolist())) == k for row in skewed)


def _plan_shipped(recipe: str) -> dict:
    return plan_recipe(read_recipe(CONFIGS / recipe), gpu_memory_gb=80, margin=0.1, skew=None, batch="synthetic")


@pytest.mark.slow
def test_every_shipped_recipe_fits_its_gpus_and_its_header_is_current():
    """Every GPU recipe planned at its real shapes on a fake process group of its world size (two worker processes):
    it fits 80 GiB with the 10 % margin, and the recipe's header carries the planner's table with the current peak
    (within 2 %; regenerate with `python -m qmoe_lightning.plan --config <recipe> --update_header`)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        plans = dict(zip(GPU_RECIPES, pool.map(_plan_shipped, GPU_RECIPES)))
    problems = []
    for recipe, plan in plans.items():
        header = (CONFIGS / recipe).read_text()
        peak = max(plan["peak_bytes_per_rank"]) / GiB
        stated = re.search(r"#\s+peak\s+([0-9.]+)", header)
        if not plan["fits"]:
            problems.append(f"{recipe}: planned peak {peak:.2f} GiB > {plan['limit_bytes'] / GiB:.2f} GiB")
        if HEADER_START not in header or stated is None:
            problems.append(f"{recipe}: no planned table in its header")
        elif abs(float(stated.group(1)) / peak - 1) > 0.02:
            problems.append(f"{recipe}: its header says a peak of {stated.group(1)} GiB, the plan {peak:.2f} GiB")
    assert not problems, "\n".join(problems)


def test_cli_errors_name_the_file_and_what_was_expected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {devices: 2}\n")
    with pytest.raises(SystemExit):
        plan_main(["--config", str(bad)])
    assert "bad.yaml" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("trainer: {devices: 2, strategy: ddp}\nmodel: {pretrained: embedded}\n")
    with pytest.raises(SystemExit):
        plan_main(["--config", str(other)])
    assert "ExpertParallelStrategy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plan_main(["--config", str(CONFIGS / "qwen3_5_35b_a3b_ep8_8xh100.yaml"), "--measure"])
    assert "GPU recipe" in capsys.readouterr().err


def test_an_unknown_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    path = tmp_path / "r.yaml"
    path.write_text("trainer: {devices: 1}\nmodel: {pretrained: someone/unknown-moe}\n")
    from qmoe_lightning.plan.recipe import model_config

    with pytest.raises(FileNotFoundError, match="someone/unknown-moe.*config.json"):
        model_config(read_recipe(path))


@pytest.mark.slow
def test_cli_prints_the_table_and_one_json_line_last_and_skew_grows_what_the_hot_rank_receives(capsys):
    assert plan_main(["--config", str(CONFIGS / "tiny_ep.yaml"), "--batch", "synthetic", "--skew", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(out[-1])
    assert plan["world_size"] == 2 and len(plan["peak_bytes_per_rank"]) == 2 and plan["fits"] is True
    assert any(line.startswith("peak") for line in out) and out[0].startswith("Qwen3_5Moe (4 layers); 2 rank(s)")
    # balanced: every rank receives what it sends; skewed, the dispatch brings rank 0 about 1.2x (the combine
    # returns what it sent), and its peak grows
    assert plan["skew"] == 2.0
    assert plan["skewed_all_to_all_received_bytes_per_micro_batch"] > 1.05 * plan["all_to_all_bytes_per_micro_batch"]
    assert plan["skewed_peak_bytes"] > plan["peak_bytes_per_rank"][0]


def _plan_dict(peak: int) -> dict:
    cats = dict(parameters=peak // 2, gradients=0, optimizer_state=peak // 4, activations=peak // 4,
                communication_buffers=0, fused_ce_buffers=0)
    return {"model": "M (4 layers)", "layout": "2 rank(s)", "batch": "synthetic", "planned_layers": [4], "skew": None,
            "by_category_bytes": cats, "skewed_by_category_bytes": cats, "peak_bytes_per_rank": [peak, peak],
            "skewed_peak_bytes": peak, "all_to_all_bytes_per_micro_batch": 0, "gpu_memory_gb": 80, "margin": 0.1,
            "limit_bytes": int(72 * GiB), "fits": True, "headroom_bytes": int(72 * GiB) - peak}


def test_update_header_replaces_the_marker_then_its_own_table_and_keeps_the_yaml(tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text("# my recipe\n# @PLANNED_TABLE@\n# launch: cli.py fit\ntrainer:\n  devices: 2  # two\n")
    before = yaml.safe_load(path.read_text())
    update_header(path, _plan_dict(3 * GiB))
    update_header(path, _plan_dict(5 * GiB))
    text = path.read_text()
    assert text.count(HEADER_START) == 1 and "@PLANNED_TABLE@" not in text
    assert re.search(r"#\s+peak\s+5\.00", text) and not re.search(r"#\s+peak\s+3\.00", text)
    assert text.startswith("# my recipe\n") and "# launch: cli.py fit\ntrainer:\n  devices: 2  # two\n" in text
    assert yaml.safe_load(text) == before
