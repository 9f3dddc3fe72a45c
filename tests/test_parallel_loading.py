"""Rank-local HF loading (`parallel.loading`) into a meta-built, parallelised model, on gloo CPU processes.

Layouts: the embedded tiny checkpoint as bundled (per-expert keys `experts.{e}.{gate,up,down}_proj.weight`, one
file) and a fused-layout copy of it written by our exporter (`gate_up_proj (E, 2I, H)`, several shard files, plus
the checkpoint's mtp.* tensors, copied through). Meshes: 2 processes (ep 2 x efsdp 1) and 4 processes (ep 2 x efsdp 2); dense parameters are
FSDP-sharded over all ranks (449-row vocabulary: uneven row blocks).

Checked in each worker: the gathered full tensors (`full_tensor()` of the `global_state_dict` entries) equal
`from_pretrained` in one process bitwise, and (independently of how state.py describes the shards) the parallel
forward's logits equal the one-process model's; the report equals `load_hf_weights`' (skipped / passthrough);
what each rank read (a recording wrapper around `safe_open`): never `get_tensor`, per-expert keys only of its own
experts, and over all ranks every checkpoint element exactly once (sum of the elements read = the tensor's numel,
so no rank read a sharded tensor whole); LoRA adapters initialised sharded equal `apply_lora` on the full model
bitwise. 2 processes also: EP without FSDP, and bad checkpoints (a missing dense key, a missing expert of ONE
rank, a wrong shape, a wrong fused-expert shape) raise the same ValueError naming file / key on EVERY rank (no hang).
Finally the real module: `QMoELightningModule(pretrained=...)` under a Lightning Trainer with
`ExpertParallelStrategy(ep_size=2)`, bf16-true, with LoRA: rank-local loading is what ran, and what configure_model
built, and the model after Lightning's bf16-true cast, equal the one-process module's bitwise (A_log / dt_bias and
the adapters fp32, the rest bf16).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_app_common import embedded_model_dir
from test_parallel_common import run_workers

LORA = dict(rank=4, alpha=8.0, expert_rank=2)


# ---------------------------------------------------------------------------------------------- checkpoints
def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from qmoe_lightning.models.checkpoint import safetensors_files

    out = {}
    for f in safetensors_files(path):
        out.update(load_file(str(f)))
    return out


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy of a one-file checkpoint with its tensors edited by `edit(dict)`."""
    _copy_dir(src, dst)
    for f in [*dst.glob("*.safetensors"), *dst.glob("*.index.json")]:
        f.unlink()
    tensors = _read_all(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    root = tmp_path_factory.mktemp("ckpts")
    per_expert = Path(embedded_model_dir())
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in _read_all(per_expert))
    fused = Qwen3_5MoeForConditionalGeneration.from_pretrained(per_expert).save_pretrained(
        root / "fused", max_shard_size="400KB")
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    # the embedded checkpoint's MTP layer, copied through by the export (no MTP module here)
    assert sum(k.startswith("mtp.") for k in index["weight_map"]) > 10
    assert len(set(index["weight_map"].values())) > 2
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in index["weight_map"])

    L0 = "model.language_model.layers.0."
    bad = {
        "missing_dense": _rewrite(per_expert, root / "bad1", lambda t: t.pop(L0 + "linear_attn.in_proj_a.weight")),
        # expert 1 belongs to ep rank 0 only: rank 1 finds nothing wrong locally and must still raise
        "missing_expert_of_rank0": _rewrite(per_expert, root / "bad2",
                                            lambda t: t.pop(L0 + "mlp.experts.1.up_proj.weight")),
        "wrong_dense_shape": _rewrite(per_expert, root / "bad3", lambda t: t.update(
            {L0 + "linear_attn.in_proj_a.weight": torch.zeros(5, 64)})),
    }
    fused_one = root / "fused_one"
    _rewrite(fused, fused_one, lambda t: None)
    bad["wrong_fused_expert_shape"] = _rewrite(fused_one, root / "bad4", lambda t: t.update(
        {L0 + "mlp.experts.down_proj": torch.zeros(8, 64, 31)}))
    return {"per_expert": per_expert, "fused": fused, "bad": bad}


