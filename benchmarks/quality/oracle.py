"""An oracle bound over a set of configurations (NOTES.md section 43).

Per task and length, the oracle keeps whichever of the given configurations ended lowest (two-seed
means, as the zoo's tables) and divides it by the best AdamW of the grid:

    oracle(task, length) = min_c loss(c) / min_lr loss(AdamW lr)

So it is what a rule that picked the best of those configurations for every task would reach. It
needs the answer to pick, so it bounds rules, it is not one. The grid's minimum carries the same
selection bias (best of several on the same seeds).

``--pick-at F`` (NOTES.md section 46) replaces the answer by what a run has seen at fraction ``F`` of
its steps: per task, length and seed, the configuration whose training loss over the trace window
``[F - 0.05, F)`` of the run is lowest, scored by its own final loss. It bounds rules that would probe
the configurations on the run's early part and keep the best (their probes' cost not counted).

``--pilot P:T`` (NOTES.md section 80) picks, per task and seed, the configuration whose complete run at length
``P`` ended lowest and scores its run at length ``T``: what pilot runs at a shorter length would choose (their
cost, ``len(configs) * P / T`` of the run, not counted).

``--signal CONFIG --control C --floor-scale K`` (NOTES.md section 49) scores, in hindsight, a floor at K times
CONFIG's applied level on the multiple of C's searched level (:func:`floor_report`).

``--feature KEY --feature-rows ROWS --control C --rule-scale K`` (NOTES.md section 51) scores, in hindsight,
the multiple set to K times a feature measured along C's run (:func:`feature_rule_report`).

``--among Q,...`` with a rehearsal's pick as the feature (NOTES.md section 70) picks again among those of its
multiples only: what a rehearsal with fewer branches would have read.

``--switched ROWS`` (NOTES.md section 65) adds, from the rehearsal's rows (``zoo.signals --rehearsal``) with a
branch to the run's end, one row per multiple ``q``, named ``switch_<q>``: the run that switched to ``q`` at
the preset's freeze (:func:`switched_rows`), so that any of the reports above can pick among them.

    python -m benchmarks.quality.oracle results/zoo/development.jsonl results/zoo/development_oracle43.jsonl \\
        --configs pretrain_peak0.5,pretrain_peak1,pretrain_hold,pretrain_peak4,pretrain_peak8 --split development
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Dict, List, Optional, Sequence

from .._common import name_pairs
from .zoo.runner import _gmean, parse_seeds, read_rows, summarize
from .zoo.signals import lowest_multiple
from .zoo.tasks import LENGTHS


def bound(rows: List[dict], configs: Sequence[str], split: Optional[str] = None,
          optional: Sequence[str] = ()) -> Dict[str, dict]:
    """Per length: ``per_task`` {task: (best config, its ratio to the best AdamW)}, their ``geomean``,
    the tasks above 1.15 and 1.03, and how often each configuration was the best. A task counts only
    if every configuration of ``configs`` has its rows (a missing one would make the oracle weaker, not
    stronger); ``optional`` ones (a grid's extensions, run only where an end of it won) count where
    they have rows."""
    if not configs:
        raise ValueError("configs is empty: name the configurations the oracle picks from")
    order = list(configs) + [c for c in optional if c not in configs]
    summary = summarize([r for r in rows if split is None or r.get("split") == split])
    out = {}
    for length in LENGTHS:
        per_task, missing = {}, []
        for entry in summary.values():
            if entry["length"] != length:
                continue
            present = entry["configs"]
            if any(c not in present for c in configs):
                missing.append(entry["task"])
                continue
            ratios = {c: present[c]["ratio"] for c in order if c in present}
            best = min(ratios, key=lambda c: (ratios[c], order.index(c)))
            per_task[entry["task"]] = (best, ratios[best])
        if not per_task:
            continue
        values = [ratio for _, ratio in per_task.values()]
        out[length] = dict(
            per_task=dict(sorted(per_task.items())), missing=sorted(missing),
            geomean=_gmean(values) if all(math.isfinite(v) for v in values) else math.inf,
            above_1_15=sorted(t for t, (_, r) in per_task.items() if r > 1.15),
            above_1_03=sorted(t for t, (_, r) in per_task.items() if r > 1.03),
            best_counts=dict(Counter(best for best, _ in per_task.values())))
    return out


def switched_rows(rehearsal_rows: List[dict], key: str = "full") -> List[dict]:
    """Zoo rows of the runs that switched multiple at the freeze, from rehearsal rows with a branch ``key``
    to the run's end (``rehearsal_final_losses_<key>``): per row and multiple ``q``, a row named ``switch_<q>``
    with that branch's final train loss (the zoo's reading of a run's end) and the row's task, split, length,
    seed and steps. Rows of a switch during the warm-up (``--switch-at``, NOTES.md section 66) give theirs
    (``switch_final_losses``) instead. Rows with neither are refused by name."""
    out = []
    for row in rehearsal_rows:
        if "switch_final_losses" in row:
            losses, multiples = row["switch_final_losses"], row["switch_multiples"]
        else:
            losses, multiples = row.get(f"rehearsal_final_losses_{key}"), row.get("rehearsal_multiples")
        if losses is None:
            raise ValueError(f"a rehearsal row of {row.get('task')} {row.get('length')} seed {row.get('seed')} has no "
                             f"branch {key!r} to the run's end (rehearsal_final_losses_{key})")
        for q, loss in zip(multiples, losses):
            out.append(dict(task=row["task"], split=row["split"], length=row["length"], seed=row["seed"],
                            steps=row["steps"], config=f"switch_{q:g}", final_train_loss=loss, val_loss=None,
                            level_mean=None, forwards_per_step=None,
                            diverged=None if math.isfinite(loss) else "non-finite loss"))
    return out


def rehearsal_picks_among(rehearsal_rows: List[dict], key: str, among: Sequence[float]) -> List[dict]:
    """The rehearsal's rows with ``key`` (``rehearsal_min_multiple_<branch>``) picked again among the multiples
    ``among`` only (NOTES.md section 70): the lowest of the branch's readings (``rehearsal_losses_<branch>``,
    or ``rehearsal_final_losses_<branch>``) at those multiples, as a rehearsal that ran only their branches
    would have read. ValueError naming the problem for another key or a multiple a row did not run."""
    prefix = "rehearsal_min_multiple_"
    if not key.startswith(prefix) or not among:
        raise ValueError(f"picking among multiples needs a rehearsal's {prefix}<branch> and some multiples, got {key!r}")
    branch = key[len(prefix):]
    out = []
    for row in rehearsal_rows:
        readings = row.get(f"rehearsal_losses_{branch}", row.get(f"rehearsal_final_losses_{branch}"))
        ran = row.get("rehearsal_multiples") or []
        missing = [q for q in among if q not in ran]
        if readings is None or missing:
            raise ValueError(f"a rehearsal row of {row.get('task')} {row.get('length')} seed {row.get('seed')} has no "
                             f"branch {branch!r} at {missing or list(among)}")
        kept = [q for q in ran if q in among]
        out.append(dict(row, **{key: lowest_multiple(kept, [readings[ran.index(q)] for q in kept])}))
    return out


def early_loss(row: dict, at: float, window: float = 0.05) -> float:
    """Mean training loss over the fraction ``[at - window, at)`` of the run (its ``loss_trace``,
    equal bins of the run's steps); inf if the window holds no finite value, and for a run that
    diverged, whose trace covers only the steps before it (so such a run is picked only when every
    configuration diverged: a pick that favours the bound)."""
    if row.get("diverged"):
        return math.inf
    trace = row.get("loss_trace") or []
    lo, hi = int(len(trace) * max(at - window, 0.0)), int(len(trace) * at)
    values = [x for x in trace[lo:max(hi, lo + 1)] if x is not None and math.isfinite(x)]
    return sum(values) / len(values) if values else math.inf


def picked_at(rows: List[dict], configs: Sequence[str], at: float, window: float = 0.05,
              name: Optional[str] = None) -> List[dict]:
    """One row per task, length and seed, named ``name`` (default ``picked@<at>``): a copy of the
    row of whichever of ``configs`` had the lowest :func:`early_loss` at ``at`` on that seed (the
    first of ``configs`` on a tie). Only where every configuration has that seed's row. The copy's
    ``picked_from`` says which it was."""
    if not 0.0 < at <= 1.0:
        raise ValueError(f"at must be a fraction of the run in (0, 1], got {at}")
    if not configs:
        raise ValueError("configs is empty: name the configurations the pick chooses from")
    name = name or f"picked@{at:g}"
    runs: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        if row["config"] in configs:
            runs.setdefault((row["task"], row["length"], row["seed"]), {})[row["config"]] = row
    out = []
    for key, by_config in sorted(runs.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if len(by_config) < len(configs):
            continue
        pick = min(configs, key=lambda c: (early_loss(by_config[c], at, window), configs.index(c)))
        out.append(dict(by_config[pick], config=name, picked_from=pick))
    return out


def picked_by_pilot(rows: List[dict], configs: Sequence[str], pilot: str, target: str,
                    name: Optional[str] = None) -> List[dict]:
    """One row per task and seed at length ``target``, named ``name`` (default ``pilot@<pilot>``): a copy of
    the ``target`` row of whichever of ``configs`` ended lowest at length ``pilot`` on that seed (final train
    loss; a diverged pilot never wins unless all did; the first of ``configs`` on a tie). Only where every
    configuration has both rows. The copy's ``picked_from`` says which it was."""
    for length in (pilot, target):
        if length not in LENGTHS:
            raise ValueError(f"unknown length {length!r}: one of {', '.join(LENGTHS)}")
    if LENGTHS[pilot] >= LENGTHS[target]:
        raise ValueError(f"the pilot length {pilot!r} must be shorter than the target {target!r}")
    if not configs:
        raise ValueError("configs is empty: name the configurations the pilots choose from")
    name = name or f"pilot@{pilot}"
    runs: Dict[tuple, Dict[tuple, dict]] = {}
    for row in rows:
        if row["config"] in configs and row["length"] in (pilot, target):
            runs.setdefault((row["task"], row["seed"]), {})[(row["config"], row["length"])] = row

    def ended(row):
        loss = row.get("final_train_loss")
        return math.inf if row.get("diverged") or loss is None or not math.isfinite(loss) else loss

    out = []
    for (task, seed), by_run in sorted(runs.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if any((c, length) not in by_run for c in configs for length in (pilot, target)):
            continue
        pick = min(configs, key=lambda c: (ended(by_run[(c, pilot)]), configs.index(c)))
        out.append(dict(by_run[(pick, target)], config=name, picked_from=pick))
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan with fewer than 3 pairs or a
    constant side."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs pairs, got {len(a)} and {len(b)} values")

    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    if len(a) < 3:
        return math.nan
    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    sa = math.sqrt(sum((x - ma) ** 2 for x in ra))
    sb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (sa * sb) if sa > 0 and sb > 0 else math.nan


def best_multiples(rows: List[dict], multiples: Dict[str, float], split: Optional[str] = None,
                   optional: Optional[Dict[str, float]] = None) -> List[tuple]:
    """``(task, length, best multiple)`` per task-length where :func:`bound` over ``multiples`` (name ->
    the multiple it applies) picks one; ``optional`` (name -> multiple): a grid's extensions, counted
    where they have rows."""
    optional = optional or {}
    every = {**multiples, **optional}
    return [(task, length, every[best]) for length, r in bound(rows, list(multiples), split, list(optional)).items()
            for task, (best, _) in r["per_task"].items()]


def signal_report(rows: List[dict], multiples: Dict[str, float], control: str, signal: str,
                  split: Optional[str] = None, optional: Optional[Dict[str, float]] = None) -> dict:
    """Does ``signal``'s applied level tell the multiple of ``control``'s level a task wants (NOTES.md
    section 47)? Per task-length where every configuration of ``multiples`` (name -> its multiple of
    ``control``'s level; ``control`` among them) and ``signal`` have rows: the oracle's best multiple,
    and the levels over the best AdamW's mean rate. Returns ``pairs`` (task, length, best multiple,
    control's level ratio, signal's), the standard deviation of log2 of each level ratio over them
    (``spread_control``, ``spread_signal``), and ``rho``: Spearman's correlation of log2(signal level /
    control level) with log2(best multiple). ``optional`` (name -> multiple): a grid's extensions, counted
    where they have rows, as in :func:`bound`."""
    if control not in multiples:
        raise ValueError(f"the control {control!r} must be one of the multiples {sorted(multiples)}")
    summary = summarize([r for r in rows if split is None or r.get("split") == split])
    pairs = []
    for task, length, best in best_multiples(rows, multiples, split, optional):
        present = summary[f"{task}@{length}"]["configs"]
        levels = [present.get(c, {}).get("level_ratio") for c in (control, signal)]
        if all(v is not None and v > 0 and math.isfinite(v) for v in levels):
            pairs.append((task, length, best, levels[0], levels[1]))

    def spread(values):
        logs = [math.log2(v) for v in values]
        if not logs:
            return math.nan
        mean = sum(logs) / len(logs)
        return math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))

    return dict(pairs=pairs, spread_control=spread([p[3] for p in pairs]), spread_signal=spread([p[4] for p in pairs]),
                rho=spearman([math.log2(p[4] / p[3]) for p in pairs], [math.log2(p[2]) for p in pairs]))


