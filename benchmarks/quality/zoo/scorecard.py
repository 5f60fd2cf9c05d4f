"""Issue 14's targets, read off the zoo's rows for one configuration on one split, at each run length.

    python -m benchmarks.quality.zoo scorecard benchmarks/quality/results/zoo/validation.jsonl \\
        --split validation --config pretrain_hold [--update README.md]

Per task and length: ratio = the configuration's mean final train loss over seeds / the best AdamW's
(5% warm-up + cosine, the grid of the rows, as :func:`runner.summarize` computes it), and its applied
level / the best AdamW's mean rate. Per length, each target:

- the geometric mean of the ratios over the split's tasks is at most 1.03, and no ratio is above 1.15;
- no task is more than 5% worse than the ``FusedSaLSa`` defaults (``salsa_defaults``);
- at or ahead of each reference (``runner.REFERENCES``: Prodigy and schedule-free AdamW with their
  documented warm-up, prodigy-plus-schedule-free) on at least 3/4 of the tasks;
- forwards per step, reported (mean and highest over the tasks).

Beside them, a yardstick for how precise a level the targets ask for: the same ratios for AdamW at the
grid's rates next to its best (about 3x below and above), the better and the worse of the two per task;
with ``--one-rate-from FILE...``, AdamW at one rate on every task, the rate chosen on those rows (the
development tasks: :func:`one_rate`, NOTES.md section 82), and on how many tasks the configuration is at or
ahead of it; with ``--also-adamw NAME``, the geomean against another AdamW denominator (NOTES.md section 91:
AdamW tuned over beta2 too); and how far the geomean rests on the seeds drawn: its 5th and 95th percentiles over ``RESAMPLES``
resamplings of each task's seeds with replacement (the configuration and the best AdamW rate on the same
drawn seeds, the rate kept as the whole sample chose it; a fixed generator, so the card is reproducible).

A task without rows for the configuration, the defaults or a reference at some length fails every target
of that length it enters: the card never reads a missing task as met. A task whose best AdamW rate is at an
end of the rates run (the runner stops extending after ``runner.MAX_EXTENSIONS``) is named below the card as
not bracketed. ``--update FILE`` rewrites, in
FILE, the text between ``<!-- zoo scorecard: SPLIT -->`` and ``<!-- end zoo scorecard: SPLIT -->``.
"""

from __future__ import annotations

import math
import random
import re
from typing import Dict, List, Optional, Tuple

from . import runner as R
from . import tasks as Z

GEOMEAN_AT_MOST = 1.03
NO_TASK_ABOVE = 1.15
VS_DEFAULTS_AT_MOST = 1.05
AHEAD_SHARE_AT_LEAST = 0.75
RESAMPLES = 2000
INTERVAL = (0.05, 0.95)
DEFAULTS = "salsa_defaults"
REFERENCE_NAMES = {"prodigy_warmup": "Prodigy + warm-up", "schedulefree_warmup": "schedule-free AdamW + warm-up",
                   "prodigy_plus_sf": "prodigy-plus-schedule-free"}


def scorecard(rows: List[dict], split: str, config: str, grids: Tuple[str, ...] = R.ZOO_GRID,
              one_rate: Optional[str] = None) -> Dict[str, dict]:
    """Per length of ``tasks.LENGTHS``: the split's tasks (each with the configuration's ratio, level
    ratio and forwards, the defaults' and the references' ratios, None where a row is missing) and
    each target, met or not; the best AdamW among the grids ``grids`` names (:func:`runner.summarize`).
    ``one_rate``: an AdamW configuration (``adamw_<lr>``) read on every task as a yardstick (:func:`one_rate`)."""
    names = sorted(name for name, spec in Z.ZOO.items() if spec.split == split)
    if not names:
        raise ValueError(f"the zoo has no task in split {split!r}")
    card = {}
    for length in Z.LENGTHS:
        at_length = [r for r in rows if r["split"] == split and r["length"] == length]
        summary = R.summarize(at_length, grids)
        ran = {r["task"] for r in at_length}
        tasks = []
        for name in names:
            entry = summary.get(f"{name}@{length}")
            configs = entry["configs"] if entry else {}

            def ratio(c):
                return configs[c]["ratio"] if c in configs else None

            mine = configs.get(config, {})
            tasks.append(dict(task=name, ratio=ratio(config), level_ratio=mine.get("level_ratio"),
                              forwards=mine.get("forwards_per_step"), defaults=ratio(DEFAULTS),
                              references={ref: ratio(ref) for ref in R.REFERENCES},
                              best_lr=entry["best_lr"] if entry else None, edge=bool(entry and entry["edge"]),
                              grid_step_off=grid_step_off(entry) if entry else None,
                              no_grid=entry is None and name in ran,
                              one_rate=ratio(one_rate) if one_rate else None,
                              seed_pairs=seed_pairs([r for r in at_length if r["task"] == name], config, entry)))
        card[length] = dict(tasks=tasks, one_rate=_one_rate_yardstick(tasks, one_rate), **_targets(tasks))
    return card


