"""Search rules the quality ablations tried and rejected (NOTES.md sections 2 and 3).

They left the package (``salsa_fused.rules``) for losing to the published Armijo test; they stay
here, runnable by name in ``optimizers.py``, so the NOTES' numbers can be re-measured. Each is a
:class:`salsa_fused.rules.SearchRule`: pass an instance as ``FusedSaLSa(..., search_rule=rule)``.

Model along the search direction ``d`` (``q = g.d`` the step's slope, ``eta`` the trial step):

    f(w0 - eta*d) ~= f0 - eta*q + eta^2 * kappa / 2,   kappa = d^T H d.

One trial gives the curvature estimate ``kappa_hat = 2*(f1 - f0 + eta*q) / eta^2``. The
published test (c = 0.5) accepts at most the greedy step ``q/kappa``; training with a fixed
rate sits near the edge of stability ``2*q/kappa`` and above it, and the greedy search
feeds back (the step falls, sharpness rises to meet it, the step falls again).
:class:`EdgeRule` aims at ``sigma * q/kappa`` from averaged estimates instead;
:class:`NonMonotoneArmijo` measures the decrease from a reference ``max(f0, recent f0)``;
:class:`RatioArmijo` smooths the Armijo ratio ``(f0 - f1) / (eta*q)`` instead of its two terms;
:class:`ClimbingArmijo` keeps the published test and lets the first trial climb faster while the
batch's own test passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from salsa_fused.line_search import (MIN_SLOPE_AVG, ArmijoSearch, SearchConfig,
                                     SearchState, StepPlan, _f32, _fp32, record_search)
from salsa_fused.line_search import plan_step as salsa_plan_step
from salsa_fused.rules import FinalMove, Verdict


def curvature_estimate(loss: float, trial_loss: float, slope: float, step_size: float) -> float:
    """``kappa_hat = 2*(f1 - f0 + eta*q) / eta^2``: the quadratic through f0, its slope -q and f1."""
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    return 2.0 * (trial_loss - loss + step_size * slope) / (step_size * step_size)


def sharpness_ratio(loss: float, trial_loss: float, slope: float, step_size: float) -> float:
    """``eta * kappa_hat / q``: 1 at the greedy step, 2 at the edge of stability (q > 0)."""
    if not slope > 0:
        return math.nan
    return step_size * curvature_estimate(loss, trial_loss, slope, step_size) / slope


@dataclass(frozen=True)
class EdgeRule:
    """Aim the level at ``sigma`` times the greedy step ``q/kappa`` (sigma = 2: the edge).

    Per search, from the trial at the current level ``eta`` (raw slope ``q``, losses f0, f1):

        kappa_hat = 2*(f1 - f0 + eta*q) / eta^2
        Q = avg(q),  K = avg(max(kappa_hat, 0))       (EMAs with weight ``smoothing``, bias-corrected)
        eta_next = clip(sigma * Q / K, eta / max_change, eta * max_change)   (eta * max_change if K == 0)

    The trial is the update unless it is a blow-up: the loss rose by more than ``blowup`` times
    ``h``, the smoothed decrease of kept trials (0 before the first: any rise), or ``f1`` is
    non-finite; then
    ``eta *= backtrack`` and the trial is repeated. A step with ``q <= 0`` (possible along the
    momentum direction) carries no curvature information: the trial is kept (unless a blow-up)
    and the level with it.

    The stored ``eta`` is the next level divided by the growth factor, so the optimizer's plain
    steps (``eta * growth``) and next trial apply exactly the level. The averages live in
    ``SearchState.rule_state`` (so in the optimizer's ``state_dict``).
    """

    #: Its searches keep ``step_size_fast_peak`` as ArmijoSearch does (a schedule's ``freeze_below``).
    tracks_level_peak: ClassVar[bool] = True

    sigma: float = 2.0
    smoothing: float = 0.9
    max_change: float = 1.5
    blowup: float = 1.0
    backtrack: float = 0.5

    def __post_init__(self):
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if not (math.isfinite(self.max_change) and self.max_change > 1.0):
            raise ValueError(f"max_change must be a finite number > 1, got {self.max_change}")
        if not (math.isfinite(self.blowup) and self.blowup > 0):
            raise ValueError(f"blowup must be a finite number > 0, got {self.blowup}")
        if not 0.0 < self.backtrack < 1.0:
            raise ValueError(f"backtrack must lie in (0, 1), got {self.backtrack}")

    @staticmethod
    def direction(configured: str) -> str:
        return configured

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, grad_norm: float) -> "EdgeSearch":
        return EdgeSearch(self, plan, config, loss, grad_norm)


class EdgeSearch:
    """One search of :class:`EdgeRule` (ArmijoSearch's protocol)."""

    def __init__(self, rule: EdgeRule, plan: StepPlan, config: SearchConfig, loss: float, grad_norm: float):
        self.rule = rule
        self.config = config
        self.state = replace(plan.state, steps_since_search=0, num_searches=plan.state.num_searches + 1,
                             rule_state=dict(plan.state.rule_state))
        self.state.slope_avg = self.state.slope_avg * config.beta3 + grad_norm * (1 - config.beta3)
        self.loss = float(loss)
        self.slope = float(grad_norm)
        self.step_size = plan.trial_step_size
        self.next_level = None
        self.last_trial = self.step_size
        self.trials = 0
        self.active = self.loss != 0 and abs(self.slope) >= MIN_SLOPE_AVG
        self.last_ratio = math.nan  # eta * kappa_hat / q of the last trial

    def observe(self, trial_loss: float) -> Verdict:
        """Record the loss at ``w0 - step_size * d``: keep it, or backtrack (give up at ``max_trials``)."""
        self.trials += 1
        self.last_trial = self.step_size
        self.state.num_forward_evals += 1
        rule, eta, q = self.rule, self.step_size, self.slope
        self.state.last_loss_decrease = self.loss - trial_loss
        # A rise beyond ``blowup`` typical decreases (h, the smoothed decrease of kept trials; 0 at
        # first) is a blow-up. Not ``eta*q``: far past the edge the loss saturates and
        # kappa_hat ~ 2q/eta reads as "at the edge" at any large eta.
        allowed = rule.blowup * max(self.state.loss_decrease_avg, 0.0)
        blown_up = not math.isfinite(trial_loss) or trial_loss - self.loss > allowed
        if q > 0 and math.isfinite(trial_loss):
            kappa = curvature_estimate(self.loss, trial_loss, q, eta)
            self.last_ratio = eta * kappa / q
            self._average(q, max(kappa, 0.0))
        if blown_up:
            self.step_size = eta * rule.backtrack
            self.next_level = None
            return Verdict.GIVE_UP if self.exhausted else Verdict.RETRY
        self.next_level = self._proposal(eta) if q > 0 else eta
        if q > 0:
            decrease = self.loss - trial_loss
            self.state.loss_decrease_avg = (self.state.loss_decrease_avg * self.config.beta3
                                            + decrease * (1 - self.config.beta3))
        return Verdict.ACCEPT

    def final(self) -> FinalMove:
        """The kept trial; without trials ``eta * growth`` along ``m_hat`` (the guard, as SaLSa)."""
        if not self.active:
            return FinalMove(self.step_size, direction="momentum")
        return FinalMove(self.last_trial)

    def _average(self, slope: float, curvature: float) -> None:
        extra, beta = self.state.rule_state, self.rule.smoothing
        extra["slope_avg"] = extra.get("slope_avg", 0.0) * beta + slope * (1 - beta)
        extra["curvature_avg"] = extra.get("curvature_avg", 0.0) * beta + curvature * (1 - beta)
        extra["count"] = extra.get("count", 0) + 1

    def _proposal(self, eta: float) -> float:
        """``clip(sigma * Q / K, eta / max_change, eta * max_change)``; grow when ``K == 0``."""
        extra, rule = self.state.rule_state, self.rule
        curvature = extra.get("curvature_avg", 0.0)
        if extra.get("count", 0) == 0:
            return eta
        if curvature <= 0:
            return eta * rule.max_change
        target = rule.sigma * extra["slope_avg"] / curvature  # bias corrections cancel in the ratio
        return min(max(target, eta / rule.max_change), eta * rule.max_change)

    @property
    def exhausted(self) -> bool:
        return self.trials >= self.config.max_trials

    def finish(self) -> SearchState:
        level = self.next_level if self.next_level is not None else self.step_size
        return record_search(self.state, level / self.config.growth, self.trials)


@dataclass(frozen=True)
class NonMonotoneArmijo:
    """The smoothed Armijo test against a reference loss ``f_ref >= f0`` (non-monotone, PoNoS-like).

    Identical to :class:`~salsa_fused.line_search.ArmijoSearch` except that the decrease of a
    trial is measured from a reference instead of the current batch's loss ``f0``:

        f_ref = max(f0, R),   accept eta when  beta3*h + (1-beta3)*(f_ref - f1) >= c * eta * s

    (or ``f1 == f0``), with ``R`` over the ``f0`` of earlier searches: ``reference="ema"``, their
    bias-corrected average with weight ``smoothing``; ``reference="max"``, the largest of the last
    ``window``. A batch whose ``f0`` is below the recent losses (a lucky draw) then does not cut
    the step. ``R`` (its average and count, or the recent values) lives in
    ``SearchState.rule_state``, so in the optimizer's ``state_dict``; it is updated with ``f0`` when
    the search finishes. An accepted trial sets ``h`` to the left side (``reference_in_average``,
    the default), or to ``beta3*h + (1-beta3)*(f0 - f1)``: then the reference enters only the
    current term of the test and ``h`` stays the plain smoothed decrease.
    """

    #: Its searches keep ``step_size_fast_peak`` as ArmijoSearch does (a schedule's ``freeze_below``).
    tracks_level_peak: ClassVar[bool] = True

    reference: str = "ema"
    smoothing: float = 0.9
    window: int = 10
    reference_in_average: bool = True

    REFERENCES = ("ema", "max")

    def __post_init__(self):
        if self.reference not in self.REFERENCES:
            raise ValueError(f"reference must be one of {self.REFERENCES}, got {self.reference!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    def reference_loss(self, rule_state: dict, loss: float) -> float:
        """``max(f0, R)``; ``f0`` alone before the first search."""
        if self.reference == "ema":
            count = rule_state.get("count", 0)
            if count == 0:
                return loss
            average = rule_state["loss_avg"] / (1.0 - self.smoothing ** count)
            return max(loss, average)
        recent = rule_state.get("recent_losses", [])
        return max([loss, *recent])

    def remember(self, rule_state: dict, loss: float) -> None:
        """Fold ``f0`` of a finished search into ``R`` (finite losses only)."""
        if not math.isfinite(loss):
            return
        if self.reference == "ema":
            rule_state["loss_avg"] = rule_state.get("loss_avg", 0.0) * self.smoothing + loss * (1.0 - self.smoothing)
            rule_state["count"] = rule_state.get("count", 0) + 1
        else:
            rule_state["recent_losses"] = [*rule_state.get("recent_losses", []), loss][-self.window:]

    @staticmethod
    def direction(configured: str) -> str:
        return configured

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, grad_norm: float) -> "NonMonotoneSearch":
        return NonMonotoneSearch(self, plan, config, loss, grad_norm)


class NonMonotoneSearch(ArmijoSearch):
    """One search of :class:`NonMonotoneArmijo` (ArmijoSearch's protocol and fp32 arithmetic)."""

    def __init__(self, rule: NonMonotoneArmijo, plan: StepPlan, config: SearchConfig, loss: float,
                 grad_norm: float):
        super().__init__(plan, config, loss, grad_norm)
        self.rule = rule
        self.state.rule_state = dict(plan.state.rule_state)
        self.reference_loss = _fp32(rule.reference_loss(self.state.rule_state, float(loss)))

    def _tested_decrease(self, decrease, trial_loss: float):
        """``f_ref - f1`` (fp32)."""
        return _f32(self.reference_loss) - _f32(trial_loss)

    def _kept_average(self, smoothed, decrease):
        """The tested left side, or ``beta3*h + (1-beta3)*(f0 - f1)`` without ``reference_in_average``."""
        return smoothed if self.rule.reference_in_average else self._smoothed(decrease)

    def finish(self) -> SearchState:
        state = super().finish()
        self.rule.remember(state.rule_state, self.loss)
        return state


@dataclass(frozen=True)
class RatioArmijo:
    """The smoothed Armijo test on the ratio, each search weighing the same (NOTES.md section 41).

    The published test smooths the decrease and the slope apart (``h``, ``s``), so a search on a
    batch with a large loss and slope weighs more, and early searches (large losses) weigh long
    after. This one smooths their ratio, with ``q`` the step's raw slope:

        r = (f0 - f1) / (eta * q),   accept eta when  beta3 * R + (1 - beta3) * r >= c   (or f1 == f0)

    and keeps ``R <- beta3 * R + (1 - beta3) * r`` on acceptance (``R`` starts at ``c``; it lives in
    ``SearchState.rule_state``). A step with ``q <= 0`` is tested as published. Since ``r = 1 -
    eta*kappa/(2q)`` on a quadratic, ``R`` near ``c = 0.5`` is the greedy step on average over searches.
    """

    #: Its searches keep ``step_size_fast_peak`` as ArmijoSearch does (a schedule's ``freeze_below``).
    tracks_level_peak: ClassVar[bool] = True

    @staticmethod
    def direction(configured: str) -> str:
        return configured

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, grad_norm: float) -> "RatioSearch":
        return RatioSearch(plan, config, loss, grad_norm)


class RatioSearch(ArmijoSearch):
    """One search of :class:`RatioArmijo` (ArmijoSearch's protocol)."""

    def __init__(self, plan: StepPlan, config: SearchConfig, loss: float, grad_norm: float):
        super().__init__(plan, config, loss, grad_norm)
        self.state.rule_state = dict(plan.state.rule_state)
        self.raw_slope = float(grad_norm)

    def _accepts(self, tested, decrease, trial_loss: float) -> bool:
        """``beta3*R + (1-beta3)*r >= c`` with ``r = (f0 - f1) / (eta*q)``; ``R`` is kept on a pass.
        A step with ``q <= 0`` is tested as published."""
        if not self.raw_slope > 0:
            return super()._accepts(tested, decrease, trial_loss)
        beta3, c = self.config.beta3, self.config.c
        ratio = (float(self.loss) - float(trial_loss)) / (self.step_size * self.raw_slope)
        smoothed = beta3 * self.state.rule_state.get("ratio_avg", c) + (1 - beta3) * ratio
        if smoothed >= c:
            self.state.rule_state["ratio_avg"] = smoothed
            return True
        return False


@dataclass(frozen=True)
class ClimbingArmijo:
    """The published smoothed test, with a first trial that climbs faster while each search's own
    batch passes the unsmoothed test too (NOTES.md section 42).

    SaLSa's first trial is ``eta * growth``, so the level rises by at most ``growth`` (1.1) per search,
    and a short search phase can end while it is still climbing (section 35). Here a search's first
    trial is ``eta * G``, with ``G`` in ``SearchState.rule_state`` (``growth`` at first):

        G <- min(G^2, max_climb)   after a search whose first trial passed the smoothed test and the
                                   batch's own  f0 - f1 >= c * eta * q  (q > 0, the step's raw slope)
        G <- growth                after any other search.

    A first trial above ``eta * growth`` that fails the batch's test (or is not finite) is counted and
    the search goes on from ``eta * growth`` with the published test alone; one that passes it but not
    the smoothed test backtracks as published (``eta *= backtrack``); ``f1 == f0`` accepts, as published. Plain steps apply ``eta * growth``,
    as published. Where the batch's test keeps passing the level doubles per search; once it
    fails, the search is SaLSa's again.
    """

    #: Its searches keep ``step_size_fast_peak`` as ArmijoSearch does (a schedule's ``freeze_below``).
    tracks_level_peak: ClassVar[bool] = True

    max_climb: float = 2.0

    def __post_init__(self):
        if not (math.isfinite(self.max_climb) and self.max_climb >= 1.0):
            raise ValueError(f"max_climb must be a finite number >= 1, got {self.max_climb}")

    @staticmethod
    def direction(configured: str) -> str:
        return configured

    def climb(self, rule_state: dict, config: SearchConfig) -> float:
        """``G``: the first trial's factor on the level at the next search (never below ``growth``)."""
        return min(max(rule_state.get("climb", config.growth), config.growth), max(self.max_climb, config.growth))

    def plan(self, state: SearchState, config: SearchConfig) -> StepPlan:
        plan = salsa_plan_step(state, config)
        if not plan.is_search:
            return plan
        return replace(plan, trial_step_size=state.step_size * self.climb(state.rule_state, config))

    @staticmethod
    def without_search(state: SearchState, config: SearchConfig) -> StepPlan:
        return replace(salsa_plan_step(state, config), is_search=False)

    @staticmethod
    def check_state(rule_state: dict) -> None:
        climb = rule_state.get("climb", 1.0)
        if isinstance(climb, bool) or not (isinstance(climb, (int, float)) and math.isfinite(climb) and climb >= 1):
            raise ValueError(f"rule_state climb must be a finite number >= 1, got {climb!r}")

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, slope: float) -> "ClimbingSearch":
        return ClimbingSearch(self, plan, config, loss, slope)


