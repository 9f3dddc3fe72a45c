"""LoRA training step vs frozen-base step, forward+backward, on the mid-size CPU config.

Config: hidden 256, 8 layers (6 Gated DeltaNet + 2 full attention), 64 experts top-8, moe intermediate 64, shared
expert 128, vocab 32k (the `mid_config` of bench/bench_model.py, imported so both benchmarks measure one model).
Input: one packed row of log-normal documents (`--tokens`, default 2048) with cu_seqlens, labels = inputs.

Variants, timed in ONE process, interleaved step by step (so machine-load drift hits all of them alike), median of
`--steps` after a warm-up:
  frozen   every base parameter frozen, no adapter; the input embeddings require grad, so the backward runs through
           the whole network (activation gradients only): the least work any LoRA step must do
  lora     the same model with adapters (default targets: attention, linear attention, shared expert, routed
           experts through the grouped-GEMM path), same inputs
  full     full fine-tuning (every parameter trainable), for context
Printed: seconds per step, the overhead ratio lora / frozen (target <= 1.3x), lora / full, the per-group trainable
table. Threads default to 1 (`--threads`): the machines this runs on are shared and 2-thread timings of small GEMMs
mostly measure spin-waiting.

    python bench/bench_lora.py [--tokens 2048] [--steps 3] [--rank 16] [--expert-rank 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import mid_config  # noqa: E402  the same mid-size config as the model benchmark


def packed_row(total: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        n = int(torch.empty(1).log_normal_(mean=5.0, std=0.9, generator=g).clamp(8, 2048))
        lengths.append(min(n, total - sum(lengths)))
    ids = torch.randint(0, vocab - 8, (1, total), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--expert-rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=None, help="lora targets (default: the LoraConfig default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning variant")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from qmoe_lightning.lora import LoraConfig, apply_lora
    from qmoe_lightning.models import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    base = Qwen3_5MoeForConditionalGeneration.from_config(mid_config(args.vocab)).train()
    ids, cu = packed_row(args.tokens, args.vocab, seed=0)

    models = {}
    frozen = base
    for p in frozen.parameters():
        p.requires_grad_(False)
    models["frozen"] = frozen
    lora_model = copy.deepcopy(base)
    kw = dict(rank=args.rank, alpha=2 * args.rank, expert_rank=args.expert_rank)
    if args.targets:
        kw["targets"] = args.targets
    report = apply_lora(lora_model, LoraConfig(**kw))
    models["lora"] = lora_model
    if not args.no_full:
        full = copy.deepcopy(base)
        for p in full.parameters():
            p.requires_grad_(True)
        models["full"] = full

    def step(model) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        emb = model.model.language_model.embed_tokens(ids)
        if not emb.requires_grad:
            emb = emb.detach().requires_grad_(True)  # backward through the whole network, as a LoRA step needs
        out = model(inputs_embeds=emb, input_ids=None, labels=ids, cu_seqlens=cu, output_router_logits=True,
                    label_logits_only=True)
        out.loss.backward()
        return time.perf_counter() - t0

    times = {k: [] for k in models}
    for i in range(args.steps + 1):
        for name, model in models.items():
            t = step(model)
            if i > 0:  # first round is warm-up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on a shared machine
    print(f"mid config, {args.tokens} packed tokens ({len(cu) - 1} documents), threads {args.threads}, "
          f"rank {args.rank}, expert rank {args.expert_rank}")
    print(report.table())
    for k, v in med.items():
        print(f"{k:7s} fwd+bwd {v:7.3f} s   ({', '.join(f'{t:.3f}' for t in times[k])})")
    ratio = med["lora"] / med["frozen"]
    print(f"LoRA overhead vs frozen-base fwd+bwd: {ratio:.3f}x median, {best['lora'] / best['frozen']:.3f}x best-of "
          "(target <= 1.3x)")
    if "full" in med:
        print(f"LoRA vs full fine-tuning fwd+bwd:     {med['lora'] / med['full']:.3f}x")
    print(json.dumps({"lora_over_frozen": round(ratio, 3), "lora_over_frozen_best": round(best["lora"] / best["frozen"], 3),
                      "step_s": {k: round(v, 3) for k, v in med.items()},
                      "trainable": report.total_trainable}))


if __name__ == "__main__":
    main()