def one_rate(rows: List[dict], split: str = Z.DEVELOPMENT) -> dict:
    """AdamW at one rate for every task and length, the rate chosen on ``rows`` of ``split`` (NOTES.md section
    82): of the zoo grid's rates with a row on every task-length there (on the seeds its ratios are over), the
    one whose ratios to the best AdamW have the lowest geometric mean over the task-lengths. Returns ``config``
    (its name), ``geomeans`` (rate -> geomean, of every complete rate) and ``edge`` (the chosen rate is the lowest
    or highest complete rate: the ladder should be extended past it before the choice is read)."""
    entries = [e for length in Z.LENGTHS
               for e in R.summarize([r for r in rows if r["split"] == split and r["length"] == length]).values()]
    if not entries:
        raise ValueError(f"no task-length of split {split!r} has an AdamW grid in the rows to choose one rate on")
    ratios: Dict[str, List[float]] = {}
    for entry in entries:
        for name, numbers in entry["configs"].items():
            if R.lr_of(name) is not None:
                ratios.setdefault(name, []).append(numbers["ratio"])
    complete = {name: values for name, values in ratios.items() if len(values) == len(entries)}
    if not complete:
        raise ValueError(f"no AdamW rate has rows on all {len(entries)} task-lengths of split {split!r}")
    geomeans = {name: R._gmean(values) for name, values in complete.items()}
    chosen = min(geomeans, key=lambda name: (geomeans[name], R.lr_of(name)))
    ladder = sorted(geomeans, key=R.lr_of)
    return dict(config=chosen, geomeans={name: geomeans[name] for name in ladder}, task_lengths=len(entries),
                edge=chosen in (ladder[0], ladder[-1]))


def _one_rate_yardstick(tasks: List[dict], config: Optional[str]) -> Optional[dict]:
    if config is None:
        return None
    have = [t for t in tasks if t["one_rate"] is not None]
    geomean = R._gmean([t["one_rate"] for t in have]) if len(have) == len(tasks) else math.nan
    ahead = sum(t["ratio"] is not None and t["ratio"] <= t["one_rate"] for t in have)
    return dict(config=config, geomean=geomean, above=sum(not t["one_rate"] <= NO_TASK_ABOVE for t in have),
                tasks=len(have), ahead=ahead)


def seed_pairs(rows: List[dict], config: str, entry: Optional[dict]) -> Optional[List[Tuple[float, float]]]:
    """Per seed the configuration's ratio is over (``entry``: one task-length of :func:`runner.summarize`),
    (its final train loss, the best AdamW rate's); None without the configuration, or where a loss is
    missing (a diverged run)."""
    if entry is None or config not in entry["configs"]:
        return None
    seeds = entry["configs"][config]["seeds"]
    loss = {(r["config"], r["seed"]): r["final_train_loss"] for r in rows}
    pairs = [(loss.get((config, s)), loss.get((entry["best_adamw"], s))) for s in seeds]
    return None if any(a is None or b is None for a, b in pairs) else pairs


def geomean_interval(tasks: List[dict], resamples: int = RESAMPLES,
                     interval: Tuple[float, float] = INTERVAL) -> Optional[Tuple[float, float]]:
    """The percentiles ``interval`` of the geomean over tasks of (mean final loss / the best AdamW's mean on
    the same seeds), each task's seeds drawn with replacement ``resamples`` times (:func:`seed_pairs`); None
    where a task has no pairs. The generator is seeded, so the interval is the same on every call."""
    pairs = [t.get("seed_pairs") for t in tasks]
    if not pairs or any(not p for p in pairs):
        return None
    draw = random.Random(0)
    geomeans = []
    for _ in range(resamples):
        logs = 0.0
        for task_pairs in pairs:
            picked = [task_pairs[draw.randrange(len(task_pairs))] for _ in task_pairs]
            ours, best = sum(a for a, _ in picked), sum(b for _, b in picked)
            if not (ours > 0 and best > 0 and math.isfinite(ours) and math.isfinite(best)):
                return None
            logs += math.log(ours / best)
        geomeans.append(math.exp(logs / len(pairs)))
    geomeans.sort()
    at = [min(len(geomeans) - 1, max(0, int(round(q * (len(geomeans) - 1))))) for q in interval]
    return geomeans[at[0]], geomeans[at[1]]