# ---------------------------------------------------------------------------------------------- read recording
class _RecordingSlice:
    def __init__(self, inner, key, log):
        self.inner, self.key, self.log = inner, key, log

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        out = self.inner[index]
        self.log.append(("slice", self.key, out.numel()))
        return out


class _RecordingFile:
    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, key):
        return _RecordingSlice(self.inner.get_slice(key), key, self.log)

    def get_tensor(self, key):
        out = self.inner.get_tensor(key)
        self.log.append(("tensor", key, out.numel()))
        return out


def _record_reads() -> list:
    """Record every read of the checkpoint files (the loaders open them through `checkpoint.CheckpointScan`)."""
    from qmoe_lightning.models import checkpoint

    log: list = []
    real = checkpoint.safe_open
    checkpoint.safe_open = lambda *a, **k: _RecordingFile(real(*a, **k), log)
    return log


# ---------------------------------------------------------------------------------------------- workers
def _parallel_model(mesh, lora=None, fsdp=True):
    from transformers import AutoConfig

    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
    from qmoe_lightning.parallel.parallelize import parallelize_model

    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(AutoConfig.from_pretrained(embedded_model_dir()))
    if lora is not None:
        apply_lora(model, LoraConfig(**lora))
    parallelize_model(model, mesh, ep_size=mesh["ep"].size(), fsdp=fsdp)
    model.to_empty(device="cpu")
    model.reset_buffers()
    return model


def _gathered(model) -> dict[str, torch.Tensor]:
    from qmoe_lightning.parallel.state import full_tensor, global_state_dict

    return {k: full_tensor(v).detach().clone() for k, v in global_state_dict(model).items()}


def _mismatches(got: dict, ref: dict) -> list[str]:
    bad = sorted(set(got) ^ set(ref))
    bad += [k for k in sorted(set(got) & set(ref))
            if got[k].dtype != ref[k].dtype or got[k].shape != ref[k].shape or not torch.equal(got[k], ref[k])]
    return bad


def _loading_worker(rank, world, ckpts, with_bad):
    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration
    from qmoe_lightning.parallel import loading
    from qmoe_lightning.parallel.parallelize import build_mesh

    mesh = build_mesh("cpu", world, ep_size=2)
    log = _record_reads()
    out = {"layouts": {}, "errors": {}}
    ids = (torch.arange(24) * 7 % 400).reshape(1, 24)
    for layout, lora in (("per_expert", None), ("fused", LORA)):  # the LoRA model's state also holds the base
        path = ckpts[layout]
        ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(path).eval()
        model = _parallel_model(mesh, lora).eval()  # LoRA: adapters added on meta, before parallelising
        log.clear()
        report = loading.load_hf_weights_parallel(model, path)
        reads = list(log)
        n_adapters = loading.init_lora_parallel(model, LoraConfig(**lora).init_seed) if lora else 0
        with torch.no_grad():  # B = 0: the adapters do not change the output
            want = ref(input_ids=ids).logits
            # independent of how state.py describes the shards: the parallel forward equals the one-process one
            diff = (model(input_ids=ids).logits - want).abs().max().item()
        if lora:
            apply_lora(ref, LoraConfig(**lora))  # one process: adapters initialised on the loaded full model
        out["layouts"][layout] = dict(
            reads=reads, report=dataclasses.asdict(report), logits_diff=diff, n_adapters=n_adapters,
            mismatches=_mismatches(_gathered(model), ref.state_dict()),
            same_report=dataclasses.replace(report, rank_local=None) == ref.checkpoint_source.report,
            n_lora_keys=sum("lora_" in k for k in ref.state_dict()), experts=list(range(*_expert_box(model))))
    if with_bad:
        # EP without FSDP: dense tensors replicated (read whole on every rank), experts still rank-local
        model = _parallel_model(mesh, fsdp=False)
        loading.load_hf_weights_parallel(model, ckpts["per_expert"])
        ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(ckpts["per_expert"])
        out["ep_only_mismatches"] = _mismatches(_gathered(model), ref.state_dict())
        model = _parallel_model(mesh)  # a failed load leaves it half-written: reused, only the errors matter
        for name, path in ckpts["bad"].items():
            try:
                loading.load_hf_weights_parallel(model, path)
                out["errors"][name] = None
            except ValueError as err:
                out["errors"][name] = str(err)
    return out


