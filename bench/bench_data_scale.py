"""How data preparation grows with the corpus: 10K -> 1M text rows and 1K -> 100K image rows, on this machine.

Each size runs in a process of its own (so its peak memory is its own): a generated JSONL corpus (chat rows with
log-normal answer lengths; image rows reference one of 64 PNG files of random sizes), then what `cli.py fit` does
before its first step: `MultimodalPackingDataModule.setup("fit")` (encoding into the datasets cache, with
`--proc` processes, and the epoch's pack plan). Printed per size:
- rows/s of the preparation (encode + plan), and of a second setup that reuses the cache;
- peak RSS of the process (the corpus file is streamed: it should not grow with the rows beyond the plan's arrays);
- the cache's size on disk;
- per-epoch planning per rank: re-planning the next epoch (`EpochPackPlan.packs`) and this rank's order among
  `--world` data-parallel ranks (`PackSampler.rank_orders`), what every rank does at each epoch start.
Then the growth of each figure from the smallest to the largest size against the growth of the rows (linear: the
same ratio), and one JSON line with every figure.

    python bench/bench_data_scale.py [--text 10000 100000 1000000] [--image 1000 10000 100000] [--proc 2]
                                     [--world 8] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "garden", "window", "red", "blue",
         "circle", "square", "one", "two", "three", "four", "five"]


def write_corpus(out: Path, text_rows: int, image_rows: int, seed: int = 0) -> Path:
    """A shuffled JSONL of text and image chat rows (written streaming: the generator holds no row list)."""
    from PIL import Image

    rng = random.Random(seed)
    images = []
    for k in range(64):
        w, h = rng.randint(48, 512), rng.randint(48, 512)
        Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(out / f"img_{k:03d}.png")
        images.append(f"img_{k:03d}.png")
    total = text_rows + image_rows
    path = out / "train.jsonl"
    with open(path, "w") as f:
        left_image = image_rows
        for i in range(total):
            image = rng.random() < left_image / (total - i)  # exactly image_rows image rows, spread uniformly
            left_image -= image
            question = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
            answer = " ".join(rng.choices(WORDS, k=max(1, min(int(rng.lognormvariate(4.5, 1.0)), 3000))))
            content = [{"type": "image", "image": rng.choice(images)}, {"type": "text", "text": question}] \
                if image else question
            f.write(json.dumps({"messages": [{"role": "user", "content": content},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_size(text_rows: int, image_rows: int, proc: int, world: int, max_tokens: int, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from data_modules import MultimodalPackingDataModule, PackSampler
    from qmoe_lightning.embedded import ensure_embedded_default

    emb = ensure_embedded_default()
    work = Path(tempfile.mkdtemp(prefix="bench_data_scale_"))
    try:
        t0 = time.perf_counter()
        train = write_corpus(work, text_rows, image_rows)
        t_write = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def datamodule():
            return MultimodalPackingDataModule(
                model_path=str(emb.model_dir), train_path=str(train), val_path=None, max_tokens=max_tokens,
                pad_to_multiple_of=64, num_workers=0, preprocess_num_proc=proc, max_pixels=256 * 256,
                cache_dir=str(work / "cache"))

        dm = datamodule()
        t0 = time.perf_counter()
        dm.setup("fit")
        t_prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = datamodule()
        again.setup("fit")
        t_cached = time.perf_counter() - t0
        rows = dm.stats["train"]["ok"]
        plan = dm.train_dataset.plan
        t0 = time.perf_counter()
        plan.packs(1)  # the next epoch's re-plan (what every rank computes at the epoch start)
        t_replan = time.perf_counter() - t0
        t0 = time.perf_counter()
        PackSampler(plan, world, 0, seed=0).rank_packs(1)  # this rank's packs of that epoch
        t_order = time.perf_counter() - t0
        cache_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the encoding processes
        queue.put(dict(text_rows=text_rows, image_rows=image_rows, rows_ok=rows, packs=plan.num_packs,
                       write_s=round(t_write, 2), prepare_s=round(t_prep, 2), cached_setup_s=round(t_cached, 2),
                       rows_per_s=round(rows / t_prep), cached_rows_per_s=round(rows / t_cached),
                       replan_s=round(t_replan, 3), rank_order_s=round(t_order, 3),
                       epoch_planning_s=round(t_replan + t_order, 3),
                       peak_rss_mb=round(peak / 1024), rss_before_setup_mb=round(rss_before / 1024),
                       encode_process_peak_rss_mb=round(children / 1024), cache_mb=round(cache_bytes / 2**20, 1),
                       stats=dict(dm.stats["train"])))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--image", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--proc", type=int, default=2, help="encoding processes (data.preprocess_num_proc)")
    ap.add_argument("--world", type=int, default=8, help="data-parallel ranks of the per-rank epoch planning")
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    if len(args.text) != len(args.image):
        ap.error("--text and --image take one value per size")

    from qmoe_lightning.embedded import ensure_embedded_default

    ensure_embedded_default()  # built once, before the timed processes
    ctx = mp.get_context("spawn")
    results = []
    print(f"{'text rows':>10} {'image rows':>10} {'packs':>8} {'prepare s':>9} {'rows/s':>7} {'cached rows/s':>13} "
          f"{'epoch plan s':>12} {'peak RSS MB':>11} {'encode RSS MB':>13} {'cache MB':>9}", flush=True)
    for text_rows, image_rows in zip(args.text, args.image):
        queue = ctx.Queue()
        p = ctx.Process(target=run_size, args=(text_rows, image_rows, args.proc, args.world, args.max_tokens, queue))
        p.start()
        r = queue.get()
        p.join()
        results.append(r)
        print(f"{text_rows:>10} {image_rows:>10} {r['packs']:>8} {r['prepare_s']:>9} {r['rows_per_s']:>7} "
              f"{r['cached_rows_per_s']:>13} {r['epoch_planning_s']:>12} {r['peak_rss_mb']:>11} "
              f"{r['encode_process_peak_rss_mb']:>13} {r['cache_mb']:>9}", flush=True)
    first, last = results[0], results[-1]
    rows_growth = last["rows_ok"] / first["rows_ok"]
    growth = {k: round(last[k] / max(first[k], 1e-9), 1) for k in
              ("prepare_s", "cached_setup_s", "epoch_planning_s", "peak_rss_mb", "cache_mb")}
    print(f"growth from {first['rows_ok']} to {last['rows_ok']} rows (x{rows_growth:.0f}): " +
          ", ".join(f"{k} x{v}" for k, v in growth.items()))
    print(json.dumps({"sizes": results, "rows_growth": round(rows_growth, 1), "growth": growth}))


if __name__ == "__main__":
    main()
