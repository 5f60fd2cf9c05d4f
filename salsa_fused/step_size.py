"""A schedule on the applied step: :class:`WarmupStableDecay` (the ``pretrain`` preset's), and
:class:`Cooldown` (a cooldown started by hand in a run of unknown length).

Host-side arithmetic on Python floats; no tensors. A *schedule* multiplies the step the
optimizer applies (trials still probe the searched level; the weight decay ``wd * lr * s * eta`` takes
the scale too, ``salsa_fused.applied``) and may freeze the search. A schedule planned for a run length
has ``total_steps``: the optimizer warns once when a step goes past it
(:func:`warn_past_end`). Search rules are in :mod:`salsa_fused.rules`; the rules the quality
ablations rejected live in ``benchmarks/quality/rules.py``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Optional

from .errors import caller_stacklevel, checked_int
from .line_search import FLOAT32_MAX, FLOAT32_TINY, _is_bool


def is_number(value) -> bool:
    """A real number (int, float, a numpy scalar, a Fraction), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_freeze_below(value) -> float:
    """``value`` as a ``freeze_below`` fraction: a number in [0, 1); ValueError naming it otherwise."""
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"freeze_below must be a fraction of the search's peak level in [0, 1) "
                         f"(0: off), got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    """``value`` as an on/off option named ``name``: a bool; ValueError naming it otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def linear_decay(step: int, start: int, end: int, final: float) -> float:
    """The cooldown both schedules share: 1 at ``start``, linearly down to ``final`` at ``end``
    (``start < step``), ``final`` from ``end`` on: ``final + (1 - final) * (end - step) / (end - start)``."""
    if step >= end:
        return final
    return final + (1.0 - final) * (end - step) / (end - start)


