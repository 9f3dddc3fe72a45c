"""Expert-parallel dispatch, blocking vs overlapped (the shared expert computed while the rows travel), on CPU gloo
processes, in one run: one Qwen3.5-MoE SparseMoE layer (hidden 1024, 64 experts top-8, expert intermediate 512,
shared expert 2048 by default), ep = 2 processes, each with its own `--tokens` tokens; forward + backward, the minimum
over `--steps` timed steps after one warm-up, for both modes in the same processes (alternating, so machine load
hits both alike). Prints each mode's step time (max over ranks), the ratio blocking / overlapped, and checks the two
modes' outputs and gradients are bitwise equal.

On CPU the all-to-all is gloo over loopback TCP and both processes share the cores: what overlap can hide here is the
time a rank waits for the other's rows, not the link. The figure that matters is on GPUs (NCCL on its own stream,
NVLink); a one-GPU machine cannot run expert parallelism, so that measurement needs a multi-GPU node.

    python bench/bench_ep_overlap.py [--tokens 4096] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _config(hidden: int, experts: int, top_k: int, inter: int, shared: int):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k,
                                moe_intermediate_size=inter, shared_expert_intermediate_size=shared)


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from qmoe_lightning.models.moe import SparseMoE
    from qmoe_lightning.parallel.expert_parallel import shard_experts_

    cfg = _config(args["hidden"], args["experts"], args["top_k"], args["inter"], args["shared"])
    layers = {}
    for mode in ("blocking", "overlapped"):
        torch.manual_seed(0)
        moe = SparseMoE(cfg).float()
        shard_experts_(moe.experts, None, overlap=mode == "overlapped")
        layers[mode] = moe
    g = torch.Generator().manual_seed(rank + 1)
    x = torch.randn(1, args["tokens"], args["hidden"], generator=g)
    w = torch.randn(1, args["tokens"], args["hidden"], generator=g)

    def step(moe):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        dist.barrier()
        t0 = time.perf_counter()
        out, _, _ = moe(xi)
        (out * w).sum().backward()
        return time.perf_counter() - t0, out.detach(), xi.grad, {n: p.grad for n, p in moe.named_parameters()}

    times = {m: [] for m in layers}
    results = {}
    for i in range(args["steps"] + 1):
        for mode, moe in layers.items():
            dt, *results[mode] = step(moe)
            if i:
                times[mode].append(dt)
    a, b = results["blocking"], results["overlapped"]
    equal = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"times": {m: min(t) for m, t in times.items()},
                                                          "bitwise_equal": equal}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--shared", type=int, default=2048)
    args = vars(parser.parse_args())
    out = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    slowest = {m: max(r["times"][m] for r in ranks) for m in ("blocking", "overlapped")}
    print(f"SparseMoE layer, ep=2 gloo processes, {args['tokens']} tokens per rank, hidden {args['hidden']}, "
          f"{args['experts']} experts top-{args['top_k']}, shared expert {args['shared']}, {args['threads']} thread(s)")
    print(f"forward + backward (min of {args['steps']}, max over ranks): blocking {slowest['blocking'] * 1e3:.1f} ms, "
          f"overlapped {slowest['overlapped'] * 1e3:.1f} ms, ratio {slowest['blocking'] / slowest['overlapped']:.3f}")
    print(f"bitwise equal on every rank: {all(r['bitwise_equal'] for r in ranks)}")


if __name__ == "__main__":
    main()
