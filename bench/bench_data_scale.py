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

`--plan-only` times the per-epoch planning alone, in seconds instead of the encoding's minutes: document lengths are
drawn (numpy) from the distribution this corpus encodes to, through a length model read off the encoder (the chat
template's fixed tokens, each image's tokens, one token per word, the first word's extra tokens) and checked
against the real encoder on `--check-rows` generated rows. Per size and per `--seeds` value: epoch 0's setup
(`EpochPackPlan` and its pack token counts), then for epochs 1..`--epochs` the next epoch's plan plus this rank's
`rank_packs` (per rank), the random orders drawn, and the non-pad fraction (packs padded to a multiple of 64) and
the fill of max_tokens-long rows.

    python bench/bench_data_scale.py [--text 10000 100000 1000000] [--image 1000 10000 100000] [--proc 2]
                                     [--world 8] [--max-tokens 4096]
    python bench/bench_data_scale.py --plan-only [--seeds 0 1 2 3] [--epochs 3]
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


def write_images(out: Path, rng: random.Random) -> list[str]:
    """The 64 PNG files image rows reference (random sizes from `rng`)."""
    from PIL import Image

    images = []
    for k in range(64):
        w, h = rng.randint(48, 512), rng.randint(48, 512)
        Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3))).save(out / f"img_{k:03d}.png")
        images.append(f"img_{k:03d}.png")
    return images