def trace_features(rows: List[dict], config: str) -> List[dict]:
    """Features of ``config``'s loss trace (100 bin means of the run's losses), one row per run
    (NOTES.md section 50), ``m[a, b)`` the trace's mean over that fraction of the run:

    - ``search_progress = m[0.15, 0.2) / m[0.1, 0.15)``: the loss's progress late in the search phase;
    - ``stable_progress = m[0.3, 0.4) / m[0.2, 0.3)``: its progress after the search phase, at the level
      the preset applies there;
    - ``roughness_over_trend``: over the bins of ``[0.1, 0.2)``, the mean absolute change between bins
      over the mean change per bin of the trend (``|first - last| / (bins - 1)``): about 1 on a smooth
      descent, large where the loss bounces more than it descends.

    A run that diverged has no features (its trace stops early)."""
    out = []
    for row in rows:
        trace = row.get("loss_trace") or []
        if row["config"] != config or row.get("diverged") or len(trace) < 20:
            continue
        window = [x for x in trace[int(0.1 * len(trace)):int(0.2 * len(trace))] if x is not None and math.isfinite(x)]
        steps = [abs(b - a) for a, b in zip(window, window[1:])]
        trend = abs(window[-1] - window[0]) / (len(window) - 1) if len(window) > 1 else 0.0
        out.append(dict(task=row["task"], length=row["length"], seed=row["seed"], split=row.get("split"),
                        search_progress=early_loss(row, 0.2) / early_loss(row, 0.15),
                        stable_progress=early_loss(row, 0.4, 0.1) / early_loss(row, 0.3, 0.1),
                        roughness_over_trend=(sum(steps) / len(steps)) / trend if steps and trend > 0 else math.inf))
    return out


