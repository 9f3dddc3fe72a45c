"""`ExpertParallelStrategy` under a real Lightning Trainer (CPU, gloo, `devices=2`, Lightning's own launcher).

A small LightningModule builds the tiny text model in
`configure_model`, calls `trainer.strategy.parallelize(model)` and clips with the EP-aware clip. Checked: the mesh
(ep 2, efsdp 1, data_parallel 2), the sampler kwargs (2 replicas, rank = global rank), each rank owning 4 of 8
experts, EP + FSDP training for 3 optimizer steps with finite losses, and the logged global loss and global grad norm
identical on both ranks at every step. Then the project's own recipe, `cli.py fit --config configs/tiny_ep.yaml`,
through QMoELightningModule.configure_model -> strategy.parallelize, with its distributed checkpoint and HF export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rank_launcher import launch_ranks

SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.modules.setdefault("fla", None); sys.modules.setdefault("causal_conv1d", None)
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import lightning.pytorch as pl
    from tiny_configs import make_config
    from qmoe_lightning.models import Qwen3_5MoeForCausalLM
    from qmoe_lightning.parallel.clip import clip_grad_norm_
    from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 12
        def __getitem__(self, i):
            return torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(i))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.log_rows = None, []
        def configure_model(self):
            if self.model is not None:
                return
            torch.manual_seed(0)
            model = Qwen3_5MoeForCausalLM.from_config(make_config().text_config).float()
            self.model = self.trainer.strategy.parallelize(model)
        def training_step(self, ids, i):
            out = self.model(input_ids=ids, labels=ids)
            self.last_loss = self.trainer.strategy.reduce(out.loss.detach(), reduce_op="mean").item()
            return out.loss
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            norm = clip_grad_norm_(self.model, gradient_clip_val)
            self.log_rows.append(dict(loss=self.last_loss, norm=norm.item()))
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=3e-3, foreach=False)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        strategy = ExpertParallelStrategy(ep_size=2, process_group_backend="gloo")
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, gradient_clip_val=1.0,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir={out!r})
        module = Module()
        trainer.fit(module, torch.utils.data.DataLoader(Data(), batch_size=1))
        mesh = strategy.device_mesh
        result = dict(rank=trainer.global_rank, rows=module.log_rows,
                      mesh={{n: mesh[n].size() for n in ("replicate", "efsdp", "ep", "data_parallel")}},
                      sampler=strategy.distributed_sampler_kwargs,
                      local_experts=module.model.model.layers[0].mlp.experts.num_local_experts)
        with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
            json.dump(result, f)
''')


@pytest.mark.multiprocess
def test_lightning_trainer_with_expert_parallel_strategy(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "train_ep.py"
    script.write_text(SCRIPT.format(root=str(root), tests=str(root / "tests"), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["mesh"] == {"replicate": 1, "efsdp": 1, "ep": 2, "data_parallel": 2}
        assert r["sampler"] == {"num_replicas": 2, "rank": r["rank"]}
        assert r["local_experts"] == 4
        assert len(r["rows"]) == 3
    assert results[0]["rows"] == results[1]["rows"]  # global loss and global norm agree on both ranks
    losses = [row["loss"] for row in results[0]["rows"]]
    assert all(l == l and 0 < l < 20 for l in losses), losses


def test_tiny_ep_config_parses_with_the_strategy(capsys, monkeypatch):
    # in this process: `--print_config` parses, prints and exits before anything is built or launched
    import cli

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setattr("sys.argv", ["cli.py"])
    with pytest.raises(SystemExit) as done:
        cli.main(["fit", "--config", "configs/tiny_ep.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    assert "class_path: qmoe_lightning.parallel.strategy.ExpertParallelStrategy" in out
    assert "ep_size: 2" in out and "devices: 2" in out


def _cli(root: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    # both ranks started at once, as torchrun does (test_app_expert_parallel runs the recipe by Lightning's launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return launch_ranks(
        ["fit", "--config", "configs/tiny_ep.yaml", "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
         "false", "--trainer.default_root_dir", str(tmp_path), *extra], 2, env=env, timeout=420, cwd=root)


@pytest.mark.multiprocess
def test_tiny_ep_recipe_trains_through_the_project_module(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = _cli(root, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FSDPQwen3_5MoeForConditionalGeneration" in proc.stdout + proc.stderr  # parallelised, not a plain copy
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in proc.stdout + proc.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # a DCP directory
    assert (tmp_path / "hf_export" / "config.json").is_file()


def test_strategy_refuses_layouts_it_cannot_run():
    from qmoe_lightning.parallel.strategy import ExpertParallelStrategy

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="not divisible by cp_size 4 x ep_size 2"):
        ExpertParallelStrategy(ep_size=2, cp_size=4).build_device_mesh(4, cpu)
    with pytest.raises(ValueError, match="fsdp=False is for single-process runs"):
        ExpertParallelStrategy(ep_size=2, fsdp=False).build_device_mesh(2, cpu)
    with pytest.raises(ValueError, match="cp_size must be >= 1"):
        ExpertParallelStrategy(cp_size=0)


def test_context_parallel_groups_and_data_coordinates():
    """rank = ((outer * cp) + c) * ep + e: a cp group shares (outer, e), and so does its data-parallel rank."""
    from qmoe_lightning.parallel.context_parallel import context_parallel_groups, data_parallel_coordinates

    assert context_parallel_groups(4, 2, 2) == [[0, 2], [1, 3]]
    assert context_parallel_groups(8, 2, 1) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert context_parallel_groups(8, 4, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for world, cp, ep in ((4, 2, 2), (8, 2, 1), (8, 4, 2), (16, 2, 4)):
        groups = context_parallel_groups(world, cp, ep)
        assert sorted(r for g in groups for r in g) == list(range(world))
        coords = [data_parallel_coordinates(r, cp, ep) for r in range(world)]
        assert sorted(set(coords)) == list(range(world // cp))  # world / cp data-parallel ranks
        for g in groups:
            assert len({coords[r] for r in g}) == 1  # one row per cp group
            assert len({r % ep for r in g}) == 1  # a cp group never spans ep ranks: each keeps its experts' slice
