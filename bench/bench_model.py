"""Native packed forward+backward vs transformers, on CPU, in one run.

Mid-size config (hidden 256, 8 layers, 64 experts top-8, vocab 32k by default) of a family (`--family`:
Qwen3.5-MoE, 6 Gated DeltaNet + 2 gated attention layers with a shared expert; Qwen3-VL-MoE, 8 GQA attention layers;
Qwen3-MoE, the same 8 GQA attention layers in a text-only model with plain RoPE; Qwen3-Next, Qwen3.5's text layers
with its grouped Gated DeltaNet projections and plain partial RoPE, text only)
and one packed row of 2-4K tokens made of log-normal document lengths. Three timed variants, each in its own process (so peak memory is its own):

  native_packed   our model on the packed row with cu_seqlens (documents kept apart)
  hf_padded       transformers on the same documents padded into a batch: what a transformers user must do on
                  CPU to keep documents apart (its torch Gated DeltaNet cannot take cu_seqlens)
  hf_packed       transformers on the same packed row as one sequence: the same work with wrong numerics
                  (documents leak into each other); isolates implementation speed
  native_mtp      (with --mtp, Qwen3.5-MoE or Qwen3-Next) native_packed plus one multi-token prediction depth: the cost of MTP

Two label scenarios:
  all        every token is a target (language-model pre-training style); the LM head is the same work for both
             implementations and, at vocab 32k, about 40 % of the native step
  sft        targets on the assistant part only (the last 40-60 % of each document); the native model runs the LM
             head only where targets exist, transformers has no such option

The native model runs its training path (`return_logits=False`: LM head + CE fused in row chunks, no (T, V)
logits). Each step time is the minimum over the timed steps (robust to other load on the machine).

Printed per scenario: useful tokens/s (document tokens, padding excluded), peak RSS above the model-loaded baseline,
the ratios (a) native_packed / hf_padded and (b) native_packed / hf_packed, and a numerics check (per-document CE of
the packed native run vs transformers on the padded batch). transformers runs its CPU defaults (grouped_mm experts,
SDPA, torch chunked delta rule).

    python bench/bench_model.py [--family qwen3_5_moe|qwen3_vl_moe|qwen3_moe|qwen3_next] [--tokens 3072] [--steps 3]
                                [--vocab 32768] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mid_config(vocab: int, family: str = "qwen3_5_moe"):
    ids = dict(image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
               vision_end_token_id=vocab - 1)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=256,
                  num_position_embeddings=64)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=64,
                              num_experts_per_tok=8, moe_intermediate_size=64, decoder_sparse_step=1,
                              mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=8192,
                              tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e6))
    hybrid = dict(hidden_size=256, num_hidden_layers=8,
                  layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                  + ["full_attention"],
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
                  linear_conv_kernel_dim=4, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=64,
                  shared_expert_intermediate_size=128, max_position_embeddings=8192)
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(vocab_size=vocab, **hybrid, intermediate_size=512, decoder_sparse_step=1,
                               mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
                               rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25))
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig

        text = dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=64, num_experts_per_tok=8,
                    moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=8192,
                    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[8, 4, 4],
                                         mrope_interleaved=True))
        return Qwen3VLMoeConfig(text_config=text, vision_config=dict(vision, deepstack_visual_indexes=[0]),
                                tie_word_embeddings=False, **ids)
    from transformers import Qwen3_5MoeConfig

    text = dict(vocab_size=vocab, **hybrid,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[1, 1, 2], mrope_interleaved=True))
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def model_classes(family: str):
    """(native class, transformers class) of the family's main model (vision-language where it has one)."""
    import transformers

    from qmoe_lightning.models.registry import family_of

    native = family_of(family).model_class(text_only=False)
    return native, getattr(transformers, native.HF_ARCHITECTURE)


