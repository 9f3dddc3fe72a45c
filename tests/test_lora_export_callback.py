"""LoraExport callback: table at fit start, hf_adapter written at train end (sizes, base path), refuses a run
without adapters. Uses stand-in trainer / module objects: the callback reads only these attributes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_configs import make_config

from callbacks import LoraExport
from qmoe_lightning.lora import LoraConfig, apply_lora
from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration


def _trainer(root):
    return SimpleNamespace(default_root_dir=str(root), is_global_zero=True,
                           strategy=SimpleNamespace(barrier=lambda name=None: None))


def test_lora_export_writes_hf_adapter(tmp_path, capsys):
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config("base"))
    lora = LoraConfig(rank=4, alpha=8, expert_rank=2)
    module = SimpleNamespace(model=model, hparams=SimpleNamespace(pretrained="org/base-model", lora=lora))
    cb = LoraExport()
    with pytest.raises(RuntimeError, match="no LoRA adapters"):
        cb.on_fit_start(_trainer(tmp_path), module)
    apply_lora(model, lora)
    cb.on_fit_start(_trainer(tmp_path), module)
    cb.on_train_end(_trainer(tmp_path), module)
    out = tmp_path / "hf_adapter"
    assert cb.last_export == out
    assert sorted(p.name for p in out.iterdir()) == [".qmoe_export", "adapter_config.json",
                                                      "adapter_model.safetensors", "qmoe_lora.json"]
    assert json.loads((out / "qmoe_lora.json").read_text())["expert_rank"] == 2  # the run's own LoRA settings
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base-model"
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["rank_pattern"] == {"mlp.experts.gate_up_proj": 2, "mlp.experts.down_proj": 2}
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    # fp32 tensors + a small header
    size = (out / "adapter_model.safetensors").stat().st_size
    assert n_adapter * 4 < size < n_adapter * 4 + 64 * 1024
    # no temporary directory left behind
    assert [p.name for p in tmp_path.iterdir()] == ["hf_adapter"]