def feature_values(feature_rows: List[dict], key: str, index: Optional[int] = None) -> Dict[tuple, List[float]]:
    """``(task, length) -> [the feature per seed]`` over the rows where it is finite and > 0 (``key``: a
    number or, with ``index``, an element of a list)."""
    values: Dict[tuple, List[float]] = {}
    for row in feature_rows:
        value = row.get(key)
        if index is not None:
            value = value[index] if isinstance(value, list) and -len(value) <= index < len(value) else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            values.setdefault((row["task"], row["length"]), []).append(value)
    return values


def feature_report(rows: List[dict], feature_rows: List[dict], multiples: Dict[str, float], key: str,
                   index: Optional[int] = None, split: Optional[str] = None,
                   optional: Optional[Dict[str, float]] = None) -> dict:
    """Does a feature measured along a run (``feature_rows``: rows with ``task``, ``length``, ``seed`` and
    ``key``, a number or, with ``index``, a list) tell the oracle's best multiple (NOTES.md section 48)?
    Per task-length where :func:`bound` over ``multiples`` picks one and the feature is finite and > 0 on
    some seed: ``pairs`` (task, length, best multiple, the feature's geometric mean over seeds), and
    ``rho``, Spearman's correlation of log2(feature) with log2(best multiple). ``optional`` as for
    :func:`signal_report`."""
    values = feature_values(feature_rows, key, index)
    pairs = [(task, length, best, _gmean(values[(task, length)]))
             for task, length, best in best_multiples(rows, multiples, split, optional) if values.get((task, length))]
    return dict(pairs=pairs, rho=spearman([math.log2(p[3]) for p in pairs], [math.log2(p[2]) for p in pairs]))


