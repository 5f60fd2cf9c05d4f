"""Pool seeds from several result folders into one table (mean and spread over seeds).

    python -m benchmarks.quality.combine results/cpu results/cpu_seeds --out results/cpu_seeds/three_seeds.md

For each task and each optimizer present in every folder: the final train loss per seed, its
mean, and the ratio of the mean to the best AdamW mean; the same for the val loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import optimizers as O


def pooled(folders, task):
    runs = {}
    for folder in folders:
        path = os.path.join(folder, f"{task}.json")
        if not os.path.exists(path):
            return {}
        with open(path) as handle:
            for name, seeds in json.load(handle)["runs"].items():
                runs.setdefault(name, {}).update({r["seed"]: r for r in seeds})
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--tasks", default="gpt,digits,seqcls,teacher")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    lines = ["| task | optimizer | seeds | final train loss per seed | mean | vs best AdamW mean | val loss mean |",
             "|---|---|---|---|---|---|---|"]
    for task in args.tasks.split(","):
        runs = pooled(args.folders, task)
        rows = {}
        for name, seeds in runs.items():
            if len(seeds) < 2:
                continue
            train = [seeds[s]["final_train_loss"] for s in sorted(seeds)]
            val = [seeds[s]["val_loss"] for s in sorted(seeds)]
            if not all(math.isfinite(x) for x in train):
                continue
            rows[name] = (sorted(seeds), train, sum(train) / len(train), sum(val) / len(val))
        adamw = [r[2] for n, r in rows.items() if n.startswith(O.ADAMW_PREFIX)]
        best = min(adamw) if adamw else math.nan
        for name, (seeds, train, mean, val) in sorted(rows.items(), key=lambda kv: kv[1][2]):
            lines.append(f"| {task} | {name} | {','.join(map(str, seeds))} | "
                         f"{' / '.join(f'{x:.4f}' for x in train)} | {mean:.4f} | {mean / best:.3f} | {val:.4f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
