"""Figures a user reads after a run: the layers x experts load heatmap and the run summary, drawn with matplotlib.

Heatmap: each cell is the share of a layer's routed tokens that went to one expert, relative to the uniform share
(1 = exactly balanced), on a fixed colour scale 0 .. `vmax` so images from different steps and runs compare; dead
experts (no token in the window) are crossed out in red. Axes are labelled (layer, expert) with integer ticks
thinned to stay readable at 40 layers x 256 experts; the colour bar has numbers; the title carries the step, the
mean coefficient of variation, the worst max/mean ratio and the dead count.

Summary: train / val loss, aux loss, expert CV and dead experts over optimizer steps, one panel each, so a run can
be judged at a glance without starting TensorBoard.

Both are written atomically as PNGs whose `Title` text chunk holds the figure title (tests and tools read it), and
returned as RGB arrays for TensorBoard's add_image. The Agg backend is used explicitly: no display is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def relative_load(counts: np.ndarray) -> np.ndarray:
    """(L, E) token counts -> (L, E) share of each layer's tokens relative to the uniform share (1 = balanced)."""
    counts = np.asarray(counts, dtype=np.float64)
    E = counts.shape[1]
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts * E / np.maximum(total, 1e-12), 0.0)


def heatmap_title(counts: np.ndarray, step: int | None) -> str:
    rel = relative_load(counts)
    loaded = rel[np.asarray(counts).sum(1) > 0]
    cv = float((loaded.std(1) / np.maximum(loaded.mean(1), 1e-12)).mean()) if len(loaded) else 0.0
    worst = float(loaded.max()) if len(loaded) else 0.0
    dead = int((np.asarray(counts) == 0).sum())
    where = f", step {step}" if step is not None else ""
    return f"expert load{where}\nCV {cv:.2f}, max/mean {worst:.2f}, dead {dead}"


def _figure_to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def load_heatmap_figure(counts: np.ndarray, step: int | None = None, vmax: float = 3.0,
                        layers: list[int] | None = None):
    """(figure, title) of the (L, E) heatmap; the caller saves or renders it. layers: the decoder-layer index of each
    row (a model with dense layers routes in fewer layers than it has; default 0..L-1)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(counts)
    L, E = counts.shape
    rel = relative_load(counts)
    width = float(np.clip(3.0 + 0.09 * E, 6.0, 26.0))
    height = float(np.clip(1.8 + 0.22 * L, 3.2, 14.0))
    fig, ax = plt.subplots(figsize=(width, height), dpi=100, layout="constrained")
    im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    dead_l, dead_e = np.nonzero(counts == 0)
    if len(dead_l):
        size = float(np.clip(2400.0 / max(E, L), 25.0, 80.0))
        ax.scatter(dead_e, dead_l, marker="x", s=size, c="red", linewidths=1.5, label="dead (no token)")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8, bbox_to_anchor=(1.0, 1.0))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(E, 32), integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(L, 20), integer=True))
    if layers is not None and list(layers) != list(range(L)):
        ax.yaxis.set_major_formatter(lambda y, _: str(layers[int(y)]) if 0 <= int(y) < len(layers) else "")
        ax.set_ylabel("layer (MoE layers only)")
    bar = fig.colorbar(im, ax=ax, extend="max")
    bar.set_label("x uniform share (1 = balanced)")
    title = heatmap_title(counts, step)
    ax.set_title(title, fontsize=10)
    return fig, title


def summary_figure(history: dict[str, list[tuple[int, float]]], title: str = "run summary"):
    """(figure, title): one panel per metric group; `history` maps a metric name to (step, value) pairs."""
    plt = _plt()
    panels = [("loss", ["train/loss", "val/loss"]), ("aux loss", ["moe/aux_loss", "train/aux_loss"]),
              ("expert load CV (0 = balanced)", ["experts/cv"]), ("dead experts", ["experts/dead"])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=100, layout="constrained")
    for ax, (name, keys) in zip(axes.flat, panels):
        drawn = False
        for key in keys:
            points = history.get(key) or []
            if not points:
                continue
            steps, values = zip(*points)
            if len(points) >= 50 and not key.startswith("experts/"):  # noisy per step: faded, averaged on top
                ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _moving_average(values, max(5, len(values) // 50)), label=f"{key} (moving average)")
            else:
                ax.plot(steps, values, marker="o" if len(points) < 50 else None, markersize=4, label=key)
            drawn = True
            if name == "aux loss":
                break  # moe/aux_loss and train/aux_loss are the same number: draw one
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    fig.suptitle(title)
    return fig, title


def _moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (shorter at the start), same length as `values`."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def save_figure(fig, title: str, path: str | Path) -> tuple[Path, np.ndarray]:
    """Write `fig` as a PNG (atomically, `Title` text chunk set), close it; returns (path, RGB array)."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", metadata={"Title": title})
    rgb = _figure_to_rgb(fig)
    plt.close(fig)
    tmp.replace(path)
    return path, rgb
