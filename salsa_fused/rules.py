"""Search rules: what a rule decides, and the rules by name (``FusedSaLSa(search_rule=...)``).

A *rule* picks the trial direction and starts one *search* per search step; the search picks
the first trial, reads each trial loss (accept, next trial, give up), names the final move
(which may differ from the last trial) and returns the new :class:`SearchState`. The optimizer
moves the weights (``salsa_fused.applied`` forms every trial and applied step from the search's numbers,
``lr_g`` and the schedule) and reads the losses; a rule is host-side arithmetic on floats.

One search step, as :func:`salsa_fused.functional.search_step` drives it::

    direction = rule.direction(configured)            # before the slope q is reduced along it
    search = rule(plan, config, loss, q)
    if search.active:                                  # else: no trial, only search.final()
        weights at search.step_size                    # the first trial
        while search.observe(f(weights)) is Verdict.RETRY:
            weights at search.step_size                # the next trial
    move, state = search.final(), search.finish()      # both read before the move is written
    weights at move                                    # times lr_g and the schedule's scale

``direction()`` names one of the backends' directions (``"gradient"``, ``"momentum"``, ``"raw"``;
checked at construction and at every step); ``final()`` a finite step ``>= 0`` along the trials'
direction or one of those; ``finish()`` a state :meth:`SearchState.validate` accepts. Anything
else, or an exception from either, leaves the weights, moments and search state as before the step.

Optional attributes let a rule change what surrounds its searches (:func:`plan_step`,
:func:`moment_step` and :func:`check_arguments` read them; a rule without them gets SaLSa's
behaviour):

- ``plan(state, config) -> StepPlan``: whether this step searches and its first trial
  (SaLSa's adaptive interval and ``eta * growth`` by default; seed 001's rules search every
  step from ``eta * 2^(1/b)``);
- ``adam_bias_correction = True``: Adam's moments corrected with ``1 - beta^k`` (Kingma & Ba)
  instead of 0.1.0's ``1 - beta^(k+1)``;
- ``reads``: the names in :data:`SEARCH_ARGUMENTS` (FusedSaLSa's arguments that configure a
  search) the rule uses; FusedSaLSa refuses any other of them passed by name (all, by default);
- ``batches(plan) -> Batches``: the rule reads several batches per step; the closure then takes
  a batch index, ``closure(i)`` (the contract: :class:`Batches`; :func:`step_batches`);
- ``without_search(state, config) -> StepPlan``: the step ahead when a search may not run (the
  schedule freezes the level, or every group's lr is 0); by default the plan without its search;
- ``check_state(rule_state)``: raise ValueError on a ``SearchState.rule_state`` no run of the rule
  can reach (``load_state_dict`` calls it before anything changes);
- ``initial_rule_state() -> dict``: the ``rule_state`` before the first step, every key present;
  ``state_dict()`` writes it for a run that has not stepped (torch.distributed.checkpoint loads only
  the keys it finds in a fresh optimizer's state dict);
- ``tracks_level_peak = True``: its searches keep ``SearchState.step_size_fast_peak`` (the peak of
  the level's fast average) as :class:`ArmijoSearch` does; a schedule's ``freeze_below`` reads it
  and is refused under a rule without it.

``"salsa"`` (:class:`~salsa_fused.line_search.ArmijoSearch`, the published smoothed Armijo
test) is the default; ``"sls"`` and ``"alsals"`` are seed 001's Adam+SLS and ALSALS
(:mod:`salsa_fused.adam_sls`), ``"labpal"`` and ``"labpal_sgd"`` seed 003's LABPAL, NSGD and SGD
(:mod:`salsa_fused.labpal`); :func:`register_rule` adds others.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Dict, Iterable, Optional, Protocol, Union, runtime_checkable

from .backends.base import DIRECTIONS
from .errors import checked_int

if TYPE_CHECKING:
    from .line_search import SearchConfig, SearchState, StepPlan


class Verdict(enum.Enum):
    """What a trial loss means. Only ``ACCEPT`` is truthy (``if search.observe(f1):``)."""

    ACCEPT = "accept"  # the search ends; its final move follows
    RETRY = "retry"  # move to the search's next ``step_size`` and evaluate again
    GIVE_UP = "give_up"  # the search ends without an accepted trial; its final move follows

    def __bool__(self) -> bool:
        return self is Verdict.ACCEPT


@dataclass(frozen=True)
class FinalMove:
    """The move a search step applies from ``w0``: ``step`` in units of the level (the optimizer
    multiplies by ``lr_g`` and the schedule's scale), along ``direction`` (``None``: the trials')."""

    step: float
    direction: Optional[str] = None


@dataclass(frozen=True)
class Batches:
    """How many batches one step of a multi-batch rule reads (its ``batches(plan)``).

    The closure of such a rule takes a batch index: ``closure(i)`` runs the forward pass on batch
    ``i`` of *this* step and returns its mean loss (no backward); called again with the same ``i``
    within the step it must use the same batch, and the optimizer replays the random draws of its
    first call (dropout masks), so it sees the same function of the weights. Batches
    ``0 .. gradient-1`` give the gradient: the optimizer runs the backward of ``closure(i) /
    gradient`` for each (in the two-phase form the caller has done it and passes their mean loss).
    Each point of the search is the mean of ``closure(i)`` over ``i < points`` (0: no point is
    evaluated); the point at the weights before the step reuses the gradient batches' losses and
    evaluates only ``gradient .. points-1``. Under DDP each rank's ``closure(i)`` is its own shard
    of batch ``i``; the point means are averaged over the ranks before the rule reads them.
    """

    gradient: int
    points: int = 0

    def __post_init__(self):
        object.__setattr__(self, "gradient", checked_int("gradient (batches a step reads)", self.gradient, 1))
        object.__setattr__(self, "points", checked_int("points", self.points, 0))
        if not (self.points == 0 or self.points >= self.gradient):
            raise ValueError(f"points must be 0 or >= gradient ({self.gradient}), got {self.points!r}")


@runtime_checkable
class Search(Protocol):
    """One search step's decisions."""

    #: False: no trial at all (e.g. 0.1.0's guard: zero loss or tiny slope); only ``final()`` moves.
    active: bool
    #: The trial the weights go to next (the first one once constructed), in units of the level.
    step_size: float
    # Optional: ``undecayed_trials = True`` (a search along "raw"): its trials lie on the line from the undecayed
    # w0, and the weight decay comes with the final move (LABPAL's parabola fit through f(w0) and two trials).

    def observe(self, trial_loss: float) -> Verdict:
        """Read the loss at the current trial."""

    def final(self) -> FinalMove:
        """The move this step applies (after the last ``observe``, or at once when not active)."""

    def finish(self) -> "SearchState":
        """The search state after this step (the new level, averages and counters)."""


