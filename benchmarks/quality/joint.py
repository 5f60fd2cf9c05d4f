"""A joint search over the preset's constants (NOTES.md section 39): the space, a seeded sample of it,
and the registry name of each point.

Every earlier round changed one constant of the ``pretrain`` preset at a time. This samples them
together, to choose on the development tasks and gate on the unseen ``holdout2`` tasks. A point is
the preset (momentum or gradient trial direction, the WarmupStableDecay warm-up then a linear decay to
zero, the early freeze, the back-off and the hold as shipped) with these constants:

- ``b``: ``beta3``, the smoothing of the Armijo test;
- ``c``: the Armijo constant;
- ``g``: ``growth``, the first trial's factor on the level;
- ``p``: ``peak``, the warm-up's top in units of the searched level;
- ``w``: the search phase (the warm-up) as a fraction of the run; the decay takes the rest;
- ``d``: the trial direction, ``m`` (momentum) or ``g`` (gradient);
- ``i``: ``max_search_interval``, the adaptive interval's cap.

Name: ``joint_b0.95_c0.5_g1.1_p2_w0.2_dm_i10`` (that one builds the shipped preset).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from typing import Dict, List, Tuple

PREFIX = "joint_"

SPACE: Dict[str, tuple] = {
    "b": (0.9, 0.95, 0.99),
    "c": (0.3, 0.4, 0.5),
    "g": (1.05, 1.1, 1.2),
    "p": (1.5, 2.0, 3.0),
    "w": (0.1, 0.2, 0.3),
    "d": ("m", "g"),
    "i": (3, 10),
}

#: The shipped preset's point (section 25's ``pretrain_hold``).
PRESET = dict(b=0.95, c=0.5, g=1.1, p=2.0, w=0.2, d="m", i=10)

#: Section 39's sample: its size and the seed of its generator, fixed before any run.
SAMPLE_SIZE = 40
SAMPLE_SEED = 39


def _number(value) -> str:
    return f"{value:g}"


def name_of(point: dict) -> str:
    return PREFIX + "_".join(f"{key}{value if key == 'd' else _number(value)}" for key, value in
                             ((k, point[k]) for k in SPACE))


def parse(name: str) -> dict:
    """The point a ``joint_...`` name stands for; ValueError on anything else."""
    if not name.startswith(PREFIX):
        raise ValueError(f"not a joint-search name: {name!r}")
    point = {}
    for part in name[len(PREFIX):].split("_"):
        key, raw = part[:1], part[1:]
        if key not in SPACE or key in point or not raw:
            raise ValueError(f"bad joint-search name {name!r}: fields {''.join(SPACE)} once each, e.g. "
                             f"{name_of(PRESET)}")
        if key == "d":
            value = raw
        elif key == "i":
            value = int(raw) if raw.isdigit() else None
        else:
            try:
                value = float(raw)
            except ValueError:
                value = None
        if value not in SPACE[key]:
            raise ValueError(f"bad joint-search name {name!r}: {key}={raw} is outside the space {SPACE[key]}")
        point[key] = value
    if set(point) != set(SPACE):
        raise ValueError(f"bad joint-search name {name!r}: missing {sorted(set(SPACE) - set(point))}")
    return point


def sample(size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> List[dict]:
    """``size`` distinct points drawn uniformly from the space (never the preset's own point)."""
    rng = random.Random(seed)
    seen = {name_of(PRESET)}
    points = []
    while len(points) < size:
        point = {key: rng.choice(values) for key, values in SPACE.items()}
        if name_of(point) not in seen:
            seen.add(name_of(point))
            points.append(point)
    return points


def overrides(point: dict) -> Tuple[dict, dict]:
    """The point as (fields of the preset's WarmupStableDecay, FusedSaLSa arguments) replacing the preset's."""
    schedule = dict(warmup=point["w"], decay=round(1.0 - point["w"], 10), peak=point["p"])
    search = dict(beta3=point["b"], c=point["c"], growth=point["g"], max_search_interval=point["i"],
                  search_direction="momentum" if point["d"] == "m" else "gradient")
    return schedule, search


FORWARDS_BOUND = 1.10  # a point's forwards per step at most this many times the preset's, on every task-length
ABOVE = 1.15  # the bound on one task's ratio to the best AdamW


def _geomean(ratios: List[float]) -> float:
    """Their geometric mean; inf if there are none or one is not a finite positive number (a divergence)."""
    if not ratios or not all(0 < r < math.inf for r in ratios):
        return math.inf
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def rank(rows: List[dict], control: str = "pretrain_hold", split: str = "development") -> List[dict]:
    """Step 1 of section 39's rule: per point (and the control), its task-lengths above ``ABOVE``, its
    geomean ratio to the best AdamW over the task-lengths, whether its forwards stay within
    ``FORWARDS_BOUND`` of the control's; sorted eligible first (forwards within the bound, and rows on
    every task-length the most complete point has), then by (count above, geomean)."""
    from .zoo.runner import summarize  # here: the runner imports the registry, which imports this module

    summary = {key: entry for key, entry in summarize(rows).items() if entry["split"] == split}
    names = sorted({c for entry in summary.values() for c in entry["configs"]
                    if c.startswith(PREFIX) or c == control})
    table = []
    for name in names:
        ratios, above, fwd_ok, per_length = [], 0, True, {}
        for key, entry in summary.items():
            mine, ref = entry["configs"].get(name), entry["configs"].get(control)
            if mine is None or ref is None:
                continue
            ratios.append(mine["ratio"])
            above += mine["ratio"] > ABOVE
            per_length.setdefault(entry["length"], []).append(mine["ratio"])
            if mine["forwards_per_step"] > FORWARDS_BOUND * ref["forwards_per_step"]:
                fwd_ok = False
        table.append(dict(name=name, task_lengths=len(ratios), above=above, geomean=_geomean(ratios),
                          forwards_ok=fwd_ok, per_length={length: _geomean(rs) for length, rs in per_length.items()}))
    complete = max((t["task_lengths"] for t in table), default=0)
    for t in table:
        t["complete"] = t["task_lengths"] == complete
    return sorted(table, key=lambda t: (not (t["forwards_ok"] and t["complete"]), t["above"], t["geomean"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.joint",
                                     description="section 39's sample (no arguments: its names, comma-separated), "
                                                 "or `rank FILES`: step 1 of its rule on those rows")
    parser.add_argument("command", nargs="?", choices=["names", "rank"], default="names")
    parser.add_argument("files", nargs="*")
    parser.add_argument("--control", default="pretrain_hold")
    args = parser.parse_args(argv)
    if args.command == "names":
        print(",".join(name_of(p) for p in sample()))
        return 0
    rows = [json.loads(line) for path in args.files for line in open(path) if line.strip()]
    print("| point | task-lengths | above 1.15 | geomean | short | default | long | forwards within 1.10x |")
    print("|---|---|---|---|---|---|---|---|")  # incomplete points (fewer task-lengths) rank last
    for t in rank(rows, args.control):
        lengths = " | ".join(f"{t['per_length'].get(L, float('nan')):.3f}" for L in ("short", "default", "long"))
        print(f"| {t['name']} | {t['task_lengths']} | {t['above']} | {t['geomean']:.3f} | {lengths} | "
              f"{'yes' if t['forwards_ok'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
