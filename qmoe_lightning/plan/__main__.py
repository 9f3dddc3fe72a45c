"""Plan a recipe's memory and communication per rank before renting the GPUs.

    python -m qmoe_lightning.plan --config configs/<recipe>.yaml [--world_size N] [--gpu_memory_gb 80]
                                  [--margin 0.1] [--skew 2] [--batch auto|data|synthetic] [--full_depth]
                                  [--update_header] [--measure]

Builds the recipe's real model on the meta device, applies the recipe's real parallel plan on a fake process group
of its world size, and runs one training micro-batch of the real step on fake tensors (nothing is allocated; a
235B recipe plans on a laptop). Prints the peak per rank by category, the all-to-all bytes per step, whether it fits
the GPU with the margin, and as its last line one JSON object with every number. `--measure` (CPU recipes) also
trains the recipe for real for three steps and adds each rank's measured peak. docs/planning.md explains the
method and what it does not count.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .plan import GiB, plan_recipe
from .recipe import read_recipe
from .tracking import CATEGORIES


def table(plan: dict) -> str:
    """The plan as the text table the recipes' headers carry."""
    unit, div = ("GiB", GiB) if max(plan["peak_bytes_per_rank"]) >= GiB else ("MiB", 2 ** 20)

    def cell(n: int) -> str:
        return f"{n / div:9.2f}"

    rows = [f"{plan['model']}; {plan['layout']}",
            f"{plan['batch']}; layers planned {plan['planned_layers']}",
            f"{unit + ' per rank':<24}{'balanced':>9}{'skewed' if plan['skew'] else '':>9}"]
    for cat in CATEGORIES:
        skewed = cell(plan["skewed_by_category_bytes"][cat]) if plan["skew"] else ""
        rows.append(f"{cat.replace('_', ' '):<24}{cell(plan['by_category_bytes'][cat])}{skewed}")
    skewed = cell(plan["skewed_peak_bytes"]) if plan["skew"] else ""
    rows.append(f"{'peak':<24}{cell(max(plan['peak_bytes_per_rank']))}{skewed}")
    if plan["all_to_all_bytes_per_micro_batch"]:
        rows.append(f"all-to-all per micro-batch: {plan['all_to_all_bytes_per_micro_batch'] / GiB:.2f} GiB sent by each rank "
                    f"({plan['all_to_all_off_rank_bytes_per_micro_batch'] / GiB:.2f} GiB leave it); per optimizer step "
                    f"{plan['all_to_all_bytes_per_step'] / GiB:.2f} GiB")
        if plan["skew"]:
            rows.append(f"skewed (expert 0 at {plan['skew']:g}x): rank 0 receives "
                        f"{plan['skewed_all_to_all_received_bytes_per_micro_batch'] / GiB:.2f} GiB")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    rows.append(f"{verdict} {plan['gpu_memory_gb']:g} GiB with a {plan['margin']:.0%} margin "
                f"(limit {plan['limit_bytes'] / GiB:.2f} GiB, headroom {plan['headroom_bytes'] / GiB:.2f} GiB)")
    if "measured_peak_bytes_per_rank" in plan:
        rows.append(f"measured peak per rank ({unit}, against the plan): " + ", ".join(
            f"{m / div:.2f} ({m / p - 1:+.1%})" for m, p in zip(plan["measured_peak_bytes_per_rank"],
                                                                plan["peak_bytes_per_rank"])))
    return "\n".join(rows)


HEADER_START = ("# Memory and all-to-all per rank, planned by python -m qmoe_lightning.plan "
                "(--update_header rewrites this):")
HEADER_END = "# (end of the planned table)"
MARKER = "# @PLANNED_TABLE@"


def update_header(path: Path, plan: dict) -> None:
    """Write the plan's table into the recipe's header: in place of the previous table, or of a line
    `# @PLANNED_TABLE@`, or (neither) at the top of the file."""
    rows = [piece for row in table(plan).splitlines()
            for piece in textwrap.wrap(row, 112, subsequent_indent="  ", drop_whitespace=False) or [row]]
    block = [HEADER_START, *("#   " + row.rstrip() for row in rows), HEADER_END]
    lines = path.read_text().splitlines()
    if HEADER_START in lines:
        start = lines.index(HEADER_START)
        end = lines.index(HEADER_END, start)
        lines[start:end + 1] = block
    elif MARKER in lines:
        at = lines.index(MARKER)
        lines[at:at + 1] = block
    else:
        lines[0:0] = block
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmoe_lightning.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the recipe (the YAML of `cli.py fit --config`)")
    parser.add_argument("--world_size", type=int, default=None, help="ranks (default: devices x num_nodes)")
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="fraction of the GPU left for what no tensor holds (default 0.1)")
    parser.add_argument("--skew", type=float, default=2.0,
                        help="the skewed case: expert 0's load x its share (1: none; only with expert parallelism)")
    parser.add_argument("--batch", choices=("auto", "data", "synthetic"), default="auto",
                        help="the micro-batch: the recipe's data (auto: when readable here) or a text row")
    parser.add_argument("--full_depth", action="store_true", help="plan every layer (no extrapolation)")
    parser.add_argument("--update_header", action="store_true",
                        help="write the table into the recipe's header (replacing the previous one)")
    parser.add_argument("--measure", action="store_true",
                        help="also train the recipe for 3 steps on this machine's CPU and measure each rank's peak")
    args = parser.parse_args(argv)
    try:
        recipe = read_recipe(args.config, args.world_size)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.measure and recipe.on_gpu:
        parser.error(f"--measure trains the recipe on this machine's CPU; {args.config} is a GPU recipe")
    print(f"planning {args.config}: {recipe.describe()}", file=sys.stderr)
    measuring = None
    if args.measure:  # the real run goes on while the plan is computed
        from .measure import MeasuringRun, measured_batch_index

        measuring = MeasuringRun(args.config, recipe.world_size)
    plan = plan_recipe(recipe, args.gpu_memory_gb, args.margin, args.skew, args.batch, args.full_depth,
                       progress=lambda m: print("  " + m, file=sys.stderr),
                       # the measured micro-batch, planned: the comparison is of the same step
                       batch_index=measured_batch_index(recipe.accumulate_grad_batches) if args.measure else None)
    if measuring is not None:
        plan["measured_peak_bytes_per_rank"] = measuring.peaks()
        plan["measured_over_planned"] = [round(m / p, 4) for m, p in zip(plan["measured_peak_bytes_per_rank"],
                                                                           plan["peak_bytes_per_rank"])]
    print(table(plan))
    if args.update_header:
        update_header(Path(args.config), plan)
        print(f"(table written into {args.config})", file=sys.stderr)
    print(json.dumps(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
