"""Why the search settles where it does: per-search diagnostics from the suite's search logs.

    python -m benchmarks.quality.study --size cpu --task gpt --optimizers salsa_faithful,salsa_author

For each FusedSaLSa run in ``results/<size>/<task>.json`` (seed 0) and each window of steps:
the median of ``eta * kappa_hat / q`` at the first trial (1 = the greedy step, 2 = the edge
of stability; ``kappa_hat = 2*(f1 - f0 + eta*q)/eta^2``), the two sides of the smoothed
Armijo test at the first trial (``beta3*h + (1-beta3)*(f0 - f1)`` against ``c*eta*s``), the
raw slope ``q`` against its average ``s``, trials per search, the fraction of searches with
``q <= 0``, and the applied step size. Writes a markdown table and a PNG of the Armijo sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .run import RESULTS

WINDOWS = ((1, 10), (10, 50), (50, 150), (150, 300), (300, 10**9))


def _median(xs):
    xs = sorted(x for x in xs if math.isfinite(x))
    return xs[len(xs) // 2] if xs else math.nan


def per_search(entry: dict) -> dict:
    """Scalars of one logged search (its first trial)."""
    eta, q, f0, f1 = entry["eta"], entry["q"], entry["f0"], entry["f1"]
    kappa = 2 * (f1 - f0 + eta * q) / (eta * eta)
    return dict(k=entry["k"], ratio=eta * kappa / q if q > 0 else math.nan,
                lhs=entry["beta3"] * entry["h"] + (1 - entry["beta3"]) * (f0 - f1),
                rhs=entry["c"] * eta * entry["s"], q=q, s=entry["s"], trials=entry.get("trials", 1), eta=eta)


def windows(run: dict):
    rows = [per_search(e) for e in run["searches"] if "f1" in e]
    out = []
    for lo, hi in WINDOWS:
        sel = [r for r in rows if lo <= r["k"] < hi]
        if not sel:
            continue
        sizes = run["step_sizes"][lo - 1:min(hi, len(run["step_sizes"])) - 1] or [math.nan]
        out.append(dict(window=f"{lo}-{min(hi, len(run['step_sizes']))}", searches=len(sel),
                        ratio=_median([r["ratio"] for r in sel]), lhs=_median([r["lhs"] for r in sel]),
                        rhs=_median([r["rhs"] for r in sel]), q=_median([r["q"] for r in sel]),
                        s=_median([r["s"] for r in sel]),
                        trials=sum(r["trials"] for r in sel) / len(sel),
                        nonpositive=sum(r["q"] <= 0 for r in sel) / len(sel),
                        step=_median(sizes)))
    return rows, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="cpu")
    parser.add_argument("--task", default="gpt")
    parser.add_argument("--optimizers", default="salsa_faithful,salsa_author")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    folder = args.out or os.path.join(RESULTS, args.size)
    with open(os.path.join(folder, f"{args.task}.json")) as handle:
        runs = json.load(handle)["runs"]
    lines = [f"### Search diagnostics: {args.task} ({args.size})", "",
             "| optimizer | steps | searches | median eta*kappa_hat/q | Armijo lhs | Armijo rhs | q | s | "
             "trials/search | q<=0 | applied step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in args.optimizers.split(",") if n in runs]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows, table = windows(runs[name][0])
        for w in table:
            lines.append(f"| {name} | {w['window']} | {w['searches']} | {w['ratio']:.2f} | {w['lhs']:.2e} | "
                         f"{w['rhs']:.2e} | {w['q']:.2e} | {w['s']:.2e} | {w['trials']:.2f} | "
                         f"{w['nonpositive']:.2f} | {w['step']:.2e} |")
        ax.plot([r["k"] for r in rows], [r["lhs"] for r in rows], ".", ms=3, label="beta3*h + (1-beta3)*(f0-f1)")
        ax.plot([r["k"] for r in rows], [r["rhs"] for r in rows], ".", ms=3, label="c*eta*s")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title(f"{args.task} {name}: Armijo sides, first trial")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, f"{args.task}_armijo.png"), dpi=80)
    plt.close(fig)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, f"{args.task}_study.md"), "w") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