@dataclass(frozen=True)
class WarmupStableDecay:
    """A multiplier on the applied step given the run length, and a freeze of the search.

    ``scale(k)`` for step ``k`` (1-based) of ``total_steps``, all times ``peak``::

        k / W                         for k <= W              (W = round(warmup * total_steps))
        1                             until D                 (D = total_steps - round(decay * total_steps))
        final + (1 - final) * (total_steps - k) / (total_steps - D)   after D

    ``peak`` is the applied step at the top of the schedule in units of the searched level
    (1: the level the search accepts; the recommended preset applies 2x the level it froze at
    the end of a 20% warmup, then decays linearly to zero: NOTES section 6 of the quality suite).

    ``searches(k)`` is False after ``D``: the level found by the search is frozen during the
    cooldown (if the search kept running, sharpness would follow the smaller step and the
    search would cut the level again).

    Past ``total_steps`` the scale holds :attr:`past_end_scale`, the last positive scale of
    the run: ``scale(total_steps)`` when it is positive (``final > 0``: ``final * peak``; no
    decay: ``peak``), else, with a decay to 0, ``scale(total_steps - 1)`` (``peak / (total_steps - D)``
    when the warm-up ends before the cooldown).
    A run that goes on moves at the cooldown's last step instead of stopping; the level stays
    frozen (``searches(k)`` is False past the end).

    ``freeze_below`` = r (0: off) freezes the level early, during the search phase, once it falls
    below ``r * eta_fast_peak`` (the largest fast average of the level the search reached): the level
    is set to that floor and no later step searches (:func:`freeze_if_collapsed`). A greedy search can
    collapse before the freeze; the floor it is stopped at is a small raise, where a floor applied at
    the end of the search phase jumped by orders of magnitude (quality NOTES sections 20-22).

    ``backoff_on_loss_rise`` (a range test on the search phase's own losses) halves the applied
    step whenever the loss turns during the search phase: at each search the loss ``f0`` it read
    updates ``l <- 0.9 l + 0.1 f0`` and its lowest value ``l_low``; when ``l > 2 l_low`` the
    multiplier ``b`` on the applied step halves and ``l_low <- l`` (:func:`observe_search_loss`,
    :func:`applied_scale`; quality NOTES section 23). No extra forward or host read. It reads the
    loss of the single-batch searches (the ``"salsa"``, ``"sls"`` and ``"alsals"`` rules), not a
    LABPAL fit's. Only losses > 0 are compared (a ratio): a loss <= 0 leaves ``l`` as it is, and a
    loss shifted up by a constant doubles later or never. ``b`` is in the checkpoint and multiplies
    the applied step under any schedule (not with ``schedule=None``).

    ``hold_scale_on_loss_rise`` (with ``backoff_on_loss_rise``) also ends the warm-up's rise where the
    loss turned: at the first back-off it sees (while ``scale_hold`` is 0), at step ``k``, the
    schedule's scale ``h = scale(k)`` is kept (``SearchState.scale_hold``) and from then on the
    applied multiplier is ``min(scale(step), h) * b`` (:func:`applied_scale`; quality NOTES section
    25). The cooldown then decays from ``h`` once its own scale falls below it. Under a beam's wrapper
    the hold applies to the wrapped schedule's scale, not to the beam's multiplier.

    ``decay_from_hold`` (with ``hold_scale_on_loss_rise``) makes the hold the schedule's peak for the rest
    of the run: past the warm-up the scale is ``scale(k) * h / peak`` (``h`` at most ``peak``) instead of
    ``min(scale(k), h)``, so the cooldown decays from ``h`` at once (:meth:`held_scale`; quality NOTES section 73).
    """

    total_steps: int
    warmup: float = 0.05
    decay: float = 0.2
    final: float = 0.0
    peak: float = 1.0
    freeze_below: float = 0.0
    backoff_on_loss_rise: bool = False
    hold_scale_on_loss_rise: bool = False
    decay_from_hold: bool = False

    def __post_init__(self):
        object.__setattr__(self, "total_steps", checked_int("total_steps", self.total_steps, 1))  # a numpy integer, say
        for name in ("warmup", "decay", "final"):
            value = getattr(self, name)
            if not (is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))  # a numpy scalar or Fraction: a Python float from here
        if self.warmup + self.decay > 1.0:
            raise ValueError(f"warmup + decay must be <= 1, got {self.warmup} + {self.decay}")

        if not (is_number(self.peak) and 0.0 < self.peak < math.inf):
            raise ValueError(f"peak must be a finite number > 0, got {self.peak!r}")
        object.__setattr__(self, "peak", float(self.peak))
        object.__setattr__(self, "freeze_below", check_freeze_below(self.freeze_below))
        check_flag("backoff_on_loss_rise", self.backoff_on_loss_rise)
        check_hold(self.backoff_on_loss_rise, self.hold_scale_on_loss_rise)
        check_flag("decay_from_hold", self.decay_from_hold)
        if self.decay_from_hold and not self.hold_scale_on_loss_rise:
            raise ValueError("decay_from_hold=True decays the cooldown from hold_scale_on_loss_rise's held scale: "
                             "set hold_scale_on_loss_rise=True (and backoff_on_loss_rise=True) too")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.total_steps))

    @property
    def decay_start(self) -> int:
        return self.total_steps - int(round(self.decay * self.total_steps))

    def check_searches(self) -> None:
        """Under a FusedSaLSa: refuse a run too short for one search step before the cooldown (the
        search would never run and the run would apply ``init_step_size``); ``decay=1`` asks for that."""
        if self.decay < 1.0 and self.decay_start < 1:
            raise ValueError(
                f"total_steps={self.total_steps} with decay={self.decay} leaves no step before the cooldown, "
                f"so the search would never run and the run would apply init_step_size: use total_steps >= "
                f"{self.shortest_total_steps()} (or decay=1 to mean no search)")

    def shortest_total_steps(self) -> int:
        """The fewest ``total_steps`` that leave a step before a cooldown of ``decay < 1``:
        the least ``n`` with ``n - round(decay * n) >= 1`` (from about ``0.5 / (1 - decay)``)."""
        if not self.decay < 1.0:
            raise ValueError(f"decay={self.decay} leaves no step before the cooldown at any total_steps")
        n = max(1, int(0.5 / (1.0 - self.decay)) - 2)
        while n - int(round(self.decay * n)) < 1:
            n += 1
        return n

    @property
    def past_end_scale(self) -> float:
        """The scale held after ``total_steps``: the last positive scale of the run (``peak`` for
        a one-step run that decays to 0 at once). Every step before the last has a positive scale."""
        for step in (self.total_steps, self.total_steps - 1):
            if step >= 1 and self._shape(step) > 0:
                return self.peak * self._shape(step)
        return self.peak

    def scale(self, step: int) -> float:
        if step > self.total_steps:
            return self.past_end_scale
        return self.peak * self._shape(step)

    def _shape(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        start = self.decay_start
        if step <= start:
            return 1.0
        return linear_decay(step, start, self.total_steps, self.final)

    def searches(self, step: int) -> bool:
        return step <= self.decay_start

    def held_scale(self, step: int, scale: float, hold: float) -> float:
        """The scale ``scale`` (this schedule's at ``step``) under a hold ``h = hold > 0``: ``min(scale, h)``;
        with :attr:`decay_from_hold`, past the warm-up, ``scale * min(h, peak) / peak`` (the hold is the peak; a
        hold above this schedule's peak, kept from a checkpoint of a higher one, caps nothing, as the ``min`` does)."""
        if self.decay_from_hold and step > self.warmup_steps:
            return scale * min(1.0, hold / self.peak)
        return min(scale, hold)


@dataclass(frozen=True)
class Cooldown:
    """A cooldown started during a run of unknown length (``presets.recommended(params, None)``), at
    step ``start`` (1-based, e.g. ``optimizer.search_state.step``) over ``steps`` steps::

        1                                                  for k <= start
        final + (1 - final) * (start + steps - k) / steps  after start, ``final`` at start + steps

    ``searches(k)`` is False after ``start`` (the level freezes, as in WarmupStableDecay's
    cooldown). ``total_steps = start + steps``; past it the scale holds its last positive value
    (``final``, or ``1 / steps`` for a decay to 0) and the optimizer warns once. Install it with
    ``optimizer.schedule = Cooldown(optimizer.search_state.step, steps)`` once a search has run
    (``start`` 0 would freeze a level no search set: refused at the first step).
    """

    start: int
    steps: int
    final: float = 0.0

    def __post_init__(self):
        for name, minimum in (("start", 0), ("steps", 1)):
            object.__setattr__(self, name, checked_int(name, getattr(self, name), minimum))  # a numpy integer, say
        if not (is_number(self.final) and 0.0 <= self.final <= 1.0):
            raise ValueError(f"final must lie in [0, 1], got {self.final!r}")
        object.__setattr__(self, "final", float(self.final))

    @property
    def total_steps(self) -> int:
        return self.start + self.steps

    @property
    def past_end_scale(self) -> float:
        return self.final if self.final > 0 else 1.0 / self.steps

    def scale(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if step <= self.start:
            return 1.0
        if step > self.total_steps:
            return self.past_end_scale
        return linear_decay(step, self.start, self.total_steps, self.final)

    def searches(self, step: int) -> bool:
        return step <= self.start


class ScaledSchedule:
    """FusedSaLSa's schedule protocol around another one: ``scale(k) = inner.scale(k) *
    getattr(owner, attribute)``, searching when the inner schedule does (always without one).
    ``owner`` installed it (a StepSizeBeam, an LRFactorSearch) and sets the multiplier."""

    def __init__(self, inner, owner, attribute: str):
        self.inner, self.owner, self.attribute = inner, owner, attribute

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r}, {type(self.owner).__name__}.{self.attribute})"

    def scale(self, step: int) -> float:
        inner, multiplier = self.parts(step)
        return inner * multiplier

    def parts(self, step: int):
        """``(inner.scale(step), the owner's multiplier)``: a hold caps the first, not the second."""
        return (1.0 if self.inner is None else float(self.inner.scale(step))), getattr(self.owner, self.attribute)

    def searches(self, step: int) -> bool:
        """The inner schedule's answer as it gave it (checked by :func:`schedule_searches`)."""
        return True if self.inner is None else self.inner.searches(step)

    @property
    def total_steps(self) -> Optional[int]:
        """The inner schedule's planned run length (None without one)."""
        return getattr(self.inner, "total_steps", None)

    @property
    def freeze_below(self) -> float:
        """The inner schedule's early-freeze fraction (0 without one), as the inner schedule has it."""
        return getattr(self.inner, "freeze_below", 0.0)

    @property
    def backoff_on_loss_rise(self) -> bool:
        """Whether the inner schedule backs off when the loss turns (False without one)."""
        return getattr(self.inner, "backoff_on_loss_rise", False)

    @property
    def hold_scale_on_loss_rise(self) -> bool:
        """Whether the inner schedule's warm-up stops rising at a back-off (False without one)."""
        return getattr(self.inner, "hold_scale_on_loss_rise", False)

    @property
    def decay_from_hold(self) -> bool:
        """Whether the inner schedule's cooldown decays from its held scale (False without one)."""
        return getattr(self.inner, "decay_from_hold", False)


