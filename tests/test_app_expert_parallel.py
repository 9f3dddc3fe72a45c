"""Acceptance of expert parallelism through the real application: `cli.py fit --config configs/tiny_ep.yaml`,
launched by Lightning on CPU processes (gloo), against one process accumulating the same packs.

- 2 processes (ep=2, efsdp=1) vs 1 process with accumulate_grad_batches=2: the sampler gives the two ranks of step
  s the same two packs the single process accumulates at step s;
- 4 processes (ep=2 x expert-FSDP 2, and HSDP: replicate 2 x ep=2) vs accumulate_grad_batches=4, likewise;
- LoRA on attention, linear attention, shared and routed experts (the EP run crashed after step 3 and resumed
  from its adapter-only distributed checkpoint): same merged export and PEFT adapter;
- crash after step 3 (an exception on every rank, checkpoint of step 2 on disk) and `--ckpt_path last`: the
  continuation ends bitwise where the uninterrupted run ends (distributed checkpoint with expert global views,
  optimizer state, sampler position).

How "equal" is decided, so that the checks are decisive and stable at once:
1. Gradients, tightly. The first GRAD_STEPS steps' gradients, after the global token normalisation and before
   clipping (`ep_test_callbacks.DumpGradients`), must match per tensor within GRAD_TOL of the tensor's scale (its
   largest element, floored at GRAD_FLOOR of the step's largest gradient: a tensor whose gradient cancels to ~1e-7,
   such as one layer's A_log / dt_bias, has only rounding noise left, 6e-4 of itself at 4 processes), and every
   element within GRAD_ATOL. fp32 reduction order (all-to-all, reduce-scatter vs one process summing micro-batches)
   moves them by <= ~1e-5 of the scale and ~1e-7 absolute; a scaling bug (experts divided once too often or not at
   all, a missing world-size factor) moves a tensor by >= 0.5 of its scale. Clipping and AdamW would
   hide exactly such a bug in the weights (a 2x gradient gives the same clipped, sign-like Adam step).
2. Weights after STEPS AdamW steps with clipping, within a bound derived from the optimizer: Adam's update
   g / (sqrt(v) + eps) changes by at most |dg| / eps for a gradient change dg, so STEPS steps of lr move a weight by
   at most STEPS * lr * |dg| / eps. With the recipes' eps=1e-8 that is ~lr for ANY reordering of a near-zero
   gradient element (one run failed 2.37e-5 against a 1e-5 bound that way), so these runs use eps=EPS=1e-3 and
   the bound `weight_bound(lr)` from the absolute gradient tolerance (1.6e-5; seen ~1e-8). It catches what
   gradients at the first steps cannot: optimizer state, schedules, resume and data order (bugs move weights ~lr).
Negative control: the ep=2 run's gradients with the experts' halved (the HSDP double-division bug) must fail the
gradient check. The one-process reference runs run in the test process (`cli.main`), the multi-process ones as
`python cli.py` launched by Lightning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rank_launcher import launch_ranks
from safetensors.torch import load_file

from qmoe_lightning.models.registry import FAMILIES

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
GRAD_STEPS = 2  # optimizer steps whose (unclipped, normalised) gradients are saved and compared
EPS = 1e-3  # AdamW eps of these runs (the recipes: 1e-8); see the module doc
GRAD_TOL = 2e-4  # per tensor, relative to its scale (noise seen: <= 1e-5; a scaling bug: >= 0.5)
GRAD_FLOOR = 1e-3  # a tensor's scale: max(its largest |g|, GRAD_FLOOR * the step's largest |g| over all tensors)
GRAD_ATOL = 1e-6  # any element, absolute (noise seen: <= 7.5e-8, on gradients up to ~0.6), for weight_bound
LR = 4e-3  # configs/tiny_ep.yaml
LORA = json.dumps(dict(rank=4, alpha=8, dropout=0.0, targets=["attention", "linear_attention", "shared_expert",
                                                               "experts"], expert_rank=2, expert_alpha=4))


def rank_env() -> dict[str, str]:
    """The environment of a multi-process run's ranks: one intra-op thread, the test callbacks importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))