@runtime_checkable
class SearchRule(Protocol):
    """Starts the search of a search step; chooses the direction its trials move along."""

    def direction(self, configured: str) -> str:
        """The trial direction (``"gradient"``, ``"momentum"`` or ``"raw"``) given ``search_direction``."""

    def __call__(self, plan: "StepPlan", config: "SearchConfig", loss: float, slope: float) -> Search:
        """The search of this step: ``loss`` is ``f(w0)``, ``slope`` is ``q = sum lr_g * g.d``."""


#: name -> the rule, or "module:attribute" imported when first chosen.
RULES: Dict[str, Union[str, SearchRule]] = {
    "salsa": "salsa_fused.line_search:ArmijoSearch",
    "sls": "salsa_fused.adam_sls:ADAM_SLS",
    "alsals": "salsa_fused.adam_sls:ALSALS",
    "labpal": "salsa_fused.labpal:LABPAL_NSGD",
    "labpal_sgd": "salsa_fused.labpal:LABPAL_SGD",
}
DEFAULT = "salsa"


#: The packaged rules' names: :func:`register_rule` does not replace them.
BUILT_IN = frozenset(RULES)


def register_rule(name: str, rule: Union[str, SearchRule]) -> None:
    """Add rule ``name``: an object with :class:`SearchRule`'s methods, or ``"module:attribute"``.
    Registering a name again replaces the rule of one's own it named; a packaged rule's name
    (:data:`BUILT_IN`) is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a rule name must be a non-empty string, got {name!r}")
    if name in BUILT_IN:
        raise ValueError(f"{name!r} names a packaged search rule ({', '.join(sorted(BUILT_IN))}), which "
                         "register_rule does not replace: register the rule under a name of its own")
    if not isinstance(rule, str):
        _check_rule_object(rule, f"rule {name!r}")
    RULES[name] = rule


def resolve_rule(rule: Union[None, str, SearchRule]) -> SearchRule:
    """The rule for ``search_rule=``: ``None`` (the default), a registered name, or a rule object."""
    if rule is None:
        rule = DEFAULT
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"search_rule must be one of {sorted(RULES)} or a rule object, got {rule!r}")
        entry = RULES[rule]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
        rule = entry
    _check_rule_object(rule, "search_rule")
    return rule


def _check_rule_object(rule: object, label: str) -> None:
    """Raise TypeError unless ``rule`` has :class:`SearchRule`'s methods callable as they stand: a
    class is a rule only when its ``direction`` needs no instance and constructing it starts a
    search (:class:`ArmijoSearch`); a rule class whose methods take ``self`` must be instantiated."""
    if not isinstance(rule, SearchRule):
        raise TypeError(f"{label} must be a rule name or an object with direction(configured) and "
                        f"__call__(plan, config, loss, slope), got {type(rule).__name__}")
    if isinstance(rule, type) and not (isinstance(inspect.getattr_static(rule, "direction"),
                                                  (staticmethod, classmethod)) and _binds(rule, 4)):
        raise TypeError(f"{label}={rule.__name__} is the rule's class; its methods take an instance: "
                        f"pass {rule.__name__}() (with the rule's settings as arguments)")


def _binds(function, count: int) -> bool:
    """Does ``function`` take ``count`` positional arguments (True when its signature is unknown)?"""
    try:
        inspect.signature(function).bind(*range(count))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def checked_direction(rule: SearchRule, configured: str) -> str:
    """``rule.direction(configured)``, refused with the rule named unless it is one of the
    backends' directions (``"gradient"``, ``"momentum"``, ``"raw"``), before anything is written."""
    direction = rule.direction(configured)
    if direction not in DIRECTIONS:
        raise ValueError(f"search rule {rule_name(rule)}.direction({configured!r}) returned {direction!r}; "
                         f"a trial direction is one of {', '.join(map(repr, DIRECTIONS))}. Nothing was written")
    return direction