def freeze_if_collapsed(schedule, state, step: int, rule):
    """The search state step ``step`` (1-based) starts from: ``state``, unless ``schedule`` has
    ``freeze_below`` = r > 0, searches at ``step`` or searched at ``step - 1`` (so the search phase's
    last search is checked too, at the schedule's own freeze), has not frozen early yet, and the
    level ``eta`` is below ``r * eta_fast_peak``; then a copy with ``eta = r * eta_fast_peak`` and
    ``frozen_at = step``, after which :func:`schedule_searches` is False for the rest of the run.
    ``freeze_below`` is checked first, with the search ``rule`` (:func:`check_freeze_rule`)."""
    # a schedule of the caller's own, or one assigned after construction: checked before the step writes anything
    fraction = check_freeze_rule(schedule, rule)
    if fraction <= 0.0 or state.frozen_at:
        return state
    if not (schedule.searches(step) or (step > 1 and schedule.searches(step - 1))):
        return state
    floor = fraction * state.step_size_fast_peak
    if not state.step_size < floor:
        return state
    return replace(state, step_size=floor, frozen_at=step)


def check_freeze_rule(schedule, rule) -> float:
    """``schedule``'s ``freeze_below`` (0 without one), checked (:func:`check_freeze_below`); ValueError
    when it is > 0 under a search rule that does not track the peak of its level's fast average
    (``tracks_level_peak``: SaLSa's ArmijoSearch): the freeze compares the level with that peak,
    which would stay 0 and never freeze."""
    fraction = 0.0 if schedule is None else check_freeze_below(getattr(schedule, "freeze_below", 0.0))
    if fraction > 0.0 and not getattr(rule, "tracks_level_peak", False):
        from .rules import rule_name

        raise ValueError(f"the schedule's freeze_below={fraction:g} compares the level with the peak of its fast "
                         f"average, which only SaLSa's search ('salsa') tracks; search rule {rule_name(rule)} "
                         "does not, so "
                         "the level would never freeze: set freeze_below=0 with this rule")
    return fraction


