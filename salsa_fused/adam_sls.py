"""Seed 001's line searches for Adam as search rules: Adam+SLS (``"sls"``) and ALSALS (``"alsals"``).

Both search on every step, start from ``eta_k^0 = eta_{k-1} * 2^(1/b)`` (seed 001, Eq. 2),
backtrack ``eta *= backtrack`` until a plain (unsmoothed) Armijo test holds, and keep the last
trial when ``max_trials`` fail. Adam's moments use the standard bias correction ``1 - beta^k``
(Eq. 3). ``eta`` is the stored level (``SearchState.step_size``); trials move ``lr_g * eta``.

- **Adam+SLS** (section II): trials along ``d = g / (sqrt(v_hat) + eps)`` (Adam with
  ``beta1 = 0``), slope ``q = g . d``; accept when ``f(w - eta*d) <= f(w) - c * eta * q``
  (Eq. 5, ``c = 0.1``). The update moves along ``m_hat / (sqrt(v_hat) + eps)`` by the
  accepted ``eta`` (``beta1 != 0``), so the final move is not the last trial.
- **ALSALS** (section III): trials along ``d = m_hat / (sqrt(v_hat) + eps)``; the gradient norm
  is replaced by the decrease rate ``f_a`` along ``d`` (Eq. 6); ``c_h = c`` if ``f_a > 0`` else
  ``1/c`` (Eq. 8, ``c = 0.6``); accept when ``f(w) - f(w - eta*d) >= c_h * eta * f_a`` (Eq. 9),
  which a negative ``f_a`` (momentum pointing uphill) makes lenient. The accepted trial is the
  update. ``f_a`` is the directional derivative ``g . d`` the slope pass reduces (the limit
  of Eq. 6's finite difference, exact, no extra forward). The paper's probe ``lambda = 5e-8``
  moves most fp32 weights by less than an ulp and no bf16 weight at all, and the loss it
  differences changes by ``~5e-8 * f_a``, a few ulps of the fp32 losses the optimizer reads:
  the literal probe measures rounding (``tests/reference/alsals.py`` keeps it, to compare).

The backtracking factor 0.9 and first step 1.0 are SLS's (Vaswani et al. 2019); seed 001 does
not restate them. Seed 001's introduction also names an exponential moving average on both sides of
the Armijo test, but its methods (Eq. 5, Eq. 9) give no formula for it, and these rules test the
batch's losses as the equations write them (the authors' later code smooths with ``beta = 0.99``).
SaLSa smooths both sides, and ``FusedSaLSa(params, search_direction="momentum")`` runs its test
along ALSALS's direction (without ALSALS's switch of ``c``). The rule objects carry these constants
and read none of FusedSaLSa's search arguments (``c``, ``growth``, ``backtrack``, ``beta3``,
``max_trials``, the interval settings, ``search_direction``): passing one with these rules raises.
``FusedSaLSa(params, search_rule=AdamSLSRule(c=0.2))`` changes a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, FrozenSet

from .backends.base import GRADIENT, MOMENTUM
from .errors import checked_int, checked_real
from .line_search import SearchConfig, SearchState, StepPlan
from .rules import FinalMove, Verdict


class _BacktrackingSearch:
    """One backtracking search from the plan's first trial; subclasses say what a trial must pass."""

    def __init__(self, rule: "_EveryStepRule", plan: StepPlan, loss: float, slope: float):
        self.rule = rule
        self.state = replace(plan.state, steps_since_search=0, num_searches=plan.state.num_searches + 1)
        self.loss = float(loss)
        self.slope = float(slope)
        self.step_size = plan.trial_step_size
        self.last_trial = self.step_size
        self.trials = 0  # trials judged by the Armijo test
        #: Always searches: no guard on the slope (ALSALS's may be <= 0).
        self.active = True

    def observe(self, trial_loss: float) -> Verdict:
        self.state.num_forward_evals += 1
        self.trials += 1
        self.last_trial = self.step_size
        if math.isfinite(trial_loss):
            self.state.last_loss_decrease = self.loss - trial_loss
            if self._sufficient(trial_loss):
                return Verdict.ACCEPT
        # A NaN/inf trial loss fails the test.
        if self.trials >= self.rule.max_trials:
            return Verdict.GIVE_UP  # the last trial is kept
        self.step_size = self.step_size * self.rule.backtrack
        return Verdict.RETRY

    @property
    def exhausted(self) -> bool:
        """Every one of ``max_trials`` trials was judged (a GIVE_UP then means that all failed)."""
        return self.trials >= self.rule.max_trials

    def _sufficient(self, trial_loss: float) -> bool:
        raise NotImplementedError

    def final(self) -> FinalMove:
        return FinalMove(self.last_trial)

    def finish(self) -> SearchState:
        state = self.state
        state.step_size = self.last_trial
        state.last_trials = self.trials
        state.num_backtracks += max(0, self.trials - 1)
        return state