def document_lengths(total: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        n = int(torch.empty(1).log_normal_(mean=5.0, std=0.9, generator=g).clamp(8, 2048))
        lengths.append(min(n, total - sum(lengths)) if sum(lengths) + n > total + 512 else n)
    return lengths


def make_docs(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, vocab - 8, (n,), generator=g) for n in lengths]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sft_labels(docs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Mask the 'prompt' (first 40-60 %) of each document: only the assistant part is a target."""
    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for d in docs:
        cut = int(len(d) * (0.4 + 0.2 * torch.rand(1, generator=g).item()))
        out.append(torch.cat([torch.full((cut,), -100), d[cut:]]))
    return out


def run_variant(variant: str, scenario: str, ckpt: str, lengths: list[int], vocab: int, steps: int, threads: int,
                queue, family: str = "qwen3_5_moe") -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    docs = make_docs(lengths, vocab, seed=0)
    labels = docs if scenario == "all" else sft_labels(docs, seed=0)
    if variant.startswith("native"):
        native, _ = model_classes(family)
        if variant == "native_mtp":  # the mid-size checkpoint has no mtp.*: a seeded random MTP layer
            from qmoe_lightning.build import build_model
            from qmoe_lightning.models.registry import load_config

            model = build_model(native, load_config(Path(ckpt)), checkpoint=Path(ckpt), model_kwargs={"mtp_layers": 1},
                                mtp_random_init=True).model.train()
        else:
            model = native.from_pretrained(ckpt).train()
        ids = torch.cat(docs).unsqueeze(0)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        # the training path: LM head + CE fused over target rows only (no (T, V) logits); identical CE work
        inputs = dict(input_ids=ids, labels=torch.cat(labels).unsqueeze(0), cu_seqlens=cu, output_router_logits=True,
                      return_logits=False)
    else:
        sys.modules.setdefault("fla", None)  # force transformers' torch fallbacks (no GPU kernels on CPU)
        sys.modules.setdefault("causal_conv1d", None)
        _, HF = model_classes(family)
        model = HF.from_pretrained(ckpt, dtype=torch.float32).train()
        if variant == "hf_padded":
            longest = max(lengths)
            ids = torch.zeros(len(docs), longest, dtype=torch.long)
            padded_labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (d, lab) in enumerate(zip(docs, labels)):
                ids[i, : len(d)] = d
                padded_labels[i, : len(d)] = lab
                mask[i, : len(d)] = 1
            inputs = dict(input_ids=ids, attention_mask=mask, labels=padded_labels, output_router_logits=True)
        else:
            ids = torch.cat(docs).unsqueeze(0)
            inputs = dict(input_ids=ids, labels=torch.cat(labels).unsqueeze(0), output_router_logits=True)
    base = _rss_mb()
    times = []
    for i in range(steps + 1):  # first step is warm-up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(**inputs)
        out.loss.backward()
        times.append(time.perf_counter() - t0)
    # numerics: per-document mean CE (forward only, eval mode)
    model.eval()
    with torch.no_grad():
        if variant == "hf_padded":
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            ce = [torch.nn.functional.cross_entropy(logits[i, : len(d) - 1], d[1:]).item() for i, d in enumerate(docs)]
        elif variant.startswith("native"):
            logits = model(input_ids=inputs["input_ids"], cu_seqlens=inputs["cu_seqlens"]).logits[0]
            b = inputs["cu_seqlens"].tolist()
            ce = [torch.nn.functional.cross_entropy(logits[s : e - 1], docs[i][1:]).item()
                  for i, (s, e) in enumerate(zip(b[:-1], b[1:]))]
        else:
            ce = []
    queue.put(dict(variant=variant, scenario=scenario, step_s=min(times[1:]), peak_mb=_rss_mb() - base, ce=ce))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3072, help="packed row length target (useful tokens)")
    parser.add_argument("--steps", type=int, default=3, help="timed forward+backward steps (after 1 warm-up)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads per run (1 gives stable ratios on a shared machine)")
    parser.add_argument("--scenarios", nargs="+", default=["all", "sft"], choices=["all", "sft"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="qwen3_5_moe",
                        choices=["qwen3_5_moe", "qwen3_vl_moe", "qwen3_moe", "qwen3_next"])
    parser.add_argument("--mtp", action="store_true", help="also time the native model with one MTP depth")
    args = parser.parse_args()

    lengths = document_lengths(args.tokens, args.seed)
    useful = sum(lengths)
    print(f"documents: {len(lengths)}, useful tokens: {useful}, longest: {max(lengths)}, "
          f"padded batch: {len(lengths)} x {max(lengths)} = {len(lengths) * max(lengths)} slots, "
          f"threads: {args.threads}, family: {args.family}", flush=True)
    ctx = mp.get_context("spawn")
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        sys.modules.setdefault("fla", None)
        _, HF = model_classes(args.family)
        torch.manual_seed(args.seed)
        HF(mid_config(args.vocab, args.family)).save_pretrained(tmp)
        for scenario in args.scenarios:
            results = {}
            variants = ("native_packed", "hf_padded", "hf_packed") + (("native_mtp",) if args.mtp else ())
            for variant in variants:
                queue = ctx.Queue()
                proc = ctx.Process(target=run_variant, args=(variant, scenario, tmp, lengths, args.vocab, args.steps,
                                                             args.threads, queue, args.family))
                proc.start()
                results[variant] = queue.get()
                proc.join()
                r = results[variant]
                print(f"[{scenario}] {variant:14s} fwd+bwd {r['step_s']:7.3f} s  {useful / r['step_s']:8.0f} useful "
                      f"tok/s  peak +{r['peak_mb']:6.0f} MB", flush=True)
            nat, pad, packed = (results[k]["step_s"] for k in ("native_packed", "hf_padded", "hf_packed"))
            ce_diff = max(abs(a - b) for a, b in zip(results["native_packed"]["ce"], results["hf_padded"]["ce"]))
            print(f"[{scenario}] (a) native packed vs transformers padded batch: {pad / nat:.2f}x useful tokens/s")
            print(f"[{scenario}] (b) native packed vs transformers on the same packed row: {packed / nat:.2f}x")
            print(f"[{scenario}] numerics: max per-document CE diff native packed vs transformers padded = "
                  f"{ce_diff:.2e}", flush=True)
            if "native_mtp" in results:
                print(f"[{scenario}] cost of one MTP depth: step time x{results['native_mtp']['step_s'] / nat:.2f}")
            summary[scenario] = {
                "ratio_a_vs_hf_padded": round(pad / nat, 2), "ratio_b_vs_hf_packed": round(packed / nat, 2),
                "useful_tok_s": {k: round(useful / v["step_s"]) for k, v in results.items()},
                "peak_mb": {k: round(v["peak_mb"]) for k, v in results.items()}, "max_doc_ce_diff": ce_diff,
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