def schedule_searches(schedule, state, step: int) -> bool:
    """Whether step ``step`` may search: no schedule, or one that searches there while the level has
    not frozen early (``state.frozen_at``, kept in checkpoints: it holds under any schedule loaded
    later, and ``schedule=None`` searches as always)."""
    if schedule is None:
        return True
    searches = schedule.searches(step)
    if searches is not True and searches is not False and not _is_bool(searches):  # no call for a bool
        named = getattr(schedule, "inner", None) or schedule  # the caller's, inside a ScaledSchedule
        raise ValueError(f"schedule {type(named).__name__}.searches({step}) returned {searches!r}; a schedule's "
                         "searches(step) is True or False (a missing return is None, which read as False: no step "
                         "searched again)")
    return bool(searches) and not state.frozen_at


#: The range test of ``backoff_on_loss_rise`` (quality NOTES section 23): the smoothing of the searches'
#: losses, the rise over their lowest smoothed value that counts as the loss turning, and the factor the
#: applied step's multiplier is then cut by.
LOSS_RISE_SMOOTHING = 0.9
LOSS_RISE_RATIO = 2.0
LOSS_RISE_BACKOFF = 0.5


def check_hold(backoff_on_loss_rise, hold_scale_on_loss_rise) -> bool:
    """``hold_scale_on_loss_rise`` checked: a bool, on only with ``backoff_on_loss_rise`` (it acts at that
    test's back-offs); ValueError naming it otherwise."""
    check_flag("hold_scale_on_loss_rise", hold_scale_on_loss_rise)
    if hold_scale_on_loss_rise and not backoff_on_loss_rise:
        raise ValueError("hold_scale_on_loss_rise=True acts at backoff_on_loss_rise's back-offs: "
                         "set backoff_on_loss_rise=True too")
    return hold_scale_on_loss_rise


def backs_off_on_loss_rise(schedule) -> bool:
    """Whether ``schedule`` has ``backoff_on_loss_rise`` on (False without a schedule); a value that is
    not a bool, on a schedule of the caller's own, is refused by name (checked before a step writes)."""
    if schedule is None:
        return False
    on = check_flag("backoff_on_loss_rise", getattr(schedule, "backoff_on_loss_rise", False))
    check_hold(on, getattr(schedule, "hold_scale_on_loss_rise", False))
    return on


def _scale_parts(schedule, step: int):
    """``(scale, multiplier)`` of ``schedule`` at ``step``: a beam's or a factor search's wrapper gives its
    inner schedule's scale and its own multiplier (:meth:`ScaledSchedule.parts`), any other schedule
    its scale and 1."""
    if isinstance(schedule, ScaledSchedule):
        return schedule.parts(step)
    return float(schedule.scale(step)), 1.0


