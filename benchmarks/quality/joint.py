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

import random
from typing import Dict, List

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


def preset_kwargs(point: dict, total_steps: int) -> dict:
    """FusedSaLSa's arguments at ``point`` (the preset's, with the point's constants)."""
    from dataclasses import replace

    from salsa_fused import presets

    kwargs = presets.preset_kwargs(presets.RECOMMENDED, total_steps)
    kwargs["schedule"] = replace(kwargs["schedule"], warmup=point["w"], decay=round(1.0 - point["w"], 10),
                                 peak=point["p"])
    kwargs.update(beta3=point["b"], c=point["c"], growth=point["g"], max_search_interval=point["i"],
                  search_direction="momentum" if point["d"] == "m" else "gradient")
    return kwargs


if __name__ == "__main__":
    print(",".join(name_of(p) for p in sample()))