class ClimbingSearch(ArmijoSearch):
    """One search of :class:`ClimbingArmijo` (ArmijoSearch's protocol and fp32 arithmetic)."""

    def __init__(self, rule: ClimbingArmijo, plan: StepPlan, config: SearchConfig, loss: float, slope: float):
        super().__init__(plan, config, loss, slope)
        self.rule = rule
        self.state.rule_state = dict(plan.state.rule_state)
        self.raw_slope = float(slope)
        self.published_trial = plan.state.step_size * config.growth
        self.climbing = self.step_size > self.published_trial
        self.climb_failed = False  # this trial climbed and failed the batch's test

    def _batch_passes(self, trial_loss: float) -> bool:
        """The unsmoothed test on this batch: ``f0 - f1 >= c * eta * q`` with ``q > 0``."""
        return (self.raw_slope > 0 and math.isfinite(trial_loss)
                and self.loss - trial_loss >= self.config.c * self.step_size * self.raw_slope)

    def _accepts(self, tested, decrease, trial_loss: float) -> bool:
        """The published test, unless this is a climbing first trial that failed the batch's test."""
        return not self.climb_failed and super()._accepts(tested, decrease, trial_loss)

    def _backtrack(self) -> Verdict:
        """``eta *= backtrack``; after a climbing first trial that failed the batch's test (or was not
        finite), SaLSa's first trial ``eta * growth`` instead."""
        if not self.climb_failed:
            return super()._backtrack()
        self.climb_failed = False
        self.state.rule_state["climb"] = self.config.growth
        self.step_size = self.published_trial
        return Verdict.GIVE_UP if self.exhausted else Verdict.RETRY

    def observe(self, trial_loss: float) -> Verdict:
        """ArmijoSearch's trial; when the search ends, ``G`` squares if its first trial passed both tests."""
        first = self.trials == 0
        passes = self._batch_passes(trial_loss)
        self.climb_failed = first and self.climbing and not passes
        verdict = super().observe(trial_loss)
        if verdict is not Verdict.RETRY:
            kept = first and passes and verdict is Verdict.ACCEPT
            climb = self.rule.climb(self.state.rule_state, self.config)
            self.state.rule_state["climb"] = min(climb * climb, self.rule.max_climb) if kept else self.config.growth
        return verdict
