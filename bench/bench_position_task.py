"""Does the tiny default learn an image task whose answer depends only on WHERE things are? End to end, judged by
transformers.

Task (written here, not the bundled data): a 64 px image with a red and a blue square, each wholly inside a
different half (left / right), at random heights and sizes, on a noisy grey background; the question "Is the red
square left or right of the blue square?" has the two answers "left" / "right", balanced. Every image holds both
colours, so colour statistics say nothing; only the squares' positions do.

Steps: write the train / held-out JSONL and PNGs -> `python cli.py fit --config configs/tiny.yaml` on them (the
recipe's hyperparameters; only data paths, step count and output directory are overridden) -> score both answers
for every held-out question with transformers on the run's `hf_export` (`bench/eval_answers.py`), with the real
images and with blank ones. Pass: held-out accuracy >= 0.9, blank images within 0.15 of chance (0.5), the whole
fit within 5 minutes.

Usage: python bench/bench_position_task.py [--steps 1200] [--train 2000] [--val 300] [--out runs/position_task]
                                          [-- extra cli.py overrides, e.g. --model.lr 1e-2 --data.shuffle false]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

QUESTION = "Is the red square left or right of the blue square?"
SIZE = 64


def draw(rng: random.Random, red_left: bool) -> Image.Image:
    from qmoe_lightning.embedded.synthetic import noisy_background

    img = noisy_background(rng, SIZE)
    d = ImageDraw.Draw(img)
    for color, left in (((220, 40, 40), red_left), ((40, 80, 220), not red_left)):
        extent = rng.randint(10, 20)
        x0 = rng.randint(2, SIZE // 2 - 4 - extent) if left else rng.randint(SIZE // 2 + 4, SIZE - 2 - extent)
        y0 = rng.randint(2, SIZE - 2 - extent)
        d.rectangle((x0, y0, x0 + extent, y0 + extent), fill=color)
    return img


def write_split(out: Path, split: str, n: int, seed: int) -> Path:
    rng = random.Random(f"{seed}-{split}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    answers = ["left", "right"] * (n // 2) + ["left"] * (n % 2)  # balanced
    rng.shuffle(answers)
    path = out / f"{split}.jsonl"
    with open(path, "w") as f:
        for i, answer in enumerate(answers):
            name = f"images/{split}_{i:05d}.png"
            draw(rng, answer == "left").save(out / name)
            content = [{"type": "image", "image": name}, {"type": "text", "text": QUESTION}]
            row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                   "meta": {"kind": "image_red_left_or_right_of_blue", "answer": answer}}
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/position_task")
    ap.add_argument("overrides", nargs="*", help="extra cli.py arguments after `--` (controls: the old recipe)")
    args = ap.parse_args()

    from eval_answers import evaluate, format_table

    out = (ROOT / args.out).resolve()
    data = out / "data"
    train, val = write_split(data, "train", args.train, args.seed), write_split(data, "val", args.val, args.seed)
    cmd = [sys.executable, "cli.py", "fit", "--config", "configs/tiny.yaml", "--data.train_path", str(train),
           "--data.val_path", str(val), "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval",
           str(args.steps), "--trainer.default_root_dir", str(out / "run"), "--trainer.enable_progress_bar", "false",
           *args.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True,
                          text=True)
    fit_s = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"fit failed:\n{proc.stderr[-3000:]}")
    result = evaluate(str(out / "run" / "hf_export"), str(val), blank=True)
    (real, n, chance), = result["real"].values()
    (blank, _, _), = result["blank"].values()
    print(f"fit: {args.steps} steps in {fit_s:.0f} s (python cli.py fit --config configs/tiny.yaml "
          f"{' '.join(args.overrides)}, {args.train} training questions)")
    print(format_table(result))
    ok = real >= 0.9 and abs(blank - chance) <= 0.15 and fit_s <= 300
    print(f"held-out accuracy {real:.3f} (>= 0.9), blank images {blank:.3f} (chance {chance:.2f}), fit {fit_s:.0f} s "
          f"(<= 300): {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