def rate_chosen_elsewhere(rows: List[dict], choose_rows: List[dict], split: str, config: str) -> Dict[str, dict]:
    """Per length: AdamW at the rate the grid of ``choose_rows`` picks (its best there, other seeds), scored on
    ``rows``, over ``rows``' own best rate (``adamw``: how much the in-sample pick flatters the denominator), and
    the configuration over AdamW at that rate (``config``); per task and as geomeans with the tasks above 1.15.
    A task without rows on either side, or without the chosen rate in ``rows``, is in ``missing``."""
    names = sorted(name for name, spec in Z.ZOO.items() if spec.split == split)
    out = {}
    for length in Z.LENGTHS:
        scored = R.summarize([r for r in rows if r["split"] == split and r["length"] == length])
        chooser = R.summarize([r for r in choose_rows if r["split"] == split and r["length"] == length])
        per_task, missing = {}, []
        for name in names:
            entry, chosen = scored.get(f"{name}@{length}"), chooser.get(f"{name}@{length}")
            at_rate = None if entry is None or chosen is None else entry["configs"].get(chosen["best_adamw"])
            mine = entry["configs"].get(config) if entry else None
            if at_rate is None or mine is None:
                missing.append(name)
                continue
            per_task[name] = dict(rate=chosen["best_lr"], best_rate=entry["best_lr"], adamw=at_rate["ratio"],
                                  config=mine["ratio"] / at_rate["ratio"], config_in_sample=mine["ratio"])
        summary = {key: dict(geomean=R._gmean([t[key] for t in per_task.values()]),
                             above=sorted(n for n, t in per_task.items() if not t[key] <= NO_TASK_ABOVE))
                   for key in ("adamw", "config", "config_in_sample")}
        out[length] = dict(tasks=per_task, missing=missing, **summary)
    return out


def grid_step_off(entry: dict) -> Optional[Tuple[float, float]]:
    """(better, worse): the ratios of the AdamW grid's rates next to its best rate, one entry of
    :func:`runner.summarize`; both the one neighbour's where the best is at an end of the grid."""
    rates, prefix = entry["grid"], entry.get("grid_prefix", R.ZOO_GRID[0])
    at = rates.index(entry["best_lr"])
    by_rate = {R.lr_of(c, prefix): e["ratio"] for c, e in entry["configs"].items() if R.lr_of(c, prefix) is not None}
    ratios = [by_rate[rates[i]] for i in (at - 1, at + 1) if 0 <= i < len(rates)]
    return (min(ratios), max(ratios)) if ratios else None


def _targets(tasks: List[dict]) -> dict:
    ratios = [t["ratio"] for t in tasks]
    missing = [t["task"] for t in tasks if t["ratio"] is None]
    no_grid = [t["task"] for t in tasks if t.get("no_grid")]
    complete = not missing
    geomean = R._gmean(ratios) if complete else math.nan
    above = [t["task"] for t in tasks if t["ratio"] is None or not t["ratio"] <= NO_TASK_ABOVE]
    worse_than_defaults = [t["task"] for t in tasks if t["ratio"] is None or t["defaults"] is None
                           or not t["ratio"] <= VS_DEFAULTS_AT_MOST * t["defaults"]]
    ahead = {}
    for ref in R.REFERENCES:
        count = sum(t["ratio"] is not None and t["references"][ref] is not None
                    and t["ratio"] <= t["references"][ref] for t in tasks)
        ahead[ref] = dict(count=count, met=count >= AHEAD_SHARE_AT_LEAST * len(tasks))
    forwards = [t["forwards"] for t in tasks if t["forwards"] is not None]
    off = [t["grid_step_off"] for t in tasks if t["grid_step_off"] is not None]
    step_off = {side: dict(geomean=R._gmean([o[k] for o in off]),
                           above=sum(not o[k] <= NO_TASK_ABOVE for o in off), tasks=len(off))
                for k, side in enumerate(("better", "worse"))}
    return dict(grid_step_off=step_off, no_grid=no_grid,
                geomean=geomean, geomean_interval=geomean_interval(tasks) if complete else None,
                seeds=sorted({len(t["seed_pairs"]) for t in tasks if t.get("seed_pairs")}),
                geomean_met=complete and geomean <= GEOMEAN_AT_MOST,
                above=above, worse_than_defaults=worse_than_defaults, ahead=ahead, missing=missing,
                forwards_mean=sum(forwards) / len(forwards) if forwards else None,
                forwards_max=max(forwards) if forwards else None)


