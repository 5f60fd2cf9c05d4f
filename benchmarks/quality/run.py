"""Run the quality suite: every optimizer on every task, same weights and batches.

    python -m benchmarks.quality.run --size cpu --tasks gpt,digits,seqcls,diabetes
    python -m benchmarks.quality.run --size cpu --tasks gpt --optimizers edge2_mom,adamw_1e-3
    python -m benchmarks.quality.run --size gpu            # the issue's H100 size (CUDA, bf16 autocast)

Writes ``results/<size>/<task>.json`` (per optimizer and seed: the loss and step-size traces,
the search log of FusedSaLSa runs, the summary numbers), ``results/<size>/summary.md`` and
``summary.json`` (the tables), and PNG plots. Results for optimizers already in a task's
JSON are kept and merged, so ablations can be added run by run; an optimizer run again
replaces its entry there (the tables read the latest). Every run is also appended, without its
traces, to ``results/<size>/runs.jsonl``, and each carries where and how it ran (``provenance``:
commit, torch/triton/CUDA/Python versions, device, date, command), which the tables list per task.
The AdamW grid is extended by factors of 3 until its best rate is inside the grid.

Numbers per run: final train loss (mean over the last 10% of steps of the loss at the
step's batch, before the step), val loss (at the end, on fixed held-out batches), wall time
per step, forward evaluations per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from salsa_fused.errors import NonFiniteError
from salsa_fused.line_search import ArmijoSearch
from salsa_fused.step_size import applied_scale

from .. import _common as C
from . import optimizers as O
from .tasks import SIZES, TASKS, make_task

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: Every run, appended (the task JSONs keep each optimizer's latest runs only).
HISTORY = "runs.jsonl"
#: A run's numbers that go into the history with its provenance (its traces stay in the task's JSON).
HISTORY_KEYS = ("seed", "final_train_loss", "val_loss", "step_time_ms", "forwards_per_step", "diverged")
#: Families whose parameters hold the gradient point in train() mode and the average in eval() mode.
SCHEDULE_FREE = ("schedulefree", "schedulefree_plus")


class SearchRecorder:
    """Wraps a search rule; records per search the scalars of the first trial and the outcome.

    Per search: step ``k``, loss ``f0``, raw slope ``q``, smoothed ``s`` and ``h`` before the
    search, trial step ``eta``, first trial loss ``f1``, accepted step, trials. From those:
    the two sides of the Armijo test at the first trial and ``eta*kappa_hat/q``.
    """

    def __init__(self, rule, log: list):
        self.rule, self.log = rule, log

    def __getattr__(self, name):  # the rule's optional hooks (plan, adam_bias_correction)
        return getattr(self.rule, name)

    def direction(self, configured):
        return self.rule.direction(configured)

    def __call__(self, plan, config, loss, grad_norm):
        search = self.rule(plan, config, loss, grad_norm)
        entry = dict(k=plan.state.step, f0=float(loss), q=float(grad_norm), h=plan.state.loss_decrease_avg,
                     s=search.state.slope_avg, eta=search.step_size, c=config.c, beta3=config.beta3)
        self.log.append(entry)
        return _RecordingSearch(search, entry)


class _RecordingSearch:
    def __init__(self, search, entry):
        self._search, self._entry = search, entry

    @property
    def active(self):
        return self._search.active

    @property
    def step_size(self):
        return self._search.step_size

    @property
    def exhausted(self):
        return self._search.exhausted

    @property
    def state(self):
        return self._search.state

    def observe(self, trial_loss):
        if "f1" not in self._entry:
            self._entry["f1"] = float(trial_loss)
        return self._search.observe(trial_loss)

    def final(self):
        return self._search.final()

    def finish(self):
        state = self._search.finish()
        self._entry.update(accepted=self._search.step_size, trials=self._search.trials,
                           next_eta=state.step_size)
        return state


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr_factor_step(built, task, model, batch, score_batch) -> torch.Tensor:
    """One step of the ``lr_factor`` family: the wrapped optimizer's step on ``batch``; on decision
    steps the factors are scored on ``score_batch`` (the next batch of the stream; the seed scores
    on a randomly drawn batch), with the model's buffers put back after each scoring forward."""
    opt, search = built.optimizer, built.factor_search
    buffers = list(model.buffers())

    def score():
        saved = [b.detach().clone() for b in buffers]
        try:
            return task.loss(model, score_batch)
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    opt.zero_grad(set_to_none=True)
    if built.inner_family == "fused":
        return search.step(score, lambda: opt.step(lambda: task.loss(model, batch)))
    loss = task.loss(model, batch)
    loss.backward()
    search.step(score)
    return loss


