"""Multi-node training on one machine, launched the way clusters launch it, against one process accumulating.

The world: 2 nodes x 2 processes (`--trainer.num_nodes 2 --trainer.devices 2`), `configs/tiny_ep.yaml`'s ep=2
inside a node and `--trainer.strategy.replicate 2` across the nodes (HSDP: the two nodes hold replicas, as the
multi-node recipes replicate or shard across nodes), gloo on CPU. Two launchers:
- torchrun, exactly as a user types it on each node: `torchrun --nnodes 2 --nproc-per-node 2 --node-rank {0,1}
  --master-addr 127.0.0.1 --master-port P cli.py fit ...` (two agents, four fresh interpreters);
- SLURM: the four tasks get the variables `srun` gives them (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID,
  SLURM_NODEID, SLURM_NNODES, SLURM_NTASKS_PER_NODE, ...) and MASTER_ADDR / MASTER_PORT as an sbatch script exports
  them; Lightning's SLURMEnvironment then decides ranks and world (tests/rank_launcher.py, forked ranks).
Both are held to the equality standard of the expert-parallel acceptance (tests/test_app_expert_parallel.py: the first
steps' gradients per tensor, the final weights within the bound AdamW allows) against one process accumulating 4
micro-batches. The torchrun run's distributed checkpoint of step 2 then resumes on 1 node x 4 processes (the same
world: it ends bitwise where the 2 x 2 run ends) and on 1 process accumulating 4 (the expert-parallel strategy with
ep 1, which reads distributed checkpoints; the data sampler continues the epoch at the same pack: it must end where
the one-process run ends).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from rank_launcher import launch_ranks
from test_app_expert_parallel import ROOT, _compare, _compare_gradients, _fit, _weights, fit_args, rank_env, \
    weight_bound

pytestmark = pytest.mark.multiprocess

LR = 4e-3  # configs/tiny_ep.yaml
NODES, PER_NODE = 2, 2
LAYOUT = ["--trainer.num_nodes", str(NODES), "--trainer.strategy.replicate", "2"]
# a distributed checkpoint every 2 steps, all kept (the step-2 one is resumed below)
CHECKPOINTS = ["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=callbacks.RunCheckpoint",
               "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_2x2(tmp_path_factory):
    """The 2 x 2 run through two torchrun agents, one per 'node', started together."""
    out = tmp_path_factory.mktemp("torchrun_2x2")
    port = _free_port()
    procs = [subprocess.Popen(
        ["torchrun", "--nnodes", str(NODES), "--nproc-per-node", str(PER_NODE), "--node-rank", str(node),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "cli.py",
         *fit_args(out, PER_NODE, *LAYOUT, *CHECKPOINTS)],
        cwd=ROOT, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(NODES)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node}:\n{log[-5000:]}"
    assert "FSDP" in logs[0] + logs[1]  # really parallelised
    return out


@pytest.fixture(scope="module")
def single_4(tmp_path_factory):
    """One process accumulating the 4 micro-batches the 4 ranks take per step."""
    out = tmp_path_factory.mktemp("single_4")
    _fit(out, "--trainer.accumulate_grad_batches", "4", *CHECKPOINTS, devices=1)
    return out


def test_torchrun_two_nodes_equal_one_process_accumulating(torchrun_2x2, single_4):
    grads = _compare_gradients(torchrun_2x2, single_4)
    worst = _compare(_weights(torchrun_2x2), _weights(single_4), weight_bound(LR))
    print(f"torchrun 2 nodes x 2 vs 1 process x accumulate 4: gradients {grads:.2e}, weights {worst:.2e}")
    export = json.loads((torchrun_2x2 / "hf_export" / "config.json").read_text())
    assert export["model_type"] == "qwen3_5_moe"


def test_slurm_two_nodes_equal_one_process_accumulating(tmp_path, single_4):
    out = tmp_path / "slurm_2x2"
    proc = launch_ranks(fit_args(out, PER_NODE, *LAYOUT), NODES * PER_NODE, env=rank_env(), nodes=NODES,
                        scheduler="slurm")
    assert proc.returncode == 0, proc.stderr[-5000:]
    # Lightning took the world from the SLURM variables (its SLURM environment's signal handlers say so)
    assert "SLURM auto-requeueing enabled" in proc.stderr and "MEMBER: 4/4" in proc.stderr
    grads = _compare_gradients(out, single_4)
    worst = _compare(_weights(out), _weights(single_4), weight_bound(LR))
    print(f"SLURM 2 nodes x 2 vs 1 process x accumulate 4: gradients {grads:.2e}, weights {worst:.2e}")


def _step2(run: Path) -> Path:
    (ckpt,) = (run / "checkpoints").glob("*step=2.ckpt")
    assert (ckpt / ".metadata").is_file()  # a distributed checkpoint
    return ckpt


def test_two_node_checkpoint_resumes_on_one_node_and_on_one_process(torchrun_2x2, single_4, tmp_path):
    step2 = _step2(torchrun_2x2)
    # 1 node x 4 processes: the same world and mesh, so the run ends where the 2 x 2 run ended
    node = tmp_path / "one_node_x4"
    proc = launch_ranks(fit_args(node, 4, "--trainer.strategy.replicate", "2", "--ckpt_path", str(step2)), 4,
                        env=rank_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    resumed, full = _weights(node), _weights(torchrun_2x2)
    assert all(torch.equal(resumed[k], full[k]) for k in full), "1 x 4 resumed run differs from the 2 x 2 run"
    # 1 process accumulating 4, under the strategy that reads distributed checkpoints (ep 1: the experts' global
    # views resharded onto one rank): it ends where the uninterrupted one-process run ends
    alone = tmp_path / "one_process"
    proc = launch_ranks(fit_args(alone, 1, "--trainer.accumulate_grad_batches", "4", "--trainer.strategy.ep_size", "1",
                                 "--trainer.strategy.replicate", "1", "--ckpt_path", str(step2)), 1, env=rank_env())
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "continues on 1: epoch 0 from its pack 8" in proc.stdout + proc.stderr  # the sampler's position
    worst = _compare(_weights(alone), _weights(single_4), weight_bound(LR))
    print(f"2 x 2 checkpoint of step 2 resumed on 1 process x accumulate 4 vs 1 process: weights {worst:.2e}")
    # negative control: the step-2 weights themselves are far from the end of the run (the resume trained 2 steps)
    start = tmp_path / "start"
    _fit(start, "--trainer.accumulate_grad_batches", "4", "--trainer.max_steps", "2", devices=1)
    moved = max((_weights(start)[k] - _weights(single_4)[k]).abs().max().item() for k in full)
    assert moved > 100 * weight_bound(LR)
