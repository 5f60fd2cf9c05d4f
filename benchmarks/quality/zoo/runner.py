"""Run the zoo, tabulate it, plot it (benchmarks/quality/ZOO.md).

    python -m benchmarks.quality.zoo run --split validation --configs adamw_grid,salsa_defaults,pretrain \\
        --seeds 0-1 --out benchmarks/quality/results/zoo/validation.jsonl --jobs 2
    python -m benchmarks.quality.zoo table benchmarks/quality/results/zoo/validation.jsonl --md table.md
    python -m benchmarks.quality.zoo plot benchmarks/quality/results/zoo/validation.jsonl --out-dir DIR
    python -m benchmarks.quality.zoo compare CANDIDATE_ROWS... --candidate C --control K \\
        --control-files CONTROL_ROWS... --split validation --seeds 0-3 --worse-seeds 3
    python -m benchmarks.quality.zoo scorecard benchmarks/quality/results/zoo/validation.jsonl \\
        --split validation --config pretrain_hold --update README.md
    python -m benchmarks.quality.zoo pooled FILES... --splits validation,holdout,holdout2 \\
        --configs pretrain_hold_decayfromhold,pretrain_beta2_0.95 --adamw tuned-betas

``run`` appends one JSON row per finished run (task, split, configuration, seed, final train
and val loss, applied level, forwards per step, ``best_adamw_lr``, commit, versions, date).
``best_adamw_lr`` is the best AdamW rate of the row's task, length and step count among the grid rows
in the file when the row is written, itself included: the final grid's best for the rows of
configurations run after ``adamw_grid`` (the grid runs first), the best so far on a grid row, and
null while the file has no grid row of that task-length. Rows written before 2026-12-01 22:00 UTC
lack it; the tables compute the best rate from the grid rows for every row. A file holds one step
count per task and length (``--steps`` runs in a file of their own): the tables refuse a mix. ``run``
skips runs whose row is already in the file, so an interrupted run resumes. Runs go configuration by
configuration over all tasks (the AdamW grid first), so a run cut short has fewer
configurations on every task rather than every configuration on a few. Each run uses one
thread.

Configurations: ``adamw_grid`` (AdamW + 5% warmup + cosine at 1e-3, 3e-3, 1e-2, extended by
3x while the best rate is at an end), ``adamw_<lr>``, the aliases in ``ALIASES`` and any name of
``benchmarks.quality.optimizers``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

from .. import optimizers as O
from . import tasks as Z

GRID = (1e-3, 3e-3, 1e-2)
MAX_EXTENSIONS = 4
ALIASES = {"salsa_defaults": "salsa_faithful", "pretrain": "salsa_recommended"}
REFERENCES = ("prodigy_warmup", "schedulefree_warmup", "prodigy_plus_sf")
TRACE_POINTS = 100
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_seeds(text: str) -> List[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``."""
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                seeds += range(lo, hi + 1)
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"bad seeds {text!r}: expected e.g. 0-1 or 0,3,5") from None
    if not seeds:
        raise ValueError(f"bad seeds {text!r}: no seed")
    return sorted(set(seeds))


def optimizer_of(config: str) -> str:
    """The ``benchmarks.quality.optimizers`` name a zoo configuration runs."""
    return ALIASES.get(config, config)


#: The AdamW grids ``run --configs`` takes, and the prefix of their rows' configurations: the zoo's (weight
#: decay 0.1 on matrices), the same at no weight decay (NOTES.md section 78) and at betas (0.9, 0.95) (section 89).
GRIDS = {"adamw_grid": O.ADAMW_PREFIX, "adamw_grid_wd0": O.ADAMW_WD0_PREFIX, "adamw_grid_b95": O.ADAMW_B95_PREFIX}
#: ``summarize(grids=...)``: the zoo's grid alone (every table before section 78), or AdamW tuned over its rate
#: and its weight decay (the better of both grids per task-length)
ZOO_GRID = (O.ADAMW_PREFIX,)
TUNED_OVER_DECAY = (O.ADAMW_PREFIX, O.ADAMW_WD0_PREFIX)
#: ``scorecard --adamw``: its name -> (the grids, how the card says it)
ADAMW_DENOMINATORS = {"zoo-grid": (ZOO_GRID, "weight decay 0.1 on matrices"),
                      "no-decay": ((O.ADAMW_WD0_PREFIX,), "no weight decay"),
                      "tuned-decay": (TUNED_OVER_DECAY, "the better of weight decay 0.1 on matrices and none"),
                      "tuned-betas": ((O.ADAMW_PREFIX, O.ADAMW_B95_PREFIX),
                                      "weight decay 0.1 on matrices, the better of betas (0.9, 0.999) and (0.9, 0.95)")}


def lr_of(config: str, prefix: str = O.ADAMW_PREFIX) -> Optional[float]:
    """The rate of an AdamW grid row's configuration of the grid ``prefix`` names; None for any other."""
    if config.startswith(prefix):
        return float(config[len(prefix):])
    return None


