"""Candidate overshoot signals, measured along a configuration's run (quality NOTES section 29).

    python -m benchmarks.quality.zoo.signals --tasks mlp_tanh_cycled,lm_small --lengths default \\
        --seeds 0-1 --out benchmarks/quality/results/zoo/signals.jsonl

Per run (one thread, the zoo's weights and batches) two measurements, appended as one JSON row with the
commit, versions and date:

- **The range test's statistics** over the search phase (the first ``warmup`` fraction of the steps,
  where the ``pretrain`` preset searches): the searches' losses ``f0`` smoothed as the preset smooths
  them (``l <- 0.9 l + 0.1 f0``), the largest ``l / l_low`` (what ``backoff_on_loss_rise`` compares with
  2) and the largest ``l / l_first`` (the smoothed loss against its first value).
- **Cross-batch agreement** per step ``t >= 2``: ``rho_t = <g_t, P_t m_hat_{t-1}> / <g_t, P_t g_t>``, with
  ``g_t`` this step's gradient (its batch, before the step), ``m_hat_{t-1} = m_{t-1} / (1 - beta1^(t-1))``
  the previous steps' bias-corrected momentum and ``P_t = 1 / (sqrt(v_t / (1 - beta2^t)) + eps)``. Under
  independent batch noise ``E rho = |G|^2_P / (|G|^2_P + tr(P Sigma) / B)``, the signal fraction of the
  gradient noise scale (McCandlish et al., arXiv 1812.06162); a trajectory at the edge of stability, where
  each gradient turns against the step just taken, drives it to 0 or below. Reported as its mean over
  each quarter of the search phase and over the rest of the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .. import optimizers as O
from ..run import _record_level
from . import tasks as Z
from .runner import _provenance, parse_seeds

SMOOTHING = 0.9  # the range test's smoothing of the searches' losses (salsa_fused.step_size.LOSS_RISE_SMOOTHING)


def agreement(grads: Sequence[torch.Tensor], previous_exp_avg: Sequence[torch.Tensor],
              exp_avg_sq: Sequence[torch.Tensor], step: int, betas=(0.9, 0.999), eps: float = 1e-8) -> float:
    """``<g, P m_hat_prev> / <g, P g>`` summed over tensors (module docstring); ``step`` is ``t >= 2``,
    the 1-based count of the step whose gradient ``grads`` is and whose second moment ``exp_avg_sq`` is."""
    if step < 2:
        raise ValueError(f"agreement needs a previous momentum: step must be >= 2, got {step}")
    beta1, beta2 = betas
    cross = own = 0.0
    for g, m, v in zip(grads, previous_exp_avg, exp_avg_sq):
        g = g.double()
        precond = 1.0 / ((v.double() / (1.0 - beta2 ** step)).sqrt() + eps)
        cross += float((g * precond * m.double()).sum()) / (1.0 - beta1 ** (step - 1))
        own += float((g * g * precond).sum())
    return cross / own if own > 0.0 else math.nan


def range_statistics(search_losses: Iterable[float]) -> Dict[str, float]:
    """The largest smoothed loss over its lowest and over its first value, from the searches' ``f0``
    in order (losses that are not finite and > 0 are skipped, as the range test skips them)."""
    average = low = first = None
    over_low = over_first = 1.0
    for loss in search_losses:
        if not (math.isfinite(loss) and loss > 0.0):
            continue
        average = loss if average is None else SMOOTHING * average + (1.0 - SMOOTHING) * loss
        first = average if first is None else first
        low = average if low is None else min(low, average)
        over_low, over_first = max(over_low, average / low), max(over_first, average / first)
    return dict(max_over_low=over_low, max_over_first=over_first)


def _means(values: List[tuple], edges: List[int]) -> List[float]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        window = [rho for step, rho in values if lo < step <= hi and math.isfinite(rho)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def measure(task_name: str, length: str, seed: int, config: str = "pretrain_hold", warmup: float = 0.2,
            steps: Optional[int] = None) -> dict:
    """Train ``config`` on the zoo task (``steps`` overrides the length's) and return the row of both
    measurements; the run itself is the zoo's (its losses bitwise those of ``zoo run``)."""
    torch.set_num_threads(1)
    task = Z.make(task_name, seed, steps=steps, length=length)
    model = task.model(seed)
    model.train()
    built = O.build(config, task, model, task.steps)
    opt = built.optimizer
    if built.family != "fused":
        raise ValueError(f"{config!r} is not a plain FusedSaLSa configuration (family {built.family!r})")
    group = opt.param_groups[0]
    betas, eps = group["betas"], group["eps"]
    params = [p for g in opt.param_groups for p in g["params"]]
    search_window = int(warmup * task.steps)
    search_losses, rhos, levels, backoffs, losses = [], [], [], [], []
    for k, batch in enumerate(task.batches):
        step = k + 1
        previous = [opt.state[p]["exp_avg"].clone() if "exp_avg" in opt.state.get(p, {}) else None for p in params]
        searches_before = opt.search_state.num_searches
        opt.zero_grad(set_to_none=True)
        loss = opt.step(lambda: task.loss(model, batch))
        _record_level(opt, built.schedule, step, levels, backoffs)
        losses.append(float(loss))
        if opt.search_state.num_searches > searches_before and step <= search_window:
            search_losses.append(opt.search_state.last_search_loss)
        kept = [(p.grad, m, opt.state[p]["exp_avg_sq"]) for p, m in zip(params, previous)
                if p.grad is not None and m is not None]
        if step >= 2 and kept:
            rhos.append((step, agreement(*zip(*kept), step=step, betas=betas, eps=eps)))
    quarter = [round(search_window * i / 4) for i in range(5)]
    tail = max(1, len(losses) // 10)
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / tail, level_mean=sum(levels) / len(levels),
                loss_rise_backoffs=backoffs, searches_in_window=len(search_losses),
                **range_statistics(search_losses),
                agreement_by_quarter=_means(rhos, quarter), agreement_after=_means(rhos, [search_window, task.steps])[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, help="comma-separated zoo task names")
    parser.add_argument("--lengths", default="default", help="comma-separated: short, default, long")
    parser.add_argument("--seeds", default="0-1")
    parser.add_argument("--config", default="pretrain_hold")
    parser.add_argument("--out", required=True, help="JSONL file the rows are appended to")
    args = parser.parse_args(argv)
    tasks, lengths = args.tasks.split(","), args.lengths.split(",")
    for name in tasks:
        if name not in Z.ZOO:
            parser.error(f"unknown zoo task {name!r}; choose from {sorted(Z.ZOO)}")
    for length in lengths:
        if length not in ("short", "default", "long"):
            parser.error(f"unknown length {length!r}; choose from short, default, long")
    provenance = _provenance()
    with open(args.out, "a") as out:
        for name in tasks:
            for length in lengths:
                for seed in parse_seeds(args.seeds):
                    row = measure(name, length, seed, args.config)
                    row.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               **provenance)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(f"{name} {length} seed {seed}: max l/l_low {row['max_over_low']:.3f}, "
                          f"agreement {[round(x, 3) for x in row['agreement_by_quarter']]} then "
                          f"{row['agreement_after']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
