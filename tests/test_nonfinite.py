"""Non-finite training never goes silent and never reaches a checkpoint or an export:

- model.nonfinite=stop: a NaN gradient or loss stops the fit with NonFiniteTrainingError naming the step, the
  quantity and the parameter group; last.ckpt and the HF export of the last good step stay bitwise as they were,
  even with save_on_exception;
- model.nonfinite=skip: the step changes neither the weights nor the optimizer state nor the LR schedule, is
  counted, and more than nonfinite_max_skips in a row stop the run;
- a step window without any target token is skipped and counted as an empty step (no NaN, no weight change);
- the writers (HF export, PEFT adapter, RunCheckpoint) refuse NaN weights naming the tensor;
- the refusal is decided on every rank together when only one rank holds the NaN (2 gloo processes);
- `cli.py fit --model.lr 1e4` ends non-zero with the message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from rank_launcher import launch_ranks
from test_app_common import make_datamodule, make_trainer, write_small_dataset

from callbacks import HFExport, RunCheckpoint
from qmoe_lightning.export_dir import NonFiniteError
from qmoe_lightning.lightning_module import NonFiniteTrainingError, QMoELightningModule, parameter_group

ROOT = Path(__file__).resolve().parents[1]
ROUTER = "model.language_model.layers.0.mlp.gate.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    return write_small_dataset(tmp / "data", n_rows=12), tmp / "cache"


def _dm(data):
    return make_datamodule(data[0], data[1], max_tokens=64)


class PoisonGradient(pl.Callback):
    """Sets one gradient to NaN at the given steps (1-based, as the step's number); records the files of the last
    good step just before."""

    def __init__(self, steps, name=ROUTER, snapshot=()):
        self.steps, self.name, self.snapshot = set(steps), name, snapshot
        self.files: dict[str, bytes] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        self.weights[step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        if step in self.steps:
            self.files = {str(p): p.read_bytes() for d in self.snapshot for p in sorted(Path(d).rglob("*"))
                          if p.is_file()}
            dict(pl_module.model.named_parameters())[self.name].grad[0, 0] = float("nan")


def _params(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_parameter_groups_of_the_message():
    assert parameter_group(ROUTER) == "router"
    assert parameter_group("model.language_model.layers.0.mlp.experts.gate_and_up_projs") == "routed_experts"
    assert parameter_group("model.language_model.layers.3.self_attn.q_proj.lora_B") == "lora"
    assert parameter_group("model.language_model.embed_tokens.weight") == "embeddings"
    assert parameter_group("lm_head.weight") == "lm_head"
    assert parameter_group("model.language_model.layers.1.linear_attn.in_proj_qkvz.weight") == "linear_attention"


def test_stop_names_step_quantity_and_group_and_keeps_the_last_good_files(tmp_path, data):
    root = tmp_path / "run"
    ckpt, export = root / "checkpoints", root / "hf_export"
    poison = PoisonGradient({3}, snapshot=(ckpt, export))
    module = QMoELightningModule(pretrained="embedded", lr=1e-3)
    callbacks = [RunCheckpoint(every_n_train_steps=1, save_on_exception=True), HFExport(every_n_steps=1), poison]
    trainer = make_trainer(root, max_steps=5, callbacks=callbacks, enable_checkpointing=True)
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.fit(module, datamodule=_dm(data))
    msg = str(err.value)
    assert "step 3" in msg and "gradient norm nan" in msg and "router" in msg and ROUTER in msg, msg
    assert "loss" not in msg.split(":")[1].split(";")[0]  # the loss itself was finite
    assert trainer.global_step == 2
    # what step 2 wrote is still there, bitwise, and nothing else was written
    assert poison.files and any(k.endswith("last.ckpt") for k in poison.files)
    now = {str(p): p.read_bytes() for d in (ckpt, export) for p in sorted(d.rglob("*")) if p.is_file()}
    assert now == poison.files
    # and the weights in memory are those of step 2: nothing of step 3 was applied
    assert all(torch.equal(p, poison.weights[3][n]) for n, p in _params(module).items())


def test_skip_leaves_weights_optimizer_and_schedule_alone_then_stops_after_max_skips(tmp_path, data):
    states = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            states[trainer.global_step] = dict(
                weights=_params(pl_module), lr=opt.param_groups[0]["lr"],
                adam_steps={id(p): float(opt.state[p]["step"]) for p in opt.state},
                exp_avg={id(p): opt.state[p]["exp_avg"].clone() for p in opt.state},
                sched=trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                skips=pl_module.step_guard.skipped.nonfinite, in_row=pl_module.step_guard.skipped.nonfinite_in_row)

    poison = PoisonGradient({2, 4, 5, 6, 7})
    module = QMoELightningModule(pretrained="embedded", lr=1e-3, warmup_steps=3, nonfinite="skip",
                                 nonfinite_max_skips=2)
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[poison, Record()])
    with pytest.raises(NonFiniteTrainingError, match=r"step 6 .*3 non-finite steps in a row.*nonfinite_max_skips=2"):
        trainer.fit(module, datamodule=_dm(data))
    s1, s2, s3 = states[1], states[2], states[3]
    # the skipped step 2: weights, AdamW moments and step counts, LR schedule all as after step 1
    assert all(torch.equal(s2["weights"][n], w) for n, w in s1["weights"].items())
    assert s2["adam_steps"] == s1["adam_steps"] and all(torch.equal(s2["exp_avg"][k], v)
                                                       for k, v in s1["exp_avg"].items())
    assert s2["sched"] == s1["sched"] and s2["lr"] == s1["lr"]
    assert (s2["skips"], s2["in_row"]) == (1, 1)
    # step 3 is taken again (the schedule moves on from where it was), and resets the run of skips
    assert not all(torch.equal(s3["weights"][n], w) for n, w in s2["weights"].items())
    assert s3["sched"] == s2["sched"] + 1 and (s3["skips"], s3["in_row"]) == (1, 0)
    assert (states[5]["skips"], states[5]["in_row"]) == (3, 2) and 6 not in states
    assert all(torch.equal(states[5]["weights"][n], w) for n, w in s3["weights"].items())
    assert trainer.callback_metrics["train/nonfinite_skips"] == 3


def test_window_without_targets_is_an_empty_step(tmp_path, data):
    from test_app_training import _loader

    dm = _dm(data)
    dm.setup("fit")
    good = dm.train_dataset[0]
    empty = dict(dm.train_dataset[1])
    empty["labels"] = torch.full_like(empty["labels"], -100)  # every document's answer dropped
    empty["num_label_tokens"] = 0
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            seen[trainer.global_step] = (_params(pl_module), {id(p): float(opt.state[p]["step"]) for p in opt.state},
                                         pl_module.step_guard.skipped.empty)

    module = QMoELightningModule(pretrained="embedded", lr=1e-2)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[Record()])
    trainer.fit(module, train_dataloaders=_loader([good, empty, good]))
    (w1, adam1, e1), (w2, adam2, e2), (w3, _, e3) = seen[1], seen[2], seen[3]
    # with AdamW's momentum from step 1, a zero-gradient step would still move every weight
    assert all(torch.equal(w2[n], w) for n, w in w1.items()) and adam2 == adam1
    assert (e1, e2, e3) == (0, 1, 1) and trainer.callback_metrics["train/empty_steps"] == 1
    assert all(torch.isfinite(w).all() for w in w3.values())
    assert not all(torch.equal(w3[n], w) for n, w in w2.items())


def _nan_model():
    from qmoe_lightning.embedded import ensure_embedded_default
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ensure_embedded_default().model_dir))


def test_writers_refuse_nan_weights_naming_them_and_keep_the_previous_files(tmp_path):
    from qmoe_lightning.lora import LoraConfig, apply_lora, save_peft_adapter

    model = _nan_model()
    out = model.save_pretrained(tmp_path / "hf_export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model.lm_head.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"lm_head.weight.*1 NaN"):
        model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf_export"]  # no temporary left

    model = _nan_model()
    apply_lora(model, LoraConfig(rank=2))
    adapter = save_peft_adapter(model, tmp_path / "hf_adapter", "base")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    name = next(n for n, _ in model.named_parameters() if n.endswith("q_proj.lora_B"))
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"q_proj.lora_B.weight.*inf"):
        save_peft_adapter(model, adapter, "base")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_callbacks_refuse_nan_weights(tmp_path, data):
    """HFExport and RunCheckpoint check the model before writing: the previous export / last.ckpt stay."""
    root = tmp_path / "run"
    module = QMoELightningModule(pretrained="embedded", lr=1e-3)
    export, ckpt = HFExport(), RunCheckpoint(every_n_train_steps=1)
    trainer = make_trainer(root, max_steps=1, callbacks=[export, ckpt], enable_checkpointing=True)
    trainer.fit(module, datamodule=_dm(data))
    last = root / "checkpoints" / "last.ckpt"
    files = {p: p.read_bytes() for p in [last, *sorted((root / "hf_export").iterdir())]}
    with torch.no_grad():
        module.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"HF export .*lm_head.weight"):
        export.export(trainer, module)
    with pytest.raises(NonFiniteError, match=r"checkpoint .*last.ckpt.*lm_head.weight"):
        ckpt._save_checkpoint(trainer, str(last))
    assert {p: p.read_bytes() for p in files} == files


_RANKS = """
import os, sys, torch, torch.distributed as dist
from qmoe_lightning.export_dir import NonFiniteError, refuse_nonfinite_model
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
model = torch.nn.Linear(3, 2)  # an expert-parallel rank holds its own slice: only rank 1's holds the NaN
if rank == 1:
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
try:
    refuse_nonfinite_model(model, "the export")
    print("rank", rank, "wrote")
except NonFiniteError as err:
    print("rank", rank, "refused:", err)
dist.barrier()  # both reached it: nobody was left waiting in a collective
"""


@pytest.mark.multiprocess
def test_every_rank_refuses_when_one_rank_holds_a_nan():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _RANKS, str(r), port], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (out, err) in enumerate(outs):
        assert f"rank {rank} refused" in out and "NaN / inf (weight)" in out, err[-2000:]


@pytest.mark.slow
def test_cli_fit_with_a_huge_lr_ends_non_zero_with_the_message(tmp_path, data):
    root = tmp_path / "run"
    args = [sys.executable, "cli.py", "fit", "--config", "configs/tiny.yaml", "--model.lr", "1e4",
            "--trainer.max_steps", "4", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
            "false", "--data.train_path", str(data[0]), "--data.val_path", "null", "--data.max_tokens", "64",
            "--data.num_workers", "0", "--data.cache_dir", str(data[1])]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 3, proc.stderr[-3000:]  # cli.EXIT_NONFINITE: one message, not a traceback
    assert "Traceback" not in proc.stderr
    # the weights of step 1 (lr 1e4 / 11 in warmup) are huge but finite; step 2's forward gives a NaN loss
    assert "training stopped at step 2" in proc.stderr and "loss nan" in proc.stderr, proc.stderr[-3000:]
    assert "model.lr is 10000" in proc.stderr
    assert not (root / "hf_export").exists()  # the end-of-fit export is not written from diverged weights


@pytest.mark.multiprocess
def test_expert_parallel_ranks_stop_together_when_one_rank_sees_a_nan(tmp_path, data):
    """2 processes, experts split over them (ep=2, gloo): rank 1 alone gets a NaN expert gradient; both ranks stop
    at that step with the same message naming the experts, and nothing is left waiting in a collective."""
    root = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    args = [sys.executable, "cli.py", "fit", "--config", "configs/tiny_ep.yaml", "--trainer.max_steps", "4",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--data.train_path", str(data[0]), "--data.val_path", "null",
            "--data.max_tokens", "64", "--data.num_workers", "0", "--data.cache_dir", str(data[1]),
            "--trainer.callbacks+=nonfinite_callbacks.PoisonGradientOnRank", "--trainer.callbacks.step", "2",
            "--trainer.callbacks.rank", "1"]
    proc = launch_ranks(args[2:], 2, env=env, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "rank 1: poisoned the gradient of" in text, text[-3000:]
    stops = [line for line in text.splitlines() if "training stopped at step 2" in line]
    assert len(stops) >= 2 and all("routed_experts" in line for line in stops), text[-3000:]  # every rank says it
    assert not (root / "hf_export").exists()