def _expert_box(model):
    from qmoe_lightning.parallel.loading import _target
    from qmoe_lightning.parallel.state import global_state_dict

    key = "model.language_model.layers.0.mlp.experts.down_projs"
    return _target(key, global_state_dict(model)[key]).box[0]


def _check(results, ckpts, world):
    for layout, path in (("per_expert", ckpts["per_expert"]), ("fused", ckpts["fused"])):
        numel = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                numel.update({k: h.get_slice(k).get_shape() for k in h.keys()})
        read = defaultdict(int)
        for rank, res in enumerate(results):
            r = res["layouts"][layout]
            assert r["mismatches"] == [], (rank, layout, r["mismatches"][:5])
            assert r["logits_diff"] <= 1e-5, (rank, layout, r["logits_diff"])
            assert r["same_report"], (rank, layout, r["report"])
            assert r["n_adapters"] == r["n_lora_keys"] and (r["n_adapters"] > 0) == (layout == "fused")
            assert not [e for e in r["reads"] if e[0] == "tensor"], "get_tensor was called"
            # per-expert keys: only this rank's experts are read
            for _, key, _ in r["reads"]:
                if ".mlp.experts." in key and key.split(".mlp.experts.")[1][0].isdigit():
                    assert int(key.split(".mlp.experts.")[1].split(".")[0]) in r["experts"], (rank, key)
            for _, key, n in r["reads"]:
                read[key] += n
            rl = r["report"]["rank_local"]
            assert rl["read_elements"] < rl["checkpoint_elements"] / (world - 0.5)  # about 1/world of the tensors
        # every checkpoint element read exactly once over all ranks (mtp: never), so no rank read a tensor whole
        expected = {k: math.prod(s) for k, s in numel.items() if not k.startswith("mtp.")}
        assert dict(read) == expected, [(k, read.get(k), n) for k, n in expected.items() if read.get(k) != n][:5]
    if results[0]["errors"]:
        assert [res["ep_only_mismatches"] for res in results] == [[]] * world
        for name in results[0]["errors"]:
            msgs = [res["errors"][name] for res in results]
            assert all(m is not None for m in msgs), (name, msgs)
            assert len(set(msgs)) == 1, msgs  # the same error on every rank
            print(name, "->", msgs[0].splitlines()[:3])
        errs = results[0]["errors"]
        assert "linear_attn.in_proj_a.weight" in errs["missing_dense"] and "missing (1)" in errs["missing_dense"]
        assert "rank(s) [0]" in errs["missing_expert_of_rank0"] and "experts.gate_and_up_projs" in \
            errs["missing_expert_of_rank0"] and ": [1]" in errs["missing_expert_of_rank0"]
        assert "model.safetensors: 'model.language_model.layers.0.linear_attn.in_proj_a.weight'" in \
            errs["wrong_dense_shape"] and "(5, 64)" in errs["wrong_dense_shape"]
        assert "experts.down_proj' has shape (8, 64, 31)" in errs["wrong_fused_expert_shape"]


def _as_str(ckpts: dict) -> dict:
    return {k: ({n: str(p) for n, p in v.items()} if isinstance(v, dict) else str(v)) for k, v in ckpts.items()}


@pytest.mark.multiprocess
def test_rank_local_loading_ep2(checkpoints, tmp_path):
    results = run_workers(_loading_worker, 2, tmp_path, _as_str(checkpoints), True, timeout=120)
    _check(results, checkpoints, 2)


@pytest.mark.multiprocess
def test_rank_local_loading_ep2_efsdp2(checkpoints, tmp_path):
    results = run_workers(_loading_worker, 4, tmp_path, _as_str(checkpoints), False, timeout=180)
    _check(results, checkpoints, 4)


