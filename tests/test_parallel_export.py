"""Exports of a sharded model equal the single-process exports of the same weights, file by file.

The tiny vision-language model (8 experts, 2-block vision tower) with LoRA on attention, linear attention, shared
and routed experts (adapters made non-zero, so the merge matters), parallelised with `parallelize_model` on
2 processes (ep=2, efsdp=1) and on 4 (ep=2 x efsdp=2: each expert slice is also FSDP-sharded), then exported
with the sharded path every rank walks (`full_tensor_fetcher`, rank 0 writes):
  - the merged HF directory (`save_merged_pretrained`): every safetensors tensor bitwise equal, same keys, same
    config, and `max_shard_size` honoured (several shards);
  - the PEFT adapter (`save_peft_adapter`): expert adapters of all E experts, bitwise equal.
Also: an export of the 2-process model without adapters (plain `save_pretrained` layout), and the DCP round trip
of the global views (state.py): saved by 4 ranks, loaded back in place, and loaded by ONE process into the
unparallelised model (the checkpoint holds (E, ...) experts at their global offsets).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_parallel_common import run_workers
from tiny_configs import make_config

pytestmark = pytest.mark.multiprocess

SHARD = "60KB"


def _model(lora: bool):
    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration.from_config(make_config())
    if lora:
        apply_lora(model, LoraConfig(rank=4, alpha=8.0, expert_rank=2, expert_alpha=4.0))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _export(model, out: Path, fetch=None, write=True):
    from qmoe_lightning.lora import save_merged_pretrained, save_peft_adapter
    from qmoe_lightning.lora.apply import has_lora

    save_merged_pretrained(model, out / "merged", max_shard_size=SHARD, fetch=fetch, write=write)
    if has_lora(model):
        save_peft_adapter(model, out / "adapter", "base", fetch=fetch, write=write)


def _worker(rank, world, out_dir):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from qmoe_lightning.parallel.parallelize import build_mesh, parallelize_model
    from qmoe_lightning.parallel.state import full_tensor_fetcher, global_state_dict

    out = Path(out_dir)
    mesh = build_mesh("cpu", world, ep_size=2)
    variants = (True, False) if world == 2 else (True,)
    for lora in variants:
        model = _model(lora)
        parallelize_model(model, mesh, ep_size=2)
        _export(model, out / f"w{world}-lora{lora}", fetch=full_tensor_fetcher(model), write=rank == 0)
    if world == 4:
        # DCP round trip of the global views: save, scramble, load in place
        model = _model(True)
        parallelize_model(model, mesh, ep_size=2)
        views = global_state_dict(model)
        dcp.save({"model": views}, checkpoint_id=str(out / "dcp"))
        before = {k: v.full_tensor().clone() for k, v in global_state_dict(model).items()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        dcp.load({"model": global_state_dict(model)}, checkpoint_id=str(out / "dcp"))
        after = {k: v.full_tensor() for k, v in global_state_dict(model).items()}
        assert all(torch.equal(before[k], after[k]) for k in before), "DCP load did not restore the parameters"
        local = model.model.language_model.layers[0].mlp.experts.gate_and_up_projs.to_local().shape[0]
        dist.barrier()
        return {"local_experts_per_rank": local, "global_shape": tuple(views[
            "model.language_model.layers[0]".replace("[0]", ".0") + ".mlp.experts.gate_and_up_projs"].shape)}
    return None


def _same_dirs(a: Path, b: Path, what: str) -> int:
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir()), (what, files_a)
    n = 0
    for name in files_a:
        if name.endswith(".safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys(), (what, name)
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (what, name, k)
                n += 1
        elif name.endswith(".json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), (what, name)
    return n


def test_sharded_exports_equal_single_process(tmp_path):
    results = run_workers(_worker, 4, tmp_path / "w4", str(tmp_path / "w4"), timeout=300)
    run_workers(_worker, 2, tmp_path / "w2", str(tmp_path / "w2"), timeout=300)
    for lora in (True, False):
        _export(_model(lora), tmp_path / f"ref-lora{lora}")

    ref = tmp_path / "refTrue"
    for world, lora in ((4, True), (2, True), (2, False)):
        got, ref = tmp_path / f"w{world}" / f"w{world}-lora{lora}", tmp_path / f"ref-lora{lora}"
        n = _same_dirs(got / "merged", ref / "merged", f"merged w{world} lora={lora}")
        assert n > 50 and len(list((got / "merged").glob("model-*.safetensors"))) > 1  # sharded by size
        index = json.loads((got / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in index
        assert not any("lora" in k for k in index)
        if lora:
            assert _same_dirs(got / "adapter", ref / "adapter", f"adapter w{world}") > 20
            assert load_file(got / "adapter" / "adapter_model.safetensors")[
                "base_model.model.model.language_model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape[0] == 8 * 2

    # the 4-rank DCP checkpoint: each rank held 2 of 8 experts; one process loads the global (8, ...) tensors
    assert results[0] == {"local_experts_per_rank": 2, "global_shape": (8, 64, 64)}
    import torch.distributed.checkpoint as dcp

    single = _model(True)
    sd = {k: torch.empty_like(v) for k, v in single.state_dict().items()}
    dcp.load({"model": sd}, checkpoint_id=str(tmp_path / "w4" / "dcp"), no_dist=True)
    for k, v in single.state_dict().items():
        assert torch.equal(sd[k], v), k