def _cell(ratio, level) -> str:
    if ratio is None:
        return "no rows"
    shown = R._fmt(ratio)
    if not ratio <= NO_TASK_ABOVE:
        shown = f"**{shown}**"
    return shown + (f" ({level:.2g}x)" if level is not None else "")


def _seed_counts(card: Dict[str, dict]) -> str:
    counts = sorted({n for c in card.values() for n in c["seeds"]})
    if not counts:
        return "none"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(card: Dict[str, dict], split: str, config: str, command: str, adamw: str = "zoo-grid",
             also: Optional[Tuple[str, Dict[str, dict]]] = None) -> str:
    """The card as markdown; ``also``: (a name of ``runner.ADAMW_DENOMINATORS``, the card against it), whose
    geomeans and tasks above 1.15 make one more row."""
    lengths = list(card)
    count = len(card[lengths[0]]["tasks"])
    lines = [f"Generated by `{command}` from the committed rows: final train loss / the best AdamW (5% warm-up + "
             f"cosine, a grid bracketing its best; {R.ADAMW_DENOMINATORS[adamw][1]}), mean of the seeds "
             f"({_seed_counts(card)} per task-length); in brackets the applied level / the best "
             f"AdamW's mean rate; **bold** above {NO_TASK_ABOVE}. The references: Prodigy and schedule-free AdamW with "
             f"their documented warm-up, prodigy-plus-schedule-free at its defaults (ZOO.md). Lengths: "
             + ", ".join(f"{name} = {Z.LENGTHS[name]:.3g}x the task's steps" for name in lengths) + ".", "",
             f"| `{config}`, {split} task | " + " | ".join(lengths) + " | forwards/step (" + " / ".join(lengths)
             + ") |", "|---|" + "---|" * (len(lengths) + 1)]
    for i in range(count):
        per = [card[length]["tasks"][i] for length in lengths]
        forwards = " / ".join(R._fmt(t["forwards"], ".2f") for t in per)
        lines.append(f"| {per[0]['task']} | " + " | ".join(_cell(t["ratio"], t["level_ratio"]) for t in per)
                     + f" | {forwards} |")
    lines += ["", f"| target ({count} {split} tasks) | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(f"geomean <= {GEOMEAN_AT_MOST}", [f"{R._fmt(card[n]['geomean'])}: {_met(card[n]['geomean_met'])}"
                                          for n in lengths])
    row(f"geomean, {INTERVAL[0]:.0%}-{INTERVAL[1]:.0%} over the seeds resampled per task",
        [(lambda iv: "—" if iv is None else f"{R._fmt(iv[0])}-{R._fmt(iv[1])}")(card[n]["geomean_interval"])
         for n in lengths])
    row(f"no task above {NO_TASK_ABOVE}", [f"{_met(not card[n]['above'])}" + (
        f" ({len(card[n]['above'])}: {', '.join(card[n]['above'])})" if card[n]["above"] else "") for n in lengths])
    row(f"never more than {VS_DEFAULTS_AT_MOST - 1:.0%} worse than the defaults",
        [f"{_met(not card[n]['worse_than_defaults'])}" + (
            f" ({len(card[n]['worse_than_defaults'])}: {', '.join(card[n]['worse_than_defaults'])})"
            if card[n]["worse_than_defaults"] else "") for n in lengths])
    for ref in R.REFERENCES:
        row(f"at or ahead of {REFERENCE_NAMES[ref]} on {AHEAD_SHARE_AT_LEAST:.0%} of tasks",
            [f"{card[n]['ahead'][ref]['count']}/{count}: {_met(card[n]['ahead'][ref]['met'])}" for n in lengths])
    row("forwards/step, mean (highest)", [f"{R._fmt(card[n]['forwards_mean'], '.2f')} "
                                          f"({R._fmt(card[n]['forwards_max'], '.2f')})" for n in lengths])
    for side in ("better", "worse"):
        row(f"yardstick: AdamW a grid step off its best rate, the {side} side: geomean (tasks above {NO_TASK_ABOVE})",
            [f"{R._fmt(card[n]['grid_step_off'][side]['geomean'])} ({card[n]['grid_step_off'][side]['above']}"
             f"/{card[n]['grid_step_off'][side]['tasks']})" for n in lengths])
    yardstick = card[lengths[0]].get("one_rate")
    if yardstick is not None:
        row(f"yardstick: AdamW at one rate on every task (`{yardstick['config']}`, chosen on development): geomean "
            f"(tasks above {NO_TASK_ABOVE})",
            [f"{R._fmt(card[n]['one_rate']['geomean'])} ({card[n]['one_rate']['above']}/{card[n]['one_rate']['tasks']})"
             for n in lengths])
        row(f"at or ahead of AdamW at that one rate", [f"{card[n]['one_rate']['ahead']}/{card[n]['one_rate']['tasks']}"
                                                       for n in lengths])
    if also is not None:
        name, other = also
        row(f"against AdamW with {R.ADAMW_DENOMINATORS[name][1]} (`--adamw {name}`): geomean (tasks above "
            f"{NO_TASK_ABOVE})", [f"{R._fmt(other[n]['geomean'])} ({len(other[n]['above'])}/{count})" for n in lengths])
    missing = {n: card[n]["missing"] for n in lengths if card[n]["missing"]}
    if missing:
        lines += ["", "Tasks without rows (every target they enter counts as missed): "
                  + "; ".join(f"{n}: {', '.join(m)}" for n, m in missing.items()) + "."]
    no_grid = {n: card[n]["no_grid"] for n in lengths if card[n]["no_grid"]}
    if no_grid:
        lines += ["", "Of those, with rows but no complete AdamW grid to divide by (run `--configs adamw_grid` on "
                  "them first): " + "; ".join(f"{n}: {', '.join(m)}" for n, m in no_grid.items()) + "."]
    for name, scored in [(adamw, card)] + ([also] if also else []):
        edges = {n: [t["task"] for t in scored[n]["tasks"] if t["edge"]] for n in lengths}
        edges = {n: tasks for n, tasks in edges.items() if tasks}
        if edges:  # the runner stops after MAX_EXTENSIONS: the card must not call such a grid bracketing
            lines += ["", f"Not bracketed (`--adamw {name}`): AdamW's best rate is at an end of the rates run, so its "
                      "best may lie past it and the ratio may flatter the configuration (run the next rate): "
                      + "; ".join(f"{n}: {', '.join(tasks)}" for n, tasks in edges.items()) + "."]
    return "\n".join(lines) + "\n"