def _record_level(opt, schedule, step: int, step_sizes: List[float], backoffs: List[list],
                  multiplier: float = 1.0) -> None:
    """Append the level step ``step`` (1-based) applied, in the units of a rate (``eta * growth`` times
    the schedule's scale and the range test's back-off ``b``: ``salsa_fused.step_size.applied_scale``,
    times ``multiplier``, the groups' ``lr``), and ``[step, b]`` to ``backoffs`` when ``b`` changed at
    ``step``. One copy of the search state."""
    state = opt.search_state
    step_sizes.append(state.step_size * opt.search_config.growth * applied_scale(schedule, state, step) * multiplier)
    if state.applied_backoff != (backoffs[-1][1] if backoffs else 1.0):
        backoffs.append([step, state.applied_backoff])


def train(task, name: str, seed: int, record_searches: bool = True) -> dict:
    """Train a fresh model of ``task`` (weights from ``seed``) with optimizer ``name``."""
    model = task.model(seed)
    model.train()
    built = O.build(name, task, model, task.steps)
    opt, family = built.optimizer, built.family
    searches: List[dict] = []
    if family == "fused" and record_searches:
        opt.search_rule = SearchRecorder(opt.search_rule, searches)
    if family in SCHEDULE_FREE:
        opt.train()
    if built.average is not None:
        built.average.train()
    losses: List[torch.Tensor] = []
    step_sizes: List[float] = []
    backoffs: List[list] = []  # [step, b] each time the range test's back-off changed
    ema_losses: List[float] = []  # section 62: the average's loss on each tail batch, read before the step
    ema_from = len(task.batches) - max(1, len(task.batches) // 10)
    diverged = None
    _sync(task.device)
    start = time.perf_counter()
    for k, batch in enumerate(task.batches):
        try:
            if family == "fused":
                if built.ema is not None and k >= ema_from:
                    ema_losses.append(built.ema.loss(lambda averaged: task.loss(averaged, batch)))
                opt.zero_grad(set_to_none=True)
                if built.hyper is not None:
                    built.hyper.before_step()
                multiplier = opt.param_groups[0]["lr"]  # a learned multiplier's (section 53), read before it moves
                loss = opt.step(lambda: task.loss(model, batch))
                _record_level(opt, opt.schedule, k + 1, step_sizes, backoffs, multiplier)
                if built.hyper is not None:
                    built.hyper.after_step()
                if built.ema is not None:
                    built.ema.update()
            elif family == "beam":
                batches = task.batches  # closure(i): batch i of this step's horizon, the stream from step k on
                loss = built.beam.step(lambda i: task.loss(model, batches[k + i]))
                _record_level(opt, opt.schedule, k + 1, step_sizes, backoffs)
            elif family == "labpal":
                batches = task.batches  # closure(i): batch i of this step, the stream from step k on
                opt.zero_grad(set_to_none=True)
                loss = opt.step(lambda i: task.loss(model, batches[(k + i) % len(batches)]))
                step_sizes.append(opt.labpal_state["update_step"] or 0.0)
            elif family == "lr_factor":  # the step's rate is read before a decision changes it
                fused = built.inner_family == "fused"
                scale = applied_scale(opt.schedule, opt.search_state, k + 1) if fused else opt.param_groups[0]["lr"]
                loss = _lr_factor_step(built, task, model, batch, task.batches[(k + 1) % len(task.batches)])
                step_sizes.append(opt.step_size * opt.search_config.growth * scale if fused else scale)
            elif family == "salsa_pub":
                opt.zero_grad(set_to_none=True)

                def closure(backwards=False):
                    value = task.loss(model, batch)
                    if backwards:
                        value.backward()
                    return value
                loss = opt.step(closure)
                step_sizes.append(opt.step_size)
            else:
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, batch)
                loss.backward()
                group = opt.param_groups[0]
                if family == "prodigy":
                    step_sizes.append(group["d"] * group["lr"])
                elif family == "mechanic":  # the base's scheduled rate times the learned scale
                    step_sizes.append(opt.scale * group["lr"])
                elif family not in SCHEDULE_FREE:
                    step_sizes.append(group["lr"])
                if family == "schedulefree_plus":  # its rate is a Polyak step from this loss
                    opt.step(loss.detach())
                else:
                    opt.step()
                if family in SCHEDULE_FREE:  # the rate is set inside step: its warmup, Prodigy+SF's d, SF+'s Polyak
                    step_sizes.append(group.get("d", 1.0) * group.get("scheduled_lr", group["lr"]))
                if built.scheduler is not None:
                    built.scheduler.step()
        except (NonFiniteError, ValueError) as error:  # ValueError: the published package's NaN check
            diverged = f"step {k}: {error}"
            break
        losses.append(loss.detach().float().reshape(()))
        if (k + 1) % 50 == 0 and not math.isfinite(float(losses[-1])):
            diverged = f"non-finite loss by step {k}"
            break
    _sync(task.device)
    elapsed = time.perf_counter() - start
    values = [float(v) for v in torch.stack(losses)] if losses else []
    if family in SCHEDULE_FREE:
        opt.eval()
    if built.average is not None:  # as for the schedule-free families: the train losses were read at y
        built.average.eval()
    if values and not math.isfinite(values[-1]):
        diverged = diverged or "non-finite loss"
    val = task.evaluate(model) if diverged is None else math.nan
    tail = max(1, len(values) // 10)
    final = sum(values[-tail:]) / tail if diverged is None and values else math.nan
    raw_final = final
    if built.ema is not None:  # the losses at the average, over the same tail; the iterates' kept beside them
        final = sum(ema_losses) / tail if diverged is None and len(ema_losses) == tail else math.nan
        val = task.evaluate(built.ema.evaluated_model()) if diverged is None else math.nan
    if family == "fused":
        forwards = opt.num_forward_evals
    elif family == "beam":
        forwards = built.beam.num_forward_evals  # the branches' forwards too
    elif family == "salsa_pub":
        forwards = opt.state["n_forwards"]
    elif family == "labpal":
        forwards = opt.num_forward_evals
    elif family == "lr_factor":  # the wrapped optimizer's forwards and the search's scoring forwards
        inner = opt.num_forward_evals if built.inner_family == "fused" else len(values)
        forwards = inner + built.factor_search.scoring_forward_evals
    else:
        forwards = len(values)
    result = dict(optimizer=name, seed=seed, final_train_loss=final, val_loss=val,
                  step_time_ms=1e3 * elapsed / max(1, len(values)),
                  forwards_per_step=forwards / max(1, len(values)), diverged=diverged,
                  losses=values, step_sizes=step_sizes, searches=searches)
    if built.ema is not None:
        result["raw_final_train_loss"] = raw_final
    if family == "beam":  # each beam step: its branches' scores, the factor kept, the multiplier
        result["beam_decisions"] = built.beam.decisions
    if family in ("fused", "beam") and getattr(opt.schedule, "freeze_below", 0.0):
        state = opt.search_state  # whether and when the level froze early, and at what
        result["early_freeze"] = dict(frozen_at=state.frozen_at, peak=state.step_size_fast_peak,
                                      level=state.step_size)
    if family in ("fused", "beam") and getattr(opt.schedule, "backoff_on_loss_rise", False):
        result["loss_rise_backoffs"] = backoffs  # the steps the loss turned at, and the multiplier after
    if family == "fused" and built.hyper is not None:  # the learned multiplier at the end, and its cosines
        cosines = built.hyper.cosines
        result["hypergradient"] = dict(multiplier=built.hyper.multiplier, updates=len(cosines),
                                       mean_cosine=sum(cosines) / len(cosines) if cosines else 0.0)
    return result


def _compact(value):
    """Floats rounded to 5 significant digits (the JSON traces stay small)."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return value


def _light(runs: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
    """Runs without search logs, traces thinned to every 10th step (the final step size kept)."""
    out = {}
    for name, seeds in runs.items():
        out[name] = [r if r.get("traces_every") == 10 else
                     {**r, "searches": [], "losses": r["losses"][::10], "traces_every": 10,
                      "step_sizes": r["step_sizes"][::10] + r["step_sizes"][-1:]} for r in seeds]
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summarize(runs: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Mean over seeds of each optimizer's numbers."""
    table = {}
    for name, seeds in runs.items():
        row = {key: _mean([r[key] for r in seeds])
               for key in ("final_train_loss", "val_loss", "step_time_ms", "forwards_per_step")}
        row["diverged"] = sum(r["diverged"] is not None for r in seeds)
        row["seeds"] = len(seeds)
        row["final_step_size"] = _mean([r["step_sizes"][-1] if r["step_sizes"] else math.nan for r in seeds])
        row["commits"] = sorted({r.get("provenance", {}).get("git_commit", "unrecorded") for r in seeds})
        table[name] = row
    adamw = {n: r for n, r in table.items() if n.startswith(O.ADAMW_PREFIX) and math.isfinite(r["final_train_loss"])}
    if adamw:
        best = min(adamw.values(), key=lambda r: r["final_train_loss"])["final_train_loss"]
        for row in table.values():
            row["vs_best_adamw"] = row["final_train_loss"] / best if math.isfinite(row["final_train_loss"]) else math.nan
    return table


def _lr_of(name: str) -> float:
    return float(name[len(O.ADAMW_PREFIX):])


def recorded_run(task, name: str, seed: int, size: str, out_dir: str) -> dict:
    """:func:`train`, its result stamped with ``provenance`` (``benchmarks._common.environment``: commit,
    versions, device, date, command) and appended, without its traces, to ``out_dir/runs.jsonl``."""
    result = train(task, name, seed)
    result["provenance"] = C.environment(task.device)
    line = {"task": task.name, "size": size, "optimizer": name,
            **{key: result[key] for key in HISTORY_KEYS}, **result["provenance"]}
    with open(os.path.join(out_dir, HISTORY), "a") as handle:
        handle.write(json.dumps(_compact(line)) + "\n")
    return result


def _extend_grid(task_of, runs, seeds, log, run=train) -> None:
    """Add AdamW rates (x3 beyond the end) until the best rate is not at an end of the grid.
    ``task_of(seed)``: the task with that seed's batches; ``run(task, name, seed)``: one run's result."""
    for _ in range(4):
        table = summarize(runs)
        grid = sorted((n for n in table if n.startswith(O.ADAMW_PREFIX)), key=_lr_of)
        finite = [n for n in grid if math.isfinite(table[n]["final_train_loss"])]
        if len(grid) < 2 or not finite:
            return
        best = min(finite, key=lambda n: table[n]["final_train_loss"])
        if best == grid[0]:
            new = O.adamw_name(_lr_of(grid[0]) / 3)
        elif best == grid[-1]:
            new = O.adamw_name(_lr_of(grid[-1]) * 3)
        else:
            return
        log(f"  AdamW best at the end of the grid ({best}): adding {new}")
        runs[new] = []
        for seed in seeds:
            task = task_of(seed)
            result = run(task, new, seed)
            runs[new].append(result)
            log(run_line(task.name, new, result) + " (grid extension)")


def run_line(task_name: str, name: str, result: dict) -> str:
    """One run's log line (``benchmarks.quality.screen`` parses it: task, optimizer, "seed", seed,
    "train", loss are its first six fields)."""
    return (f"{task_name:9s} {name:20s} seed {result['seed']}: train {result['final_train_loss']:.4f} "
            f"val {result['val_loss']:.4f} {result['step_time_ms']:.1f} ms/step "
            f"{result['forwards_per_step']:.2f} fwd/step"
            + (f" DIVERGED {result['diverged']}" if result["diverged"] else ""))


def _fmt(x, spec=".4f"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(size: str, tables: Dict[str, Dict[str, dict]]) -> str:
    lines = [f"# Quality suite, size `{size}`", "",
             "Final train loss: mean of the last 10% of steps; ratio: to the best AdamW rate of the task. "
             "Step time on a shared 2-core CPU is noisy: compare ratios within a table.", ""]
    for task, table in tables.items():
        lines += [f"## {task}", "", "| optimizer | final train loss | vs best AdamW | val loss | "
                  "final step size | step time (ms) | forwards/step | diverged |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in sorted(table.items(), key=lambda kv: (not math.isfinite(kv[1]["final_train_loss"]),
                                                               kv[1]["final_train_loss"])):
            lines.append(f"| {name} | {_fmt(row['final_train_loss'])} | {_fmt(row.get('vs_best_adamw'), '.3f')} | "
                         f"{_fmt(row['val_loss'])} | {_fmt(row['final_step_size'], '.2e')} | "
                         f"{_fmt(row['step_time_ms'], '.1f')} | {_fmt(row['forwards_per_step'], '.2f')} | "
                         f"{row['diverged']}/{row['seeds']} |")
        commits = defaultdict(list)
        for name, row in sorted(table.items()):
            for commit in row.get("commits", ["unrecorded"]):
                commits[commit].append(name)
        lines += ["", "Runs by commit: " + "; ".join(
            f"{commit}: {len(names)} optimizer(s)" if commit != "unrecorded" else
            f"unrecorded (run before runs carried their commit): {', '.join(names)}"
            for commit, names in sorted(commits.items())) + f" (every run with its date and versions: {HISTORY})."]
        lines.append("")
    return "\n".join(lines)


def plot(task: str, runs: Dict[str, List[dict]], out_dir: str, names: Optional[List[str]] = None,
         filename: Optional[str] = None) -> List[str]:
    """Loss (smoothed) and step size over steps, the first seed of each optimizer, into
    ``out_dir/<filename or task.png>``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if names is None:  # the shipped configurations and the references; ablations stay in the tables
        names = [n for n in O.DEFAULT_SET if n in runs] + sorted(
            (n for n in runs if n.startswith(O.ADAMW_PREFIX)), key=_lr_of)
    names = [n for n in names if n in runs]
    paths = []
    fig, (ax_loss, ax_step) = plt.subplots(1, 2, figsize=(14, 5))
    for name in names:
        run = runs[name][0]
        values = torch.tensor(run["losses"]) if run["losses"] else torch.zeros(0)
        if len(values) == 0:
            continue
        window = max(1, len(values) // 40)
        smooth = torch.nn.functional.avg_pool1d(values[None, None], window, 1).flatten() if len(values) >= window else values
        style = "--" if name.startswith(O.ADAMW_PREFIX) else "-"
        ax_loss.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), style, label=name, lw=1.2)
        ax_step.plot(run["step_sizes"], style, label=name, lw=1.2)
    ax_loss.set_xlabel("step"); ax_loss.set_ylabel("train loss (moving average)"); ax_loss.set_title(f"{task}: loss")
    finals = [r[0]["final_train_loss"] for r in runs.values() if math.isfinite(r[0]["final_train_loss"])]
    if finals:
        ax_loss.set_ylim(min(finals) * 0.9, max(finals) * 2.0)
    ax_step.set_yscale("log"); ax_step.set_xlabel("step")
    ax_step.set_ylabel("applied step size / learning rate"); ax_step.set_title(f"{task}: step size")
    ax_step.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    path = os.path.join(out_dir, filename or f"{task}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--tasks", default="gpt,digits,seqcls,teacher")
    parser.add_argument("--optimizers", default="default",
                        help="comma list; 'default' = the published/recommended configurations and references")
    parser.add_argument("--adamw-lrs", default=",".join(str(x) for x in O.DEFAULT_ADAMW_GRID),
                        help="comma list of AdamW peak rates ('' for none)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=None, help="override each task's step count")
    parser.add_argument("--out", default=None, help=f"results folder (default {RESULTS}/<size>)")
    parser.add_argument("--fresh", action="store_true", help="ignore results already in the folder")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-traces", action="store_true",
                        help="save no search logs and every 10th point of the loss and step-size traces "
                             "(many-seed runs; the plots need full traces)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    names = list(O.DEFAULT_SET) if args.optimizers == "default" else [n for n in args.optimizers.split(",") if n]
    names += [O.adamw_name(float(x)) for x in args.adamw_lrs.split(",") if x]
    O.known(names)
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = args.out or os.path.join(RESULTS, args.size)
    os.makedirs(out_dir, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    tables = {}
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path) and not args.fresh:
        with open(summary_path) as handle:
            tables = json.load(handle)
    for task_name in tasks:
        path = os.path.join(out_dir, f"{task_name}.json")
        runs: Dict[str, List[dict]] = {}
        if os.path.exists(path) and not args.fresh:
            with open(path) as handle:
                runs = json.load(handle)["runs"]
        task = make_task(task_name, args.size, seed=seeds[0], steps=args.steps)
        for name in names:
            results = []
            for seed in seeds:
                if seed != seeds[0]:
                    task = make_task(task_name, args.size, seed=seed, steps=args.steps)
                result = recorded_run(task, name, seed, args.size, out_dir)
                results.append(result)
                log(run_line(task_name, name, result))
            task = make_task(task_name, args.size, seed=seeds[0], steps=args.steps)
            runs[name] = results
            with open(path, "w") as handle:  # after every optimizer, so a failure later loses nothing
                json.dump({"task": task_name, "size": args.size, "steps": task.steps,
                           "runs": _compact(_light(runs) if args.no_traces else runs)}, handle)
        if any(n.startswith(O.ADAMW_PREFIX) for n in names):
            _extend_grid(lambda seed: make_task(task_name, args.size, seed=seed, steps=args.steps), runs, seeds, log,
                         lambda task, name, seed: recorded_run(task, name, seed, args.size, out_dir))
        table = summarize(runs)
        tables[task_name] = table
        with open(path, "w") as handle:
            json.dump({"task": task_name, "size": args.size, "steps": task.steps,
                       "runs": _compact(_light(runs) if args.no_traces else runs)}, handle)
        if not args.no_plots:
            plot(task_name, runs, out_dir)
    if os.path.exists(summary_path) and not args.fresh:  # another run may have added tasks meanwhile
        with open(summary_path) as handle:
            tables = {**json.load(handle), **{t: tables[t] for t in tasks}}
    with open(summary_path, "w") as handle:
        json.dump(tables, handle, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(markdown(args.size, tables))
    log(markdown(args.size, {t: tables[t] for t in tasks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
