"""Candidate overshoot signals, measured along a configuration's run (quality NOTES sections 29-31, 48, 51, 64-68).

    python -m benchmarks.quality.zoo.signals --tasks mlp_tanh_cycled,lm_small --lengths default \\
        --seeds 0-1 --out /tmp/signals.jsonl
    python -m benchmarks.quality.zoo.signals --sharpness --tasks lm_small --lengths default --seeds 0 \\
        --around-best-adamw benchmarks/quality/results/zoo/development.jsonl --out /tmp/sharpness.jsonl
    python -m benchmarks.quality.zoo.signals --chord --tasks lm_small --lengths default --seeds 0 \\
        --around-best-adamw benchmarks/quality/results/zoo/development.jsonl --out /tmp/chord.jsonl
    python -m benchmarks.quality.zoo.signals --line-scan --tasks lm_small --lengths default --seeds 0-1 \\
        --out /tmp/linescan.jsonl
    python -m benchmarks.quality.zoo.signals --rehearsal --tasks lm_small --lengths default --seeds 0-1 \\
        --out /tmp/rehearsal.jsonl
    python -m benchmarks.quality.zoo.signals --rehearsal --rehearse-at 0.1 --branches r2=0.5 \\
        --tasks lm_small --lengths default --seeds 0-1 --out /tmp/rehearsal_early.jsonl

Every run is the zoo's own (one thread, the zoo's weights and batches; its losses bitwise those of
``zoo run``), and appends one JSON row with the commit, versions and date. Two kinds of row:

**Without** ``--sharpness`` (``--config``, a plain FusedSaLSa configuration; the preset by default):

- **the range test's statistics** over the search phase (the first ``warmup`` fraction of the steps,
  where the ``pretrain`` preset searches): the searches' losses ``f0`` smoothed as the preset smooths
  them (``l <- 0.9 l + 0.1 f0``), ``max_over_low``, the largest ``l / l_low`` (what
  ``backoff_on_loss_rise`` compares with 2), and ``max_over_first``, the largest ``l / l_first``;
- **cross-batch agreement** per step ``t >= 2``: ``rho_t = <g_t, P_t m_hat_{t-1}> / <g_t, P_t g_t>``, with
  ``g_t`` this step's gradient (its batch, before the step), ``m_hat_{t-1} = m_{t-1} / (1 - beta1^(t-1))``
  the previous steps' bias-corrected momentum and ``P_t = 1 / (sqrt(v_t / (1 - beta2^t)) + eps)``. Under
  independent batch noise ``E rho = |G|^2_P / (|G|^2_P + tr(P Sigma) / B)``, the signal fraction of the
  gradient noise scale (McCandlish et al., arXiv 1812.06162); a trajectory whose steps reach the line's
  minimum on the next batch, or pass it, drives it to 0 or below. ``agreement_by_quarter``: its mean
  over each quarter of the search phase; ``agreement_after``: over the rest of the run.
- **the Polyak step over the searched level** (NOTES.md section 48), the median over each quarter of the
  search phase: ``polyak_l1_by_quarter``, ScheduleFree+'s ``F / (‖g‖₁ √(π/2))`` every step, and
  ``polyak_slope_by_quarter``, ``f0 / s`` along the search's own direction at each search (``s`` its
  smoothed slope); both divided by the searched level ``eta``.

**With** ``--sharpness`` (a plain FusedSaLSa or a torch optimizer such as ``adamw_<lr>``; with
``--around-best-adamw ROWS``, AdamW at each task-length's best grid rate in those zoo rows and at 1/3
and 3x it, the row then recording that ``best_adamw_lr``): per step the **step's sharpness ratio**
``r_k = 2 (1 - (f_B(w_k) - f_B(w_{k+1})) / <g_k, w_k - w_{k+1}>)``, the actual decrease of the step's own
batch against its first-order prediction (one extra forward of that batch at the new weights, with the
step's random draws replayed and BatchNorm buffers restored around it). Along a quadratic
``r = eta * kappa / q``: 1 at the greedy step, 2 at the edge of stability, above 2 the batch's loss rises;
the Armijo test with constant ``c`` accepts ``r <= 2 (1 - c)``. ``sharpness_by_fifth``: its median over
each fifth of the run; ``steps_measured``: the steps with a positive prediction. Run at AdamW's best rate
it says where along the batch's own line a tuned rate steps, and whether that place is the same on
every task.

**With** ``--chord`` (the same configurations, and ``--around-best-adamw`` as above): the **chord ratio**
``rho = f_k((w_{k-K} + w_k) / 2) / f_k(w_k)`` at the end of each window of ``K`` = 10 and 40 steps, the loss
of the next batch at the midpoint of the window's displacement over its loss at the weights reached
(:func:`chord_ratio`): whether, in hindsight, half the step over the window would have ended lower on a
batch the window did not step on. ``chord_by_fifth``: its median over each fifth of the run, per ``K``.

**With** ``--line-scan`` (``--config``, a plain FusedSaLSa with a ``WarmupStableDecay`` schedule; the preset by
default): the **line scan at the freeze** (:func:`line_scan`, NOTES.md section 51), the mean loss of the next
``LINE_SCAN_BATCHES`` batches along the last search step at 0 and ``2^-3 .. 2^5`` times the searched level,
and ``line_min_multiple`` / ``line_parabola_multiple``, where it is lowest (:func:`line_minimum`).

**With** ``--rehearsal`` (``--config`` as for the line scan): the **rehearsal at the freeze** (:func:`rehearsal`,
NOTES.md section 64), for each multiple of ``REHEARSAL_MULTIPLES`` a branch of ``R/8`` and of ``R/4`` steps
(``R`` the steps after the freeze) at that multiple, decayed linearly to zero, and the mean loss of the next
``REHEARSAL_BATCHES`` batches after it; ``rehearsal_min_multiple_r8`` / ``_r4``, where it is lowest
(``--branches``, ``--multiples`` to choose others; a fraction of 1 runs to the end, NOTES.md section 65). With
``--switch-at F`` instead the rest of the run from step ``F T`` at each peak (:func:`switch_during_warmup`,
section 66): ``switch_final_losses``, ``switch_min_multiple``; with ``--rehearse-at F`` the branches after step
``F T`` (section 67), and the line scan along step ``F T`` (section 68).

**With** ``--path`` (``--config``, a plain FusedSaLSa; the preset by default): the run to step ``F T``
(``--read-at F``, default 0.1, half the preset's warm-up) and three readings of its path there
(:func:`path_readings`, NOTES.md section 87): how straight it went, how far against the weights' scale, and
how the gradient's norm grew. These rows stop at ``F T`` and have no final loss.

Every kind but ``--path`` records the final train loss (and the sharpness and chord rows the val loss). Rows are appended:
to rebuild a committed file, write to a new one (ZOO.md lists the commands).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from salsa_fused.step_size import LOSS_RISE_SMOOTHING, Cooldown

from .. import optimizers as O
from ..run import _record_level
from . import tasks as Z
from . import runner
from .runner import _provenance, parse_seeds



def agreement(grads: Sequence[torch.Tensor], previous_exp_avg: Sequence[torch.Tensor],
              exp_avg_sq: Sequence[torch.Tensor], step: int, betas=(0.9, 0.999), eps: float = 1e-8) -> float:
    """``<g, P m_hat_prev> / <g, P g>`` summed over tensors (module docstring); ``step`` is ``t >= 2``,
    the 1-based count of the step whose gradient ``grads`` is and whose second moment ``exp_avg_sq`` is.
    A measurement's own definition, with Adam's bias correction in ``t``: not the optimizer's direction
    (whose correction is 0.1.0's, docs/api.md); a common scale on ``P`` cancels in the ratio."""
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
        average = loss if average is None else LOSS_RISE_SMOOTHING * average + (1.0 - LOSS_RISE_SMOOTHING) * loss
        first = average if first is None else first
        low = average if low is None else min(low, average)
        over_low, over_first = max(over_low, average / low), max(over_first, average / first)
    return dict(max_over_low=over_low, max_over_first=over_first)


def polyak_l1_ratio(loss: float, grads: Sequence[torch.Tensor], level: float) -> float:
    """ScheduleFree+'s Polyak step ``F / (‖g‖₁ √(π/2))`` (``f* = 0``) over the searched level ``eta``.
    ``F / ‖g‖₁`` is the step that would take a linear model of the loss to 0 if every coordinate moved
    by it against its gradient's sign; ScheduleFree+ takes ``√(2/π)`` (about 0.8) of it. nan where it
    is undefined (no gradient, a level or loss not > 0)."""
    l1 = sum(float(g.double().abs().sum()) for g in grads)
    if not (l1 > 0 and level > 0 and loss > 0 and math.isfinite(loss)):
        return math.nan
    return loss / (l1 * math.sqrt(math.pi / 2)) / level


def polyak_slope_ratio(loss: float, slope_avg: float, level: float) -> float:
    """The Polyak step along the search's own direction, ``f0 / s`` (``s`` the smoothed slope
    ``g.d``), over the searched level ``eta``: the Armijo test with ``c`` accepts at most ``1 / c`` times
    it along a line of that slope. nan where undefined."""
    if not (slope_avg > 0 and level > 0 and loss > 0 and math.isfinite(loss)):
        return math.nan
    return loss / slope_avg / level


def _medians(values: List[tuple], edges: List[int]) -> List[float]:
    """The median of the finite values whose step lies in each window ``(lo, hi]`` of ``edges``."""
    out = []
    for lo, hi in zip(edges, edges[1:]):
        window = sorted(v for step, v in values if lo < step <= hi and math.isfinite(v))
        n = len(window)
        out.append(math.nan if not n else window[n // 2] if n % 2 else (window[n // 2 - 1] + window[n // 2]) / 2)
    return out


def _means(values: List[tuple], edges: List[int]) -> List[float]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        window = [rho for step, rho in values if lo < step <= hi and math.isfinite(rho)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _start(task_name: str, length: str, seed: int, config: str, steps: Optional[int], families: tuple):
    """The zoo's task, fresh model (train mode) and ``config`` built on it, on one thread, as ``zoo run``
    starts a run; a configuration of another family than ``families`` is refused by name."""
    torch.set_num_threads(1)
    task = Z.make(task_name, seed, steps=steps, length=length)
    model = task.model(seed)
    model.train()
    built = O.build(config, task, model, task.steps)
    if built.family not in families:
        kinds = " or ".join({"fused": "plain FusedSaLSa", "torch": "torch"}[f] for f in families)
        raise ValueError(f"{config!r} is not a {kinds} configuration (family {built.family!r})")
    return task, model, built


def measure(task_name: str, length: str, seed: int, config: str = "pretrain_hold", warmup: float = 0.2,
            steps: Optional[int] = None) -> dict:
    """Train ``config`` on the zoo task (``steps`` overrides the length's) and return the row of both
    measurements; the run itself is the zoo's (its losses bitwise those of ``zoo run``)."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused",))
    opt = built.optimizer
    group = opt.param_groups[0]
    betas, eps = group["betas"], group["eps"]
    params = [p for g in opt.param_groups for p in g["params"]]
    search_window = int(warmup * task.steps)
    search_losses, rhos, levels, backoffs, losses = [], [], [], [], []
    polyak_l1, polyak_slope = [], []  # (step, the Polyak step over the searched level), section 48
    for k, batch in enumerate(task.batches):
        step = k + 1
        previous = [opt.state[p]["exp_avg"].clone() if "exp_avg" in opt.state.get(p, {}) else None for p in params]
        searches_before = opt.search_state.num_searches
        opt.zero_grad(set_to_none=True)
        loss = opt.step(lambda: task.loss(model, batch))
        _record_level(opt, built.schedule, step, levels, backoffs)
        losses.append(float(loss))
        state = opt.search_state
        searched = state.num_searches > searches_before
        if searched and step <= search_window:
            search_losses.append(state.last_search_loss)
        polyak_l1.append((step, polyak_l1_ratio(float(loss), [p.grad for p in params if p.grad is not None],
                                                state.step_size)))
        if searched:
            polyak_slope.append((step, polyak_slope_ratio(state.last_search_loss, state.slope_avg, state.step_size)))
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
                agreement_by_quarter=_means(rhos, quarter), agreement_after=_means(rhos, [search_window, task.steps])[0],
                polyak_l1_by_quarter=_medians(polyak_l1, quarter), polyak_slope_by_quarter=_medians(polyak_slope, quarter))


def _take_step(built, task, model, batch) -> float:
    """One zoo step of ``built`` (a plain FusedSaLSa or a torch optimizer and its scheduler) on ``batch``;
    the loss at the weights before it."""
    opt = built.optimizer
    opt.zero_grad(set_to_none=True)
    if built.family == "fused":
        loss = opt.step(lambda: task.loss(model, batch))
    else:
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        if built.scheduler is not None:
            built.scheduler.step()
    return float(loss.detach())


def _loss_elsewhere(task, model, batch, params, weights=None, rng_state=None) -> float:
    """``batch``'s loss with ``params`` set to ``weights`` (None: where they are), as a side measurement:
    the weights, the module's buffers (BatchNorm's running statistics) and the random generator come back
    as they were, so the run goes on bitwise. The forward draws from ``rng_state`` (None: what the
    step's own forward will draw next)."""
    with torch.no_grad():
        current = None if weights is None else [p.detach().clone() for p in params]
        kept = [b.clone() for b in model.buffers()]
        rng = torch.get_rng_state()
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for p, w in zip(params, weights or ()):
            p.copy_(w)
        loss = float(task.loss(model, batch))
        torch.set_rng_state(rng)
        for p, w in zip(params, current or ()):
            p.copy_(w)
        for b, saved in zip(model.buffers(), kept):
            b.copy_(saved)
    return loss


def _medians_by_fifth(values: List[tuple], steps: int) -> List[float]:
    fifths = [round(steps * i / 5) for i in range(6)]
    medians = []
    for lo, hi in zip(fifths, fifths[1:]):
        window = sorted(r for step, r in values if lo < step <= hi and math.isfinite(r))
        medians.append(window[len(window) // 2] if window else math.nan)
    return medians


#: The windows of the chord measurement, in steps.
CHORD_WINDOWS = (10, 40)


def chord_ratio(task_name: str, length: str, seed: int, config: str, windows: Sequence[int] = CHORD_WINDOWS,
                steps: Optional[int] = None) -> dict:
    """Train ``config`` (a plain FusedSaLSa or an AdamW configuration) on the zoo task and return the row
    of its **chord ratio**: for a window of ``K`` steps ending at step ``k`` (``k`` a multiple of ``K``),
    ``rho = f_k((w_{k-K} + w_k) / 2) / f_k(w_k)``, the loss of step ``k``'s batch (one it has not stepped
    on yet, on a stream) at the midpoint of the window's displacement over its loss at the weights
    reached. The midpoint is where the same ``K`` directions at half the step would have led, to first
    order: ``rho < 1`` says half the step would have ended lower (the run bounces across a valley),
    ``rho > 1`` that the run made progress the half step would not have. One extra forward per window;
    the run is the zoo's (bitwise). ``chord_by_fifth``: ``{K: median rho over each fifth of the run}``."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused", "torch"))
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    starts = {K: [p.detach().clone() for p in params] for K in windows}
    ratios: Dict[int, List[tuple]] = {K: [] for K in windows}
    losses = []
    for k, batch in enumerate(task.batches):
        step = k + 1
        due = [K for K in windows if step > 1 and (step - 1) % K == 0]
        current = [p.detach().clone() for p in params] if due else None
        middles = {K: _loss_elsewhere(task, model, batch, params,
                                      [0.5 * (s + c) for s, c in zip(starts[K], current)]) for K in due}
        losses.append(_take_step(built, task, model, batch))
        for K in due:  # the window ran from the weights before step - K to those before this step
            if losses[-1] > 0.0 and math.isfinite(middles[K]):
                ratios[K].append((step, middles[K] / losses[-1]))
            starts[K] = current
    tail = max(1, len(losses) // 10)
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / tail, val_loss=task.evaluate(model),
                chord_by_fifth={str(K): _medians_by_fifth(ratios[K], task.steps) for K in windows},
                windows_measured={str(K): len(ratios[K]) for K in windows})


def step_sharpness(task_name: str, length: str, seed: int, config: str, steps: Optional[int] = None) -> dict:
    """Train ``config`` (a plain FusedSaLSa or an AdamW configuration) on the zoo task and return the
    row of its per-step sharpness ratio ``r_k`` (module docstring); the run is the zoo's."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused", "torch"))
    opt = built.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    ratios, losses = [], []
    for k, batch in enumerate(task.batches):
        before = [p.detach().clone() for p in params]
        forward_rng = torch.get_rng_state()  # the step's forward draws (dropout) replayed at w_{k+1}
        losses.append(_take_step(built, task, model, batch))
        with torch.no_grad():
            predicted = sum(float((p.grad.double() * (b.double() - p.double())).sum())
                            for p, b in zip(params, before) if p.grad is not None)
        after = _loss_elsewhere(task, model, batch, params, rng_state=forward_rng)
        if predicted > 0.0 and math.isfinite(after):
            ratios.append((k + 1, 2.0 * (1.0 - (losses[-1] - after) / predicted)))
    medians = _medians_by_fifth(ratios, task.steps)
    tail = max(1, len(losses) // 10)
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / tail, val_loss=task.evaluate(model),
                sharpness_by_fifth=medians,
                steps_measured=len(ratios))


#: The line scan's multiples of the searched level (NOTES.md section 51): 0 and 2^-3 .. 2^5.
LINE_SCAN_MULTIPLES = (0.0,) + tuple(2.0 ** j for j in range(-3, 6))
#: The upcoming batches whose mean loss the line scan reads at each multiple.
LINE_SCAN_BATCHES = 8


def line_minimum(multiples: Sequence[float], losses: Sequence[float]) -> Dict[str, float]:
    """The multiple of the lowest loss (a non-finite loss counts as infinitely high; ties: the smaller
    multiple), and the vertex of the parabola through it and its two neighbours on the ladder: nan when the
    lowest is at an end or the three points are not convex."""
    clean = [loss if math.isfinite(loss) else math.inf for loss in losses]
    i = min(range(len(clean)), key=lambda j: (clean[j], j))
    vertex = math.nan
    if 0 < i < len(clean) - 1 and all(math.isfinite(clean[j]) for j in (i - 1, i, i + 1)):
        (x0, x1, x2), (y0, y1, y2) = multiples[i - 1:i + 2], clean[i - 1:i + 2]
        # the parabola's second divided difference and the vertex -b / 2a
        a = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
        if a > 0:
            b = (y1 - y0) / (x1 - x0) - a * (x0 + x1)
            vertex = -b / (2 * a)
    return dict(line_min_multiple=multiples[i], line_parabola_multiple=vertex)


def line_scan(task_name: str, length: str, seed: int, config: str = "pretrain_hold",
              multiples: Sequence[float] = LINE_SCAN_MULTIPLES, batches: int = LINE_SCAN_BATCHES,
              steps: Optional[int] = None, at: Optional[float] = None) -> dict:
    """Train ``config`` (a plain FusedSaLSa with a ``WarmupStableDecay`` schedule) on the zoo task and
    return the row of its **line scan** at the freeze (NOTES.md section 51): after the last search step
    ``F`` (the schedule's ``decay_start``), with ``w_F`` the weights before it, ``a_F`` the level it applied
    and ``u = (w_F - w_{F+1}) / a_F``, the mean loss of the ``batches`` batches of steps ``F+1 ..`` at
    ``w_F - q (eta g) u`` for each ``q`` of ``multiples`` (``eta g``: the searched level times the growth
    after step ``F``). With ``at``, the same along step ``s = round(at T)`` instead (NOTES.md section 68).
    Side measurements: the run is the zoo's (bitwise)."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused",))
    opt, schedule = built.optimizer, built.schedule
    if schedule is None or not hasattr(schedule, "decay_start"):
        raise ValueError(f"{config!r} has no WarmupStableDecay schedule: the line scan reads its freeze")
    scan_step = schedule.decay_start if at is None else int(round(at * task.steps))
    where = "the freeze" if at is None else "the scan"
    if scan_step < 1 or scan_step + batches > task.steps:
        raise ValueError(f"{task.steps} steps leave no {batches} batches after {where} at step {scan_step}")
    params = [p for g in opt.param_groups for p in g["params"]]
    levels, backoffs, losses, scan = [], [], [], {}
    for k, batch in enumerate(task.batches):
        step = k + 1
        before = [p.detach().clone() for p in params] if step == scan_step else None
        losses.append(_take_step(built, task, model, batch))
        _record_level(opt, schedule, step, levels, backoffs)
        if step == scan_step:
            unit = opt.search_state.step_size * opt.search_config.growth
            applied = levels[-1]
            update = [(b - p.detach()) / applied for b, p in zip(before, params)]
            ahead = task.batches[step:step + batches]
            scan_losses = [sum(_loss_elsewhere(task, model, upcoming, params,
                                               [b - q * unit * d for b, d in zip(before, update)])
                               for upcoming in ahead) / len(ahead) for q in multiples]
            at_step = (dict(freeze_step=scan_step, level_at_freeze=unit, applied_multiple_at_freeze=applied / unit)
                       if at is None else
                       dict(line_scan_step=scan_step, level_at_scan=unit, applied_multiple_at_scan=applied / unit))
            scan = dict(line_scan_multiples=list(multiples), line_scan_losses=scan_losses, **at_step,
                        **line_minimum(multiples, scan_losses))
    tail = max(1, len(losses) // 10)
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / tail, level_mean=sum(levels) / len(levels), **scan)


#: The multiples (as the preset's peak: 2 is the preset) whose branches the rehearsal runs (NOTES.md section 64).
REHEARSAL_MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)
#: The branch lengths, as fractions of the steps after the freeze.
REHEARSAL_FRACTIONS = {"r8": 1 / 8, "r4": 1 / 4}
#: The batches after a branch whose mean loss it reads.
REHEARSAL_BATCHES = 8


class _Branch:
    """A schedule for a rehearsal branch: ``multiple`` times a linear decay from 1 after step ``start``
    to 0 at step ``start + steps`` (:class:`salsa_fused.step_size.Cooldown`'s shape); it never searches."""

    def __init__(self, start: int, steps: int, multiple: float):
        self.cooldown, self.multiple = Cooldown(start, steps), multiple

    def scale(self, step: int) -> float:
        return self.multiple * self.cooldown.scale(step)

    def searches(self, step: int) -> bool:
        return False

    @property
    def total_steps(self) -> int:
        return self.cooldown.total_steps


def branch_fractions(text: str) -> Dict[str, float]:
    """``"r8=0.125,r4=0.25"`` -> ``{"r8": 0.125, "r4": 0.25}``: keys of letters, digits and underscores, each
    once, and fractions in (0, 1] (1: to the run's end); ValueError naming the first entry that is not."""
    out: Dict[str, float] = {}
    for entry in text.split(","):
        key, sep, value = entry.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not sep or not key.replace("_", "").isalnum() or key in out or not 0.0 < fraction <= 1.0:
            raise ValueError(f"bad branch {entry!r}: give KEY=FRACTION, a new key of letters, digits and "
                             "underscores and a fraction in (0, 1] (1: to the end of the run)")
        out[key] = fraction
    return out


def lowest_multiple(multiples: Sequence[float], losses: Sequence[float]) -> float:
    """The multiple of the lowest loss; a non-finite loss counts as infinitely high, ties go to the smaller."""
    clean = [loss if math.isfinite(loss) else math.inf for loss in losses]
    return multiples[min(range(len(clean)), key=lambda j: (clean[j], j))]


def check_branchable(schedule, config: str) -> None:
    """ValueError unless the branches of :func:`rehearsal` and :func:`switch_during_warmup` model ``config``'s
    schedule: they set its peak to ``q`` and take the top of the run as :func:`switched_top`, which a
    ``decay_from_hold`` schedule does not follow once its hold is set (its peak is then the hold, whatever ``q``)."""
    if getattr(schedule, "decay_from_hold", False):
        raise ValueError(f"{config!r} decays its cooldown from the held scale (decay_from_hold, NOTES.md section 73): "
                         "a branch's peak q would not move its top once the hold is set; these measurements model "
                         "section 25's preset, 'pretrain_hold'")


def switched_top(peak: float, backoff: float, hold: float) -> float:
    """The multiple of the searched level at the top of a run whose schedule's peak became ``peak``, under
    the back-off ``b`` and hold ``h`` it carries (:func:`salsa_fused.step_size.applied_scale`): ``min(peak, h) b``,
    ``peak b`` without a hold (``h = 0``)."""
    return (min(peak, hold) if hold > 0 else peak) * backoff


def rehearsal(task_name: str, length: str, seed: int, config: str = "pretrain_hold",
              multiples: Sequence[float] = REHEARSAL_MULTIPLES, fractions: Dict[str, float] = REHEARSAL_FRACTIONS,
              batches: int = REHEARSAL_BATCHES, steps: Optional[int] = None, at: Optional[float] = None) -> dict:
    """Train ``config`` (a FusedSaLSa with a ``WarmupStableDecay`` schedule) on the zoo task and return the
    row of its **rehearsal** at the freeze (NOTES.md section 64): after step ``F`` (``decay_start``), for each
    branch length ``S = round(f (T - F))`` of ``fractions`` and each ``q`` of ``multiples``, a branch of ``S``
    steps on the batches of steps ``F+1 ..`` that applies ``(q / peak) m_F`` times the frozen level (``m_F``
    the multiple step ``F`` applied, hold and back-off included), decayed linearly to zero, then the mean
    loss of the next ``batches`` batches at its weights. A fraction of 1 runs each branch to the end of the
    run and reads it as the zoo reads a run (``rehearsal_final_losses_<key>``, the mean of its last 10% of
    steps' losses): the run that switched to that multiple at the freeze (NOTES.md section 65). The run's
    state comes back after each branch and the run goes on: its losses are the zoo's (bitwise).

    With ``at`` the branches start after step ``s = round(at T)`` instead (NOTES.md section 67), ``R = T - s``,
    and the branch at ``q`` applies ``min(q, h) b`` times the searched level there (``b`` the back-off and ``h``
    the hold at step ``s``, no hold: ``q b``): the top of the run whose peak switched to ``q`` at ``s``
    (:func:`switch_during_warmup`), had its level stopped moving."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused",))
    opt, schedule = built.optimizer, built.schedule
    if schedule is None or not hasattr(schedule, "decay_start"):
        raise ValueError(f"{config!r} has no WarmupStableDecay schedule: the rehearsal branches at its freeze")
    check_branchable(schedule, config)
    branch_step = schedule.decay_start if at is None else int(round(at * task.steps))
    if not 1 <= branch_step < task.steps:
        raise ValueError(f"a rehearsal at {at!r} of {task.steps} steps leaves no step before or after it")
    rest = task.steps - branch_step
    lengths = {key: int(round(f * rest)) for key, f in fractions.items()}
    tail = max(1, task.steps // 10)
    for key, n in lengths.items():
        if n == rest:
            continue  # to the end of the run: read as the zoo reads a run's end
        if n < 2 or branch_step + n + batches > task.steps:
            raise ValueError(f"{task.steps} steps leave no {key} branch of {n} >= 2 steps and {batches} batches "
                             f"after the {'freeze' if at is None else 'rehearsal'} at step {branch_step}")
    params = [p for g in opt.param_groups for p in g["params"]]
    levels, backoffs, losses, found = [], [], [], {}
    for k, batch in enumerate(task.batches):
        step = k + 1
        losses.append(_take_step(built, task, model, batch))
        _record_level(opt, schedule, step, levels, backoffs)
        if step == branch_step:
            state = opt.search_state
            unit = state.step_size * opt.search_config.growth
            applied_multiple = levels[-1] / unit
            if at is None:
                found.update(freeze_step=branch_step, level_at_freeze=unit, applied_multiple_at_freeze=applied_multiple)
                branch_multiples = [q / schedule.peak * applied_multiple for q in multiples]
            else:
                found.update(rehearsal_step=branch_step, level_at_rehearsal=unit,
                             backoff_at_rehearsal=state.applied_backoff, hold_at_rehearsal=state.scale_hold)
                branch_multiples = [switched_top(q, state.applied_backoff, state.scale_hold) for q in multiples]
            found.update(rehearsal_multiples=list(multiples))
            for key, n in lengths.items():
                read = [_branch_loss(task, model, opt, params, branch_step, n, multiple, batches, tail)
                        for multiple in branch_multiples]
                field = "rehearsal_final_losses" if n == rest else "rehearsal_losses"
                readings = [final if n == rest else after for after, final in read]
                found[f"rehearsal_steps_{key}"] = n
                found[f"{field}_{key}"] = readings
                found[f"rehearsal_min_multiple_{key}"] = lowest_multiple(multiples, readings)
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / tail, level_mean=sum(levels) / len(levels), **found)


def _branch_loss(task, model, opt, params, start: int, steps: int, multiple: float, batches: int,
                 tail: int = 1, branch_schedule=None) -> tuple:
    """One rehearsal branch from after step ``start`` (:func:`rehearsal`): ``steps`` steps under
    :class:`_Branch`, the search's back-off and hold set aside. Returns the mean loss of the next ``batches``
    batches after it (nan for none) and the mean of its last ``tail`` steps' losses (each before its step,
    as the zoo's final train loss); everything the branch moved (weights, buffers, optimizer state,
    schedule, random generator) is put back. With ``branch_schedule`` the branch runs under it instead, the
    search state as it is (section 66's switch of the peak)."""
    weights = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    saved, schedule, rng = copy.deepcopy(opt.state_dict()), opt.schedule, torch.get_rng_state()
    try:
        if branch_schedule is None:
            opt.schedule = _Branch(start, steps, multiple)
            opt._commit(replace(opt.search_state, applied_backoff=1.0, scale_hold=0.0))
        else:
            opt.schedule = branch_schedule
        losses = []
        for batch in task.batches[start:start + steps]:
            opt.zero_grad(set_to_none=True)
            losses.append(float(opt.step(lambda: task.loss(model, batch))))
        ahead = task.batches[start + steps:start + steps + batches]
        mean = sum(_loss_elsewhere(task, model, b, params) for b in ahead) / len(ahead) if ahead else math.nan
        tail_mean = sum(losses[-tail:]) / len(losses[-tail:])
    finally:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
            for b, kept in zip(model.buffers(), buffers):
                b.copy_(kept)
        opt.schedule = schedule
        opt.load_state_dict(saved)
        torch.set_rng_state(rng)
    return mean, tail_mean


def switch_during_warmup(task_name: str, length: str, seed: int, at: float, config: str = "pretrain_hold",
                         multiples: Sequence[float] = REHEARSAL_MULTIPLES, steps: Optional[int] = None) -> dict:
    """Train ``config`` (a FusedSaLSa with a ``WarmupStableDecay`` schedule) on the zoo task and return the row
    of its **switch during the warm-up** (NOTES.md section 66): after step ``s = round(at T)``, for each ``q`` of
    ``multiples``, the rest of the run with the schedule's ``peak`` set to ``q`` (searches, back-off and hold as
    the schedule has them), read as the zoo reads a run (``switch_final_losses``, the mean of its last 10% of
    steps' losses). At ``q`` = the schedule's own peak the branch is the run itself. The run's state comes back
    after each branch and the run goes on: its losses are the zoo's (bitwise)."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused",))
    opt, schedule = built.optimizer, built.schedule
    if schedule is None or not hasattr(schedule, "decay_start"):
        raise ValueError(f"{config!r} has no WarmupStableDecay schedule: the switch changes its peak")
    check_branchable(schedule, config)
    start = int(round(at * task.steps))
    if not 1 <= start < task.steps:
        raise ValueError(f"a switch at {at!r} of {task.steps} steps leaves no step before or after it")
    params = [p for g in opt.param_groups for p in g["params"]]
    levels, backoffs, losses, found = [], [], [], {}
    tail = max(1, task.steps // 10)
    for k, batch in enumerate(task.batches):
        step = k + 1
        losses.append(_take_step(built, task, model, batch))
        _record_level(opt, schedule, step, levels, backoffs)
        if step == start:
            finals = [_branch_loss(task, model, opt, params, start, task.steps - start, 0.0, 0, tail,
                                   branch_schedule=replace(schedule, peak=q))[1] for q in multiples]
            found.update(switch_step=start, switch_multiples=list(multiples), switch_final_losses=finals,
                         switch_min_multiple=lowest_multiple(multiples, finals))
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, final_train_loss=sum(losses[-tail:]) / len(losses[-tail:]),
                level_mean=sum(levels) / len(levels), **found)


#: Where the path readings are taken, as a fraction of the run (NOTES.md section 87: half the warm-up).
PATH_READ_AT = 0.1


def _median(values: Sequence[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else math.nan


def path_readings(task_name: str, length: str, seed: int, config: str = "pretrain_hold", at: float = PATH_READ_AT,
                  steps: Optional[int] = None) -> dict:
    """Train ``config`` (a plain FusedSaLSa) on the zoo task to step ``s = round(at T)`` and return the row of
    three readings of its path there (NOTES.md section 87), ``w_t`` the weights after step ``t``:

    - ``path_efficiency = |w_s - w_0| / sum_t |w_t - w_(t-1)|``, in (0, 1]: 1 on a straight path, about
      ``1 / sqrt(s)`` on a random walk;
    - ``relative_distance = |W_s - W_0| / |W_0|`` over the tensors of 2 or more dimensions: how far the run has
      moved against the weights' own scale;
    - ``grad_norm_growth``: the median gradient norm ``|g_t|`` over steps ``(0.75 s, s]`` over its median over
      steps ``1 .. max(1, round(0.25 s))``.

    The run stops at ``s`` (the readings need nothing after it); up to there it is the zoo's run."""
    task, model, built = _start(task_name, length, seed, config, steps, ("fused",))
    read_step = int(round(at * task.steps))
    if not 1 <= read_step <= task.steps:
        raise ValueError(f"path readings at {at!r} of {task.steps} steps: no step to read at")
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    start = [p.detach().double().clone() for p in params]
    previous = [w.clone() for w in start]
    travelled, grad_norms, losses = 0.0, [], []
    for batch in task.batches[:read_step]:
        losses.append(_take_step(built, task, model, batch))
        with torch.no_grad():
            grad_norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)))
            now = [p.detach().double() for p in params]
            travelled += math.sqrt(sum(float((w - v).pow(2).sum()) for w, v in zip(now, previous)))
            previous = [w.clone() for w in now]
    matrices = [i for i, w in enumerate(start) if w.dim() >= 2]
    moved = math.sqrt(sum(float((w - v).pow(2).sum()) for w, v in zip(previous, start)))
    moved_matrices = math.sqrt(sum(float((previous[i] - start[i]).pow(2).sum()) for i in matrices))
    scale = math.sqrt(sum(float(start[i].pow(2).sum()) for i in matrices))
    early = grad_norms[:max(1, round(0.25 * read_step))]
    late = grad_norms[int(0.75 * read_step):]
    return dict(task=task_name, split=Z.ZOO[task_name].split, length=length, steps=task.steps, config=config,
                seed=seed, read_step=read_step, loss_at_read=losses[-1],
                path_efficiency=moved / travelled if travelled > 0 else math.nan,
                relative_distance=moved_matrices / scale if scale > 0 else math.nan,
                grad_norm_growth=_median(late) / _median(early) if _median(early) > 0 else math.nan)


def best_adamw_rates(rows: Iterable[dict]) -> Dict[tuple, float]:
    """``(task, length) -> lr``: each task-length's best AdamW rate in zoo rows, as the tables compute it
    (:func:`runner.best_adamw_lr`); task-lengths without a grid row are left out."""
    rows = list(rows)
    rates = {key: runner.best_adamw_lr(rows, *key) for key in {(r["task"], r["length"]) for r in rows}}
    return {key: lr for key, lr in rates.items() if lr is not None}


def _families(sharpness: bool) -> tuple:
    return ("fused", "torch") if sharpness else ("fused",)


def check_config(config: str, sharpness: bool, task_name: str, freeze: bool = False) -> None:
    """ValueError naming the problem unless ``config`` builds, on ``task_name``, an optimizer the
    measurement reads (``measure``: a plain FusedSaLSa; ``step_sharpness``: that or a torch optimizer;
    with ``freeze``, the line scan's and the rehearsal's, a FusedSaLSa with a ``WarmupStableDecay``)."""
    try:
        O.known([config])
    except (ValueError, SystemExit) as error:
        raise ValueError(str(error)) from None
    built = _start(task_name, "default", 0, config, 10, _families(sharpness))[2]  # built, not run: its family
    if freeze and not hasattr(built.schedule, "decay_start"):
        raise ValueError(f"{config!r} has no WarmupStableDecay schedule: the line scan and the rehearsal read its "
                         "freeze")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.zoo.signals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, help="comma-separated zoo task names")
    parser.add_argument("--lengths", default="default", help="comma-separated: short, default, long (default: default)")
    parser.add_argument("--seeds", default="0-1", help="e.g. 0-1 or 0,3,5 (default: 0-1)")
    parser.add_argument("--config", default=None,
                        help="the configuration measured (an optimizers.py name; default: pretrain_hold, the "
                             "preset); with --sharpness also adamw_<lr>")
    parser.add_argument("--sharpness", action="store_true",
                        help="measure the step's sharpness ratio of --config (a plain FusedSaLSa or a torch "
                             "optimizer such as adamw_<lr>) instead of the range test and agreement")
    parser.add_argument("--chord", action="store_true",
                        help="measure the chord ratio of --config (a plain FusedSaLSa or a torch optimizer) over "
                             f"windows of {', '.join(map(str, CHORD_WINDOWS))} steps instead of the range test and "
                             "agreement")
    parser.add_argument("--line-scan", action="store_true",
                        help="scan the loss of the upcoming batches along the step at the freeze of --config (NOTES.md "
                             "section 51) instead of the range test and agreement")
    parser.add_argument("--rehearsal", action="store_true",
                        help="run short branches at each multiple, decayed to zero, at the freeze of --config (NOTES.md "
                             "section 64) instead of the range test and agreement")
    parser.add_argument("--path", action="store_true",
                        help="read the path of --config to step F T (--read-at; NOTES.md section 87): its efficiency, its "
                             "distance against the weights' scale, the growth of the gradient's norm")
    parser.add_argument("--read-at", type=float, default=None, metavar="F",
                        help=f"with --path: where the readings are taken, as a fraction of the run (default {PATH_READ_AT:g})")
    parser.add_argument("--switch-at", type=float, default=None, metavar="F",
                        help="with --rehearsal: instead of branches at the freeze, the rest of the run from step F T with "
                             "the schedule's peak at each of --multiples (NOTES.md section 66)")
    parser.add_argument("--rehearse-at", type=float, default=None, metavar="F",
                        help="with --rehearsal: the branches after step F T instead of the freeze, each at the top of the "
                             "run switched to its multiple there (NOTES.md section 67); with --line-scan: the scan "
                             "along step F T (section 68)")
    parser.add_argument("--branches", default=None, metavar="KEY=FRACTION,...",
                        help="with --rehearsal: the branch lengths, as fractions of the steps after the freeze, and the "
                             "keys of their fields (default: " + ",".join(f"{k}={v:g}" for k, v in REHEARSAL_FRACTIONS.items())
                             + ")")
    parser.add_argument("--multiples", default=None, metavar="Q,...",
                        help="with --rehearsal: the multiples (as the preset's peak) of its branches (default: "
                             + ",".join(f"{q:g}" for q in REHEARSAL_MULTIPLES) + ")")
    parser.add_argument("--around-best-adamw", metavar="ROWS", default=None,
                        help="with --sharpness or --chord, instead of --config: AdamW at each task-length's best grid rate "
                             "in these zoo rows (comma-separated files; as the tables compute it) and at 1/3 and 3x it")
    parser.add_argument("--out", required=True,
                        help="JSONL file the rows are appended to (a new file, to rebuild a committed one)")
    args = parser.parse_args(argv)
    if args.sharpness + args.chord + args.line_scan + args.rehearsal + args.path > 1:
        parser.error("--sharpness, --chord, --line-scan, --rehearsal and --path are five measurements: choose one")
    if args.read_at is not None and (not args.path or not 0.0 < args.read_at < 1.0):
        parser.error("--read-at F goes with --path, and F in (0, 1)")
    either = args.sharpness or args.chord
    fractions, multiples = REHEARSAL_FRACTIONS, REHEARSAL_MULTIPLES
    if args.multiples is not None:
        if not args.rehearsal:
            parser.error("--multiples goes with --rehearsal")
        try:
            multiples = tuple(float(q) for q in args.multiples.split(","))
        except ValueError:
            multiples = ()
        if not multiples or not all(0.0 < q < math.inf for q in multiples):
            parser.error(f"bad --multiples {args.multiples!r}: give positive numbers separated by commas")
    if args.switch_at is not None and (not args.rehearsal or args.branches is not None
                                       or not 0.0 < args.switch_at < 1.0):
        parser.error("--switch-at F goes with --rehearsal, without --branches, and F in (0, 1)")
    if args.rehearse_at is not None and (not (args.rehearsal or args.line_scan) or args.switch_at is not None
                                         or not 0.0 < args.rehearse_at < 1.0):
        parser.error("--rehearse-at F goes with --rehearsal or --line-scan, without --switch-at, and F in (0, 1)")
    if args.branches is not None:
        if not args.rehearsal:
            parser.error("--branches goes with --rehearsal")
        try:
            fractions = branch_fractions(args.branches)
        except ValueError as error:
            parser.error(str(error))
    tasks, lengths = args.tasks.split(","), args.lengths.split(",")
    for name in tasks:
        if name not in Z.ZOO:
            parser.error(f"unknown zoo task {name!r}; choose from {sorted(Z.ZOO)}")
    for length in lengths:
        if length not in ("short", "default", "long"):
            parser.error(f"unknown length {length!r}; choose from short, default, long")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as error:
        parser.error(str(error))
    best = None
    if args.around_best_adamw:
        if not either:
            parser.error("--around-best-adamw goes with --sharpness or --chord")
        if args.config is not None:
            parser.error("--around-best-adamw runs AdamW around its best rate: leave out --config")
        paths = args.around_best_adamw.split(",")
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            parser.error(f"--around-best-adamw: no such file {absent}")
        best = best_adamw_rates(runner.read_rows(paths))
        missing = [(n, L) for n in tasks for L in lengths if (n, L) not in best]
        if missing:
            parser.error(f"no AdamW grid rows in {paths} for {missing}")
    else:
        args.config = args.config or "pretrain_hold"
        try:
            check_config(args.config, either, tasks[0], freeze=args.line_scan or args.rehearsal)
        except ValueError as error:
            parser.error(str(error))
    provenance = _provenance()
    with open(args.out, "a") as out:
        for name in tasks:
            for length in lengths:
                configs = [args.config] if best is None else [
                    O.adamw_name(best[(name, length)] * f) for f in (1 / 3, 1.0, 3.0)]
                for seed, config in [(s, c) for s in seeds for c in configs]:
                    if args.path:
                        row = path_readings(name, length, seed, config,
                                            at=PATH_READ_AT if args.read_at is None else args.read_at)
                    elif args.line_scan:
                        row = line_scan(name, length, seed, config, at=args.rehearse_at)
                    elif args.rehearsal:
                        row = (rehearsal(name, length, seed, config, multiples=multiples, fractions=fractions,
                                         at=args.rehearse_at)
                               if args.switch_at is None else
                               switch_during_warmup(name, length, seed, args.switch_at, config, multiples))
                    elif either:
                        row = (step_sharpness if args.sharpness else chord_ratio)(name, length, seed, config)
                        if best is not None:
                            row["best_adamw_lr"] = best[(name, length)]
                    else:
                        row = measure(name, length, seed, config)
                    row.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               **provenance)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    if args.chord:
                        print(f"{name} {length} seed {seed} {config}: final {row['final_train_loss']:.4g}, chord "
                              + "; ".join(f"K={K} {[round(x, 3) for x in v]}" for K, v in row["chord_by_fifth"].items()),
                              file=sys.stderr)
                    elif args.path:
                        print(f"{name} {length} seed {seed} {config}: at step {row['read_step']} path efficiency "
                              f"{row['path_efficiency']:.3g}, relative distance {row['relative_distance']:.3g}, "
                              f"gradient norm growth {row['grad_norm_growth']:.3g}", file=sys.stderr)
                    elif args.line_scan:
                        print(f"{name} {length} seed {seed} {config}: final {row['final_train_loss']:.4g}, line "
                              f"minimum at {row['line_min_multiple']:g}x (parabola {row['line_parabola_multiple']:.3g}x)",
                              file=sys.stderr)
                    elif args.rehearsal:
                        print(f"{name} {length} seed {seed} {config}: final {row['final_train_loss']:.4g}, rehearsal "
                              + ("; ".join(f"{key} lowest at {row[f'rehearsal_min_multiple_{key}']:g}x"
                                           for key in fractions) if args.switch_at is None else
                                 f"switched at step {row['switch_step']}, lowest at {row['switch_min_multiple']:g}x"),
                              file=sys.stderr)
                    elif args.sharpness:
                        print(f"{name} {length} seed {seed} {config}: final {row['final_train_loss']:.4g}, "
                              f"sharpness by fifth {[round(x, 2) for x in row['sharpness_by_fifth']]}",
                              file=sys.stderr)
                    else:
                        print(f"{name} {length} seed {seed}: max l/l_low {row['max_over_low']:.3f}, "
                              f"agreement {[round(x, 3) for x in row['agreement_by_quarter']]} then "
                              f"{row['agreement_after']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