def fit_args(out: Path, devices: int, *extra: str, config: str = "configs/tiny_ep.yaml") -> list[str]:
    """`cli.py` arguments of these runs: STEPS steps, the HF export, the first GRAD_STEPS steps' gradients dumped."""
    return ["fit", "--config", config, "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
            "--trainer.devices", str(devices), "--data.max_tokens", "512", "--data.num_workers", "0",
            "--trainer.callbacks+=callbacks.HFExport", "--model.eps", str(EPS),
            "--trainer.callbacks+=ep_test_callbacks.DumpGradients", "--trainer.callbacks.steps", str(GRAD_STEPS), *extra]


def _fit(out: Path, *extra: str, devices: int = 2, check: bool = True, config: str = "configs/tiny_ep.yaml",
         launcher: str = "together") -> subprocess.CompletedProcess:
    """One `cli.py fit` on `devices` processes. launcher "lightning": `python cli.py` starts the others, as a user
    on one machine does; "together": every rank started at once, as torchrun does (rank_launcher: half the wall
    time of a tiny run, whose imports are most of it)."""
    env = rank_env()
    args = [sys.executable, "cli.py", *fit_args(out, devices, *extra, config=config)]
    if devices == 1:
        args += ["--trainer.strategy", "auto"]
        assert check, "a one-process reference run runs in this process: it must succeed"
        return _fit_in_process(args[2:])
    if launcher == "lightning":
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    else:
        proc = launch_ranks(args[2:], devices, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _fit_in_process(cli_args: list[str]) -> subprocess.CompletedProcess:
    """The one-process reference runs: `cli.main` in this process, as `python cli.py` would run it (from the repository
    root, one intra-op thread as OMP_NUM_THREADS=1 gives the multi-process ranks). A process of its own would prove
    nothing more, and cost an interpreter start with every import (most of a tiny run's time)."""
    import cli

    cwd, threads, argv = os.getcwd(), torch.get_num_threads(), sys.argv
    os.chdir(ROOT)
    torch.set_num_threads(1)
    sys.argv = ["cli.py", *cli_args]
    try:
        cli.main(cli_args)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        sys.argv = argv
    return subprocess.CompletedProcess(cli_args, 0, "", "")


def _weights(run: Path, sub: str = "hf_export") -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / sub).glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no export in {run / sub}"
    return out


def _compare(a: dict, b: dict, tol: float) -> float:
    """max over tensors of max |a - b| / max(1, max |b|) (weights), asserted <= tol."""
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1.0)).item() for k in a)
    assert worst <= tol, worst
    return worst


def weight_bound(lr: float) -> float:
    """Largest weight difference that gradients within GRAD_ATOL can explain after STEPS AdamW steps (module doc):
    STEPS * lr * |dg| / eps (1.6e-5 at lr 4e-3; seen: ~1.5e-8; a bug in state, schedule or data order: ~lr)."""
    return STEPS * lr * GRAD_ATOL / EPS


def _compare_gradients(run: Path, ref: Path) -> float:
    """Per-tensor max |g - g_ref| / max |g_ref| over the first GRAD_STEPS steps, asserted <= GRAD_TOL; and every
    element within GRAD_ATOL (the premise of weight_bound)."""
    worst, absolute = {}, 0.0
    for step in range(GRAD_STEPS):
        got = torch.load(run / f"grads_step{step}.pt")
        want = torch.load(ref / f"grads_step{step}.pt")
        assert got.keys() == want.keys() and any(".experts." in k for k in want), sorted(set(got) ^ set(want))
        floor = GRAD_FLOOR * max(g.abs().max().item() for g in want.values())
        for k, g in want.items():
            assert got[k].shape == g.shape, (k, got[k].shape, g.shape)
            diff = (got[k] - g).abs().max().item()
            absolute = max(absolute, diff)
            worst[f"{step}:{k}"] = diff / max(g.abs().max().item(), floor)
    # the routed experts really received gradient (the comparison is not 0 == 0)
    assert max(torch.load(ref / "grads_step0.pt")[k].abs().max().item() for k in want if ".experts." in k) > 1e-6
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert top[0][1] <= GRAD_TOL, top
    assert absolute <= GRAD_ATOL, absolute
    return top[0][1]


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    """2-process ep=2 run of STEPS steps with a checkpoint every 2 steps (shared by two tests)."""
    out = tmp_path_factory.mktemp("ep2")
    proc = _fit(out, "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
                "--trainer.callbacks.every_n_train_steps", "2", launcher="lightning")  # as a user runs it
    return out, proc


