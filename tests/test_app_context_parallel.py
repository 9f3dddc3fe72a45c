"""Acceptance of context parallelism through the real application (`cli.py fit --config configs/tiny_cp.yaml`, gloo
CPU processes) against one process on the same packs, judged as the expert-parallel tests judge (gradients of the
first steps tightly, then the loss of every step and the exported weights; see test_app_expert_parallel.py).

- cp=2 (2 processes) and cp=4 (4 processes) vs 1 process: every rank of the cp group gets the same pack, so the
  data-parallel world is 1 and the single process takes the same pack each step;
- cp=2 x ep=2 on 4 processes, with activation checkpointing and the overlapped expert dispatch, vs 1 process
  accumulating 2 packs per step; that run
  crashes after step 3 and resumes from its distributed checkpoint, and its gathered HF export is what is compared.
- cp=2 with LoRA (attention, linear attention, shared and routed experts) vs 1 process: adapters and merged export;
- cp=2 with Qwen3-VL-MoE (the second family: deepstack, no MTP) vs 1 process.
Every Qwen3.5 run trains the MTP module too; every run validates at its last step and logs the expert-load
statistics: all compared.
Rows are packed without rounding (pad_to_multiple_of 1): their lengths are neither multiples of 64 nor of cp, and
documents (text and image questions) cross the slice boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_app_expert_parallel import LORA, LR, _compare, _compare_gradients, _fit, _weights, weight_bound

pytestmark = pytest.mark.multiprocess

# multi-token prediction on (its attention and shifted embeddings cross the slices too); validation at the last step
# and the expert-load statistics (router outputs of the slices, summed over the ranks) over windows of 2 steps; the
# per-layer aux losses of MoEAuxLossLogger (in tiny_cp.yaml) are compared with them
CP = ["--data.pad_to_multiple_of", "1", "--trainer.callbacks+=ep_test_callbacks.RecordStepLosses",
      "--model.mtp", "{enabled: true}", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "3",
      "--trainer.callbacks+=callbacks.ExpertLoadStats", "--trainer.callbacks.window_steps", "2",
      "--trainer.callbacks.heatmap_every_n_steps", "null"]
LOSS_TOL = 1e-5


def _cp_fit(out: Path, *extra: str, devices: int, check: bool = True, launcher: str = "together"):
    return _fit(out, *CP, *extra, devices=devices, check=check, config="configs/tiny_cp.yaml", launcher=launcher)


def _losses(run: Path, what: str = "steps") -> dict:
    return json.loads((run / "step_losses.json").read_text())[what]


def _compare_losses(run: Path, ref: Path, what: str = "steps") -> float:
    """Every step's train loss (or every validation metric: loss, MTP loss, answer / MTP accuracies)."""
    got, want = _losses(run, what), _losses(ref, what)
    assert got.keys() == want.keys() and len(want) >= 4, (got, want)
    worst = max(abs(got[k] - want[k]) / max(abs(want[k]), 1.0) for k in want)
    assert worst <= LOSS_TOL, (got, want)
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single1")
    _cp_fit(out, devices=1)
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_equals_one_process(single, tmp_path, cp):
    run = tmp_path / f"cp{cp}"
    # cp=2 as a user runs it (Lightning starts the second process), cp=4 as torchrun does
    proc = _cp_fit(run, "--trainer.strategy.cp_size", str(cp), devices=cp,
                   launcher="lightning" if cp == 2 else "together")
    assert f"each packed row split over cp_size={cp} ranks" in proc.stdout + proc.stderr
    grads = _compare_gradients(run, single)
    losses = _compare_losses(run, single)
    val = _compare_losses(run, single, "val")
    assert {"val/mtp_loss", "val/mtp_acceptance", "val/image_acc"} <= set(_losses(run, "val"))
    experts = _compare_losses(run, single, "experts")
    assert {"experts/cv", "experts/router_entropy", "experts/window_tokens", "moe/aux_loss",
            "moe/aux_loss_layer_0"} <= set(_losses(run, "experts"))
    worst = _compare(_weights(run), _weights(single), weight_bound(LR))
    print(f"cp={cp} vs 1 process: gradients {grads:.2e}, step losses {losses:.2e}, validation metrics {val:.2e}, "
          f"expert statistics {experts:.2e}, weights {worst:.2e}")


