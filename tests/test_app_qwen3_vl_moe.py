"""The application with the second family, Qwen3-VL-MoE, through cli.py on the embedded tiny checkpoint
(`embedded:qwen3_vl_moe`):

- `configs/tiny_qwen3_vl_moe.yaml` (shortened) trains, exports in the published layout, and transformers'
  AutoModelForImageTextToText loads the export with the trained model's logits; resume continues;
- expert parallelism + FSDP2: ep=2 on 2 processes == 1 process accumulating the same packs (gradients and weights,
  the criteria of test_app_expert_parallel), full fine-tuning (crashed after step 3 and resumed from its distributed
  checkpoint on the way) and LoRA on its default targets (attention, the dense MLP layer, routed experts) with
  merged and PEFT exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_app_common import small_data  # noqa: F401  (fixture)
from test_app_expert_parallel import _compare, _compare_gradients, _fit, _weights, weight_bound

import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_qwen3_vl_moe.yaml")
VL = ["--model.pretrained", "embedded:qwen3_vl_moe"]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


@pytest.mark.slow
def test_tiny_recipe_trains_exports_and_transformers_loads_the_export(tmp_path, small_data):
    from transformers import AutoModelForImageTextToText

    root = tmp_path / "run"
    common = ["--config", CONFIG, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--trainer.val_check_interval", "6", "--data.train_path", str(small_data), "--data.val_path",
              str(small_data), "--data.max_tokens", "256", "--data.num_workers", "0", "--data.cache_dir",
              str(tmp_path / "cache")]
    app = cli.main(["fit", *common, "--trainer.max_steps", "6"])
    model = app.model.model.eval()
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert app.trainer.callback_metrics["train/loss"] < 20 and "val/image_acc" in app.trainer.callback_metrics
    export = root / "hf_export"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    on_disk = {}
    for f in export.glob("*.safetensors"):
        on_disk.update(load_file(f))
    text = model.text_config
    assert on_disk["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (
        text.num_experts, text.hidden_size, 2 * text.moe_intermediate_size)  # the published layout
    hf = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    hf.config.text_config._experts_implementation = "eager"
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 300, (5,), generator=g), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((6,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(0, 300, (9,), generator=g)])[None]
    doc = dict(input_ids=ids, mm_token_type_ids=(ids == cfg.image_token_id).long(),
               pixel_values=torch.randn(24, 3 * 2 * 16 * 16, generator=g), image_grid_thw=torch.tensor([[1, 4, 6]]))
    with torch.no_grad():
        assert (model(**doc).logits - hf(**doc).logits).abs().max() <= 1e-4
        assert (model(input_ids=ids[:, :5]).logits - hf(input_ids=ids[:, :5]).logits).abs().max() <= 1e-4
    resumed = cli.main(["fit", *common, "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 8


def _start_weights() -> dict[str, torch.Tensor]:
    from qmoe_lightning.embedded import ensure_embedded_model

    out = {}
    for f in sorted(ensure_embedded_model("qwen3_vl_moe").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.multiprocess
def test_ep2_crashed_and_resumed_equals_one_process_accumulating(tmp_path):
    """The ep=2 run crashes after step 3 and resumes from its step-2 distributed checkpoint (expert global views,
    optimizer state, sampler position)."""
    ckpt = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
            "--trainer.callbacks.every_n_train_steps", "2"]
    proc = _fit(tmp_path / "ep", *VL, *ckpt, "--trainer.callbacks+=ep_test_callbacks.CrashAtStep",
                "--trainer.callbacks.step", "3", check=False)
    assert proc.returncode != 0 and "simulated crash at step 3" in proc.stderr
    assert "FSDPQwen3VLMoeForConditionalGeneration" in proc.stdout + proc.stderr  # really parallelised
    _fit(tmp_path / "ep", *VL, *ckpt, "--ckpt_path", "last")
    _fit(tmp_path / "single", *VL, "--trainer.accumulate_grad_batches", "2", devices=1)
    single = _weights(tmp_path / "single")
    start = _start_weights()
    moved = max((single[k] - start[k].transpose(1, 2) if start[k].shape != single[k].shape else single[k] - start[k])
                .abs().max().item() for k in single)
    assert moved > 1e-3  # the runs trained
    grads = _compare_gradients(tmp_path / "ep", tmp_path / "single")
    worst = _compare(_weights(tmp_path / "ep"), single, weight_bound(4e-3))
    print(f"Qwen3-VL-MoE ep=2 vs 1 process x accumulate 2: gradients {grads:.2e}, weights {worst:.2e} "
          f"(bound {weight_bound(4e-3):.1e}; moved {moved:.2e})")


@pytest.mark.multiprocess
def test_ep2_lora_on_default_targets_equals_one_process(tmp_path):
    lora = ["--model.lora", json.dumps(dict(rank=4, alpha=8, expert_rank=2, expert_alpha=4)), "--model.lr", "2e-3",
            "--trainer.callbacks+=callbacks.LoraExport"]
    proc = _fit(tmp_path / "ep", *VL, *lora)
    log = proc.stdout + proc.stderr
    assert "dense_mlp" in log and "NOT adapted" not in log  # the default targets: dense MLP and experts adapted
    _fit(tmp_path / "single", *VL, *lora, "--trainer.accumulate_grad_batches", "2", devices=1)
    grads = _compare_gradients(tmp_path / "ep", tmp_path / "single")
    merged = _compare(_weights(tmp_path / "ep"), _weights(tmp_path / "single"), weight_bound(2e-3))
    adapters = _weights(tmp_path / "ep", "hf_adapter")
    _compare(adapters, _weights(tmp_path / "single", "hf_adapter"), weight_bound(2e-3))
    assert any(".mlp.down_proj.lora_B" in k for k in adapters)  # dense MLP layer adapted
    assert any("experts" in k for k in adapters)
    assert max(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 1e-4  # adapters trained
    print(f"Qwen3-VL-MoE LoRA ep=2 vs 1 process: gradients {grads:.2e}, merged export {merged:.2e}")
