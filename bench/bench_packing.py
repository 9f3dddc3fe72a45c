"""Packing efficiency and preparation throughput of MultimodalPackingDataModule on a generated corpus.

Corpus: N chat rows whose answer lengths are log-normal (median ~150 words, long tail cut at the pack size by
truncation), ~30% with one image of random size 48..512 px (PNG files, decoded for real by the loader workers).
Figures printed:
- non-pad fraction: real tokens / (packs x padded row length) over the whole epoch (target >= 0.98), and of the
  re-planned epochs 1 and 2 and of first-fit-decreasing (the evaluation plan, the best fill but unmixed packs);
- preparation throughput: samples/s of (a) the cached-datasets encoding stage with 2 processes, and (b) the
  DataLoader with 2 workers producing micro-batches (image decode + image processor + packing), and end to end.

Usage: python bench/bench_packing.py [--rows 4000] [--max-tokens 4096] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def make_corpus(out: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "garden", "window", "red",
             "blue", "circle", "square", "one", "two", "three", "four", "five"]
    images = []
    for k in range(64):  # distinct files of varied sizes; rows reference them at random
        w, h = rng.randint(48, 512), rng.randint(48, 512)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        path = out / f"img_{k:03d}.png"
        img.save(path)
        images.append(path.name)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(rows):
            n_words = max(1, int(rng.lognormvariate(5.0, 1.0)))
            answer = " ".join(rng.choice(words) for _ in range(n_words))
            question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
            if rng.random() < 0.3:
                content = [{"type": "image", "image": rng.choice(images)}, {"type": "text", "text": question}]
            else:
                content = question
            f.write(json.dumps({"messages": [{"role": "user", "content": content},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return out / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--pad-to-multiple-of", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from data_modules import MultimodalPackingDataModule
    from qmoe_lightning.embedded import ensure_embedded_default

    emb = ensure_embedded_default()
    work = Path(tempfile.mkdtemp(prefix="bench_packing_"))
    try:
        train = make_corpus(work, args.rows)
        dm = MultimodalPackingDataModule(
            model_path=str(emb.model_dir), train_path=str(train), val_path=None, max_tokens=args.max_tokens,
            pad_to_multiple_of=args.pad_to_multiple_of, num_workers=args.workers, preprocess_num_proc=args.workers,
            max_pixels=256 * 256, cache_dir=str(work / "cache"))
        t0 = time.perf_counter()
        dm.setup("fit")
        t_prep = time.perf_counter() - t0
        n = dm.stats["train"]["ok"]
        t1 = time.perf_counter()
        real = padded = docs = 0
        for batch in dm.train_dataloader():
            real += batch.real_tokens
            padded += batch.input_ids.shape[1]
            docs += batch.num_documents
        t_load = time.perf_counter() - t1
        assert docs == n, (docs, n)
        print(f"corpus: {n} samples, {real} tokens, {len(dm.train_dataset)} packs of {args.max_tokens} "
              f"(pad multiple {args.pad_to_multiple_of}); skipped/truncated: {dm.stats['train']}")
        print(f"packing efficiency (non-pad fraction): {real / padded:.4f}")
        from data_modules import plan_packs

        plan, m = dm.train_dataset.plan, args.pad_to_multiple_of
        fill = lambda tokens: sum(plan.lengths) / sum(-(-t // m) * m for t in tokens)  # noqa: E731
        ffd = [sum(plan.lengths[i] for i in p) for p in plan_packs(plan.lengths, args.max_tokens)]
        print(f"re-planned epochs 1, 2: {fill(plan.pack_tokens(1)):.4f}, {fill(plan.pack_tokens(2)):.4f}; "
              f"first-fit-decreasing: {fill(ffd):.4f} ({len(ffd)} packs)")
        print(f"preparation throughput: encode stage {n / t_prep:.0f} samples/s ({args.workers} processes), "
              f"loader {n / t_load:.0f} samples/s ({args.workers} workers), end to end "
              f"{n / (t_prep + t_load):.0f} samples/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
