"""The text-only Qwen3-MoE family through the app: its embedded default has no image processor, so image rows are
counted skips (strict: an error naming file:line) and text rows train; LoRA on the family's default targets; the
merged export loads in transformers' AutoModelForCausalLM and the PEFT adapter in peft on transformers' model, both
with the trained model's logits; a dense-MLP adapter, which peft would load onto the experts of a qwen3_moe model,
is refused before training when a PEFT export is configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_app_common import make_datamodule, small_data  # noqa: F401  (fixture)

import cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_lora.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def test_image_rows_are_counted_skips_and_strict_names_file_line(tmp_path, small_data):
    n_rows = sum(1 for _ in open(small_data))
    n_images = sum(1 for line in open(small_data) if '"image"' in line)
    assert 0 < n_images < n_rows
    dm = make_datamodule(small_data, tmp_path / "cache", model_path="embedded:qwen3_moe")
    dm.setup("fit")
    assert dm.stats["train"]["image_for_text_model"] == n_images
    assert dm.stats["train"]["ok"] == n_rows - n_images
    assert all(t not in (None, 0) for t in [dm.encoder.eos_id])
    first_image = next(i for i, line in enumerate(open(small_data), 1) if '"image"' in line)
    strict = make_datamodule(small_data, tmp_path / "cache2", model_path="embedded:qwen3_moe", strict=True)
    with pytest.raises(ValueError, match=rf"data\.jsonl:{first_image}.*image_for_text_model"):
        strict.setup("fit")
    # negative control: the vision-language model's processor encodes the same image rows
    vl = make_datamodule(small_data, tmp_path / "cache3", model_path="embedded")
    vl.setup("fit")
    assert "image_for_text_model" not in vl.stats["train"]


@pytest.mark.slow
def test_lora_fit_exports_load_in_transformers_and_peft(tmp_path, small_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path / "run"
    app = cli.main(["fit", "--config", CONFIG, "--model.pretrained", "embedded:qwen3_moe",
                    "--model.lora.targets", "[default]", "--model.lora.dropout", "0.0",
                    "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.train_path",
                    str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
                    "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    model = app.model.model.eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for where in ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts.gate_and_up_lora", "mlp.experts.down_lora"):
        assert any(where in n for n in trained), where  # the family's default targets: attention, the experts
    assert not any("layers.1.mlp." in n for n in trained)  # the dense MLP is left out by default
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(root / "hf_export", dtype=torch.float32).eval()
        assert (merged(input_ids=ids).logits - native).abs().max() < 1e-5
        config = json.loads((root / "hf_export" / "config.json").read_text())
        assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
        base = AutoModelForCausalLM.from_pretrained(app.model.checkpoint_source.directory, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, root / "hf_adapter").eval()
        assert (peft(input_ids=ids).logits - native).abs().max() < 1e-5
        # negative control: the base model without the adapter gives other logits
        bare = AutoModelForCausalLM.from_pretrained(app.model.checkpoint_source.directory, dtype=torch.float32)
        assert (bare.eval()(input_ids=ids).logits - native).abs().max() > 1e-3


def test_dense_mlp_adapters_are_refused_before_training_when_a_peft_export_is_configured(tmp_path, small_data):
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*peft loads adapters named .*qwen3_moe"):
        cli.main(["fit", "--config", CONFIG, "--model.pretrained", "embedded:qwen3_moe",
                  "--model.lora.targets", "[attention, dense_mlp, experts]", "--trainer.default_root_dir",
                  str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
                  "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens",
                  "128", "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    # refused at fit start: nothing trained, no checkpoint or export written
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "hf_export").exists()