def observe_search_loss(schedule, state):
    """The search state after a search whose loss was ``state.last_search_loss``: unchanged unless
    ``schedule`` has ``backoff_on_loss_rise`` and that loss is > 0; then the smoothed loss
    ``l <- 0.9 l + 0.1 f0`` (``f0`` itself at the first such search) and its lowest value ``l_low``
    are updated, and if ``l > 2 l_low`` the loss has turned: ``b <- b / 2`` (the multiplier on the
    applied step, :func:`applied_scale`) and ``l_low <- l``, so a second back-off needs a second doubling."""
    if not backs_off_on_loss_rise(schedule):
        return state
    loss = state.last_search_loss
    if not (math.isfinite(loss) and loss > 0.0):
        return state  # a ratio of losses means nothing for a loss <= 0
    average = loss if state.search_loss_avg <= 0.0 else (
        LOSS_RISE_SMOOTHING * state.search_loss_avg + (1.0 - LOSS_RISE_SMOOTHING) * loss)
    low = average if state.search_loss_avg_low <= 0.0 else min(state.search_loss_avg_low, average)
    backoff, hold = state.applied_backoff, state.scale_hold
    if average > LOSS_RISE_RATIO * low:
        backoff, low = backoff * LOSS_RISE_BACKOFF, average
        if hold == 0.0 and getattr(schedule, "hold_scale_on_loss_rise", False):
            hold = _scale_parts(schedule, state.step)[0] or hold  # a scale of 0 holds nothing
    return replace(state, search_loss_avg=average, search_loss_avg_low=low, applied_backoff=backoff,
                   scale_hold=hold)


def applied_scale(schedule, state, step: int) -> float:
    """The multiplier on the level that step ``step`` applies: ``schedule.scale(step) * b``, with ``b``
    (``state.applied_backoff``) the back-off of ``backoff_on_loss_rise`` (1 until the loss turns);
    1 without a schedule. With a hold ``h = state.scale_hold > 0`` (``hold_scale_on_loss_rise``) the
    schedule's scale is ``min(scale(step), h)`` (a beam's multiplier outside the ``min``), or past the
    warm-up of a :class:`WarmupStableDecay` with ``decay_from_hold``, ``scale(step) * h / peak``."""
    if schedule is None:
        return 1.0
    if state.scale_hold <= 0.0:
        scale = _checked_scale(schedule, step, schedule.scale(step))
        return scale * state.applied_backoff
    scale, multiplier = _scale_parts(schedule, step)
    _checked_scale(schedule, step, scale * multiplier)
    inner = unwrapped(schedule)
    if isinstance(inner, WarmupStableDecay):
        held = inner.held_scale(step, scale, state.scale_hold)
    else:
        held = min(scale, state.scale_hold)
    return held * multiplier * state.applied_backoff


def _checked_scale(schedule, step: int, scale) -> float:
    """``scale`` as a float, refused (ValueError naming the schedule, before anything is written)
    unless it is a finite number >= 0."""
    value = None
    if not isinstance(scale, (bool, str, bytes)):
        try:
            value = float(scale)  # a number, or a one-element tensor or array
        except (TypeError, ValueError):
            pass
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"schedule {type(schedule).__name__}.scale({step}) returned {scale!r}; a schedule's scale "
                         "is a finite number >= 0. Nothing was written")
    return value


#: A level below this fraction of the peak of the search's fast average has collapsed (quality NOTES
#: sections 20-22: the largest drop on the development tasks that did not collapse was 7.8x); the
#: ``pretrain`` preset's ``freeze_below``.
COLLAPSE_FRACTION = 1 / 16