def corpus_rows(rng: random.Random, text_rows: int, image_rows: int, images: list[str]):
    """The corpus's rows, one at a time: chat rows with log-normal answer lengths, image rows spread uniformly."""
    total = text_rows + image_rows
    left_image = image_rows
    for i in range(total):
        image = rng.random() < left_image / (total - i)  # exactly image_rows image rows, spread uniformly
        left_image -= image
        question = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
        answer = " ".join(rng.choices(WORDS, k=max(1, min(int(rng.lognormvariate(4.5, 1.0)), 3000))))
        content = [{"type": "image", "image": rng.choice(images)}, {"type": "text", "text": question}] \
            if image else question
        yield {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def write_corpus(out: Path, text_rows: int, image_rows: int, seed: int = 0) -> Path:
    """A shuffled JSONL of text and image chat rows (written streaming: the generator holds no row list)."""
    rng = random.Random(seed)
    images = write_images(out, rng)
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for row in corpus_rows(rng, text_rows, image_rows, images):
            f.write(json.dumps(row) + "\n")
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


class LengthModel:
    """The token count of a corpus row without encoding it, read off the encoder once: the chat template's fixed
    tokens (per image for image rows: its vision tokens), plus one token per word (every corpus word with a leading
    space is a single token), plus the extra tokens of each turn's first word (no leading space). `check` compares
    it with the real encoder on rows of the corpus generator."""

    def __init__(self, encoder, images: list[str], base_dir: str):
        tok = encoder.processor.tokenizer
        assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)
        self.first_extra = [len(tok(w, add_special_tokens=False)["input_ids"]) - 1 for w in WORDS]
        w0 = WORDS[self.first_extra.index(0)]  # a word of one token, to measure the fixed tokens with
        self.encoder, self.base_dir, self.max_tokens = encoder, base_dir, encoder.max_tokens

        def encoded(content) -> dict:
            return encoder.encode({"messages": [{"role": "user", "content": content},
                                                {"role": "assistant", "content": w0}]}, base_dir)

        self.text_fixed = encoded(w0)["num_tokens"] - 2
        per_image = [encoded([{"type": "image", "image": im}, {"type": "text", "text": w0}]) for im in images]
        self.image_fixed = [r["num_tokens"] - 2 for r in per_image]
        self.image_visual = [r["num_visual_tokens"] for r in per_image]
        self.images = images

    def _encoded(self, row: dict) -> int:
        return self.encoder.encode(row, self.base_dir)["num_tokens"]

    def row_tokens(self, row: dict) -> int:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        if isinstance(user, str):
            fixed, question = self.text_fixed, user
        else:
            fixed, question = self.image_fixed[self.images.index(user[0]["image"])], user[1]["text"]
        n = fixed
        for text in (question, answer):
            words = text.split(" ")
            n += len(words) + self.first_extra[WORDS.index(words[0])]
        return min(n, self.max_tokens)

    def check(self, rows) -> int:
        rows = list(rows)
        bad = [(self.row_tokens(r), self._encoded(r)) for r in rows]
        bad = [b for b in bad if b[0] != b[1]]
        if bad:
            raise AssertionError(f"the length model disagrees with the encoder on {len(bad)} rows, e.g. {bad[:5]}")
        return len(rows)

    def sample(self, text_rows: int, image_rows: int, seed: int):
        """(num_tokens, num_visual_tokens) of text_rows + image_rows documents drawn from the corpus's distribution
        (numpy draws: the same distribution as `corpus_rows`, not the same rows)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        n = text_rows + image_rows
        image = rng.permutation(np.arange(n) < image_rows)
        which = rng.integers(0, len(self.images), n)
        first_extra = np.asarray(self.first_extra)
        question = rng.integers(3, 31, n) + first_extra[rng.integers(0, len(WORDS), n)]
        answer = np.clip(np.floor(rng.lognormal(4.5, 1.0, n)), 1, 3000).astype(np.int64)
        answer += first_extra[rng.integers(0, len(WORDS), n)]
        fixed = np.where(image, np.asarray(self.image_fixed)[which], self.text_fixed)
        lengths = np.minimum(fixed + question + answer, self.max_tokens)
        visual = np.where(image, np.asarray(self.image_visual)[which], 0)
        return lengths.tolist(), visual.tolist()


def plan_only(args) -> None:
    """Per-epoch planning alone, on document lengths drawn from the corpus's distribution (no encoding)."""
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    from data_modules import EpochPackPlan, PackSampler
    from data_modules.encoding import Encoder
    from qmoe_lightning.embedded import ensure_embedded_default

    emb = ensure_embedded_default()
    work = Path(tempfile.mkdtemp(prefix="bench_plan_only_"))
    try:
        rng = random.Random(0)
        images = write_images(work, rng)  # the bench corpus's 64 images (same seed, same sizes)
        model = LengthModel(Encoder(str(emb.model_dir), args.max_tokens, max_pixels=256 * 256), images, str(work))
        checked = model.check(corpus_rows(random.Random(1), args.check_rows - args.check_rows // 10,
                                          args.check_rows // 10, images))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"length model: agrees with the encoder on {checked} generated rows", flush=True)
    pad = args.pad_to_multiple_of
    results = []
    print(f"{'documents':>10} {'packs':>11} {'epoch 0 s':>9} {'next epoch per rank s (mean/max)':>30} "
          f"{'of it order s':>13} {'max draws':>9} {'non-pad (ep0/min later)':>24} {'fill of max_tokens':>18}",
          flush=True)
    for text_rows, image_rows in zip(args.text, args.image):
        lengths, visual = model.sample(text_rows, image_rows, seed=text_rows)
        total = sum(lengths)
        per_seed, per_epoch = [], []
        for seed in args.seeds:
            gc.collect()
            t0 = time.perf_counter()
            plan = EpochPackPlan(lengths, args.max_tokens, visual, seed=seed)
            tokens0 = plan.pack_tokens(0)  # the datamodule reads epoch 0's fill at setup
            per_seed.append(dict(seed=seed, packs=plan.num_packs, setup_s=round(time.perf_counter() - t0, 3),
                                 non_pad_epoch0=round(total / sum(-(-t // pad) * pad for t in tokens0), 5),
                                 fill_of_max_tokens=round(total / (plan.num_packs * args.max_tokens), 5)))
            draws = [0]
            inner = getattr(plan, "_random_plan", None)
            if inner is not None:  # count the random orders each epoch draws
                def counted(*a, inner=inner, **k):
                    draws[0] += 1
                    return inner(*a, **k)
                plan._random_plan = counted
            for epoch in range(1, args.epochs + 1):
                draws[0] = 0
                t0 = time.perf_counter()
                packs = plan.packs(epoch)
                t_plan = time.perf_counter() - t0
                t0 = time.perf_counter()
                mine = PackSampler(plan, args.world, 0, seed=seed).rank_packs(epoch)
                t_order = time.perf_counter() - t0
                tokens = plan.pack_tokens(epoch)
                assert len(packs) == plan.num_packs and max(tokens) <= args.max_tokens and len(mine) > 0
                per_epoch.append(dict(seed=seed, epoch=epoch, plan_s=round(t_plan, 3), order_s=round(t_order, 3),
                                      per_rank_s=round(t_plan + t_order, 3), draws=draws[0],
                                      non_pad=round(total / sum(-(-t // pad) * pad for t in tokens), 5)))
            del plan
        packs = sorted({s["packs"] for s in per_seed})
        r = dict(documents=len(lengths), packs=f"{packs[0]}-{packs[-1]}" if len(packs) > 1 else str(packs[0]),
                 epoch0_setup_s=max(s["setup_s"] for s in per_seed),
                 next_epoch_mean_s=round(sum(e["per_rank_s"] for e in per_epoch) / len(per_epoch), 3),
                 next_epoch_max_s=max(e["per_rank_s"] for e in per_epoch),
                 order_max_s=max(e["order_s"] for e in per_epoch), draws=[e["draws"] for e in per_epoch],
                 non_pad_epoch0=min(s["non_pad_epoch0"] for s in per_seed),
                 non_pad_min_later=min(e["non_pad"] for e in per_epoch),
                 fill_of_max_tokens=min(s["fill_of_max_tokens"] for s in per_seed), seeds=per_seed, epochs=per_epoch)
        results.append(r)
        print(f"{r['documents']:>10} {r['packs']:>11} {r['epoch0_setup_s']:>9} "
              f"{str(r['next_epoch_mean_s']) + ' / ' + str(r['next_epoch_max_s']):>30} {r['order_max_s']:>13} "
              f"{max(r['draws']):>9} {str(r['non_pad_epoch0']) + ' / ' + str(r['non_pad_min_later']):>24} "
              f"{r['fill_of_max_tokens']:>18}", flush=True)
        del lengths, visual
    print(json.dumps({"plan_only": results, "world": args.world, "max_tokens": args.max_tokens, "seeds": args.seeds,
                      "epochs": args.epochs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--image", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--proc", type=int, default=2, help="encoding processes (data.preprocess_num_proc)")
    ap.add_argument("--world", type=int, default=8, help="data-parallel ranks of the per-rank epoch planning")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--plan-only", action="store_true",
                    help="time per-epoch planning alone on lengths drawn from the corpus's distribution (no encoding)")
    ap.add_argument("--epochs", type=int, default=3, help="--plan-only: next epochs timed (1..EPOCHS)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="--plan-only: data.seed values")
    ap.add_argument("--check-rows", type=int, default=500,
                    help="--plan-only: generated rows the length model is checked against the encoder on")
    ap.add_argument("--pad-to-multiple-of", type=int, default=64, help="--plan-only: of the non-pad fraction")
    args = ap.parse_args()
    if len(args.text) != len(args.image):
        ap.error("--text and --image take one value per size")
    if args.plan_only:
        plan_only(args)
        return

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