def rule_name(rule: object) -> str:
    """The rule's class name (a class may be the rule itself: :class:`ArmijoSearch`)."""
    return rule.__name__ if isinstance(rule, type) else type(rule).__name__


#: FusedSaLSa's arguments that configure the search (its ``SearchConfig`` and the trial direction),
#: as opposed to Adam's and the optimizer's own: a rule declares in ``reads`` those it uses.
SEARCH_ARGUMENTS = ("c", "beta3", "growth", "backtrack", "max_trials", "max_search_interval",
                    "always_search_steps", "adaptive_interval", "search_direction")


def check_arguments(rule: SearchRule, passed: Iterable[str], name: object = None) -> None:
    """Raise ValueError naming each of :data:`SEARCH_ARGUMENTS` in ``passed`` (the arguments the
    caller gave by name) that ``rule`` does not read (its ``reads``; a rule without one reads them
    all), so a setting is never silently ignored. ``name``: how the caller chose the rule."""
    reads = getattr(rule, "reads", SEARCH_ARGUMENTS)
    unread = [argument for argument in SEARCH_ARGUMENTS if argument in passed and argument not in reads]
    if not unread:
        return
    label = f"search_rule={name!r}" if isinstance(name, str) else f"search_rule={rule_name(rule)}"
    used = ", ".join(argument for argument in SEARCH_ARGUMENTS if argument in reads) or "none"
    message = f"{label} does not read {', '.join(unread)} (of FusedSaLSa's search arguments it reads {used})"
    own = [argument for argument in unread if is_dataclass(rule) and argument in {f.name for f in fields(rule)}]
    if own:
        settings = ", ".join(f"{argument}=..." for argument in own)
        message += f"; set {', '.join(own)} on the rule instead: search_rule={rule_name(rule)}({settings})"
    raise ValueError(message)


def plan_step(rule: SearchRule, state: "SearchState", config: "SearchConfig") -> "StepPlan":
    """The step ahead under ``rule``: its ``plan(state, config)`` if it has one, else SaLSa's
    (:func:`salsa_fused.line_search.plan_step`: the adaptive interval, first trial ``eta * growth``)."""
    plan = getattr(rule, "plan", None)
    if plan is None:
        return _line_search.plan_step(state, config)
    return _checked_plan(rule, "plan", plan(state, config), state)