def _grid_rate(config: str, grids: Tuple[str, ...]) -> Optional[Tuple[str, float]]:
    """(prefix, rate) of a row of one of ``grids``; None for any other configuration."""
    for prefix in grids:
        lr = lr_of(config, prefix)
        if lr is not None:
            return prefix, lr
    return None


def _provenance() -> dict:
    """Commit (``benchmarks._common.git_commit``: ``+dirty`` when tracked files other than the result
    rows have uncommitted changes), versions, the backend FusedSaLSa configurations run on
    (``optimizers.BACKEND`` resolved on the CPU), and the CPU's fingerprint (``_common.cpu_fingerprint``)."""
    from benchmarks._common import cpu_fingerprint, git_commit
    commit = git_commit(_ROOT)
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for package in ("salsa-fused", "torch", "prodigyopt", "schedulefree", "prodigy-plus-schedule-free",
                    "salsa-optimizer"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    import torch

    from salsa_fused import backends
    fused_backend = backends.resolve(O.BACKEND, torch.device("cpu")).name
    return dict(commit=commit, versions=versions, fused_backend=fused_backend, machine=_machine(),
                cpu=cpu_fingerprint())


def _machine() -> str:
    """The CPU model and core count the row ran on (rows of one table may come from two machines)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def _thin(values: List[float], points: int = TRACE_POINTS) -> List[float]:
    """Means over ``points`` equal bins (the plots' traces)."""
    if len(values) <= points:
        return list(values)
    out = []
    for i in range(points):
        lo, hi = i * len(values) // points, (i + 1) * len(values) // points
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def _finite(x) -> Optional[float]:
    return float(f"{x:.6g}") if isinstance(x, (int, float)) and math.isfinite(x) else None


Unit = Tuple[str, str, int, str, Optional[int]]  # task, config, seed, length, steps override


def run_unit(unit: Unit, provenance: dict) -> dict:
    """Train one (task, configuration, seed) and return its row."""
    import torch

    from ..run import train

    torch.set_num_threads(1)
    task_name, config, seed, length, steps = unit
    task = Z.make(task_name, seed, steps=steps, length=length)
    try:
        result = train(task, optimizer_of(config), seed, record_searches=False)
    except Exception as error:  # one failing optimizer must not end the other runs: the row says why
        result = dict(final_train_loss=math.nan, val_loss=math.nan, forwards_per_step=math.nan,
                      step_time_ms=math.nan, losses=[], step_sizes=[],
                      diverged=f"error: {type(error).__name__}: {error}")
    levels = [s for s in result["step_sizes"] if math.isfinite(s)]
    spec = Z.ZOO[task_name]
    extra = {}
    if "raw_final_train_loss" in result:  # section 62: the iterates' own, where the row's is the average's
        extra["raw_final_train_loss"] = _finite(result["raw_final_train_loss"])
    if "beam_decisions" in result:  # the factors a beam kept and the scores it kept them on
        extra["beam_decisions"] = [_decision_row(d) for d in result["beam_decisions"]]
    if "early_freeze" in result:  # a schedule with freeze_below: the step the level froze early at (0: never)
        extra["early_freeze"] = {k: _finite(v) if isinstance(v, float) else v for k, v in result["early_freeze"].items()}
    if "loss_rise_backoffs" in result:  # backoff_on_loss_rise: [step, multiplier] each time the loss turned
        extra["loss_rise_backoffs"] = result["loss_rise_backoffs"]
    if "hypergradient" in result:  # NOTES.md section 53: the learned multiplier at the end, its updates' mean cosine
        extra["hypergradient"] = {k: _finite(v) if isinstance(v, float) else v
                                  for k, v in result["hypergradient"].items()}
    return dict(
        task=task_name, split=spec.split, family=spec.family, length=length, steps=task.steps,
        config=config, optimizer=optimizer_of(config), seed=seed,
        final_train_loss=_finite(result["final_train_loss"]), val_loss=_finite(result["val_loss"]),
        level_mean=_finite(sum(levels) / len(levels)) if levels else None,
        level_peak=_finite(max(levels)) if levels else None,
        level_final=_finite(levels[-1]) if levels else None,
        forwards_per_step=_finite(result["forwards_per_step"]), step_time_ms=_finite(result["step_time_ms"]),
        diverged=result["diverged"],
        loss_trace=[_finite(v) for v in _thin(result["losses"])],
        level_trace=[_finite(v) for v in _thin(result["step_sizes"])],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra, **provenance)


def _decision_row(decision: dict) -> dict:
    """A beam decision with its scores rounded ("inf": a diverged branch)."""
    row = dict(step=decision["step"], factor=decision["factor"], multiplier=_finite(decision["multiplier"]),
               scores=[_finite(x) if math.isfinite(x) else str(x) for x in decision["losses"]])
    if "lowest" in decision:  # with a move margin: the factor of lowest score, kept or not
        row["lowest"] = decision["lowest"]
    return row


def read_rows(paths: Iterable[str], missing_ok: bool = False) -> List[dict]:
    """The JSON rows of ``paths``, in order. A path that does not exist is a ValueError naming it (a
    mistyped path would otherwise drop its rows from a table without a word); with ``missing_ok`` (a run's
    own output, not written yet) it holds no rows."""
    rows = []
    for path in paths:
        if not os.path.exists(path):
            if missing_ok:
                continue
            raise ValueError(f"no such rows file: {path}")
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not a JSON row ({error})") from None
    return rows


def _key(row: dict) -> tuple:
    return row["task"], row["config"], row["seed"], row["length"], row["steps"]


def _initializer():
    import torch
    torch.set_num_threads(1)


def _execute(units: List[Unit], out: str, jobs: int, done: set, log, known: Iterable[dict] = ()) -> List[dict]:
    """Run the units not in ``done``; append each row to ``out`` as it finishes, with the best AdamW
    rate of its task and length among ``known`` (the rows already in ``out``) and the rows this call
    wrote before it, itself included (:func:`best_adamw_lr`)."""
    todo = [u for u in units if _unit_key(u) not in done]
    if not todo:
        return []
    provenance = _provenance()
    known = list(known)
    rows = []

    def record(row):
        row["best_adamw_lr"] = best_adamw_lr(known + rows + [row], row["task"], row["length"], row["steps"])
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        done.add(_key(row))
        rows.append(row)
        log(f"{row['task']:20s} {row['config']:22s} seed {row['seed']}: train {row['final_train_loss']} "
            f"val {row['val_loss']} level {row['level_mean']} fwd/step {row['forwards_per_step']} "
            f"{row['step_time_ms']} ms/step" + (f" DIVERGED {row['diverged']}" if row["diverged"] else ""))

    if jobs <= 1:
        for unit in todo:
            record(run_unit(unit, provenance))
    else:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs, initializer=_initializer) as pool:
            for row in pool.imap_unordered(_run_star, [(u, provenance) for u in todo]):
                record(row)
    return rows


def _run_star(args):
    return run_unit(*args)


def _unit_key(unit: Unit) -> tuple:
    task, config, seed, length, steps = unit
    return task, config, seed, length, steps if steps is not None else Z.ZOO[task].steps_for(length)


def grid_edge(rows: List[dict], task: str, seeds: List[int], prefix: str = O.ADAMW_PREFIX) -> Optional[float]:
    """If the best AdamW rate of ``task`` in the grid ``prefix`` names is at an end of the rates run, the next
    rate to add (x3 or /3); else None. Over the rates that have every seed of ``seeds``, on those seeds, the best
    is the tables' (:func:`summarize`); ``rows`` are of one length and step count, as a table's."""
    grid = [r for r in rows if r["task"] == task and lr_of(r["config"], prefix) is not None and r["seed"] in seeds]
    have = defaultdict(set)
    for row in grid:
        have[row["config"]].add(row["seed"])
    complete = [r for r in grid if have[r["config"]] >= set(seeds)]
    entries = [e for e in summarize(complete, grids=(prefix,)).values() if e["task"] == task]
    if len(entries) > 1:
        raise ValueError(f"grid_edge: rows of {task!r} at more than one length: {[e['length'] for e in entries]}")
    if not entries or len(entries[0]["grid"]) < 2 or not entries[0]["edge"]:
        return None
    best, rates = entries[0]["best_lr"], entries[0]["grid"]
    return rates[0] / 3 if best == rates[0] else rates[-1] * 3


def grid_gaps(rows: List[dict], task: str, seeds: List[int], prefix: str = O.ADAMW_PREFIX) -> List[Tuple[str, int]]:
    """(AdamW rate, seed) pairs missing for ``task`` in the grid ``prefix`` names: a rate run on some seed (an
    earlier run with fewer seeds, or a grown grid) is run on every seed of ``seeds``, so the table compares all
    rates on the same seeds."""
    have = defaultdict(set)
    for row in rows:
        if row["task"] == task and lr_of(row["config"], prefix) is not None:
            have[row["config"]].add(row["seed"])
    return [(config, seed) for config in sorted(have, key=lambda c: lr_of(c, prefix))
            for seed in seeds if seed not in have[config]]


def command_run(args) -> int:
    seeds = parse_seeds(args.seeds)
    task_names = [t for t in args.tasks.split(",") if t] if args.tasks else Z.names(args.split)
    for t in task_names:
        if t not in Z.ZOO:
            raise SystemExit(f"unknown zoo task {t!r}; choose from {sorted(Z.ZOO)}")
    configs = [c for c in args.configs.split(",") if c]
    O.known([optimizer_of(c) for c in configs if c not in GRIDS])
    if args.length not in Z.LENGTHS:
        raise SystemExit(f"unknown length {args.length!r}; choose from {sorted(Z.LENGTHS)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = read_rows([args.out], missing_ok=True)
    done = {_key(r) for r in rows}

    def units(config_names):
        return [(t, c, s, args.length, args.steps) for c in config_names for t in task_names for s in seeds]

    for config in configs:
        if config not in GRIDS:
            rows += _execute(units([config]), args.out, args.jobs, done, log, rows)
            continue
        prefix = GRIDS[config]
        rows += _execute(units([O.adamw_name(lr, prefix) for lr in GRID]), args.out, args.jobs, done, log, rows)
        for _ in range(MAX_EXTENSIONS):
            steps_of = {t: args.steps if args.steps is not None else Z.ZOO[t].steps_for(args.length)
                        for t in task_names}
            extra = []
            for t in task_names:
                mine = [r for r in rows if r["task"] == t and r["length"] == args.length and r["steps"] == steps_of[t]]
                gaps = grid_gaps(mine, t, seeds, prefix)
                if gaps:
                    extra += [(t, name, s, args.length, args.steps) for name, s in gaps]
                    continue  # the grid's ends are judged once every rate has every seed
                new = grid_edge(mine, t, seeds, prefix)
                if new is not None:
                    log(f"{t}: best AdamW rate at an end of the grid {config}; adding {O.adamw_name(new, prefix)}")
                    extra += [(t, O.adamw_name(new, prefix), s, args.length, args.steps) for s in seeds]
            if not extra:
                break
            rows += _execute(extra, args.out, args.jobs, done, log, rows)
        else:
            for t in task_names:
                steps = args.steps if args.steps is not None else Z.ZOO[t].steps_for(args.length)
                mine = [r for r in rows if r["task"] == t and r["length"] == args.length and r["steps"] == steps]
                new = grid_edge(mine, t, seeds, prefix)
                if new is not None:
                    log(f"warning: {t}: after {MAX_EXTENSIONS} extensions the best AdamW rate is still at an end of "
                        f"the grid {config}; the scorecard names it as not bracketed: run "
                        f"--configs {O.adamw_name(new, prefix)} (and on past it while it wins)")
    return 0


# ---------------------------------------------------------------------------- tables
def _gmean(xs: List[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def summarize(rows: List[dict], grids: Tuple[str, ...] = ZOO_GRID) -> Dict[str, dict]:
    """Per task: the best AdamW rate and, per configuration, mean-over-seeds numbers and ratios.

    The best AdamW is the lowest mean final train loss among the rows of the grids ``grids`` names (their
    prefixes; by default the zoo's grid alone; :data:`TUNED_OVER_DECAY`: over the rate and the weight decay),
    on the seeds every one of their rates has, the lowest rate where several end exactly alike (a convex task
    converged: the level ratio is then to the least rate that gets there; one rate in two grids: the grid named
    first); ``grid_prefix``, ``grid`` and ``edge`` describe the winner's grid.
    A configuration's numbers are over the seeds it shares with the complete AdamW rates; its
    ratio = its mean final train loss / the best rate's mean on those seeds (inf if a seed
    diverged); level ratio = its mean applied level / the best rate's mean scheduled rate."""
    by_task = defaultdict(lambda: defaultdict(dict))
    steps = defaultdict(set)
    for row in rows:
        by_task[(row["task"], row["length"])][row["config"]][row["seed"]] = row
        steps[(row["task"], row["length"])].add(row.get("steps"))
    mixed = {f"{task}@{length}": sorted(s, key=str) for (task, length), s in steps.items() if len(s) > 1}
    if mixed:
        raise ValueError(f"rows of different run lengths in steps for one task and length: {mixed}; a table "
                         "would divide one by the other's AdamW: keep one step count per file (--steps runs "
                         "in a file of their own)")
    out = {}
    for (task, length), configs in sorted(by_task.items()):
        grid = {c: runs for c, runs in configs.items() if _grid_rate(c, grids) is not None}
        seed_sets = [set(runs) for runs in grid.values()]
        seeds = set.intersection(*seed_sets) if seed_sets else set()
        if not seeds:
            continue

        def mean(runs, key, over):
            values = [runs[s][key] for s in over]
            return None if any(v is None for v in values) else sum(values) / len(values)

        adamw = {c: mean(runs, "final_train_loss", seeds) for c, runs in grid.items()}
        finite = {c: v for c, v in adamw.items() if v is not None}
        if not finite:
            continue
        # a tie: the lowest rate, then the grid named first
        best = min(finite, key=lambda c: (finite[c], _grid_rate(c, grids)[1], grids.index(_grid_rate(c, grids)[0])))
        prefix = _grid_rate(best, grids)[0]
        rates = sorted((c for c in grid if c.startswith(prefix)), key=lambda c: lr_of(c, prefix))
        entry = dict(task=task, length=length, split=Z.ZOO[task].split if task in Z.ZOO else "?",
                     seeds=sorted(seeds), best_adamw=best, best_lr=lr_of(best, prefix), grid_prefix=prefix,
                     edge=best in (rates[0], rates[-1]), grid=[lr_of(c, prefix) for c in rates], configs={})
        for config, runs in configs.items():
            over = sorted(set(runs) & seeds) or sorted(runs)
            loss = mean(runs, "final_train_loss", over)
            ref = mean(grid[best], "final_train_loss", over) if set(over) <= set(grid[best]) else None
            val, ref_val = mean(runs, "val_loss", over), (mean(grid[best], "val_loss", over)
                                                           if set(over) <= set(grid[best]) else None)
            level, ref_level = mean(runs, "level_mean", over), (mean(grid[best], "level_mean", over)
                                                                 if set(over) <= set(grid[best]) else None)
            entry["configs"][config] = dict(
                seeds=over, final_train_loss=loss, val_loss=val,
                ratio=(loss / ref) if loss is not None and ref else math.inf,
                val_ratio=(val / ref_val) if val is not None and ref_val else math.inf,
                level=level, level_ratio=(level / ref_level) if level is not None and ref_level else None,
                forwards_per_step=mean(runs, "forwards_per_step", over),
                diverged=sum(runs[s]["diverged"] is not None for s in over))
        out[f"{task}@{length}"] = entry
    return out


def best_adamw_lr(rows: Iterable[dict], task: str, length: str, steps: Optional[int] = None) -> Optional[float]:
    """The best AdamW rate of ``task`` at ``length`` (and ``steps``, if given) as the tables compute it
    (:func:`summarize`: the lowest mean final train loss over the seeds every grid rate has) from
    ``rows``; None without a grid row."""
    mine = [r for r in rows if r["task"] == task and r["length"] == length
            and (steps is None or r.get("steps") == steps)]
    entry = summarize(mine).get(f"{task}@{length}")
    return None if entry is None else entry["best_lr"]


def _fmt(x, spec=".3f"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "div"
    return format(x, spec)


def markdown(rows: List[dict], title: str) -> str:
    summary = summarize(rows)
    configs = sorted({c for e in summary.values() for c in e["configs"] if lr_of(c) is None})
    commits = sorted({r["commit"] for r in rows})
    dates = sorted(r["date"] for r in rows)
    lines = [f"# {title}", "",
             f"{len(rows)} runs, {dates[0] if dates else '—'} to {dates[-1] if dates else '—'}, "
             f"commits {', '.join(commits)}. Generated by `python -m benchmarks.quality.zoo table`.", "",
             "Ratio = mean final train loss (last 10% of steps) over seeds / the best AdamW rate's "
             "(5% warmup + cosine, grid extended by 3x while its best is at an end; **edge** = still at "
             "an end). Level ratio = mean applied step over the run / the best AdamW's mean scheduled "
             "rate. Prodigy and schedule-free run with their documented warmup; Prodigy+SF at its "
             "defaults (ZOO.md). `div` = diverged on a seed.", "",
             "## Summary over tasks", "",
             "| configuration | geomean ratio | worst task (ratio) | geomean without the worst | "
             "tasks <= 1.03 | tasks > 1.15 | median level ratio | mean forwards/step |",
             "|---|---|---|---|---|---|---|---|"]
    for config in configs:
        per = {e["task"]: e["configs"][config] for e in summary.values() if config in e["configs"]}
        ratios = [p["ratio"] for p in per.values()]
        finite = [r for r in ratios if math.isfinite(r)]
        gm = _gmean(ratios) if ratios and len(finite) == len(ratios) else math.inf
        worst = max(per, key=lambda t: per[t]["ratio"]) if per else None
        levels = sorted(p["level_ratio"] for p in per.values() if p["level_ratio"] is not None)
        fwd = [p["forwards_per_step"] for p in per.values() if p["forwards_per_step"] is not None]
        rest = sorted(ratios)[:-1]
        gm_rest = _gmean(rest) if rest and all(math.isfinite(r) for r in rest) else (math.inf if rest else None)
        lines.append(f"| {config} ({len(per)} tasks) | {_fmt(gm)} | "
                     f"{worst} ({_fmt(per[worst]['ratio']) if worst else '—'}) | {_fmt(gm_rest)} | "
                     f"{sum(r <= 1.03 for r in ratios)} | {sum(r > 1.15 for r in ratios)} | "
                     f"{_fmt(levels[len(levels) // 2] if levels else None, '.2f')} | "
                     f"{_fmt(sum(fwd) / len(fwd) if fwd else None, '.2f')} |")
    head = "| task | best AdamW lr (loss) | " + " | ".join(configs) + " |"
    rule = "|---|---|" + "---|" * len(configs)
    for label, key, spec in (("final train loss / best AdamW", "ratio", ".3f"),
                             ("val loss / the best-train AdamW rate's val loss", "val_ratio", ".3f"),
                             ("applied level / best AdamW's (mean over the run)", "level_ratio", ".2f"),
                             ("forwards per step", "forwards_per_step", ".2f")):
        lines += ["", f"## {label}", "", head, rule]
        for e in summary.values():
            best = e["configs"][e["best_adamw"]]
            cells = [_fmt(e["configs"][c][key], spec) if c in e["configs"] else "" for c in configs]
            lines.append(f"| {e['task']} | {e['best_lr']:.0e} ({_fmt(best['final_train_loss'], '.4g')})"
                         f"{' **edge**' if e['edge'] else ''} | " + " | ".join(cells) + " |")
    lines += ["", "## Pairwise: on how many tasks the row's final train loss is at or below the column's", "",
              "| row \\ column | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for a in configs:
        cells = []
        for b in configs:
            shared = [e for e in summary.values() if a in e["configs"] and b in e["configs"]]
            wins = sum(e["configs"][a]["ratio"] <= e["configs"][b]["ratio"] for e in shared)
            cells.append("" if a == b else f"{wins}/{len(shared)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## AdamW grids (mean final train loss per rate)", ""]
    for e in summary.values():
        cells = ", ".join(f"{lr:.0e}: {_fmt(e['configs'][O.adamw_name(lr)]['final_train_loss'], '.4g')}"
                          for lr in e["grid"])
        lines.append(f"- {e['task']} (seeds {e['seeds']}): {cells}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- a round's rule
def _runs_of(rows: List[dict], config: str, seeds: List[int], split: Optional[str]) -> Dict[tuple, dict]:
    """``{(task, length, seed): row}`` of ``config``; a run in two rows must have the same final loss."""
    runs: Dict[tuple, dict] = {}
    for row in rows:
        if row["config"] != config or row["seed"] not in seeds or (split and row["split"] != split):
            continue
        key = (row["task"], row["length"], row["seed"])
        if key in runs and runs[key]["final_train_loss"] != row["final_train_loss"]:
            raise ValueError(f"{config} {key}: two rows with different final losses "
                             f"({runs[key]['final_train_loss']} and {row['final_train_loss']}): "
                             "give the files of one machine and commit")
        runs[key] = row
    return runs


def _loss_or_inf(row: dict) -> float:
    """A run's final train loss; a run that diverged or failed (no finite loss) counts as infinitely high."""
    loss = row["final_train_loss"]
    return loss if loss is not None and math.isfinite(loss) else math.inf


def compare(candidate_rows: List[dict], control_rows: List[dict], candidate: str, control: str,
            seeds: List[int], split: Optional[str] = None, bound: float = 1.05, worse_seeds: int = 0) -> dict:
    """A candidate against its control on the runs both have, over ``seeds`` (the quality NOTES' round rules).

    Per task-length with every seed: ``ratio`` = mean final train loss of the candidate over the seeds /
    the control's; it is **worse** if ``ratio > bound`` and at least ``worse_seeds`` seeds end above their
    control's; ``forwards`` = the ratio of mean forwards per step. Per length: the geometric mean of the
    ratios. ``identical``/``changed``: runs whose loss and level traces equal the control's, or not. A run
    without a finite loss (diverged, failed) counts as infinitely high: a candidate's makes its task-length
    worse (ratio inf); a control's makes the ratio NaN, which counts as worse too (nothing to compare)."""
    cand = _runs_of(candidate_rows, candidate, seeds, split)
    ctl = _runs_of(control_rows, control, seeds, split)
    per: Dict[tuple, list] = defaultdict(list)
    identical, changed = 0, []
    for key, row in sorted(cand.items()):
        if key not in ctl:
            continue
        base = ctl[key]
        per[key[:2]].append((row, base))
        same = (row["final_train_loss"] == base["final_train_loss"] and row["loss_trace"] == base["loss_trace"]
                and row["level_trace"] == base["level_trace"])
        if same:
            identical += 1
        else:
            changed.append(dict(task=key[0], length=key[1], seed=key[2], candidate=row["final_train_loss"],
                                control=base["final_train_loss"], backoffs=row.get("loss_rise_backoffs")))
    task_lengths, incomplete = {}, []
    for (task, length), pairs in sorted(per.items()):
        if len(pairs) != len(seeds):
            incomplete.append((task, length, len(pairs)))
            continue
        cand_losses = [_loss_or_inf(r) for r, _ in pairs]
        ctl_losses = [_loss_or_inf(b) for _, b in pairs]
        ratio = sum(cand_losses) / sum(ctl_losses) if math.isfinite(sum(ctl_losses)) else math.nan
        above = sum(c > b for c, b in zip(cand_losses, ctl_losses))
        forwards = (sum(r["forwards_per_step"] for r, _ in pairs) / sum(b["forwards_per_step"] for _, b in pairs))
        task_lengths[(task, length)] = dict(ratio=ratio, seeds_above=above, forwards=forwards,
                                            worse=not ratio <= bound and above >= worse_seeds)
    lengths = {}
    for length in sorted({length for _, length in task_lengths}):
        mine = {t: v for (t, l), v in task_lengths.items() if l == length}
        lengths[length] = dict(geomean=_gmean([v["ratio"] for v in mine.values()]), tasks=len(mine),
                               worse=sorted(t for t, v in mine.items() if v["worse"]),
                               highest=max(mine.items(), key=lambda kv: kv[1]["ratio"]),
                               forwards=max(v["forwards"] for v in mine.values()))
    return dict(task_lengths=task_lengths, lengths=lengths, identical=identical, changed=changed,
                incomplete=incomplete,
                geomean=_gmean([v["ratio"] for v in task_lengths.values()]) if task_lengths else math.nan)


def _shown(loss) -> str:
    return "no loss" if loss is None else f"{loss:.4g}"


def command_compare(args) -> int:
    seeds = parse_seeds(args.seeds)
    result = compare(read_rows(args.files), read_rows(args.control_files or args.files), args.candidate,
                     args.control, seeds, args.split, args.bound, args.worse_seeds)
    if not result["task_lengths"]:
        raise ValueError(f"no task-length has {args.candidate} and {args.control} on every seed of {args.seeds}")
    print(f"{args.candidate} / {args.control}, seeds {args.seeds}: geomean {result['geomean']:.3f} over "
          f"{len(result['task_lengths'])} task-lengths; {result['identical']} runs identical to their control, "
          f"{len(result['changed'])} changed")
    for length, v in result["lengths"].items():
        task, high = v["highest"]
        print(f"  {length}: geomean {v['geomean']:.3f} over {v['tasks']} tasks; "
              f"worse: {', '.join(v['worse']) or 'none'}; highest {task} {high['ratio']:.3f} "
              f"(seeds above: {high['seeds_above']}); forwards at most {v['forwards']:.3f}")
    for c in result["changed"]:
        print(f"  changed: {c['task']} {c['length']} seed {c['seed']}: {_shown(c['candidate'])} vs {_shown(c['control'])}"
              + (f" (back-offs {c['backoffs']})" if c["backoffs"] else ""))
    for task, length, n in result["incomplete"]:
        print(f"  left out: {task} {length}: {n} of {len(seeds)} seeds")
    return 0


def command_table(args) -> int:
    rows = [r for r in read_rows(args.files) if args.split in (None, "all") or r["split"] == args.split]
    lengths = sorted({r["length"] for r in rows})
    rows = [r for r in rows if r["length"] == args.length]
    if not rows:
        raise SystemExit(f"no rows at --length {args.length} (the rows' lengths: {', '.join(lengths) or 'none'})")
    if not summarize(rows):
        raise SystemExit("no complete AdamW grid in the rows: nothing to tabulate (every ratio divides by the "
                         "best AdamW of a grid: run the task with --configs adamw_grid,... first)")
    if args.configs:  # the named configurations, and the AdamW grid every ratio divides by
        keep = set(args.configs.split(","))
        rows = [r for r in rows if r["config"] in keep or lr_of(r["config"]) is not None]
    text = markdown(rows, args.title or f"Zoo, {args.split or 'all'} tasks, length {args.length}")
    if args.md:
        with open(args.md, "w") as handle:
            handle.write(text)
    print(text)
    return 0


def row_offsets(count: int, spread: float = 0.8) -> List[float]:
    """Vertical offsets of ``count`` configurations around a task's row: evenly spaced, centred, at most
    ``spread`` apart end to end (so one task's points never reach the next task's row)."""
    if count <= 1:
        return [0.0] * count
    gap = min(0.08, spread / (count - 1))
    return [(i - (count - 1) / 2) * gap for i in range(count)]


def command_plot(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(args.files) if (args.split in (None, "all") or r["split"] == args.split)
            and r["length"] == args.length]
    summary = summarize(rows)
    if not summary:
        raise SystemExit("no complete AdamW grid in the rows: nothing to plot")
    os.makedirs(args.out_dir, exist_ok=True)
    configs = sorted({c for e in summary.values() for c in e["configs"] if lr_of(c) is None})
    if args.configs:
        wanted = [c for c in args.configs.split(",") if c]
        missing = sorted(set(wanted) - set(configs))
        if missing:
            raise SystemExit(f"no rows of {missing} with a complete AdamW grid; configurations here: {configs}")
        configs = wanted
    tasks = list(summary)
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(15, 0.4 * len(tasks) + 2.5))
    offsets = row_offsets(len(configs))
    for i, config in enumerate(configs):
        ys = [k + offsets[i] for k in range(len(tasks))]
        ratios = [summary[t]["configs"].get(config, {}).get("ratio", math.nan) for t in tasks]
        levels = [summary[t]["configs"].get(config, {}).get("level_ratio") or math.nan for t in tasks]
        marker = "os^D"[(i // 10) % 4]  # the colour cycle has 10 colours: the 11th configuration on gets another shape
        ax_r.plot([min(r, 1e3) for r in ratios], ys, marker, label=config, ms=4)
        ax_l.plot(levels, ys, marker, label=config, ms=4)
    for ax, label in ((ax_r, "final train loss / best AdamW (drawn at most 1000)"),
                      (ax_l, "mean applied level / best AdamW's")):
        ax.set_xscale("log"); ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(tasks))); ax.set_yticklabels([summary[t]["task"] for t in tasks])
        ax.set_xlabel(label)
    ax_r.axvline(1.15, color="r", lw=0.6, ls="--")
    ax_l.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths = [os.path.join(args.out_dir, f"zoo_{args.split or 'all'}_ratios.png")]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    cols = 4
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        e = summary[t]
        seed = e["seeds"][0]
        for config in [e["best_adamw"]] + configs:
            run = next((r for r in rows if r["task"] == e["task"] and r["config"] == config
                        and r["seed"] == seed), None)
            if run and run["loss_trace"]:
                trace = [v if v is not None else math.nan for v in run["loss_trace"]]
                xs = [(k + 0.5) * run["steps"] / len(trace) for k in range(len(trace))]
                ax.plot(xs, trace, "--" if config == e["best_adamw"] else "-", lw=1, label=config)
        ax.set_yscale("log"); ax.set_title(f"{e['task']} (seed {seed})", fontsize=9)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(args.out_dir, f"zoo_{args.split or 'all'}_losses.png"))
    fig.savefig(paths[1], dpi=80)
    plt.close(fig)
    print("\n".join(paths))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run configurations on the zoo's tasks, appending rows")
    run.add_argument("--split", choices=Z.SPLITS + ("all",), default="validation")
    run.add_argument("--tasks", default=None, help="comma list (default: every task of --split)")
    run.add_argument("--configs", required=True,
                     help="comma list: adamw_grid, adamw_<lr>, " + ", ".join(ALIASES) + " or optimizer names")
    run.add_argument("--seeds", default="0-1")
    run.add_argument("--length", default="default", help="short, default or long (ZOO.md)")
    run.add_argument("--steps", type=int, default=None, help="override every task's steps (tests)")
    run.add_argument("--out", required=True, help="JSONL file; rows are appended")
    run.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    for name, helptext in (("table", "markdown tables from rows"), ("plot", "PNG figures from rows")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("files", nargs="+")
        p.add_argument("--split", choices=Z.SPLITS + ("all",), default=None)
        p.add_argument("--length", default="default")
        if name == "table":
            p.add_argument("--md", default=None, help="also write the tables to this file")
            p.add_argument("--title", default=None)
            p.add_argument("--configs", default=None,
                           help="comma list: only these configurations (and the AdamW grid) (default: all)")
        else:
            p.add_argument("--out-dir", required=True)
            p.add_argument("--configs", default=None,
                           help="comma list of the configurations to draw, in this order (default: all)")
    cmp = sub.add_parser("compare", help="a candidate against its control, as a round's rule reads it")
    cmp.add_argument("files", nargs="+", help="rows of the candidate (and of the control without --control-files)")
    cmp.add_argument("--candidate", required=True)
    cmp.add_argument("--control", required=True)
    cmp.add_argument("--control-files", nargs="+", default=None,
                     help="rows of the control (a control re-run on another machine or commit)")
    cmp.add_argument("--split", choices=Z.SPLITS, default=None)
    cmp.add_argument("--seeds", default="0-1")
    cmp.add_argument("--bound", type=float, default=1.05, help="a task-length above this ratio may be worse")
    cmp.add_argument("--worse-seeds", type=int, default=0,
                     help="... and is, if at least this many seeds end above their control's")
    card = sub.add_parser("scorecard", help="issue 14's targets for one configuration, per run length")
    card.add_argument("files", nargs="+")
    card.add_argument("--split", choices=Z.SPLITS, required=True)
    card.add_argument("--config", required=True)
    card.add_argument("--choose-rate-on", nargs="+", default=None, metavar="FILE",
                      help="also read the configuration against AdamW at the rate these rows' grid picks (other "
                           "seeds), and how much the in-sample pick flatters AdamW (NOTES.md section 72)")
    card.add_argument("--adamw", choices=sorted(ADAMW_DENOMINATORS), default="zoo-grid",
                      help="the AdamW divided by: the zoo's grid (weight decay 0.1 on matrices), the grid at no "
                           "weight decay, or the better of the two per task-length (tuned over its weight decay, "
                           "NOTES.md section 78), or the better of the zoo's grid and the same at betas (0.9, 0.95) "
                           "(tuned over beta2, section 91)")
    card.add_argument("--also-adamw", choices=sorted(ADAMW_DENOMINATORS), default=None,
                      help="add a row: the geomean against this AdamW too (section 91)")
    card.add_argument("--one-rate-from", nargs="+", default=None, metavar="FILE",
                      help="add a yardstick: AdamW at one rate on every task, the rate whose ratios have the lowest "
                           "geomean over these rows' development task-lengths (NOTES.md section 82)")
    card.add_argument("--update", default=None,
                      help="rewrite this file's block between '<!-- zoo scorecard: SPLIT -->' and its end marker")
    pool = sub.add_parser("pooled", help="configurations' geomeans over the tasks of several splits together")
    pool.add_argument("files", nargs="+")
    pool.add_argument("--splits", required=True, help="comma list, e.g. validation,holdout,holdout2")
    pool.add_argument("--configs", required=True, help="comma list")
    pool.add_argument("--adamw", choices=sorted(ADAMW_DENOMINATORS), default="zoo-grid",
                      help="the AdamW divided by, as in scorecard")
    args = parser.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 3:
        parser.error(f"--steps must be >= 3 (the presets' search phase needs a step before their cooldown), "
                     f"got {args.steps}")
    try:
        from .scorecard import command_pooled, command_scorecard

        return {"run": command_run, "table": command_table, "plot": command_plot,
                "compare": command_compare, "scorecard": command_scorecard, "pooled": command_pooled}[args.command](args)
    except ValueError as error:
        parser.error(str(error))
