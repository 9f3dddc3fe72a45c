"""The text-only families (Qwen3-MoE, Qwen3-Next: the registry's families without a vision tower) through the app,
each on its embedded default (`embedded:<model_type>`): the model directory has no image processor, so image rows
are counted skips (strict: an error naming file:line) and text rows train; LoRA on the family's default targets; the
merged export loads in transformers' AutoModelForCausalLM and the PEFT adapter in peft on transformers' model, both
with the trained model's logits; adapters that peft would load onto the routed experts of such a model (a dense MLP
layer's, Qwen3-Next's shared expert's: peft takes their `gate_proj` / `up_proj` / `down_proj` for the experts') are
refused before training when a PEFT export is configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_app_common import make_datamodule, small_data  # noqa: F401  (fixture)

import cli
from qmoe_lightning.models.registry import FAMILIES

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_lora.yaml")

# the registry's text-only families (a family registers under each of its model_types: one entry per family)
TEXT_FAMILIES = sorted({f.model_type for f in FAMILIES.values() if not f.has_vision})

# the modules LoRA's default targets adapt in the family's embedded model (substrings of trained parameter names),
# and those they leave out (the dense MLP of layer 1; Qwen3-Next's shared expert, which peft would misplace)
DEFAULT_TARGETS = {
    "qwen3_moe": dict(trained=("self_attn.q_proj", "self_attn.o_proj", "mlp.experts.gate_and_up_lora",
                               "mlp.experts.down_lora"),
                      untouched=("layers.1.mlp.",)),
    "qwen3_next": dict(trained=("self_attn.q_proj", "self_attn.o_proj", "linear_attn.in_proj_qkvz",
                                "linear_attn.out_proj", "mlp.experts.gate_and_up_lora", "mlp.experts.down_lora"),
                       untouched=("layers.1.mlp.", "mlp.shared_experts.", "mlp.shared_expert_gate",
                                  "linear_attn.in_proj_ba")),
}

# LoRA target aliases of a family that peft would load elsewhere -> the first module the refusal names (sorted)
MISPLACED = {
    "qwen3_moe": {"dense_mlp": r"model\.layers\.1\.mlp\.down_proj"},
    "qwen3_next": {"shared_expert": r"model\.layers\.0\.mlp\.shared_experts\.down_proj",
                   "dense_mlp": r"model\.layers\.1\.mlp\.down_proj"},
}


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def test_every_text_family_has_its_cases():
    """A text-only family added to the registry gets the tests below only once it has its expectations here."""
    assert TEXT_FAMILIES and set(DEFAULT_TARGETS) == set(TEXT_FAMILIES) == set(MISPLACED)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_image_rows_are_counted_skips_and_strict_names_file_line(tmp_path, small_data, family):
    n_rows = sum(1 for _ in open(small_data))
    n_images = sum(1 for line in open(small_data) if '"image"' in line)
    assert 0 < n_images < n_rows
    dm = make_datamodule(small_data, tmp_path / "cache", model_path=f"embedded:{family}")
    dm.setup("fit")
    assert dm.stats["train"]["image_for_text_model"] == n_images
    assert dm.stats["train"]["ok"] == n_rows - n_images
    assert all(t not in (None, 0) for t in [dm.encoder.eos_id])
    first_image = next(i for i, line in enumerate(open(small_data), 1) if '"image"' in line)
    strict = make_datamodule(small_data, tmp_path / "cache2", model_path=f"embedded:{family}", strict=True)
    with pytest.raises(ValueError, match=rf"data\.jsonl:{first_image}.*image_for_text_model"):
        strict.setup("fit")
    # negative control: the vision-language model's processor encodes the same image rows
    vl = make_datamodule(small_data, tmp_path / "cache3", model_path="embedded")
    vl.setup("fit")
    assert "image_for_text_model" not in vl.stats["train"]


@pytest.mark.slow
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_lora_fit_exports_load_in_transformers_and_peft(tmp_path, small_data, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registered = FAMILIES[family]
    architecture = registered.text_only.HF_ARCHITECTURE
    root = tmp_path / "run"
    app = cli.main(["fit", "--config", CONFIG, "--model.pretrained", f"embedded:{family}",
                    "--model.lora.targets", "[default]", "--model.lora.dropout", "0.0",
                    "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--data.train_path",
                    str(small_data), "--data.val_path", str(small_data), "--data.max_tokens", "128",
                    "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    model = app.model.model.eval()
    assert type(model) is registered.text_only
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    for where in DEFAULT_TARGETS[family]["trained"]:
        assert any(where in n for n in trained), where  # the family's default targets
    for where in DEFAULT_TARGETS[family]["untouched"]:
        assert not any(where in n for n in trained), where  # left out by default
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(root / "hf_export", dtype=torch.float32).eval()
        assert (merged(input_ids=ids).logits - native).abs().max() < 1e-5
        config = json.loads((root / "hf_export" / "config.json").read_text())
        assert config["architectures"] == [architecture] and config["model_type"] == family
        base = AutoModelForCausalLM.from_pretrained(app.model.checkpoint_source.directory, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, root / "hf_adapter").eval()
        assert (peft(input_ids=ids).logits - native).abs().max() < 1e-5
        # negative control: the base model without the adapter gives other logits
        bare = AutoModelForCausalLM.from_pretrained(app.model.checkpoint_source.directory, dtype=torch.float32)
        assert (bare.eval()(input_ids=ids).logits - native).abs().max() > 1e-3


@pytest.mark.parametrize("family,alias", [pytest.param(f, a, id=f"{f}-{a}") for f in TEXT_FAMILIES
                                          for a in MISPLACED.get(f, {})])
def test_misplaced_adapters_are_refused_before_training_when_a_peft_export_is_configured(tmp_path, small_data,
                                                                                         family, alias):
    module = MISPLACED[family][alias]
    with pytest.raises(ValueError, match=rf"{module}.*peft loads adapters named .*{family}"):
        cli.main(["fit", "--config", CONFIG, "--model.pretrained", f"embedded:{family}",
                  "--model.lora.targets", f"[attention, {alias}, experts]", "--trainer.default_root_dir",
                  str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
                  "--data.train_path", str(small_data), "--data.val_path", str(small_data), "--data.max_tokens",
                  "128", "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")])
    # refused at fit start: nothing trained, no checkpoint or export written
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not (tmp_path / "run" / "hf_export").exists()