def _checked_plan(rule: SearchRule, method: str, plan, state: "SearchState") -> "StepPlan":
    """``plan``, a rule's own ``plan()`` or ``without_search()``, once it is one a step can take: a ``StepPlan``
    whose state counts one step more than ``state``, a bool ``is_search``, a first trial that is a finite number
    >= 0 (nothing is written before this)."""
    name = f"search rule {type(rule).__name__}.{method}()"
    if not isinstance(plan, _line_search.StepPlan):
        raise TypeError(f"{name} must return a StepPlan, got {type(plan).__name__}; nothing was written")
    if not isinstance(plan.state, _line_search.SearchState) or plan.state.step != state.step + 1:
        got = plan.state.step if isinstance(plan.state, _line_search.SearchState) else type(plan.state).__name__
        raise ValueError(f"{name} must return the state of the step ahead, step {state.step + 1}, got {got}; "
                         "nothing was written")
    if not isinstance(plan.is_search, bool):
        raise TypeError(f"{name} must say whether the step searches with a bool, got {plan.is_search!r}; nothing "
                        "was written")
    trial = plan.trial_step_size
    if not _line_search.is_step_size(trial):
        raise ValueError(f"{name} named a first trial of step size {trial!r}; a trial is a finite number >= 0. "
                         "Nothing was written")
    return plan


def step_batches(rule: SearchRule, plan: "StepPlan") -> Optional[Batches]:
    """The batches the step of ``plan`` reads under a multi-batch ``rule`` (its ``batches(plan)``);
    ``None`` for a rule whose closure takes no argument (one batch, ``closure()``)."""
    batches = getattr(rule, "batches", None)
    return None if batches is None else batches(plan)


def plan_without_search(rule: SearchRule, state: "SearchState", config: "SearchConfig",
                        plan: "StepPlan") -> "StepPlan":
    """``plan`` when the step may not search: the rule's ``without_search(state, config)``, else
    ``plan`` as a step without search (its first trial as the plain step)."""
    without = getattr(rule, "without_search", None)
    if without is None:
        StepPlan = _line_search.StepPlan
        if type(plan) is StepPlan:  # as replace() gives, without its pass over the fields
            return StepPlan(state=plan.state, is_search=False, trial_step_size=plan.trial_step_size)
        return replace(plan, is_search=False)
    return _checked_plan(rule, "without_search", without(state, config), state)


def check_rule_state(rule: SearchRule, rule_state: dict, steps_taken: int = 0) -> None:
    """The rule's ``check_state(rule_state)`` when it has one (a loaded checkpoint's scalars). A rule
    that declares ``keeps_no_state`` (the Adam rules) never has any, and one that declares
    ``keeps_state_from_first_step`` (LABPAL) has it after its first step: a checkpoint that says
    otherwise was saved under another ``search_rule``. (``"salsa"``, ``"sls"`` and ``"alsals"`` keep
    none, so they cannot be told apart; a rule of one's own declares neither, and is not checked so.)"""
    if _declares(rule, "keeps_no_state") and rule_state:
        raise ValueError(f"the checkpoint's search state carries a rule's own scalars ({sorted(rule_state)}), "
                         "which this search_rule does not keep: it was saved under another search_rule "
                         "(LABPAL's, say); build the optimizer with that rule")
    if _declares(rule, "keeps_state_from_first_step") and not rule_state and steps_taken > 0:
        raise ValueError(f"the checkpoint took {steps_taken} steps without the scalars this search_rule keeps from "
                         "its first step: it was saved under another search_rule ('salsa', 'sls' or 'alsals'); "
                         "build the optimizer with that rule")
    check = getattr(rule, "check_state", None)
    if check is not None:
        check(rule_state)


def _declares(rule: SearchRule, name: str) -> bool:
    """``name`` set on the rule's own class (or the rule, a class, itself), not inherited: a rule
    of one's own built on a packaged one may keep another state."""
    own = vars(rule) if isinstance(rule, type) else {**vars(type(rule)), **getattr(rule, "__dict__", {})}
    return bool(own.get(name, False))


def moment_step(rule: SearchRule, step: int) -> int:
    """The ``k`` that :meth:`Hyper.for_step <salsa_fused.backends.base.Hyper.for_step>` corrects
    Adam's moments with at step ``step``: 0.1.0 corrects with ``1 - beta^(step+1)``; a rule with
    ``adam_bias_correction = True`` gets Adam's ``1 - beta^step``."""
    return step - 1 if getattr(rule, "adam_bias_correction", False) else step


# At the end: line_search imports this module at its top. A function-level import ran the import
# machinery (a Python call, importlib's ``parent``) at every step's plan_step and plan_without_search.
from . import line_search as _line_search  # noqa: E402
