"""Deterministic synthetic multimodal chat dataset: coloured shapes plus text-only chat.

Image rows show one filled shape (COLORS x SHAPES) on a noisy background and ask about its content (colour or
shape; a large shape at a random place) or its position (left or right half, top or bottom half; a small shape
kept inside one half); the answer can only come from the pixels (the question text is the same for every image of
a kind), and the position questions only from WHERE in the image they are, which the model must tell apart.
Text-only rows are small deterministic tasks (counting, copying, arithmetic) so the default recipe
also exercises plain chat packing. Validation rows carry `meta` ({"kind", "answer"}) so an evaluation can measure
held-out accuracy per question kind (chance: 1/len(COLORS) for colour, 1/len(SHAPES) for shape, 1/2 for position).

Determinism: one `random.Random(seed)` per split, no global RNG, PNGs written without timestamps, so the same
seed gives byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
IMAGE_QUESTIONS = {  # content questions (v1 also had "both": "a red circle", 12 answers; it slowed the others)
    "color": "What color is the shape?",
    "shape": "What shape is in the image?",
}
POSITION_QUESTIONS = {  # kind -> (question, the two answers: first half, second half of the axis)
    "left_right": ("Is the shape on the left or on the right?", ("left", "right")),
    "top_bottom": ("Is the shape at the top or at the bottom?", ("top", "bottom")),
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "rocket", "garden", "window", "silver",
         "forest", "candle", "bridge", "planet", "mirror"]
SYSTEM_PROMPT = "You are a helpful assistant."


def noisy_background(rng: random.Random, size: int) -> Image.Image:
    """A grey square image with sparse grey noise, so the background is not a constant."""
    base = rng.randint(90, 140)
    img = Image.new("RGB", (size, size), (base, base, base))
    px = img.load()
    for _ in range(size * size // 8):
        x, y = rng.randrange(size), rng.randrange(size)
        v = base + rng.randint(-25, 25)
        px[x, y] = (v, v, v)
    return img


def draw_shape(rng: random.Random, color: str, shape: str, size: int,
               box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """A filled shape on a noisy grey background; `box` (x0, y0, x1, y1) places it, default: large, anywhere."""
    img = noisy_background(rng, size)
    draw = ImageDraw.Draw(img)
    if box is None:
        extent = rng.randint(size // 2, size - 8)
        x0, y0 = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
        box = (x0, y0, x0 + extent, y0 + extent)
    x0, y0, x1, y1 = box
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def position_box(rng: random.Random, size: int, axis: str, second_half: bool) -> tuple[int, int, int, int]:
    """A small square box wholly inside one half of the image along `axis` ("x" or "y"), anywhere along the other
    axis; it never touches the middle (a margin of size // 16), so the answer is unambiguous."""
    extent = rng.randint(size // 5, size * 3 // 8)
    margin = max(1, size // 16)
    half = size // 2
    lo, hi = (half + margin, size - extent - 2) if second_half else (2, half - margin - extent)
    along = rng.randint(lo, hi)
    across = rng.randint(2, size - extent - 2)
    x0, y0 = (along, across) if axis == "x" else (across, along)
    return x0, y0, x0 + extent, y0 + extent


def _text_row(rng: random.Random) -> tuple[dict, dict]:
    kind = rng.choice(["count", "copy", "add"])
    if kind == "count":
        n = rng.randint(1, 10)
        q, a = f"Count to {NUMBER_WORDS[n]}.", " ".join(NUMBER_WORDS[1 : n + 1])
    elif kind == "copy":
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
        q, a = "Repeat after me: " + " ".join(words), " ".join(words)
    else:
        x, y = rng.randint(0, 5), rng.randint(0, 5)
        q, a = f"What is {NUMBER_WORDS[x]} plus {NUMBER_WORDS[y]}?", NUMBER_WORDS[x + y]
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return {"messages": messages}, {"kind": "text_" + kind, "answer": a}


def _image_row(rng: random.Random, image_name: str, size: int):
    """(row, meta, image) of one image question: a content kind or a position kind, uniformly."""
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    kind = rng.choice(sorted(IMAGE_QUESTIONS) + sorted(POSITION_QUESTIONS))
    if kind in POSITION_QUESTIONS:
        question, answers = POSITION_QUESTIONS[kind]
        second = rng.random() < 0.5
        answer = answers[second]
        image = draw_shape(rng, color, shape, size, position_box(rng, size, "x" if kind == "left_right" else "y",
                                                                 second))
    else:
        question = IMAGE_QUESTIONS[kind]
        answer = {"color": color, "shape": shape}[kind]
        image = draw_shape(rng, color, shape, size)
    content = [{"type": "image", "image": image_name}, {"type": "text", "text": question}]
    if rng.random() < 0.5:  # question before or after the image: positions of the vision block vary
        content.reverse()
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"messages": messages}, {"kind": "image_" + kind, "answer": answer}, image


def write_split(out_dir: Path, split: str, n_rows: int, seed: int, image_fraction: float, image_size: int) -> Path:
    """Write `{split}.jsonl` and `images/{split}_*.png` under out_dir; return the JSONL path."""
    rng = random.Random(f"{seed}-{split}")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(n_rows):
            if rng.random() < image_fraction:
                name = f"images/{split}_{i:05d}.png"
                row, meta, image = _image_row(rng, name, image_size)
                image.save(out_dir / name, format="PNG")
            else:
                row, meta = _text_row(rng)
            row["meta"] = meta
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Texts the embedded tokenizer is trained on: rendered synthetic conversations (no images needed)."""
    rng = random.Random(f"{seed}-corpus")
    texts = []
    for _ in range(n):
        row, _meta = _text_row(rng)
        texts.extend(m["content"] for m in row["messages"])
    for kind, q in IMAGE_QUESTIONS.items():
        texts.append(q)
    for q, answers in POSITION_QUESTIONS.values():
        texts += [q, *answers]
    for color in COLORS:
        for shape in SHAPES:
            texts.append(f"a {color} {shape}")
    texts += ["user", "assistant", "system", SYSTEM_PROMPT]
    return texts