# ---------------------------------------------------------------------------------------------- the real module
MODULE_SCRIPT = textwrap.dedent('''
    import dataclasses, os, sys
    sys.modules.setdefault("fla", None); sys.modules.setdefault("causal_conv1d", None)
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import lightning.pytorch as pl
    from qmoe_lightning.lightning_module import QMoELightningModule
    from qmoe_lightning.lora import LoraConfig
    from qmoe_lightning.parallel.state import full_tensor, global_state_dict
    from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

    def gathered(model):
        return {{k: full_tensor(v).detach().clone() for k, v in global_state_dict(model).items()}}

    class Module(QMoELightningModule):
        def configure_model(self):
            super().configure_model()
            if not hasattr(self, "after_configure"):
                self.after_configure = gathered(self.model)  # what configure_model built (collective: all ranks)

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, module):  # after the strategy's setup, before any step
            experts = module.model.model.language_model.layers[0].mlp.experts
            local = {{k: (v.to_local() if hasattr(v, "to_local") else v).dtype for k, v in module.model.state_dict().items()}}
            result = dict(after_configure=module.after_configure, at_fit_start=gathered(module.model), local_dtypes=local,
                          report=dataclasses.asdict(module.checkpoint_source.report), strict_loading=module.strict_loading,
                          parallelized=module.parallelized, local_experts=experts.num_local_experts)
            torch.save(result, os.path.join({out!r}, f"rank{{trainer.global_rank}}.pt"))

    if __name__ == "__main__":
        torch.set_num_threads(1)
        module = Module(pretrained={ckpt!r}, lora=LoraConfig(**{lora!r}), total_steps=1)
        trainer = pl.Trainer(accelerator="cpu", devices=2, precision="bf16-true", max_steps=0,
                             strategy=ExpertParallelStrategy(ep_size=2, process_group_backend="gloo"),
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Probe()],
                             default_root_dir={out!r})
        data = torch.utils.data.DataLoader([{{"input_ids": torch.zeros(1, 8, dtype=torch.long)}}] * 4, batch_size=None)
        trainer.fit(module, data)
        import cli
        cli.exit_after_distributed_run()  # no interpreter teardown: it can end in std::terminate (see there)
''')


@pytest.mark.multiprocess
def test_module_loads_rank_locally_under_the_strategy(checkpoints, tmp_path):
    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "fit_module.py"
    script.write_text(MODULE_SCRIPT.format(root=str(root), tests=str(root / "tests"), out=str(tmp_path),
                                           ckpt=str(checkpoints["fused"]), lora=LORA))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    # both ranks write to this stderr: enough of it to hold a crashed rank's faulthandler stack (conftest) next to the
    # other rank's traceback
    assert proc.returncode == 0, proc.stderr[-16000:]
    assert "rank-local (rank 0 read" in proc.stdout + proc.stderr
    # the one-process module under bf16-true: meta -> bf16 -> to_empty -> load_hf_weights -> apply_lora
    ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(checkpoints["fused"], dtype=torch.bfloat16)
    apply_lora(ref, LoraConfig(**LORA))
    ref_sd = ref.state_dict()
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert res["parallelized"] and res["local_experts"] == 4 and res["strict_loading"] is False
        rl = res["report"]["rank_local"]
        assert 0 < rl["read_elements"] < 0.75 * rl["checkpoint_elements"]
        n_mtp = sum(k.startswith("mtp.") for k in json.loads(
            (checkpoints["fused"] / "model.safetensors.index.json").read_text())["weight_map"])
        assert res["report"]["skipped"] == {"mtp": n_mtp} and len(res["report"]["passthrough"]) == n_mtp
        built = res["after_configure"]
        assert _mismatches(built, ref_sd) == []  # bitwise, dtypes included
        assert built["model.language_model.layers.0.linear_attn.A_log"].dtype == torch.float32
        assert built["model.language_model.layers.0.mlp.experts.down_lora_A"].dtype == torch.float32
        assert built["lm_head.weight"].dtype == torch.bfloat16
        # after the strategy's setup too, where Lightning's bf16-true `convert_module` has run `module.to(bf16)`:
        # A_log / dt_bias and the fp32 adapters keep their exact fp32 values (KeepFp32Mixin keeps a copy)
        assert _mismatches(res["at_fit_start"], ref_sd) == []
        assert res["local_dtypes"] == {k: v.dtype for k, v in ref_sd.items()}