@pytest.fixture(scope="module")
def single_accumulating_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("single2")
    _fit(out, "--trainer.accumulate_grad_batches", "2", devices=1)
    return out


def test_ep2_equals_one_process_accumulating(ep_run, single_accumulating_2):
    out, proc = ep_run
    assert "FSDPQwen3_5MoeForConditionalGeneration" in proc.stdout + proc.stderr  # really parallelised
    ref = single_accumulating_2
    ep, single = _weights(out), _weights(ref)
    start = _weights_of_embedded()
    moved = max((single[k] - start[k]).abs().max().item() for k in single if k in start)
    assert moved > 1e-3  # the runs trained (the comparison is not start == start)
    grads = _compare_gradients(out, ref)
    worst = _compare(ep, single, weight_bound(LR))
    print(f"ep=2 vs 1 process x accumulate 2: gradients {grads:.2e} (bound {GRAD_TOL:.0e}), weights {worst:.2e} "
          f"(bound {weight_bound(LR):.1e}; moved {moved:.2e})")
    config = json.loads((out / "hf_export" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]


def test_gradient_check_catches_halved_expert_gradients(ep_run, single_accumulating_2, tmp_path):
    """Negative control: the ep=2 run's gradients with the routed experts' halved (what the HSDP double division
    did) must fail the gradient check against the one-process run. The run's dumped gradients are halved: at the
    dump point that is what a halving inside the run gives (exactly at step 0, whose halved gradients alone already
    fail), without a third multi-process run."""
    import re

    out, _ = ep_run
    halved = tmp_path / "halved"
    halved.mkdir()
    for step in range(GRAD_STEPS):
        grads = torch.load(out / f"grads_step{step}.pt")
        torch.save({k: g * 0.5 if ".experts." in k else g for k, g in grads.items()}, halved / f"grads_step{step}.pt")
    _compare_gradients(out, single_accumulating_2)  # the unaltered gradients pass: the control is the halving
    with pytest.raises(AssertionError) as failure:
        _compare_gradients(halved, single_accumulating_2)
    worst_key, worst = re.search(r"\('(\d+:[^']+)', ([0-9.e-]+)\)", str(failure.value)).groups()
    assert ".experts." in worst_key and abs(float(worst) - 0.5) < 1e-3, str(failure.value)


def test_crash_and_resume_continues_the_uninterrupted_run(ep_run, tmp_path):
    out, _ = ep_run
    run = tmp_path / "crash"
    crash = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
             "--trainer.callbacks.every_n_train_steps", "2"]
    proc = _fit(run, *crash, "--trainer.callbacks+=ep_test_callbacks.CrashAtStep",
                "--trainer.callbacks.step", "3", check=False)
    assert proc.returncode != 0 and "CrashAtStep: simulated crash at step 3" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    assert not (run / "hf_export").exists()
    _fit(run, *crash, "--ckpt_path", "last")
    resumed, full = _weights(run), _weights(out)
    assert all(torch.equal(resumed[k], full[k]) for k in full), "resumed run differs from the uninterrupted one"


@pytest.fixture(scope="module")
def single_accumulating_4(tmp_path_factory):
    out = tmp_path_factory.mktemp("single4")
    _fit(out, "--trainer.accumulate_grad_batches", "4", devices=1)
    return _weights(out), out