def markers(split: str):
    return f"<!-- zoo scorecard: {split} -->", f"<!-- end zoo scorecard: {split} -->"


def replace_block(text: str, split: str, block: str) -> str:
    """``text`` with the part between ``split``'s markers replaced by ``block``; both markers must be
    there, once each, in order."""
    start, end = markers(split)
    found = [len(re.findall(re.escape(m), text)) for m in (start, end)]
    if found != [1, 1] or text.index(start) > text.index(end):
        raise ValueError(f"expected {start!r} and then {end!r} once each; found them {found[0]} and {found[1]} times")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block}{end}{tail}"


def block_of(text: str, split: str) -> str:
    """The text between ``split``'s markers in ``text``."""
    start, end = markers(split)
    if start not in text or end not in text:
        raise ValueError(f"no {start!r} ... {end!r} block")
    return text.split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def command(files: List[str], split: str, config: str, adamw: str = "zoo-grid",
            one_rate_from: Optional[List[str]] = None, also_adamw: Optional[str] = None) -> str:
    return (f"python -m benchmarks.quality.zoo scorecard {' '.join(files)} --split {split} --config {config}"
            + ("" if adamw == "zoo-grid" else f" --adamw {adamw}")
            + (f" --one-rate-from {' '.join(one_rate_from)}" if one_rate_from else "")
            + (f" --also-adamw {also_adamw}" if also_adamw else ""))


def chosen_markdown(result: Dict[str, dict], config: str) -> str:
    lines = ["", f"AdamW's rate chosen on the rows of --choose-rate-on (other seeds), scored here: geomean over tasks "
             f"(tasks above {NO_TASK_ABOVE}):", "",
             "| length | AdamW at the chosen rate / the best here | " + f"`{config}` / the best here | "
             f"`{config}` / AdamW at the chosen rate | rate moved on | missing |", "|---|---|---|---|---|---|"]
    for length, r in result.items():
        moved = sorted(n for n, t in r["tasks"].items() if t["rate"] != t["best_rate"])
        cells = [f"{R._fmt(r[k]['geomean'])} ({len(r[k]['above'])})" for k in ("adamw", "config_in_sample", "config")]
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {len(moved)}/{len(r['tasks'])} | "
                     f"{', '.join(r['missing']) or '—'} |")
    return "\n".join(lines) + "\n"


