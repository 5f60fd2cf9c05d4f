"""LABPAL, the large-batch parabolic approximation line search (seed 003), as a search rule.

``FusedSaLSa(params, search_rule="labpal")`` (NSGD) or ``search_rule="labpal_sgd"``, or
``search_rule=LABPALRule(mode=..., ...)`` to change a constant; :class:`LABPAL` builds the same.

LABPAL moves along the raw gradient ``d = g`` (the backends' direction ``RAW``: no Adam
preconditioner, Adam's moments neither read nor written), so ``||g|| = sqrt(q)`` with the slope
``q = sum lr_g g.g`` the search step reads anyway. Every ``sgd_steps`` updates (and at the first
step) an *approximation*: with ``g`` the mean gradient of the step's first ``k(t)`` batches and
``u = g / ||g||``, the loss along ``-u`` is measured at ``s = 0, mu, 2 mu`` as the mean over
``approximation_batches`` (``n``) batches, a parabola ``a s^2 + b s + c`` is fitted exactly
through the three points, and its minimum ``s_min = -b / 2a`` (at most ``max_step``) sets the
update step ``alpha * s_min``; the weights move there. As a search: trials at ``mu / ||g||``
and ``2 mu / ||g||`` (in units of ``g``), the point at ``s = 0`` being the loss the search step
starts from, and the final move ``alpha * s_min / ||g||``. Between approximations:

- ``mode="SGD"``: ``w -= lambda * g`` with ``lambda = alpha * s_min / ||g||`` of the last fit: a
  plain step along ``RAW`` of ``lambda``, no host read;
- ``mode="NSGD"``: ``w -= alpha * s_min * g / ||g||`` (the step length is kept): a search step
  with no trial whose final move is ``alpha * s_min / ||g||``, so one host read of ``q`` per step.

A failed fit (``a <= 0`` or ``b >= 0``, or a non-finite loss at ``mu`` or ``2 mu``) keeps the
previous rate (SGD) or step length (NSGD), or before any success moves nothing and approximates
again at the next step (a ``RuntimeWarning`` each time, as when the three losses are equal). A
non-finite loss at both ``mu`` and ``2 mu`` is a search with no finite trial, and a non-finite loss
at ``s = 0`` (on a gradient batch or a point batch, at the weights before the step) is the step's
own loss: either step is skipped or refused as ``nonfinite=`` says, as any step with a NaN/inf loss.
A loss at an approximation above ``DIVERGED_RISE`` (10) times the first approximation's, once a fit
has set a rate, warns that the run is likely diverging (LABPAL-SGD on one or two batches per fit does). Under ``torch.amp.GradScaler``, a skipped
NSGD update (a search step) advances none of LABPAL's counters; a skipped SGD update (a plain
step, no host read) still counts toward ``sgd_steps`` and the batches consumed (the next
approximation reads the skips and takes them out of the step counter, not out of these).
Batch-size schedule (Algorithm 1, ``t_max`` given): ``k(t) = 1`` up to ``t_max/2``
batches consumed, 2 up to ``3 t_max / 4``, 4 after (approximation batches count in ``t``), each
times the noise adaptation factor ``epsilon`` (section 4.3, Eq. 7: ``noise_factor``, 1 by default;
:meth:`LABPALRule.noise_factor_for` computes it from the batch and dataset sizes), truncated to an
integer and at least 1, as the published code does. An approximation's points average
``max(n, k(t))`` batches: Algorithm 1 samples the approximation batch in chunks of ``k(t)`` batches
until it holds ``n``, so ``ceil(n / k) k`` (12 at ``n = 10, k = 4``), and the published code reads
``n k``; the zoo's rows were measured with ``max(n, k(t))``. ``t_max`` is None by default, so ``k(t) = 1``
throughout: the paper's default run (Algorithm 1, ``t_max = 150000`` batches) doubles the batch at half
and three quarters of it in place of a learning-rate cool-down, which here takes ``t_max`` given. The
published code also fits again when the batch size changes; here fits come every ``sgd_steps`` updates.
``accumulation=A`` splits every batch in ``A`` micro-batches: the closure is then called for
``A`` times as many indices, each returning the mean loss of one equal-sized micro-batch.

The closure contract (several batches per step) is :class:`salsa_fused.rules.Batches`: the
gradient reads ``closure(i)`` for ``i < k(t) * A``; each point averages ``closure(i)`` for
``i < n * A``, the point at ``s = 0`` reusing the gradient batches' losses.

Weight decay (not in the paper; the package's decoupled decay): the fit's three points lie on the line from the
undecayed ``w0`` (the trials carry no decay), and the update shrinks ``w0`` by ``wd * lr * s * lambda`` (``s`` the
schedule's scale), the rate before the step; before the first successful fit nothing moves or decays.

The level ``eta`` (``FusedSaLSa.step_size``, what decoupled weight decay and ``applied_steps``
read) is ``lambda`` once a fit has set it; before that (``init_step_size`` in ``step_size``) nothing moves or decays
and ``applied_steps`` is 0. A group's ``lr`` multiplies ``g``
in its trials and moves (``q`` sums ``lr_g g.g``): at the default ``lr = 1`` the geometry is the
paper's. Defaults are the paper's (``n = 10``, ``sgd_steps = 1000``, ``alpha = 1.8``,
``max_step = 1``) and its published code's (``mu = 0.01``; the code differences ``np.gradient``
on unevenly spaced points, which doubles ``s_min`` on an exact parabola: the exact fit is used, so
the paper's runs, tuned on that code, stepped about ``3.6 s_min``: ``alpha = 3.6`` reproduces them).
The published code measures at ``s = 0``, a point close to it and ``mu``; the paper says three points
along the direction; here ``0, mu, 2 mu``, so the fit spans ``[0, 2 mu]``.
Not here, from the published code and not the paper: its momentum option (0 by default there),
the mean over the last 25 fits once 400 updates have passed (here every fit replaces the last),
and its refusal of a fit whose direction norm is below 1e-3 or above 100 (absolute bounds that
depend on the model's scale; here only a fit without a minimum ahead is refused).

Cost per update: ``k`` forwards and backwards; per approximation ``k`` forwards and backwards plus
``3 max(n, k) - k`` forwards (each of the three points averages ``max(n, k)`` batches, the point at 0
reusing the gradient's ``k``) and one weight-sized copy (``restore="copy"``), once per ``sgd_steps`` updates.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import ClassVar, FrozenSet, Optional

from .backends.base import RAW
from .errors import checked_int, checked_real
from .line_search import FLOAT32_EPS, FLOAT32_MAX, SearchConfig, SearchState, StepPlan
from .optimizer import FusedSaLSa
from .rules import Batches, FinalMove, Verdict

MODES = ("SGD", "NSGD")

#: ``SearchState.rule_state`` of LABPAL: its scalars, and ``last``, what the last step decided.
_COUNTERS = ("batches_consumed", "updates_since_approximation", "num_approximations", "num_failed_fits")
_RATES = ("learning_rate", "update_step")  # lambda and alpha * s_min, None before the first fit
#: The loss at ``s = 0`` of the run's first approximation: what the divergence warning compares with (None before
#: it, and absent in checkpoints from before the key: the next approximation sets it).
_FIRST_LOSS = "first_loss"
#: A loss this many times the first approximation's is read as a run that diverged.
DIVERGED_RISE = 10.0
#: The warnings' texts carry no value that moves from fit to fit, so Python's default filter shows each once per
#: calling line (and its registry does not grow a text per fit); the values are in the rule's state.
_WHERE_THE_VALUES_ARE = ("The fit's losses are in opt.search_state.rule_state['last'] (at s = 0, mu and 2 mu), with "
                         "its first_loss, update_step, num_approximations and num_failed_fits")


def parabola_minimum(points, losses):
    """``(a, b, s_min)`` of the parabola ``a s^2 + b s + c`` through three ``(s, loss)`` points;
    ``s_min = -b / 2a``, or ``None`` when it has no minimum ahead (``a <= 0`` or ``b >= 0``)."""
    (s0, s1, s2), (l0, l1, l2) = points, losses
    slope01, slope12 = (l1 - l0) / (s1 - s0), (l2 - l1) / (s2 - s1)
    a = (slope12 - slope01) / (s2 - s0)
    b = slope01 - a * (s0 + s1)
    if not (a > 0 and b < 0):
        return a, b, None
    return a, b, -b / (2 * a)


def _initial_state() -> dict:
    return dict(batches_consumed=0, updates_since_approximation=0, num_approximations=0, num_failed_fits=0,
                learning_rate=None, update_step=None, first_loss=None, last={})


class _LABPALSearch:
    """One LABPAL search step: an approximation (two trials), or an NSGD update (no trial)."""

    #: The fit's three points lie on one line from ``w0`` (the paper's, section 3.3): the trials carry no weight
    #: decay, which comes with the update (:func:`salsa_fused.functional.run_search`).
    undecayed_trials = True

    def __init__(self, rule: "LABPALRule", plan: StepPlan, loss: float, slope: float):
        self.rule = rule
        self.state = replace(plan.state, rule_state=_copy(plan.state.rule_state))
        self.labpal = self.state.rule_state
        self.last = self.labpal["last"]
        self.norm = math.sqrt(slope) if slope > 0 else 0.0
        self.last["grad_norm"] = self.norm
        self.approximation = self.last["kind"] == "approximation"
        self.losses = [float(loss)]
        self.trials = 0
        self.move = 0.0  # along g / ||g||
        self.active = self.approximation and self.norm > 0
        self.step_size = rule.sample_step / self.norm if self.active else 0.0
        if not self.approximation and self.norm > 0:
            self.move = self.labpal["update_step"]  # NSGD: the step length is kept
        elif self.approximation and self.norm == 0:
            self.last["kind"] = "zero_gradient"  # no direction: nothing moves, the batches are consumed

    def observe(self, trial_loss: float) -> Verdict:
        rule = self.rule
        self.trials += 1
        self.state.num_forward_evals += self.last["batches"] * rule.accumulation
        self.losses.append(float(trial_loss))
        if self.trials == 1:
            self.step_size = 2 * rule.sample_step / self.norm
            return Verdict.RETRY
        labpal, last = self.labpal, self.last
        mu = rule.sample_step
        points = (0.0, mu, 2 * mu)
        a, b, s_min = parabola_minimum(points, self.losses)
        labpal["num_approximations"] += 1
        if labpal.get(_FIRST_LOSS) is None:
            labpal[_FIRST_LOSS] = self.losses[0]
        first = labpal[_FIRST_LOSS]
        if 0 < first and DIVERGED_RISE * first < self.losses[0] and labpal["update_step"] is not None:
            warnings.warn(
                f"LABPAL: the loss at this approximation is more than {DIVERGED_RISE:g} times the first "
                f"approximation's: the run is likely diverging at the last fit's "
                f"{'rate' if rule.mode == 'SGD' else 'step length'} (along g / ||g||), and later fits read losses "
                "that differ by rounding or curve downward. A fit on one or two batches misleads: the paper's "
                "defaults average approximation_batches=10 and fit every sgd_steps=1000; a smaller alpha shortens "
                f"the step. {_WHERE_THE_VALUES_ARE} (its update_step is already this approximation's fit, where one "
                "was found)", RuntimeWarning, stacklevel=2)
        if s_min is not None:
            labpal["update_step"] = rule.alpha * min(s_min, rule.max_step)
            labpal["learning_rate"] = labpal["update_step"] / self.norm
        else:
            labpal["num_failed_fits"] += 1
            if self.losses[0] == self.losses[1] == self.losses[2]:
                warnings.warn(
                    f"LABPAL: the loss is the same at s = 0, mu and 2 mu: the trial moves of mu = {mu} along "
                    "g / ||g|| changed nothing measurable: below the weights' resolution (e.g. bf16 or fp16 "
                    f"weights), below the loss's own (float32 steps by about {FLOAT32_EPS:.3g} times the loss: a "
                    "large loss is often a run that diverged), or a flat loss; so the fit failed and "
                    + ("the last fit's step is kept" if labpal["update_step"] is not None else
                       "no step is taken until a fit succeeds")
                    + f"; keep fp32 weights (autocast for the compute) or raise sample_step. {_WHERE_THE_VALUES_ARE}",
                    RuntimeWarning, stacklevel=2)
            elif not all(map(math.isfinite, self.losses[1:])):
                if any(map(math.isfinite, self.losses[1:])):  # at both: no finite trial, the step is refused
                    warnings.warn(
                        f"LABPAL: a non-finite loss at one of the trial points s = mu and 2 mu (mu = {mu}), so the "
                        "fit failed and "
                        + ("the last fit's step is kept" if labpal["update_step"] is not None else
                           "no step is taken until a fit succeeds")
                        + f"; a smaller sample_step keeps the trial points nearer the weights. {_WHERE_THE_VALUES_ARE}",
                        RuntimeWarning, stacklevel=2)
            elif labpal["update_step"] is None:  # losses that differ by rounding alone fail the fit as well
                warnings.warn(
                    f"LABPAL: no step has been taken: none of its fits found a minimum ahead along -g (mu = {mu}), "
                    "and no step is taken until one does. With bf16 or fp16 weights the trial moves of mu along "
                    "g / ||g|| are near the weights' resolution and the losses differ by rounding: keep fp32 "
                    f"weights (autocast for the compute) or raise sample_step. {_WHERE_THE_VALUES_ARE}",
                    RuntimeWarning, stacklevel=2)
        if labpal["update_step"] is not None:
            rate = labpal["learning_rate"] * self.norm if rule.mode == "SGD" else labpal["update_step"]
            self.move = rate
            labpal["updates_since_approximation"] = 0
        last.update(points=list(points), losses=list(self.losses), a=a, b=b, s_min=s_min)
        return Verdict.ACCEPT if s_min is not None else Verdict.GIVE_UP

    def final(self) -> FinalMove:
        """``move / ||g||`` along ``g``: the update, in units of the gradient."""
        return FinalMove(self.move / self.norm if self.norm > 0 else 0.0)

    def finish(self) -> SearchState:
        state, labpal = self.state, self.labpal
        self.last["move"] = self.move
        state.last_trials = self.trials
        if self.approximation:
            state.num_searches += 1
            state.steps_since_search = 0
            labpal["batches_consumed"] += self.last["batches"]
        if labpal["learning_rate"] is not None:
            state.step_size = labpal["learning_rate"]
        return state


def _copy(rule_state: dict) -> dict:
    """A copy of LABPAL's rule state deep enough to change (the initial one when empty)."""
    if not rule_state:
        return _initial_state()
    return {**rule_state, "last": dict(rule_state.get("last", {}))}