@pytest.mark.parametrize("replicate", [1, 2], ids=["ep2_x_efsdp2", "hsdp_replicate2_x_ep2"])
def test_four_processes_equal_one_process_accumulating(tmp_path, single_accumulating_4, replicate):
    # replicate=1: expert slices FSDP-sharded over 2 more ranks; replicate=2: HSDP, two replicas of an ep=2 group
    _fit(tmp_path / "ep4", "--trainer.strategy.ep_size", "2", "--trainer.strategy.replicate", str(replicate),
         devices=4)
    # HSDP reduces in two stages (reduce-scatter over efsdp, then all-reduce over replicate): another rounding order,
    # same bounds
    single, ref = single_accumulating_4
    grads = _compare_gradients(tmp_path / "ep4", ref)
    worst = _compare(_weights(tmp_path / "ep4"), single, weight_bound(LR))
    print(f"4 processes (replicate={replicate}, ep=2) vs 1 process x accumulate 4: gradients {grads:.2e}, weights "
          f"{worst:.2e} (bound {weight_bound(LR):.1e})")


def test_ep2_lora_crash_resume_equals_one_process_accumulating(tmp_path):
    # the EP run crashes after step 3 and resumes from its step-2 checkpoint (adapters only + optimizer state)
    lora = ["--model.lora", LORA, "--model.lr", "2e-3", "--trainer.callbacks+=callbacks.LoraExport"]
    ckpt = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
            "--trainer.callbacks.every_n_train_steps", "2"]
    proc = _fit(tmp_path / "ep", *lora, *ckpt, "--trainer.callbacks+=ep_test_callbacks.CrashAtStep",
                "--trainer.callbacks.step", "3", check=False)
    assert proc.returncode != 0 and "simulated crash at step 3" in proc.stderr
    _fit(tmp_path / "ep", *lora, *ckpt, "--ckpt_path", "last")
    _fit(tmp_path / "single", *lora, "--trainer.accumulate_grad_batches", "2", devices=1)
    # gradients of steps 0-1 come from the first (crashed) run: the resume must not touch them
    grads = _compare_gradients(tmp_path / "ep", tmp_path / "single")
    worst = _compare(_weights(tmp_path / "ep"), _weights(tmp_path / "single"), weight_bound(2e-3))
    adapters = _compare(_weights(tmp_path / "ep", "hf_adapter"), _weights(tmp_path / "single", "hf_adapter"),
                        weight_bound(2e-3))
    b = _weights(tmp_path / "ep", "hf_adapter")
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-4  # adapters trained
    print(f"LoRA ep=2 vs 1 process: gradients {grads:.2e}, merged export {worst:.2e}, adapters {adapters:.2e} "
          f"(bound {weight_bound(2e-3):.1e})")


def _weights_of_embedded() -> dict[str, torch.Tensor]:
    from qmoe_lightning.embedded import ensure_embedded_default

    model_dir = ensure_embedded_default().model_dir
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# the registry's text-only families (one entry per family, whatever its model_types)
TEXT_FAMILIES = sorted({f.model_type for f in FAMILIES.values() if not f.has_vision})


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_family_ep2_equals_one_process_accumulating(tmp_path, family):
    """The text-only families (embedded:qwen3_moe: a dense layer among the MoE ones; embedded:qwen3_next: the same
    and Gated DeltaNet layers, a shared expert; they train on the text rows, the image rows counted as skips) through
    the same acceptance: gradients tight, weights within the bound."""
    native = FAMILIES[family].text_only
    model = ("--model.pretrained", f"embedded:{family}")
    ep, single = tmp_path / "ep2", tmp_path / "single"
    proc = _fit(ep, *model)
    assert f"FSDP{native.__name__}" in proc.stdout + proc.stderr  # really parallelised
    _fit(single, *model, "--trainer.accumulate_grad_batches", "2", devices=1)
    grads = _compare_gradients(ep, single)
    worst = _compare(_weights(ep), _weights(single), weight_bound(LR))
    print(f"{family} ep=2 vs 1 process x accumulate 2: gradients {grads:.2e}, weights {worst:.2e}")
    config = json.loads((ep / "hf_export" / "config.json").read_text())
    assert config["architectures"] == [native.HF_ARCHITECTURE] and config["model_type"] == family
