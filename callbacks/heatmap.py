"""Layers x experts heatmap as a PNG, drawn with PIL only (no matplotlib dependency).

Each cell is the share of a layer's routed tokens that went to one expert, relative to the uniform share: the
colour scale is fixed (0 = dead expert, 1 = exactly uniform, >= `vmax` = saturated), so images from different
steps and runs are comparable. Colours follow a viridis-like ramp; dead experts are drawn black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# viridis anchors (0, .25, .5, .75, 1)
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _colour(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def load_heatmap(counts: np.ndarray, cell: int = 12, vmax: float = 3.0, title: str | None = None) -> np.ndarray:
    """(L, E) token counts -> (H, W, 3) uint8 image. Row l = layer l (top to bottom), column e = expert e."""
    counts = np.asarray(counts, dtype=np.float64)
    L, E = counts.shape
    total = counts.sum(1, keepdims=True)
    rel = np.where(total > 0, counts * E / np.maximum(total, 1e-12), 0.0)  # 1.0 = uniform load
    rgb = _colour(rel / vmax)
    rgb[counts == 0] = 0
    cell_w = max(1, min(cell, 2048 // max(E, 1)))
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell_w, axis=1)
    header = 14 if title else 0
    legend = 10
    out = np.full((img.shape[0] + header + legend + 2, max(img.shape[1], 64), 3), 255, dtype=np.uint8)
    out[header:header + img.shape[0], : img.shape[1]] = img
    bar = _colour(np.linspace(0, 1, out.shape[1]))  # legend: 0 .. vmax x uniform, left to right
    out[-legend:, :] = bar[None, :, :]
    if title:
        pil = Image.fromarray(out)
        ImageDraw.Draw(pil).text((2, 1), title, fill=(0, 0, 0))
        out = np.asarray(pil)
    return out


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)
    return path
