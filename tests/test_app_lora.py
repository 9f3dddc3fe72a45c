"""configs/tiny_lora.yaml through cli.py: only adapters train, checkpoints hold adapters only and resume, the merged
HF export and the PEFT adapter are written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_app_common import small_data  # noqa: F401  (fixture)

import cli
from qmoe_lightning.lora import is_adapter_key

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_lora.yaml")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


@pytest.mark.slow
def test_tiny_lora_fit_checkpoint_resume_and_exports(tmp_path, small_data):
    root = tmp_path / "run"
    common = ["--config", CONFIG, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--trainer.val_check_interval", "2", "--data.train_path", str(small_data), "--data.val_path",
              str(small_data), "--data.max_tokens", "128", "--data.num_workers", "0", "--data.cache_dir",
              str(tmp_path / "cache")]
    app = cli.main(["fit", *common, "--trainer.max_steps", "2"])
    model = app.model.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(is_adapter_key(k) for k in ckpt["state_dict"])
    assert (root / "hf_export" / "config.json").is_file()
    assert not any("lora" in line for line in (root / "hf_export" / "model.safetensors.index.json").read_text()
                   .splitlines())  # merged: no adapter tensors in the HF export
    assert (root / "hf_adapter").is_dir()

    resumed = cli.main(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3