@dataclass(frozen=True)
class LABPALRule:
    """LABPAL (seed 003) as a search rule: SGD or normalized SGD along ``g`` whose step comes from a
    parabola fitted to the loss along ``g`` over several batches, refitted every ``sgd_steps`` updates.

    Args:
        mode: ``"NSGD"`` (the step length is kept) or ``"SGD"`` (the learning rate is kept).
        approximation_batches: ``n``, batches averaged at each parabola point (at least the
            step's ``k(t)``: an approximation reads ``max(n, k(t))``).
        sgd_steps: updates between approximations.
        alpha: multiplier on the parabola's minimum.
        sample_step: ``mu``; the points are ``0, mu, 2 mu`` along the unit gradient.
        max_step: upper bound on ``s_min``.
        t_max: the run's length in batches for the batch-size schedule (None: ``k = 1``).
        accumulation: micro-batches per batch (the closure is called per micro-batch).
        noise_factor: ``epsilon`` of section 4.3 (Eq. 7), multiplying the schedule's batch counts:
            ``noise_factor_for(batch_size, dataset_size)`` for a run whose gradient noise differs
            from the paper's CIFAR-10 setting (batch 128, 40,000 examples).
    """

    keeps_state_from_first_step = True  # its scalars in SearchState.rule_state (rules.check_rule_state)

    @staticmethod
    def initial_rule_state() -> dict:
        """The rule state before the first step, with every key (``FusedSaLSa.state_dict`` writes it
        for a run that has not stepped, so that torch.distributed.checkpoint finds each key to load)."""
        return _initial_state()

    mode: str = "NSGD"
    approximation_batches: int = 10
    sgd_steps: int = 1000
    alpha: float = 1.8
    sample_step: float = 0.01
    max_step: float = 1.0
    t_max: Optional[int] = None
    accumulation: int = 1
    noise_factor: float = 1.0

    #: FusedSaLSa's search arguments LABPAL reads: none (its constants are the fields above).
    reads: ClassVar[FrozenSet[str]] = frozenset()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("approximation_batches", "sgd_steps", "accumulation"):
            object.__setattr__(self, name, checked_int(name, getattr(self, name), 1))  # a numpy integer, say
        for name in ("alpha", "sample_step", "max_step", "noise_factor"):
            object.__setattr__(self, name, checked_real(name, getattr(self, name), 0.0))
        if not self.alpha * self.max_step <= FLOAT32_MAX:  # the passes move by update_step in float32
            raise ValueError(f"alpha * max_step, the longest update step, must be one float32 holds (at most "
                             f"{FLOAT32_MAX:.4g}), got alpha={self.alpha!r} and max_step={self.max_step!r}")
        if not 2 * self.sample_step <= FLOAT32_MAX:  # the farther trial point, 2 mu along g / ||g||
            raise ValueError(f"sample_step (mu) must be at most half of what float32 holds ({FLOAT32_MAX / 2:.4g}): "
                             f"the farther trial moves 2 mu along g / ||g||, got {self.sample_step!r}")
        object.__setattr__(self, "t_max", checked_int("t_max", self.t_max, 1, allow_none=True))

    def direction(self, configured: str) -> str:
        return RAW

    @staticmethod
    def noise_factor_for(batch_size: int, dataset_size: int) -> float:
        """``epsilon = (128 / |B|) * (|D| / 40000)`` (seed 003, Eq. 7): the noise scale of a run with
        batch size ``batch_size`` on ``dataset_size`` examples over the paper's CIFAR-10 setting."""
        batch_size = checked_int("batch_size", batch_size, 1)
        dataset_size = checked_int("dataset_size", dataset_size, 1)
        return (128 / batch_size) * (dataset_size / 40000)

    def batch_multiplier(self, batches_consumed: int) -> int:
        """``k(t)`` of Algorithm 1, in batches, after ``t = batches_consumed``: 1, 2 or 4 times the
        noise factor, truncated, at least 1."""
        if self.t_max is None or batches_consumed <= self.t_max // 2:
            base = 1
        else:
            base = 2 if batches_consumed <= (3 * self.t_max) // 4 else 4
        return max(1, int(base * self.noise_factor))

    def plan(self, state: SearchState, config: SearchConfig) -> StepPlan:
        labpal = state.rule_state or _initial_state()
        due = labpal["update_step"] is None or labpal["updates_since_approximation"] >= self.sgd_steps
        return self._plan(state, approximate=due)

    @staticmethod
    def level_is_set(state: SearchState) -> bool:
        """Whether a fit has set the rate (``eta = lambda``): before it LABPAL's steps move nothing, and the
        weights do not decay either."""
        return (state.rule_state or {}).get("learning_rate") is not None

    def without_search(self, state: SearchState, config: SearchConfig) -> StepPlan:
        """No approximation (the schedule freezes the level): the mode's update at the last rate,
        or, before any fit, a step that moves nothing."""
        return self._plan(state, approximate=False)

    def _plan(self, state: SearchState, approximate: bool) -> StepPlan:
        labpal = _copy(state.rule_state)
        k = self.batch_multiplier(labpal["batches_consumed"])
        new = replace(state, step=state.step + 1, steps_since_search=state.steps_since_search + 1,
                      rule_state=labpal)
        rate = labpal["learning_rate"]
        if approximate:
            labpal["last"] = dict(kind="approximation", batches=max(self.approximation_batches, k), direction_batches=k)
            return StepPlan(state=new, is_search=True, trial_step_size=rate or state.step_size)
        labpal["batches_consumed"] += k
        if rate is None:  # frozen before the first fit
            labpal["last"] = dict(kind="frozen", batches=k)
            return StepPlan(state=new, is_search=False, trial_step_size=0.0)
        labpal["updates_since_approximation"] += 1
        labpal["last"] = dict(kind="update", batches=k)
        return StepPlan(state=new, is_search=self.mode == "NSGD", trial_step_size=rate)

    def batches(self, plan: StepPlan) -> Batches:
        last = plan.state.rule_state["last"]
        k = last.get("direction_batches", last["batches"]) * self.accumulation
        points = last["batches"] * self.accumulation if last["kind"] == "approximation" else 0
        return Batches(gradient=k, points=points if plan.is_search else 0)

    def __call__(self, plan: StepPlan, config: SearchConfig, loss: float, slope: float) -> _LABPALSearch:
        return _LABPALSearch(self, plan, loss, slope)

    def check_state(self, rule_state: dict) -> None:
        """Raise ValueError on LABPAL scalars no run reaches (a corrupt or hand-edited checkpoint)."""
        if not rule_state:
            return
        unknown = set(rule_state) - {*_COUNTERS, *_RATES, "last", _FIRST_LOSS}
        missing = {*_COUNTERS, *_RATES} - set(rule_state)
        if unknown or missing:
            raise ValueError(f"not a LABPAL rule state: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
        for name in _COUNTERS:
            value = rule_state[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LABPAL state {name} must be an integer >= 0, got {value!r}")
        for name in _RATES:
            value = rule_state[name]
            if value is not None and (isinstance(value, bool) or not (
                    isinstance(value, (int, float)) and 0 < value <= FLOAT32_MAX)):
                raise ValueError(f"LABPAL state {name} must be None or a number > 0 that float32 holds (at most "
                                 f"{FLOAT32_MAX:.4g}), got {value!r}")
        first = rule_state.get(_FIRST_LOSS)
        if first is not None and (isinstance(first, bool) or not (isinstance(first, (int, float))
                                                                   and math.isfinite(first))):
            raise ValueError(f"LABPAL state {_FIRST_LOSS} must be None or a finite number, got {first!r}")
        if (rule_state["learning_rate"] is None) != (rule_state["update_step"] is None):
            raise ValueError("LABPAL state learning_rate and update_step are set together, got "
                             f"{rule_state['learning_rate']!r} and {rule_state['update_step']!r}")
        last = rule_state.get("last", {})
        if not isinstance(last, dict):
            raise ValueError(f"LABPAL state last must be a dict, got {last!r}")
        if last:  # the plan of the step before: its kind and batch counts, as plan() writes them
            keys = {"kind", "batches"} | ({"direction_batches"} if last.get("kind") == "approximation" else set())
            counts_ok = all(isinstance(last.get(key), int) and not isinstance(last.get(key), bool)
                            and last[key] >= 1 for key in keys - {"kind"})
            if last.get("kind") not in ("approximation", "frozen", "update", "zero_gradient") or not counts_ok:
                raise ValueError("LABPAL state last must be the step's plan, {'kind': 'approximation', 'batches': n, "
                                 "'direction_batches': k, ...}, or {'kind': 'update', 'frozen' or 'zero_gradient', 'batches': k, ...} "
                                 f"with counts >= 1, got {last!r}")
            _check_last_readings(last)


#: What a step adds to its plan in ``last`` (:class:`_LABPALSearch`): the gradient's norm and the move, finite
#: and >= 0; the fit's points along ``g / ||g||``, finite; the losses read there and the parabola's
#: coefficients as they came (a trial's NaN loss is recorded as read); its minimum, finite, or None.
_LAST_READINGS = {"grad_norm": "finite", "move": "finite", "points": "finite list", "losses": "list", "a": "number",
                  "b": "number", "s_min": "finite or None"}

#: What each kind of reading in ``last`` must be, as the refusal says it.
_LAST_MEANING = {"finite": "a finite number >= 0", "finite list": "a list of finite numbers",
                 "list": "a list of numbers", "number": "a number", "finite or None": "a finite number or None"}


def _check_last_readings(last: dict) -> None:
    """Raise ValueError on a ``last`` whose readings (:data:`_LAST_READINGS`) no step writes."""
    unknown = set(last) - {"kind", "batches", "direction_batches", *_LAST_READINGS}
    if unknown:
        raise ValueError(f"LABPAL state last has keys no step writes: {sorted(unknown)}")

    def number(value, finite: bool) -> bool:
        return (not isinstance(value, bool) and isinstance(value, (int, float))
                and (not finite or math.isfinite(value)))

    for name, kind in _LAST_READINGS.items():
        if name not in last:
            continue
        value = last[name]
        if kind.endswith("list"):
            ok = isinstance(value, list) and all(number(v, kind == "finite list") for v in value)
        elif kind == "finite or None":
            ok = value is None or number(value, True)
        else:
            ok = number(value, kind == "finite") and (kind != "finite" or value >= 0)
        if not ok:
            raise ValueError(f"LABPAL state last[{name!r}] must be {_LAST_MEANING[kind]}, got {value!r}")


LABPAL_NSGD = LABPALRule()
LABPAL_SGD = LABPALRule(mode="SGD")


class LABPAL(FusedSaLSa):
    """``FusedSaLSa`` with the LABPAL rule (:class:`LABPALRule`): ``LABPAL(params, "SGD", t_max=...)``
    is ``FusedSaLSa(params, search_rule=LABPALRule("SGD", t_max=...))``. Keyword arguments that are
    not the rule's go to :class:`FusedSaLSa` (``backend``, ``reduction``, ``restore``, ...).
    ``step(closure)`` with ``closure(i)`` the loss of batch ``i`` of this step."""

    def __init__(self, params, mode: str = "NSGD", **options):
        if "search_rule" in options:
            raise TypeError("LABPAL builds its own search rule (LABPALRule(mode, ...) from its arguments): pass "
                            "the rule's fields (sgd_steps=..., t_max=...) here, or a rule of your own as "
                            "FusedSaLSa(params, search_rule=...)")
        rule_fields = {name: options.pop(name) for name in list(options)
                       if name in LABPALRule.__dataclass_fields__}
        super().__init__(params, search_rule=LABPALRule(mode=mode, **rule_fields), **options)

    @property
    def labpal_state(self) -> dict:
        """A copy of LABPAL's scalars (``search_state.rule_state``): batches consumed, updates since
        the last fit, ``learning_rate`` (lambda), ``update_step`` (alpha * s_min), counters, ``last``."""
        return _copy(self.search_state.rule_state)

    @property
    def last_decision(self) -> dict:
        """What the last step decided: ``kind`` (``"approximation"``, ``"update"``, ...), the batches,
        and for an approximation the points, losses, fit and move."""
        return dict(self.labpal_state["last"])

    def batches_needed(self) -> int:
        """How many indices the next one-phase ``step`` passes to ``closure``."""
        batches = self.next_batches()
        return max(batches.gradient, batches.points)
