"""Many-seed screens: pool final train losses from run logs and rank candidates against AdamW.

    python -m benchmarks.quality.screen collect run1.log run2.log --out results/cpu_screen/x.json
    python -m benchmarks.quality.screen table results/cpu_screen/x.json --reference salsa_author_wsd50
    python -m benchmarks.quality.screen table a.json b.json --seeds 20-39,80-139 --reference ...

``collect`` reads the per-run lines that ``benchmarks.quality.run`` prints
(``<task> <optimizer> seed <s>: train <loss> ...``) into ``{task: {optimizer: {seed: loss}}}``;
``--rename old=new`` renames an optimizer (e.g. a preset whose definition changed since).

``table`` prints, per task, over the seeds that every AdamW rate of the task has:

- ``x AdamW``: mean final train loss / the best AdamW rate's mean (the suite's ratio);
- ``vs reference``: the geometric mean over seeds of the per-seed ratio to ``--reference``
  (same weights and batches, so the pairing removes most of the seed-to-seed spread),
  with its standard error;

a candidate run on fewer of those seeds is compared on its own seeds (the best AdamW rate
on the same seeds), and the table says which. Several files are pooled (a run in two files
must have the same loss in both); ``--seeds`` keeps only the listed seeds (``0-19,40``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Dict, List, Optional

from .._common import name_pairs
from . import optimizers as O

Losses = Dict[str, Dict[str, Dict[int, float]]]


def collect(paths: List[str], rename: Dict[str, str]) -> Losses:
    losses: Losses = {}
    for path in paths:
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) > 5 and parts[2] == "seed" and parts[4] == "train":
                    task, name, seed = parts[0], rename.get(parts[1], parts[1]), int(parts[3].rstrip(":"))
                    losses.setdefault(task, {}).setdefault(name, {})[seed] = float(parts[5])
    return losses


def merge(parts: List[Losses]) -> Losses:
    """Pool several ``{task: {optimizer: {seed: loss}}}``; a seed in two parts must agree."""
    merged: Losses = {}
    for part in parts:
        for task, runs in part.items():
            for name, seeds in runs.items():
                into = merged.setdefault(task, {}).setdefault(name, {})
                for seed, loss in seeds.items():
                    if seed in into and into[seed] != loss:
                        raise ValueError(f"{task} {name} seed {seed}: two different losses "
                                         f"({into[seed]} and {loss}) in the files pooled")
                    into[seed] = loss
    return merged


def parse_seeds(text: str) -> List[int]:
    """``"0-19,40"`` -> ``[0, ..., 19, 40]``."""
    seeds = []
    for item in text.split(","):
        first, sep, last = item.strip().partition("-")
        try:
            seeds += list(range(int(first), int(last) + 1)) if sep else [int(first)]
        except ValueError:
            raise ValueError(f"bad seed list {text!r}: expected e.g. 0-19,40") from None
    return seeds


def only_seeds(losses: Losses, seeds: List[int]) -> Losses:
    keep = set(seeds)
    return {task: {n: {s: v for s, v in r.items() if s in keep} for n, r in runs.items()}
            for task, runs in losses.items()}


def table(losses: Losses, reference: Optional[str]) -> str:
    lines = []
    for task in sorted(losses):
        runs = losses[task]
        adamw = {n: r for n, r in runs.items() if n.startswith(O.ADAMW_PREFIX)}
        if not adamw:
            continue
        seeds = sorted(set.intersection(*(set(r) for r in adamw.values())))
        if not seeds:
            continue

        def mean(name, over):
            return statistics.mean(runs[name][s] for s in over)

        def best_adamw(over):
            return min(adamw, key=lambda n: mean(n, over))

        best = best_adamw(seeds)
        grid = ", ".join(f"{n[len(O.ADAMW_PREFIX):]}: {mean(n, seeds) / mean(best, seeds):.3f}"
                         for n in sorted(adamw, key=lambda n: float(n[len(O.ADAMW_PREFIX):])))
        lines += [f"### {task}: seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}), best AdamW {best} "
                  f"(mean {mean(best, seeds):.4f}); AdamW grid x best: {grid}", "",
                  f"| candidate | seeds | x AdamW | vs {reference or '-'} (paired) |", "|---|---|---|---|"]
        rows = []
        for name in runs:
            over = [s for s in seeds if s in runs[name]]
            if name in adamw or len(over) < 2:
                continue
            ratio = mean(name, over) / mean(best_adamw(over), over)  # the best AdamW on the same seeds
            paired = "-"
            if reference in runs and name != reference and all(s in runs[reference] for s in over):
                logs = [math.log(runs[name][s] / runs[reference][s]) for s in over]
                paired = f"{math.exp(statistics.mean(logs)):.3f} ± {statistics.stdev(logs) / math.sqrt(len(logs)):.3f}"
            label = f"{len(over)}" if len(over) == len(seeds) else f"{len(over)} ({over[0]}-{over[-1]})"
            rows.append((ratio, f"| {name} | {label} | {ratio:.3f} | {paired} |"))
        lines += [row for _, row in sorted(rows)] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("logs", nargs="+")
    c.add_argument("--out", required=True)
    c.add_argument("--rename", action="append", default=[], help="old=new")
    t = sub.add_parser("table")
    t.add_argument("losses", nargs="+")
    t.add_argument("--reference", default=None)
    t.add_argument("--seeds", default=None, help="keep only these seeds, e.g. 0-19,40")
    t.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "collect":
        try:
            rename = name_pairs(args.rename, "--rename old=new")
        except ValueError as error:
            parser.error(str(error))
        losses = collect(args.logs, rename)
        with open(args.out, "w") as handle:
            json.dump({task: {n: {str(s): v for s, v in sorted(r.items())} for n, r in sorted(runs.items())}
                       for task, runs in sorted(losses.items())}, handle, indent=1)
        print(f"{sum(len(r) for runs in losses.values() for r in runs.values())} runs -> {args.out}")
        return 0
    parts = []
    for path in args.losses:
        with open(path) as handle:
            parts.append({task: {n: {int(s): v for s, v in r.items()} for n, r in runs.items()}
                          for task, runs in json.load(handle).items()})
    try:
        losses = merge(parts)
        if args.seeds is not None:
            losses = only_seeds(losses, parse_seeds(args.seeds))
    except ValueError as error:
        parser.error(str(error))
    text = table(losses, args.reference)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