def pooled(rows: List[dict], splits: List[str], config: str, grids: Tuple[str, ...] = R.ZOO_GRID) -> Dict[str, dict]:
    """Per length: the geomean of ``config``'s ratios (:func:`scorecard`'s, against the AdamW of ``grids``) over
    every task of ``splits`` together, the tasks above ``NO_TASK_ABOVE``, and the tasks without a ratio (left out
    of the geomean and named: a pooled reading never fills a gap). NOTES.md section 92."""
    result: Dict[str, dict] = {}
    for split in splits:
        for length, card in scorecard(rows, split, config, grids).items():
            entry = result.setdefault(length, {"ratios": {}, "missing": []})
            for task in card["tasks"]:
                if task["ratio"] is None:
                    entry["missing"].append(task["task"])
                else:
                    entry["ratios"][task["task"]] = task["ratio"]
    for entry in result.values():
        ratios = entry["ratios"]
        entry["geomean"] = math.exp(sum(map(math.log, ratios.values())) / len(ratios)) if ratios else None
        entry["above"] = sorted(name for name, ratio in ratios.items() if ratio > NO_TASK_ABOVE)
    return result


def command_pooled(args) -> int:
    rows = R.read_rows(args.files)
    splits, configs = args.splits.split(","), args.configs.split(",")
    unknown = [split for split in splits if split not in Z.SPLITS]
    if unknown:
        raise ValueError(f"--splits: unknown {unknown}; choose from {list(Z.SPLITS)}")
    results = {config: pooled(rows, splits, config, R.ADAMW_DENOMINATORS[args.adamw][0]) for config in configs}
    lengths = list(next(iter(results.values())))
    lines = [f"Pooled over the tasks of {', '.join(splits)}: final train loss / the best AdamW "
             f"({R.ADAMW_DENOMINATORS[args.adamw][1]}), mean of the seeds; geomean over the tasks with a ratio "
             f"(tasks above {NO_TASK_ABOVE}; tasks without a ratio).", "",
             "| configuration | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for config, result in results.items():
        cells = [f"{R._fmt(result[n]['geomean']) if result[n]['geomean'] is not None else '—'} over "
                 f"{len(result[n]['ratios'])} ({len(result[n]['above'])} above"
                 + (f"; missing {', '.join(result[n]['missing'])}" if result[n]["missing"] else "") + ")"
                 for n in lengths]
        lines.append(f"| `{config}` | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


def command_scorecard(args) -> int:
    rows = R.read_rows(args.files)
    chosen = one_rate(R.read_rows(args.one_rate_from)) if args.one_rate_from else None
    if chosen is not None and chosen["edge"]:
        raise SystemExit(f"--one-rate-from: the lowest geomean is at {chosen['config']}, an end of the rates with "
                         f"rows on every development task-length ({', '.join(chosen['geomeans'])}): run the next "
                         "rate past it first")
    card = scorecard(rows, args.split, args.config, R.ADAMW_DENOMINATORS[args.adamw][0],
                     chosen["config"] if chosen else None)
    also = ((args.also_adamw, scorecard(rows, args.split, args.config, R.ADAMW_DENOMINATORS[args.also_adamw][0]))
            if args.also_adamw else None)
    text = markdown(card, args.split, args.config,
                    command(args.files, args.split, args.config, args.adamw, args.one_rate_from, args.also_adamw),
                    args.adamw, also)
    if args.update:  # the card alone: the page's block is the reading
        with open(args.update, encoding="utf-8") as handle:
            page = replace_block(handle.read(), args.split, text)
        with open(args.update, "w", encoding="utf-8") as handle:
            handle.write(page)
    if chosen is not None:
        per_rate = ", ".join(f"{name} {R._fmt(g)}" for name, g in chosen["geomeans"].items())
        text += (f"\nThe one rate, chosen on {chosen['task_lengths']} development task-lengths: geomean of AdamW's "
                 f"ratio to its best there, per rate: {per_rate}.\n")
    if args.choose_rate_on:
        text += chosen_markdown(rate_chosen_elsewhere(rows, R.read_rows(args.choose_rate_on), args.split, args.config),
                                args.config)
    print(text)
    return 0