def _nearest(ratios: Dict[str, float], multiples: Dict[str, float], wanted: float) -> str:
    """The name among ``ratios`` whose multiple is nearest ``wanted`` in log2 (ties: the lower multiple)."""
    return min(ratios, key=lambda name: (abs(math.log2(multiples[name] / wanted)), multiples[name]))


def _rescored(out: Dict[str, dict]) -> Dict[str, dict]:
    """Each length's ``per_task`` {task: (picked, its ratio, the control's)} summed up: ``geomean``,
    ``control_geomean``, ``above_1_15``; the lengths in ``LENGTHS`` order."""
    for result in out.values():
        picks = result["per_task"].values()
        result["geomean"] = _gmean([p[1] for p in picks])
        result["control_geomean"] = _gmean([p[2] for p in picks])
        result["above_1_15"] = sorted(t for t, p in result["per_task"].items() if p[1] > 1.15)
    return {length: out[length] for length in LENGTHS if length in out}


def floor_report(rows: List[dict], multiples: Dict[str, float], control: str, signal: str, scale: float,
                 split: Optional[str] = None) -> Dict[str, dict]:
    """A floor on the level from ``signal``'s applied level, in hindsight (NOTES.md section 49). Per task-length
    where ``control`` and ``signal`` have level ratios, the rule applies the multiple

        m = max(m_c, m_c * scale * level(signal) / level(control))       (m_c: the control's multiple)

    rounded to the nearest multiple with rows (in log2; ties to the lower), and is scored by that
    configuration's ratio to the best AdamW. ``multiples``: name -> the multiple of the searched level it
    applies, ``control`` among them. Per length: ``per_task`` {task: (picked name, its ratio, the control's
    ratio)}, ``geomean``, ``control_geomean`` and ``above_1_15``."""
    if control not in multiples:
        raise ValueError(f"the control {control!r} must be one of the multiples {sorted(multiples)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"the floor's scale must be a positive number, got {scale!r}")
    summary = summarize([r for r in rows if split is None or r.get("split") == split])
    out: Dict[str, dict] = {}
    for entry in summary.values():
        present = entry["configs"]
        levels = [present.get(c, {}).get("level_ratio") for c in (control, signal)]
        if not all(v is not None and v > 0 and math.isfinite(v) for v in levels):
            continue
        ratios = {name: present[name]["ratio"] for name in multiples
                  if present.get(name, {}).get("ratio") is not None}
        if control not in ratios:
            continue
        wanted = max(multiples[control], multiples[control] * scale * levels[1] / levels[0])
        picked = _nearest(ratios, multiples, wanted)
        result = out.setdefault(entry["length"], dict(per_task={}))
        result["per_task"][entry["task"]] = (picked, ratios[picked], ratios[control])
    return _rescored(out)


def feature_rule_report(rows: List[dict], feature_rows: List[dict], multiples: Dict[str, float], control: str,
                        key: str, scale: float, split: Optional[str] = None, power: float = 1.0) -> Dict[str, dict]:
    """A multiple set from a feature, in hindsight (NOTES.md sections 51 and 88). Per task-length where every
    configuration of ``multiples`` (name -> the multiple of the searched level it applies, ``control``
    among them) has a ratio, the rule applies ``scale * feature ** power`` (the feature: its geometric mean
    over the seeds where it is finite and > 0; the control's multiple where it has none), rounded to the nearest
    of ``multiples`` in log2 (ties to the lower), and is scored by that configuration's ratio to the best
    AdamW. Only ``multiples``, on every task: a grid's extensions that exist where an oracle wanted them
    would tell the rule the answer. Per length: ``per_task`` {task: (picked name, its ratio, the control's
    ratio)}, ``geomean``, ``control_geomean``, ``above_1_15`` and ``no_feature`` (tasks left at the control's)."""
    if control not in multiples:
        raise ValueError(f"the control {control!r} must be one of the multiples {sorted(multiples)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"the rule's scale must be a positive number, got {scale!r}")
    if not math.isfinite(power):
        raise ValueError(f"the rule's power must be a finite number, got {power!r}")
    values = feature_values(feature_rows, key)
    summary = summarize([r for r in rows if split is None or r.get("split") == split])
    out: Dict[str, dict] = {}
    for entry in summary.values():
        present = entry["configs"]
        if any(present.get(name, {}).get("ratio") is None for name in multiples):
            continue
        ratios = {name: present[name]["ratio"] for name in multiples}
        feature = values.get((entry["task"], entry["length"]))
        wanted = scale * _gmean(feature) ** power if feature else multiples[control]
        picked = _nearest(ratios, multiples, wanted)
        result = out.setdefault(entry["length"], dict(per_task={}, no_feature=[]))
        result["per_task"][entry["task"]] = (picked, ratios[picked], ratios[control])
        if not feature:
            result["no_feature"].append(entry["task"])
    return _rescored(out)


def print_rescored(result: Dict[str, dict], control: str, moved: str) -> None:
    """One line per length of a :func:`floor_report` or :func:`feature_rule_report`: the control's geomean and
    the rule's, on how many tasks the rule moved off the control, and the tasks above 1.15."""
    for length, r in result.items():
        worst = ", ".join(f"{t} {r['per_task'][t][1]:.3g} ({r['per_task'][t][0]})" for t in r["above_1_15"])
        count = sum(p[0] != control for p in r["per_task"].values())
        unread = f" (no feature: {', '.join(r['no_feature']) or 'none'})" if "no_feature" in r else ""
        print(f"  {length}: {len(r['per_task'])} tasks, geomean {r['control_geomean']:.3f} -> {r['geomean']:.3f}, "
              f"{moved} {count}{unread}; above 1.15: {worst or 'none'}")


def markdown(result: Dict[str, dict], configs: Sequence[str]) -> str:
    """``configs``: every name the oracle picked from, in the order the counts are shown."""
    lines = [f"oracle over {', '.join(configs)}", "",
             "| length | geomean | tasks > 1.15 | tasks > 1.03 | best configuration (count) |",
             "|---|---|---|---|---|"]
    for length, r in result.items():
        counts = ", ".join(f"{c} {n}" for c, n in sorted(r["best_counts"].items(), key=lambda kv: configs.index(kv[0])))
        worst = ", ".join(f"{t} {r['per_task'][t][1]:.3g}" for t in r["above_1_15"]) or "none"
        lines.append(f"| {length} | {r['geomean']:.3f} | {worst} | {len(r['above_1_03'])} of {len(r['per_task'])} "
                     f"| {counts} |")
    lines += ["", "| task | " + " | ".join(result) + " |", "|---|" + "---|" * len(result)]
    tasks = sorted({t for r in result.values() for t in r["per_task"]})
    for task in tasks:
        cells = []
        for r in result.values():
            best = r["per_task"].get(task)
            cells.append("—" if best is None else f"{best[1]:.3g} ({best[0]})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    missing = {length: r["missing"] for length, r in result.items() if r["missing"]}
    if missing:
        lines += ["", f"left out (a configuration without rows): {missing}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--configs", required=True, help="comma-separated configuration names")
    parser.add_argument("--optional", default="", help="comma-separated configurations that count where they have rows")
    parser.add_argument("--split", default=None)
    parser.add_argument("--seeds", default=None, help="only these seeds (e.g. 0-1); default: every seed in the files")
    parser.add_argument("--alias", action="append", default=[],
                        help="NAME=AS: read rows of configuration NAME as AS (one run under two names)")
    parser.add_argument("--signal", default=None, metavar="CONFIG",
                        help="report how CONFIG's applied level relates to the best multiple (section 47); "
                             "--configs and --optional then give NAME=MULTIPLE pairs and --control the "
                             "configuration they multiply")
    parser.add_argument("--control", default=None)
    parser.add_argument("--feature", default=None, metavar="KEY[:INDEX]",
                        help="report how a feature of --feature-rows relates to the best multiple (section 48); "
                             "--configs and --optional then give NAME=MULTIPLE pairs")
    parser.add_argument("--feature-rows", default=None, help="comma-separated JSONL files of the feature's rows")
    parser.add_argument("--among", default=None, metavar="Q,...",
                        help="with --feature rehearsal_min_multiple_<branch>: the rehearsal's pick among these of its "
                             "multiples only (section 70)")
    parser.add_argument("--trace-config", default=None, metavar="CONFIG",
                        help="with --feature: take the feature from CONFIG's loss traces in the files (section 50: "
                             "search_progress, stable_progress, roughness_over_trend) instead of --feature-rows")
    parser.add_argument("--floor-scale", type=float, default=None, metavar="K",
                        help="with --signal: score a floor at K times the signal's level, in hindsight (section 49)")
    parser.add_argument("--rule-scale", type=float, default=None, metavar="C",
                        help="with --feature, --feature-rows and --control: score, in hindsight, the multiple set to C "
                             "times the feature (section 51)")
    parser.add_argument("--feature-power", type=float, default=1.0, metavar="P",
                        help="with --rule-scale: the multiple set to C times the feature to the power P (section 88: "
                             "P = alpha - 1 with the searched level as the feature blends it with one rate)")
    parser.add_argument("--switched", default=None, metavar="ROWS",
                        help="add the runs that switched multiple at the freeze, switch_<q>, from these rehearsal rows "
                             "(comma-separated files; section 65), or during the warm-up (--switch-at rows, section 66)")
    parser.add_argument("--switched-key", default="full", metavar="KEY",
                        help="with --switched: the key of the branch to the run's end (default: full)")
    parser.add_argument("--pick-at", type=float, default=None, metavar="F",
                        help="pick per seed by the training loss at fraction F of the run instead of the "
                             "final loss (section 46); the optional configurations are not picked from")
    parser.add_argument("--pilot", default=None, metavar="P:T",
                        help="pick per seed by the final loss of the complete run at length P, scored at length T "
                             "(section 80); the optional configurations are not picked from")
    args = parser.parse_args(argv)
    try:
        aliases = name_pairs(args.alias, "--alias NAME=AS")
    except ValueError as error:
        parser.error(str(error))
    seeds = None if args.seeds is None else set(parse_seeds(args.seeds))
    try:
        rows = [dict(r, config=aliases.get(r["config"], r["config"])) for r in read_rows(args.files)
                if seeds is None or r["seed"] in seeds]
        if args.switched:
            rows += [r for r in switched_rows(read_rows(args.switched.split(",")), args.switched_key)
                     if seeds is None or r["seed"] in seeds]
    except ValueError as error:
        parser.error(str(error))
    def multiples_of(text, form):
        return {name: float(value) for name, value in name_pairs([c for c in text.split(",") if c], form).items()}

    if args.among is not None and (args.feature is None or not args.feature_rows):
        parser.error("--among goes with --feature and --feature-rows")

    def kept(feature_rows):
        feature_rows = [r for r in feature_rows
                        if (seeds is None or r["seed"] in seeds) and (args.split is None or r.get("split") == args.split)]
        if args.among is None:
            return feature_rows
        try:
            among = [float(q) for q in args.among.split(",")]
        except ValueError:
            raise ValueError(f"bad --among {args.among!r}: give multiples separated by commas") from None
        return rehearsal_picks_among(feature_rows, args.feature, among)

    if args.feature is not None and args.rule_scale is not None:
        try:
            multiples = multiples_of(args.configs, "--configs NAME=MULTIPLE")
            if not args.feature_rows or args.control is None:
                raise ValueError("--rule-scale needs --feature-rows and --control")
            feature_rows = kept(read_rows(args.feature_rows.split(",")))
            rule = feature_rule_report(rows, feature_rows, multiples, args.control, args.feature, args.rule_scale,
                                       args.split, args.feature_power)
        except ValueError as error:
            parser.error(str(error))
        powered = args.feature if args.feature_power == 1 else f"{args.feature} ** {args.feature_power:g}"
        print(f"the multiple at {args.rule_scale:g} x {powered}, in place of {args.control}'s")
        print_rescored(rule, args.control, "moved on")
        return 0
    if args.feature is not None:
        key, _, index = args.feature.partition(":")
        try:
            multiples = multiples_of(args.configs, "--configs NAME=MULTIPLE")
            optional_multiples = multiples_of(args.optional, "--optional NAME=MULTIPLE")
            if args.trace_config is not None:
                feature_rows = trace_features(rows, args.trace_config)
            elif args.feature_rows:
                feature_rows = read_rows(args.feature_rows.split(","))
            else:
                raise ValueError("--feature needs --feature-rows or --trace-config")
            feature_rows = kept(feature_rows)
            report = feature_report(rows, feature_rows, multiples, key, int(index) if index else None, args.split,
                                    optional_multiples)
        except ValueError as error:
            parser.error(str(error))
        print(f"{len(report['pairs'])} task-lengths; Spearman of log2({args.feature}) with log2(best multiple): "
              f"{report['rho']:.2f}")
        for task, length, best, value in report["pairs"]:
            print(f"  {task} {length}: best multiple {best:g}, {args.feature} {value:.3g}")
        return 0
    if args.signal is not None:
        if args.floor_scale is not None:
            try:
                multiples = {**multiples_of(args.configs, "--configs NAME=MULTIPLE"),
                             **multiples_of(args.optional, "--optional NAME=MULTIPLE")}
                floor = floor_report(rows, multiples, args.control, args.signal, args.floor_scale, args.split)
            except ValueError as error:
                parser.error(str(error))
            print(f"a floor at {args.floor_scale:g} x {args.signal}'s level on {args.control}")
            print_rescored(floor, args.control, "floor binds on")
            return 0
        try:
            multiples = multiples_of(args.configs, "--configs NAME=MULTIPLE")
            report = signal_report(rows, multiples, args.control, args.signal, args.split,
                                   multiples_of(args.optional, "--optional NAME=MULTIPLE"))
        except ValueError as error:
            parser.error(str(error))
        print(f"{len(report['pairs'])} task-lengths; spread of log2(level / best AdamW rate): "
              f"{args.control} {report['spread_control']:.2f}, {args.signal} {report['spread_signal']:.2f}; "
              f"Spearman of log2({args.signal} / {args.control} level) with log2(best multiple): "
              f"{report['rho']:.2f}")
        for task, length, best, control, signal in report["pairs"]:
            print(f"  {task} {length}: best multiple {best:g}, level ratio {control:.3g} -> {signal:.3g}")
        return 0
    configs = [c for c in args.configs.split(",") if c]
    optional = [c for c in args.optional.split(",") if c and c not in configs]
    if args.pilot is not None:
        pilot, _, target = args.pilot.partition(":")
        try:
            picked = picked_by_pilot(rows, configs, pilot, target)
        except ValueError as error:
            parser.error(str(error))
        name = f"pilot@{pilot}"
        on_split = [r for r in picked if args.split is None or r.get("split") == args.split]
        scored = {length: r for length, r in bound(rows + picked, [name], args.split).items() if length == target}
        print(markdown(scored, [name]))
        counts = Counter(r["picked_from"] for r in on_split)
        print(f"\npicked from {pilot}-length pilots for {target} (runs): "
              + ", ".join(f"{c} {counts[c]}" for c in configs if counts[c])
              + f"; the pilots cost {len(configs)} x {LENGTHS[pilot] / LENGTHS[target]:.3g} = "
              f"{len(configs) * LENGTHS[pilot] / LENGTHS[target]:.2f} of the {target} run")
        return 0
    if args.pick_at is not None:
        try:
            picked = picked_at(rows, configs, args.pick_at)
        except ValueError as error:
            parser.error(str(error))
        name = f"picked@{args.pick_at:g}"
        print(markdown(bound(rows + picked, [name], args.split), [name]))
        counts = Counter((r["length"], r["picked_from"]) for r in picked
                         if args.split is None or r.get("split") == args.split)
        print("\npicked (runs per length): " + "; ".join(
            f"{length}: " + ", ".join(f"{c} {counts[(length, c)]}" for c in configs if counts[(length, c)])
            for length in LENGTHS if any(l == length for l, _ in counts)))
        return 0
    print(markdown(bound(rows, configs, args.split, optional), configs + optional))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