def warn_collapsed_level(schedule, state, step: int, stacklevel: Optional[int] = None) -> bool:
    """Warn when ``schedule`` freezes, at step ``step``, a level ``eta`` below ``COLLAPSE_FRACTION``
    times ``state.step_size_fast_peak`` (the largest fast average of the level the search reached);
    return whether it warned (the caller checks once, at the first frozen step).

    A greedy search can collapse before the freeze (the step drops, sharpness rises to meet it, the step
    drops again: Roulet et al., arXiv 2312.00209), typically on a fit that converges inside the search
    phase; the frozen level then holds for the whole cooldown and training barely moves. A schedule with
    ``freeze_below`` at this fraction (the ``pretrain`` preset's) stops such a search at that floor
    and so never warns; for one without it, this only says so."""
    if schedule is None or schedule.searches(step) or state.frozen_at:
        return False  # still searching, or frozen early where a freeze_below chose to
    peak, level = state.step_size_fast_peak, state.step_size
    if not level < COLLAPSE_FRACTION * peak:
        return False
    warnings.warn(
        f"the search collapsed before the schedule froze its level: step {step} freezes the level at "
        f"{level:.3g}, {peak / level:.3g}x below the peak of its fast average ({peak:.3g}), and the "
        "applied step stays that small for the rest of the run, so training will barely move. Seen "
        "where the loss converges inside the search phase (small full-batch fits over long runs). "
        "WarmupStableDecay(freeze_below=1/16), as in the pretrain preset, freezes such a level early, "
        "at that floor; docs/quality.md, \"A search that collapses before the freeze\".",
        UserWarning, stacklevel=caller_stacklevel() if stacklevel is None else stacklevel + 1)
    return True


def check_factors(factors) -> tuple:
    """``factors`` (multipliers of the applied step that a beam or a factor search compares) as a
    tuple; ValueError unless there are at least two, each a finite number > 0, all distinct."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Iterable):
        raise TypeError(f"factors must be a sequence of multipliers (e.g. (0.5, 1.0, 2.0)), got {factors!r}")
    factors = tuple(factors)
    if len(factors) < 2:
        raise ValueError(f"factors needs at least two factors to compare, got {factors}")
    for f in factors:
        if not is_number(f) or not FLOAT32_TINY <= f <= FLOAT32_MAX:
            raise ValueError(f"factors must be numbers > 0 that float32 holds, from {FLOAT32_TINY:.4g} to "
                             f"{FLOAT32_MAX:.4g} (they multiply the applied step), got {f!r} in {factors}")
    factors = tuple(map(float, factors))
    if len(set(factors)) != len(factors):
        raise ValueError(f"factors must be distinct (a repeated factor counts twice), got {factors}")
    return factors


def scaled_by(schedule, owner_type) -> bool:
    """Whether ``schedule`` is, or wraps, a :class:`ScaledSchedule` installed by an ``owner_type``."""
    return any(isinstance(wrapper.owner, owner_type) for wrapper in _wrappers(schedule))


def check_installed(schedule, owner) -> None:
    """Raise RuntimeError unless ``owner``'s :class:`ScaledSchedule` is (in) the optimizer's
    ``schedule``: one assigned after ``owner`` wrapped it would drop ``owner``'s multiplier silently."""
    if not any(wrapper.owner is owner for wrapper in _wrappers(schedule)):
        name = type(owner).__name__
        raise RuntimeError(f"the optimizer's schedule was replaced after {name} wrapped it, so {name}'s multiplier "
                           f"no longer applies: set the schedule first (FusedSaLSa(schedule=...) or "
                           f"optimizer.schedule = ...), then build the {name}. Nothing was stepped")


def unwrapped(schedule):
    """The schedule inside any :class:`ScaledSchedule` wrappers (a beam's, a factor search's): the caller's
    own, ``None`` where a wrapper stands around none."""
    for wrapper in _wrappers(schedule):
        schedule = wrapper.inner
    return schedule


def _wrappers(schedule):
    while isinstance(schedule, ScaledSchedule):
        yield schedule
        schedule = schedule.inner


def warn_past_end(schedule, step: int, state, stacklevel: Optional[int] = None) -> bool:
    """Warn that ``step`` is past the run length ``schedule.total_steps`` planned for, quoting the scale
    applied there with the search state ``state`` (:func:`applied_scale`); return whether it warned
    (the caller warns once). Schedules without ``total_steps`` never warn."""
    total: Optional[int] = getattr(schedule, "total_steps", None)
    if total is None or step <= total:
        return False
    warnings.warn(
        f"step {step} is past the schedule's total_steps={total}: the applied step now holds at "
        f"{applied_scale(schedule, state, step):.3g}x "
        "the searched level (the end of the cooldown; times lr * growth on a plain step, as "
        "opt.applied_steps shows) with the level frozen. To train longer, build the optimizer with the "
        "new total_steps and load_state_dict() the checkpoint: the schedule continues at this step of the longer run "
        "(from a checkpoint saved before the cooldown, the decay restarts cleanly).",
        UserWarning, stacklevel=caller_stacklevel() if stacklevel is None else stacklevel + 1)
    return True
