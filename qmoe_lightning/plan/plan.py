"""`plan_recipe`: a recipe's per-rank peak memory by category and its collective traffic per step, from fake steps of
the real code (`simulate.py`), checked against a GPU's memory.

Which steps run:
- balanced routing on every simulated rank, and the skewed case (expert 0 at `skew` times its share) on rank 0,
  the rank that owns expert 0 and receives the skew;
- the micro-batch: the recipe's own training data when it can be read here (each data-parallel rank its own: the
  largest of the first micro-batches it draws), else the synthetic text row of `max_tokens`;
- ranks: every rank when the recipe's data is used (their batches differ), else rank 0 alone (balanced routing and
  the same row make every rank's step the same; the CP ranks of a row differ only in which slice they hold);
- depth: models deeper than two layer periods (and 8 layers) are planned at two depths one period apart and each
  figure extrapolated linearly to the full depth (`docs/planning.md` checks this against planning the full depth).

Fits when the largest peak (any rank, balanced or skewed) is at most `gpu_memory_gb` GiB x (1 - margin): the
margin is for what no tensor holds (the CUDA context, NCCL's buffers, the caching allocator's fragmentation).
"""

from __future__ import annotations

import time

from .recipe import Recipe, model_config
from .simulate import StepPlan, data_batches, largest, layer_period, plan_step
from .tracking import CATEGORIES

GiB = 2 ** 30


def planning_depths(config) -> tuple[int, int] | None:
    """(L1, L2) to plan and extrapolate from, or None to plan the full depth."""
    text = config.get_text_config()
    n, period = text.num_hidden_layers, layer_period(config)
    deepstack = len(getattr(getattr(config, "vision_config", None), "deepstack_visual_indexes", None) or [])
    # whole periods, past the layers that receive deepstack features (Qwen3-VL: the first 3), at least 2 layers
    l1 = period * max(1, -(-max(2, deepstack + 1) // period))
    l2 = l1 + period
    if n <= max(l2, 8):
        return None
    return l1, l2


def _extrapolate(a: StepPlan, b: StepPlan, n: int) -> StepPlan:
    """Each figure of `a` (at a.num_layers) and `b` continued linearly to `n` layers."""
    f = (n - a.num_layers) / (b.num_layers - a.num_layers)

    def lin(x, y):
        return int(round(x + (y - x) * f))

    zero = [0, 0, 0, 0]
    collectives = {k: [lin(x, y) for x, y in zip(a.collectives.get(k, zero), b.collectives.get(k, zero))]
                   for k in sorted(set(a.collectives) | set(b.collectives))}
    return StepPlan(a.rank, n, a.hot_factor, lin(a.peak_bytes, b.peak_bytes),
                    {k: lin(a.by_category[k], b.by_category[k]) for k in CATEGORIES}, collectives,
                    sorted(set(a.assumptions) | set(b.assumptions)), a.seconds + b.seconds)


def _plan_rank(recipe: Recipe, config, rank: int, hot: float, batch, depths) -> StepPlan:
    if depths is None:
        return plan_step(recipe, config, rank, hot, batch=batch)
    n = config.get_text_config().num_hidden_layers
    return _extrapolate(plan_step(recipe, config, rank, hot, depths[0], batch),
                        plan_step(recipe, config, rank, hot, depths[1], batch), n)


def plan_recipe(recipe: Recipe, gpu_memory_gb: float = 80.0, margin: float = 0.1, skew: float | None = 2.0,
                batch: str = "auto", full_depth: bool = False, progress=None, batch_index: int | None = None) -> dict:
    """The plan as a JSON-able dict (`__main__` prints it). batch: "auto", "data" or "synthetic"; with data,
    `batch_index` picks each rank's micro-batch by its position in the rank's order (what `--measure` measures)
    instead of the largest of the first eight. skew None (or a layout without expert parallelism, where a hot expert
    changes no buffer size): no skewed step; its figures are the balanced ones."""
    from qmoe_lightning.parallel.context_parallel import data_parallel_coordinates

    t0 = time.perf_counter()
    config = model_config(recipe)
    use_data = batch == "data" or (batch == "auto" and recipe.data_available())
    depths = None if full_depth else planning_depths(config)
    ranks = list(range(recipe.world_size)) if use_data else [0]
    batches = {}
    if use_data:
        for r in ranks:
            dp = data_parallel_coordinates(r, recipe.cp_size, recipe.ep_size)
            if dp not in batches:
                drawn = data_batches(recipe, dp, max(8, (batch_index or 0) + 1))
                batches[dp] = largest(drawn[:8]) if batch_index is None else drawn[batch_index]
    plans = []
    for r in ranks:
        b = batches[data_parallel_coordinates(r, recipe.cp_size, recipe.ep_size)] if use_data else None
        plans.append(_plan_rank(recipe, config, r, 1.0, b, depths))
        if progress:
            progress(f"rank {r}: {plans[-1].peak_bytes / GiB:.3f} GiB ({plans[-1].seconds:.1f} s)")
    skewed = plans[0]
    if skew is not None and skew != 1.0 and recipe.ep_size > 1:
        b = batches[data_parallel_coordinates(0, recipe.cp_size, recipe.ep_size)] if use_data else None
        skewed = _plan_rank(recipe, config, 0, skew, b, depths)
        if progress:
            progress(f"rank 0, expert 0 at {skew:g}x: {skewed.peak_bytes / GiB:.3f} GiB ({skewed.seconds:.1f} s)")
    per_rank = [p.peak_bytes for p in plans] if use_data else [plans[0].peak_bytes] * recipe.world_size
    limit = int(gpu_memory_gb * GiB * (1.0 - margin))
    worst = max(per_rank + [skewed.peak_bytes])
    a2a = plans[0].collectives.get("all_to_all", [0, 0, 0, 0])
    a2a_skew = skewed.collectives.get("all_to_all", [0, 0, 0, 0])
    text = config.get_text_config()
    return {
        "recipe": recipe.path,
        "model": f"{type(config).__name__.removesuffix('Config')} ({text.num_hidden_layers} layers)",
        "layout": recipe.describe(),
        "world_size": recipe.world_size,
        "peak_bytes_per_rank": per_rank,
        "skewed_peak_bytes": skewed.peak_bytes,
        "skew": skew if skewed is not plans[0] else None,
        "by_category_bytes": plans[0].by_category,
        "skewed_by_category_bytes": skewed.by_category,
        "all_to_all_bytes_per_micro_batch": a2a[1],
        "all_to_all_off_rank_bytes_per_micro_batch": a2a[2],
        "all_to_all_bytes_per_step": a2a[1] * recipe.accumulate_grad_batches,  # every micro-batch sends as much
        "skewed_all_to_all_bytes_per_micro_batch": a2a_skew[1],
        "skewed_all_to_all_received_bytes_per_micro_batch": a2a_skew[3],
        "collectives": plans[0].collectives,
        "gpu_memory_gb": gpu_memory_gb,
        "margin": margin,
        "limit_bytes": limit,
        "fits": worst <= limit,
        "headroom_bytes": limit - worst,
        "batch": (("the largest of each rank's first 8 micro-batches" if batch_index is None else
                   f"each rank's micro-batch {batch_index}") if use_data
                  else f"synthetic text row of {recipe.max_tokens} tokens"),
        "planned_layers": list(depths) if depths else [text.num_hidden_layers],
        "assumptions": sorted({a for p in [*plans, skewed] for a in p.assumptions}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