def test_cp2_x_ep2_resumed_equals_one_process_accumulating(tmp_path):
    ref = tmp_path / "single2"
    _cp_fit(ref, "--trainer.accumulate_grad_batches", "2", devices=1)
    run = tmp_path / "cp2ep2"
    # with per-block activation checkpointing: the recompute repeats the slices' exchanges in backward
    parallel = ["--trainer.strategy.cp_size", "2", "--trainer.strategy.ep_size", "2",
                "--trainer.strategy.activation_checkpointing", "true", "--trainer.strategy.overlap_dispatch", "true",
                "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
                "--trainer.callbacks.every_n_train_steps", "2"]
    proc = _cp_fit(run, *parallel, "--trainer.callbacks+=ep_test_callbacks.CrashAtStep", "--trainer.callbacks.step",
                   "3", devices=4, check=False)
    assert proc.returncode != 0 and "CrashAtStep: simulated crash at step 3" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    first = _losses(ref)  # the crashed run wrote no losses; the resumed one records steps 3 and 4
    _cp_fit(run, *parallel, "--ckpt_path", "last", devices=4)
    grads = _compare_gradients(run, ref)  # step 0 and 1 gradients were dumped before the crash
    resumed = _losses(run)
    assert set(resumed) == {"3", "4"}, resumed
    worst_loss = max(abs(resumed[k] - first[k]) / max(abs(first[k]), 1.0) for k in resumed)
    assert worst_loss <= LOSS_TOL, (resumed, first)
    worst = _compare(_weights(run), _weights(ref), weight_bound(LR))
    config = json.loads((run / "hf_export" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    print(f"cp=2 x ep=2 + activation checkpointing (crashed at 3, resumed) vs 1 process x accumulate 2: gradients {grads:.2e}, step losses "
          f"{worst_loss:.2e}, weights {worst:.2e}")


def test_cp2_lora_equals_one_process(tmp_path):
    """LoRA on attention, linear attention, the shared and the routed experts (the MTP block included): the frozen
    base leaves parts of the graph without gradient, which every rank of the cp group must agree on (the exchanges'
    backward are collectives). Adapters and the merged export equal one process's."""
    lora = ["--model.lora", LORA, "--model.lr", "2e-3", "--trainer.callbacks+=callbacks.LoraExport"]
    _cp_fit(tmp_path / "single", *lora, devices=1)
    _cp_fit(tmp_path / "cp2", *lora, "--trainer.strategy.cp_size", "2", devices=2)
    grads = _compare_gradients(tmp_path / "cp2", tmp_path / "single")
    losses = _compare_losses(tmp_path / "cp2", tmp_path / "single")
    adapters = _compare(_weights(tmp_path / "cp2", "hf_adapter"), _weights(tmp_path / "single", "hf_adapter"),
                        weight_bound(2e-3))
    merged = _compare(_weights(tmp_path / "cp2"), _weights(tmp_path / "single"), weight_bound(2e-3))
    trained = _weights(tmp_path / "cp2", "hf_adapter")
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 1e-4  # adapters trained
    print(f"LoRA cp=2 vs 1 process: gradients {grads:.2e}, step losses {losses:.2e}, adapters {adapters:.2e}, "
          f"merged export {merged:.2e}")


def test_cp2_qwen3_vl_moe_equals_one_process(tmp_path):
    """The second family (deepstack features spliced into the slices, no MTP module) through the app."""
    vl = ["--model.pretrained", "embedded:qwen3_vl_moe", "--model.mtp", "null"]
    _cp_fit(tmp_path / "single", *vl, devices=1)
    _cp_fit(tmp_path / "cp2", *vl, "--trainer.strategy.cp_size", "2", devices=2)
    grads = _compare_gradients(tmp_path / "cp2", tmp_path / "single")
    losses = _compare_losses(tmp_path / "cp2", tmp_path / "single")
    val = _compare_losses(tmp_path / "cp2", tmp_path / "single", "val")
    worst = _compare(_weights(tmp_path / "cp2"), _weights(tmp_path / "single"), weight_bound(LR))
    config = json.loads((tmp_path / "cp2" / "hf_export" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    print(f"Qwen3-VL-MoE cp=2 vs 1 process: gradients {grads:.2e}, step losses {losses:.2e}, validation {val:.2e}, "
          f"weights {worst:.2e}")
