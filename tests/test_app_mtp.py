"""Multi-token prediction through the application (`model.mtp.enabled`), on the embedded tiny Qwen3.5-MoE, whose
checkpoint carries an MTP layer (`mtp.*`, experts per expert as Qwen3.5-35B-A3B):

- fit logs the MTP loss and validation's MTP accuracy / acceptance, the export writes the trained `mtp.*` back under
  the checkpoint's names and layout, and a resume continues;
- LoRA with MTP: the default targets adapt the MTP block too; the merged export carries it, the PEFT adapter (for
  transformers, which has no MTP module) does not;
- expert parallelism: ep=2 on 2 processes == 1 process accumulating, MTP experts sharded like the others.
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
MTP = ["--model.mtp", json.dumps({"enabled": True})]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])


def _common(root: Path, data: Path, tmp: Path, config: str = "tiny.yaml") -> list[str]:
    return ["--config", str(ROOT / "configs" / config), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "4", "--data.train_path",
            str(data), "--data.val_path", str(data), "--data.max_tokens", "256", "--data.num_workers", "0",
            "--data.cache_dir", str(tmp / "cache"), *MTP]


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_fit_logs_mtp_exports_it_in_the_read_layout_and_resumes(tmp_path, small_data):
    from qmoe_lightning.embedded import ensure_embedded_default

    root = tmp_path / "run"
    app = cli.main(["fit", *_common(root, small_data, tmp_path), "--trainer.max_steps", "4"])
    metrics = app.trainer.callback_metrics
    for key in ("train/mtp_loss", "val/mtp_loss", "val/mtp_acc_depth1", "val/mtp_acceptance"):
        assert key in metrics, key
    assert 0 < float(metrics["train/mtp_loss"]) < 20
    source = {k: v for k, v in _tensors(ensure_embedded_default().model_dir).items() if k.startswith("mtp.")}
    written = {k: v for k, v in _tensors(root / "hf_export").items() if k.startswith("mtp.")}
    assert set(written) == set(source) and any(".experts.0.gate_proj.weight" in k for k in written)  # per expert
    assert max((written[k] - source[k]).abs().max().item() for k in source) > 1e-4  # trained
    resumed = cli.main(["fit", *_common(root, small_data, tmp_path), "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 6 and resumed.model.model.mtp is not None


def test_lora_with_mtp_merges_it_into_the_export_and_keeps_it_out_of_the_peft_adapter(tmp_path, small_data):
    root = tmp_path / "run"
    lora = json.dumps({"rank": 4, "alpha": 8, "expert_rank": 2})
    app = cli.main(["fit", *_common(root, small_data, tmp_path, "tiny_lora.yaml"), "--model.lora", lora,
                    "--trainer.max_steps", "3"])
    adapted = [n for n, p in app.model.model.named_parameters() if p.requires_grad]
    assert any(n.startswith("mtp.layers.0.self_attn.") for n in adapted)  # default targets reach the MTP block
    assert any(n.startswith("mtp.layers.0.mlp.experts.") for n in adapted)
    peft = _tensors(root / "hf_adapter")
    assert peft and not any(".mtp." in k or k.startswith("mtp.") for k in peft)
    from qmoe_lightning.embedded import ensure_embedded_default

    base = _tensors(ensure_embedded_default().model_dir)
    merged = _tensors(root / "hf_export")
    key = "mtp.layers.0.self_attn.q_proj.weight"
    assert (merged[key] - base[key]).abs().max() > 0  # the MTP adapter is merged in


@pytest.mark.multiprocess
def test_ep2_with_mtp_equals_one_process_accumulating(tmp_path):
    proc = _fit(tmp_path / "ep", *MTP)
    assert "FSDPQwen3_5MoeForConditionalGeneration" in proc.stdout + proc.stderr
    _fit(tmp_path / "single", *MTP, "--trainer.accumulate_grad_batches", "2", devices=1)
    grads = _compare_gradients(tmp_path / "ep", tmp_path / "single")
    ep, single = _weights(tmp_path / "ep"), _weights(tmp_path / "single")
    assert any(k.startswith("mtp.layers.0.mlp.experts.") for k in ep)
    worst = _compare(ep, single, weight_bound(4e-3))
    g0 = torch.load(tmp_path / "single" / "grads_step0.pt")
    assert max(v.abs().max().item() for k, v in g0.items() if k.startswith("mtp.layers.0.mlp.experts")) > 1e-7
    print(f"MTP ep=2 vs 1 process x accumulate 2: gradients {grads:.2e}, weights {worst:.2e}")


@pytest.mark.multiprocess
def test_random_mtp_init_under_expert_parallelism_equals_the_single_process_init(tmp_path):
    """A checkpoint without mtp.* and `mtp.init: random`: every rank keeps its slice of ONE seeded full init (not
    the same draw in every shard: experts e and e + E/2 would start identical), equal to one process's init."""
    import shutil

    from safetensors.torch import save_file

    from qmoe_lightning.embedded import ensure_embedded_default

    src, plain = ensure_embedded_default().model_dir, tmp_path / "no_mtp"
    shutil.copytree(src, plain)
    weights = plain / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("mtp.")}, str(weights))
    args = ["--model.pretrained", str(plain), "--model.mtp", json.dumps({"enabled": True, "init": "random"}),
            "--model.lr", "0.0"]
    _fit(tmp_path / "ep", *args)
    _fit(tmp_path / "single", *args, devices=1)
    ep, single = _weights(tmp_path / "ep"), _weights(tmp_path / "single")
    mtp_keys = [k for k in single if k.startswith("mtp.")]
    assert mtp_keys and all(torch.equal(ep[k], single[k]) for k in mtp_keys)
    experts = single["mtp.layers.0.mlp.experts.gate_up_proj"]
    half = experts.shape[0] // 2
    assert not torch.equal(experts[:half], experts[half:])