class _SLSSearch(_BacktrackingSearch):
    def _sufficient(self, trial_loss: float) -> bool:
        """Eq. 5: ``f1 <= f0 - c * eta * q``."""
        return trial_loss <= self.loss - self.rule.c * self.step_size * self.slope

    def final(self) -> FinalMove:
        """The accepted level, along ``m_hat / (sqrt(v_hat) + eps)``."""
        return FinalMove(self.last_trial, direction=MOMENTUM)


class _ALSALSSearch(_BacktrackingSearch):
    def __init__(self, rule: "ALSALSRule", plan: StepPlan, loss: float, slope: float):
        super().__init__(rule, plan, loss, slope)
        #: Eq. 6's f_a, evaluated as its limit g . d; Eq. 8's c_h from its sign.
        self.c_h = rule.c if self.slope > 0 else 1 / rule.c

    def _sufficient(self, trial_loss: float) -> bool:
        """Eq. 9: ``f0 - f1 >= c_h * eta * f_a``."""
        return self.loss - trial_loss >= self.c_h * self.step_size * self.slope


@dataclass(frozen=True)
class _EveryStepRule:
    """What both rules share: their constants, a search every step from ``eta * 2^(1/b)``,
    Adam's bias correction; a subclass names its trial direction, its search and its ``c``."""

    c: float
    b: float = 500.0
    backtrack: float = 0.9
    max_trials: int = 100

    adam_bias_correction: ClassVar[bool] = True
    #: FusedSaLSa's search arguments these rules read: none (their constants are the fields above).
    reads: ClassVar[FrozenSet[str]] = frozenset()
    trial_direction: ClassVar[str]
    search: ClassVar[type]

    def __post_init__(self):
        for name, upper in (("c", 1.0), ("b", None), ("backtrack", 1.0)):  # a numpy float, say, kept as a float
            object.__setattr__(self, name, checked_real(name, getattr(self, name), 0.0, upper))
        object.__setattr__(self, "max_trials", checked_int("max_trials", self.max_trials, 1))  # a numpy integer, say
        if self.b <= 1 / 128:
            raise ValueError(f"b={self.b!r}: each step's first trial grows the level by 2^(1/b), which float32 holds "
                             f"only for b > 1/128 (the paper's b is 500: a growth of 1.0014)")

    def direction(self, configured: str) -> str:
        return self.trial_direction

    def plan(self, state: SearchState, config: SearchConfig) -> StepPlan:
        new = replace(state, step=state.step + 1, steps_since_search=state.steps_since_search + 1,
                      search_interval=1.0)
        return StepPlan(state=new, is_search=True, trial_step_size=state.step_size * 2 ** (1 / self.b))

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, slope: float) -> _BacktrackingSearch:
        return self.search(self, plan, loss, slope)


@dataclass(frozen=True)
class AdamSLSRule(_EveryStepRule):
    """Adam+SLS (seed 001, section II): Armijo along the momentum-free direction, move along ``m_hat``."""

    keeps_no_state = True  # nothing in SearchState.rule_state (rules.check_rule_state)

    c: float = 0.1
    trial_direction: ClassVar[str] = GRADIENT
    search: ClassVar[type] = _SLSSearch


@dataclass(frozen=True)
class ALSALSRule(_EveryStepRule):
    """ALSALS (seed 001, section III): Armijo along Adam's direction with momentum, the decrease
    rate ``f_a`` in place of the gradient norm, ``c_h`` from its sign."""

    keeps_no_state = True  # nothing in SearchState.rule_state (rules.check_rule_state)

    c: float = 0.6
    trial_direction: ClassVar[str] = MOMENTUM
    search: ClassVar[type] = _ALSALSSearch


ADAM_SLS = AdamSLSRule()
ALSALS = ALSALSRule()
