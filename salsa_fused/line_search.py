"""SaLSa's host-side logic: the smoothed Armijo test and the adaptive search interval.

Pure Python on scalars: no tensors, no devices. The optimizer reads the losses and
the preconditioned gradient norm from the device (one small read per trial) and
asks this module what to do next. The specification (SPEC section 1, transcribed by the
tests' tests/spec.py) pins every formula; the decision arithmetic is fp32 where the
published 0.1.0 makes it in fp32 (``h``, ``s``, the Armijo comparison) and float64 where it
uses Python floats (the interval logic).

Notation: ``k`` step counter, ``eta`` the level (``SearchState.step_size``), ``h`` smoothed loss
decrease, ``s`` smoothed slope ``q = g.d``, ``t`` steps since the last
search, ``L`` the search interval.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import as_float, caller_stacklevel, checked_int
from .rules import SEARCH_ARGUMENTS, FinalMove, Verdict


class _f32(float):
    """A float32 scalar: its value, the other operand and every ``+ - *`` result rounded to float32
    (to nearest, overflow to inf), as ``numpy.float32``'s arithmetic (numpy 2's rules for a Python
    float operand), without numpy; the search needs no other operation. A float32 sum, difference or
    product computed in float64 and rounded once more is the correctly rounded float32 result
    (53 >= 2 x 24 + 2)."""

    __slots__ = ()

    def __new__(cls, value=0.0):
        return float.__new__(cls, ctypes.c_float(float(value)).value)

    def _other(self, other) -> float:
        return float(_f32(other))

    def __add__(self, other):
        return _f32(float(self) + self._other(other))

    def __radd__(self, other):
        return _f32(self._other(other) + float(self))

    def __sub__(self, other):
        return _f32(float(self) - self._other(other))

    def __rsub__(self, other):
        return _f32(self._other(other) - float(self))

    def __mul__(self, other):
        return _f32(float(self) * self._other(other))

    def __rmul__(self, other):
        return _f32(self._other(other) * float(self))


#: The largest float32: every level, trial and applied step goes to the passes in float32.
FLOAT32_MAX = float(_f32(3.4028234663852886e38))


def fits_float32(value: float) -> bool:
    """A finite ``value`` whose magnitude float32 holds (a step size the passes take in float32)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def is_step_size(value) -> bool:
    """A finite real number >= 0, not a bool: what a search rule may name as a trial or a move."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0

#: The smallest normal float32: a level below it is 0 or subnormal in the passes, and moves nothing.
FLOAT32_TINY = 1.1754943508222875e-38
#: float32's relative spacing (2^-23): a float32 value's resolution is about this times its size.
FLOAT32_EPS = 2.0 ** -23

#: ``s`` below this skips the search (0.1.0's guard, compared in fp32).
MIN_SLOPE_AVG = 1e-8
#: Searches in a row whose guard failed, each growing the level untested, after which a warning says so: the
#: level is then ``growth ** 50`` (117 at 1.1) times the last tested one.
UNTESTED_SEARCHES_WARNED = 50
#: Initial value of both step-size averages (no bias correction, as published).
INITIAL_STEP_SIZE_AVERAGE = 1e-8
#: Smoothing of the fast and slow step-size averages that set the interval.
FAST_SMOOTHING = 0.9
SLOW_SMOOTHING = 0.99


def _is_bool(value) -> bool:
    """True or False, also as a numpy bool scalar (read from a config file, say)."""
    return isinstance(value, bool) or (getattr(getattr(value, "dtype", None), "kind", None) == "b"
                                       and getattr(value, "shape", None) == ())


def _fp32(x: float) -> float:
    return float(_f32(x))


@dataclass(frozen=True)
class SearchConfig:
    """Constants of the search (one search over all param groups)."""

    c: float = 0.5
    beta3: float = 0.9
    growth: float = 1.1
    backtrack: float = 0.8
    max_trials: int = 100
    max_search_interval: int = 10
    always_search_steps: int = 9
    adaptive_interval: bool = True

    def validate(self) -> None:
        for name in ("c", "beta3", "growth", "backtrack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, as_float(name, value))  # a numpy scalar would reach the state and checkpoints
        for name, minimum in (("max_trials", 1), ("max_search_interval", 1), ("always_search_steps", 0)):
            object.__setattr__(self, name, checked_int(name, getattr(self, name), minimum))  # a numpy integer, say
        if not _is_bool(self.adaptive_interval):
            raise ValueError(f"adaptive_interval must be True or False, got {self.adaptive_interval!r}")
        if not 0.0 < self.c < 1.0:
            raise ValueError(f"c must lie in (0, 1), got {self.c}")
        if not 0.0 <= self.beta3 < 1.0:
            raise ValueError(f"beta3 must lie in [0, 1), got {self.beta3}")
        if not (math.isfinite(self.growth) and self.growth >= 1.0):
            raise ValueError(f"growth must be a finite number >= 1, got {self.growth}")
        if not 0.0 < self.backtrack < 1.0:
            raise ValueError(f"backtrack must lie in (0, 1), got {self.backtrack}")


#: Search-state keys of earlier checkpoints -> their names now (q is a slope: it can be negative).
RENAMED_KEYS = {"grad_norm_avg": "slope_avg"}


@dataclass
class SearchState:
    """Everything the search carries from step to step; lives in ``state_dict``."""

    step: int = 0  # k
    step_size: float = 1.0  # eta
    loss_decrease_avg: float = 0.0  # h (an fp32 value)
    slope_avg: float = 0.0  # s: the smoothed slope q (an fp32 value)
    step_size_fast: float = INITIAL_STEP_SIZE_AVERAGE
    step_size_slow: float = INITIAL_STEP_SIZE_AVERAGE
    #: The largest ``step_size_fast`` after any search so far (a level frozen far below it has collapsed).
    step_size_fast_peak: float = 0.0
    #: The step at which a schedule's ``freeze_below`` froze a collapsing level early (0: it has not).
    frozen_at: int = 0
    #: The loss ``f0`` the last single-batch search read (averaged over ranks); 0 before any (a LABPAL
    #: fit does not write it).
    last_search_loss: float = 0.0
    #: A schedule's ``backoff_on_loss_rise``: the smoothed search loss ``l``, its lowest value ``l_low``
    #: (0: none yet) and the multiplier ``b`` on the applied step (1 until the loss turns).
    search_loss_avg: float = 0.0
    search_loss_avg_low: float = 0.0
    applied_backoff: float = 1.0
    #: A schedule's ``hold_scale_on_loss_rise``: the schedule's scale at the first back-off, above which
    #: its scale no longer rises (0: no hold).
    scale_hold: float = 0.0
    steps_since_search: int = 100  # t
    search_interval: float = 1.0  # L of the last step
    num_forward_evals: int = 0
    num_backward_evals: int = 0
    num_searches: int = 0
    num_backtracks: int = 0
    num_skipped_steps: int = 0
    num_nonfinite_elements: int = 0  # plain-step elements left unmoved: NaN/inf gradient, or a 16-bit overflow
    last_trials: int = 0
    last_loss_decrease: float = 0.0
    #: Searches in a row whose guard failed (a loss of exactly 0, or ``s`` under ``MIN_SLOPE_AVG``): the level
    #: grew by ``growth`` at each, untested (0.1.0's rule).
    untested_searches: int = 0
    #: Scalars of a rule other than ArmijoSearch (salsa_fused.rules); empty for ArmijoSearch.
    rule_state: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError on values no run can reach (a corrupt or hand-edited checkpoint). numpy scalars (a
        checkpoint built by other tools, a rule's arithmetic) become Python's ints and floats first: they were
        refused as "must be an integer, got np.int64(3)"."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
                continue
            setattr(self, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))
        for name in ("step", "frozen_at", "steps_since_search", "num_forward_evals", "num_backward_evals",
                     "num_searches", "num_backtracks", "num_skipped_steps", "num_nonfinite_elements",
                     "last_trials", "untested_searches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"search state {name} must be an integer >= 0, got {value!r}")
        for name in ("step_size", "step_size_fast", "step_size_slow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                               and 0 < value <= FLOAT32_MAX):
                raise ValueError(f"search state {name} must be a finite number > 0 that float32 holds (at most "
                                 f"{FLOAT32_MAX:.4g}), got {value!r}")
        for name in ("loss_decrease_avg", "slope_avg"):  # h and s are kept in float32: beyond it they are inf
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and abs(value) <= FLOAT32_MAX):
                raise ValueError(f"search state {name} must be a finite number that float32 holds (at most "
                                 f"{FLOAT32_MAX:.4g} in magnitude), got {value!r}")
        for name in ("last_search_loss", "last_loss_decrease"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"search state {name} must be a finite number, got {value!r}")
        low, high = sorted((self.step_size_fast, self.step_size_slow))
        if not math.isfinite(high / low):  # plan_step's r: its L would be 0 at every step, each one refused
            raise ValueError(f"search state step_size_fast={self.step_size_fast!r} and step_size_slow="
                             f"{self.step_size_slow!r} are too far apart for their ratio to be a number: no run "
                             "averages its levels so")
        interval = self.search_interval  # L = min(L_max, 1 / (r - 1 + 1e-8)) > 0 at every step
        if isinstance(interval, bool) or not (isinstance(interval, (int, float)) and math.isfinite(interval)
                                              and interval > 0):
            raise ValueError(f"search state search_interval must be a finite number > 0, got {interval!r}")
        if not isinstance(self.rule_state, dict):
            raise ValueError(f"search state rule_state must be a dict, got {type(self.rule_state).__name__}")
        for name in ("search_loss_avg", "search_loss_avg_low", "scale_hold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"search state {name} must be a finite number >= 0, got {value!r}")
        backoff = self.applied_backoff
        if isinstance(backoff, bool) or not (isinstance(backoff, (int, float)) and 0 < backoff <= 1):
            raise ValueError(f"search state applied_backoff must be a number in (0, 1], got {backoff!r}")
        if self.scale_hold > 0 and not backoff < 1:
            raise ValueError(f"search state scale_hold={self.scale_hold!r} is kept at a back-off, but its "
                             f"applied_backoff is {backoff!r} (no back-off yet)")
        if self.frozen_at > self.step:
            raise ValueError(f"search state frozen_at={self.frozen_at} is after its step {self.step}")
        peak = self.step_size_fast_peak
        if isinstance(peak, bool) or not (isinstance(peak, (int, float)) and 0 <= peak <= FLOAT32_MAX):
            raise ValueError(f"search state step_size_fast_peak must be a finite number >= 0 that float32 holds (at "
                             f"most {FLOAT32_MAX:.4g}), got {peak!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "SearchState":
        values = {RENAMED_KEYS.get(k, k): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown search state keys {sorted(unknown)}")
        return cls(**values)


def copy_with(state: SearchState, **changes) -> SearchState:
    """``dataclasses.replace(state, **changes)``: for a ``SearchState`` itself (no ``__post_init__``, no
    slots) a copy of its ``__dict__``, the same shallow copy at a third of the host time (``replace``
    passes each of its fields through ``__init__``; every step plans on such a copy)."""
    if type(state) is not SearchState:
        return replace(state, **changes)
    new = object.__new__(SearchState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class StepPlan:
    """What one step will do, decided before any forward pass."""

    state: SearchState  # the state after the step's counters advance
    is_search: bool
    trial_step_size: float  # the first trial: eta * growth


def plan_step(state: SearchState, config: SearchConfig) -> StepPlan:
    """Advance the counters (on a copy) and decide whether this step searches.

    ``r = eta_fast / eta_slow`` (inverted below 1), ``L = min(L_max, 1 / (r - 1 + 1e-8))``;
    a search runs when the interval is off, ``k <= always_search_steps`` or ``t >= L``.
    """
    rate = state.step_size_fast / state.step_size_slow
    if rate < 1:
        rate = 1 / rate
    interval = min(config.max_search_interval, 1 / ((rate - 1) + 1e-8))
    new = copy_with(state, step=state.step + 1, steps_since_search=state.steps_since_search + 1,
                    search_interval=interval)
    is_search = (not config.adaptive_interval or new.step < config.always_search_steps + 1
                 or new.steps_since_search >= interval)
    return StepPlan(state=new, is_search=is_search, trial_step_size=state.step_size * config.growth)


class ArmijoSearch:
    """One smoothed Armijo search (SPEC section 1, step 6), driven by trial losses: the ``"salsa"``
    rule of :mod:`salsa_fused.rules` (the class is the rule; an instance is one search).

    ``s = beta3*s + (1-beta3)*q``;  first trial ``eta * growth``; accept a trial ``t`` when
    ``beta3*h + (1-beta3)*(f0 - f1) >= c * t * s`` or ``f0 == f1``; else ``t *= backtrack``,
    giving up after ``max_trials`` (the last trial is kept, the level stored is backtracked once
    more, as 0.1.0 does). The final move is the last trial; with the guard failed (zero loss or
    ``s < 1e-8``) there is no trial and the step moves ``eta * growth`` along ``m_hat``.
    """

    #: Every search argument of FusedSaLSa configures this rule.
    reads = frozenset(SEARCH_ARGUMENTS)
    #: No scalars of its own in ``SearchState.rule_state`` (:func:`salsa_fused.rules.check_rule_state`).
    keeps_no_state = True
    #: Its ``finish`` keeps ``step_size_fast_peak``, which a schedule's ``freeze_below`` reads.
    tracks_level_peak = True
    #: A search whose guard fails (zero loss, vanishing slope) still sets the level to ``eta * growth``: the
    #: warning when every trial fails names that cause for this rule.
    grows_untested = True

    @staticmethod
    def direction(configured: str) -> str:
        """The optimizer's ``search_direction`` (0.1.0: gradient, or momentum with ``use_mv``)."""
        return configured

    def __init__(self, plan: StepPlan, config: SearchConfig, loss: float, slope: float):
        self.config = config
        self.state = replace(plan.state, steps_since_search=0, num_searches=plan.state.num_searches + 1)
        beta3 = _f32(config.beta3)
        self.state.slope_avg = float(_f32(self.state.slope_avg) * beta3
                                         + _f32(slope) * _f32(1 - config.beta3))
        self.loss = _fp32(loss)
        self.step_size = plan.trial_step_size
        self.last_trial = self.step_size  # where the weights are after the last observed trial
        self.trials = 0
        #: False when 0.1.0's guard fails (zero loss or tiny slope): one move along m_hat, no trials.
        self.active = bool(self.loss != 0 and _f32(self.state.slope_avg) >= _f32(MIN_SLOPE_AVG))

    def observe(self, trial_loss: float) -> Verdict:
        """Record the loss at ``w0 - step_size * d``: accept, or backtrack (give up at ``max_trials``)."""
        self.trials += 1
        self.state.num_forward_evals += 1
        self.last_trial = self.step_size
        decrease = _f32(self.loss) - _f32(trial_loss)
        tested = self._tested_decrease(decrease, trial_loss)
        if not math.isfinite(tested):
            # A NaN/inf trial loss is a failed trial (even -inf, which would pass the test):
            # backtrack and record nothing non-finite.
            return self._backtrack()
        self.state.last_loss_decrease = float(decrease)
        if decrease == 0 or self._accepts(tested, decrease, trial_loss):
            return Verdict.ACCEPT
        return self._backtrack()

    def _accepts(self, tested, decrease, trial_loss: float) -> bool:
        """The smoothed test ``beta3*h + (1-beta3)*tested >= c * eta * s`` (fp32); ``h`` is kept on a pass."""
        sufficient = _f32(self.step_size * self.config.c) * _f32(self.state.slope_avg)
        smoothed = self._smoothed(tested)
        if smoothed >= sufficient:
            self.state.loss_decrease_avg = float(self._kept_average(smoothed, decrease))
            return True
        return False

    def _backtrack(self) -> Verdict:
        self.step_size = self.step_size * self.config.backtrack
        return Verdict.GIVE_UP if self.exhausted else Verdict.RETRY

    def final(self) -> FinalMove:
        """The last trial; without trials (guard failed) ``eta * growth`` along ``m_hat``."""
        if not self.active:
            return FinalMove(self.step_size, direction="momentum")
        return FinalMove(self.last_trial)

    def _smoothed(self, decrease):
        """``beta3*h + (1-beta3)*decrease`` in fp32: the left side of the test, and ``h`` once kept."""
        beta3 = self.config.beta3
        return _f32(self.state.loss_decrease_avg) * _f32(beta3) + decrease * _f32(1 - beta3)

    def _tested_decrease(self, decrease, trial_loss: float):
        """The decrease the test judges (fp32): ``f0 - f1`` here; other rules measure it otherwise."""
        return decrease

    def _kept_average(self, smoothed, decrease):
        """``h`` after an accepted trial: the tested left side here."""
        return smoothed

    @property
    def exhausted(self) -> bool:
        return self.trials >= self.config.max_trials

    def finish(self) -> SearchState:
        """The state after the search: ``eta`` and its fast/slow averages updated, and the count of searches in a
        row that grew it untested (a warning when it reaches ``UNTESTED_SEARCHES_WARNED``)."""
        untested = 0 if self.active else self.state.untested_searches + 1
        self.state.untested_searches = untested
        if untested == UNTESTED_SEARCHES_WARNED:
            warnings.warn(
                f"the search has not tested its level for {untested} searches in a row: each read a loss of exactly "
                f"0 or a smoothed slope under {MIN_SLOPE_AVG:g} (a fit that converged, a loss scaled far down, an "
                "eps far above the gradients), where SaLSa's rule (0.1.0's) grows the level by growth and moves "
                f"eta * growth along m_hat without a trial. The level is now {self.step_size:.4g}, "
                f"{self.config.growth ** untested:.4g} times the last tested one, and a step whose loss comes back "
                "with a slope still under the guard applies it untested (a converged least-squares fit was thrown "
                "to weights of 1e28 so). Stop a run that has converged, give the loss its natural scale, or train "
                "with a schedule that freezes the level (presets.recommended); docs/api.md, 'A loss of exactly "
                "zero'", RuntimeWarning, stacklevel=caller_stacklevel())
        return record_search(self.state, self.step_size, self.trials)


def record_search(state: SearchState, step_size: float, trials: int) -> SearchState:
    """Set ``eta = step_size`` in ``state`` after a search of ``trials`` trials: its fast (0.9) and
    slow (0.99) exponential averages, the fast average's peak, and the backtrack count."""
    state.step_size = step_size
    state.step_size_slow = state.step_size_slow * SLOW_SMOOTHING + step_size * (1 - SLOW_SMOOTHING)
    state.step_size_fast = state.step_size_fast * FAST_SMOOTHING + step_size * (1 - FAST_SMOOTHING)
    state.step_size_fast_peak = max(state.step_size_fast_peak, state.step_size_fast)
    state.last_trials = trials
    if trials:
        state.num_backtracks += trials - 1
    return state
