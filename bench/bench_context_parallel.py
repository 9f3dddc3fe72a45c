"""Per-rank activation memory of context parallelism on a long row, CPU, in one run: cp = 1, 2, 4.

The mid-size Qwen3.5-MoE config of bench_model.py (hidden 256, 8 layers: 6 Gated DeltaNet + 2 gated attention, 64
experts top-8, vocab 32k), one packed row of `--tokens` tokens: one document of half the row, the rest log-normal
documents, every token a target. Each cp size runs in its own gloo process group (cp processes); every rank runs the
training forward (fused LM head + CE) and backward of the same row, and reports:

  saved      bytes of the activations autograd keeps for backward (unique storages of the tensors saved by the
             forward, parameters excluded): the activation memory of a forward + backward without checkpointing
  fwd_bwd    wall time of its forward + backward (threads per process = cores / cp; with fewer cores than
             processes the times say little; the per-rank spread shows the causal-attention imbalance of the
             contiguous split)

Printed: per cp, the largest per-rank `saved` and its ratio to cp = 1 against the ideal 1 / cp, and each rank's
figures; each rank's share of the row's causal attention work (query-key pairs) under the contiguous split. What is not split: the whole-row embeddings / targets every rank builds before the split, and the
gathered keys and values of the attention layers (2 x T x Hkv x D per attention layer), which the attention
backward keeps.

    python bench/bench_context_parallel.py [--tokens 8192] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_row(tokens: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [tokens // 2]
    while sum(lengths) < tokens:
        n = int(torch.empty(1).log_normal_(6.0, 0.8, generator=g).clamp(16, 4096))
        lengths.append(min(n, tokens - sum(lengths)))
    order = torch.randperm(len(lengths), generator=g).tolist()
    lengths = [lengths[i] for i in order]
    ids = torch.randint(0, vocab - 8, (1, tokens), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(input_ids=ids, labels=ids.clone(), cu_seqlens=cu)


class SavedActivations:
    """Counts the unique storages autograd saves for backward (parameters excluded)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        if not t.is_meta and t.layout == torch.strided:
            s = t.untyped_storage()
            if s.data_ptr() not in self.params:
                self.seen[s.data_ptr()] = s.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def _worker(rank: int, world: int, port: int, tokens: int, vocab: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from bench_model import mid_config

    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(mid_config(vocab)).float()
    if world > 1:
        from qmoe_lightning.models.parallel_context import ParallelContext
        from qmoe_lightning.parallel.context_parallel import ContextParallelGroup, ContextParallelRows

        group = ContextParallelGroup(None)  # the row split over every process, nothing else parallelised
        model.parallel = ParallelContext(rows=ContextParallelRows(group))
    row = make_row(tokens, vocab)
    result = {}
    for attempt in range(2):  # the first step warms up allocators and kernels
        model.zero_grad(set_to_none=True)
        counter = SavedActivations(model)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            res = model(**row, return_logits=False)
        res.loss.backward()
        result = dict(saved=counter.bytes, fwd_bwd=time.perf_counter() - t0, ce=float(res.ce_loss))
    Path(out, f"cp{world}_rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


class _Place:
    """What `split_row` reads of a cp group (its size and this rank's place), to lay out a split without processes."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def attention_shares(row: dict, cp: int) -> list[float]:
    """Each rank's share of the row's causal attention work (query-key pairs of its local queries)."""
    from qmoe_lightning.models.context_parallel import split_row
    from qmoe_lightning.models.packing import build_sequence_info

    T = row["input_ids"].shape[1]
    whole = build_sequence_info(1, T, torch.device("cpu"), row["cu_seqlens"])
    pairs = []
    for r in range(cp):
        local = split_row(_Place(r, cp), whole, min_slice=3)
        a = local.cp.start
        n = 0
        for (s, e), doc_start in zip(local.doc_bounds, local.cp.segment_doc_start):
            first, last = a + s - doc_start + 1, a + e - doc_start  # keys seen by the segment's first / last query
            n += (first + last) * (e - s) // 2
        pairs.append(n)
    return [p / sum(pairs) for p in pairs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    import tempfile

    out = tempfile.mkdtemp()
    cores = os.cpu_count() or 1
    rows = {}
    for cp in args.cp:
        ctx = mp.get_context("spawn")
        port = _free_port()
        threads = max(1, cores // cp)
        procs = [ctx.Process(target=_worker, args=(r, cp, port, args.tokens, args.vocab, threads, out))
                 for r in range(cp)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"cp={cp}: a worker failed (exit codes {[p.exitcode for p in procs]})")
        rows[cp] = [json.loads(Path(out, f"cp{cp}_rank{r}.json").read_text()) for r in range(cp)]
    base = max(r["saved"] for r in rows[args.cp[0]])
    print(f"row of {args.tokens} tokens, mid-size Qwen3.5-MoE, vocab {args.vocab}, {cores} cores")
    print(f"{'cp':>3} {'max saved MiB':>14} {'vs cp=1':>8} {'ideal':>6}   per rank saved MiB / fwd+bwd s")
    summary = {}
    for cp, ranks in rows.items():
        top = max(r["saved"] for r in ranks)
        per = " ".join(f"{r['saved'] / 2**20:.0f}/{r['fwd_bwd']:.1f}" for r in ranks)
        print(f"{cp:>3} {top / 2**20:>14.0f} {top / base:>8.3f} {1 / cp:>6.3f}   {per}")
        summary[cp] = dict(max_saved_mib=top / 2**20, ratio=top / base, ranks=ranks)
    row = make_row(args.tokens, args.vocab)
    lengths = (row["cu_seqlens"][1:] - row["cu_seqlens"][:-1]).tolist()
    print(f"documents {lengths}; causal attention work per rank of the contiguous split (share of the row's):")
    for cp in args.cp:
        shares = attention_shares(row, cp)
        summary.setdefault(cp, {})["attention_shares"] = shares
        print(f"  cp={cp}: " + " ".join(f"{x:.3f}" for x in shares) + f"  (balanced: {1 / cp:.3f} each)")
    ces = {cp: round(sum(r["ce"] for r in ranks), 6) for cp, ranks in rows.items()}
    print(f"the row's CE (sum of the ranks' shares), per cp: {ces}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
