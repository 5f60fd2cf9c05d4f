"""A beam of step-size factors around FusedSaLSa (seed 004's ALR tree, beam width 1).

The line search finds a level ``eta``; a schedule multiplies the step applied. The beam
multiplies it once more, by ``m`` (1 at the start), and sets ``m`` from the loss itself:
at a few steps ``k`` fixed in advance, from the weights and optimizer state before step
``k``, it runs ``H`` steps once per factor ``f`` (default ``1/2, 1, 2``) with ``m * f`` on the
same upcoming batches ``k .. k+H-1``, and scores each branch by its *horizon loss*

    L(f) = (1/H) * sum_{i<H} loss_i(f),     loss_i the loss step k+i reports (before it moves)

then keeps ``m <- m * argmin_f L(f)`` (ties: the factor nearest 1).

With ``move_margin`` = delta > 0 the multiplier moves only on a clear preference: with ``f*`` the
factor of lowest score, the beam keeps ``m <- m * f*`` only if

    L(f*) < L(1) - delta * |L(1)|        (for a positive loss: L(f*) < (1 - delta) * L(1))

and otherwise keeps ``m`` (factor 1); a diverged x1 branch (``L(1) = inf``) loses to any finite one.
Scores a fraction of a percent apart are within the noise of one horizon; following them moves the
multiplier on nothing. ``delta = 0`` is the plain argmin (``f* != 1`` already means ``L(f*) < L(1)``).

With ``cooldown`` > 0 each branch goes on for ``C = round(cooldown * H)`` more steps (batches
``k+H .. k+H+C-1``) whose multiplier falls linearly, ``m * f * (C - j) / (C + 1)`` at cooldown
step ``j``, and is scored by the mean loss over those ``C`` steps instead: a short horizon
favours the smaller step, which lowers the loss's noise floor at once while the larger one
needs longer to show its progress (Wu et al., 2018); annealing every branch before scoring
compares progress, as a cooldown reveals it at the end of a run. Every branch is thrown
away (weights, moments, search state, random generators, the buffers it was given), and
step ``k`` is taken at the new ``m`` from exactly the state it had: the run after the beam
is the run that would have had ``m * f`` from step ``k`` on (the winning branch, recomputed).

Branch steps do not run the optimizer's step hooks (torch's, per optimizer or global): only
the run's own steps do, once each.

This measures what an AdamW grid measures (which rate trains best over a horizon) where the
Armijo test only sees one trial's curvature. Costs ``len(factors) * (H + C)`` extra steps per
beam step, each with its search's trial forwards; :attr:`StepSizeBeam.num_forward_evals` counts them beside the optimizer's own.

``closure(i)`` returns the loss on the ``i``-th batch from the current step on (``i = 0``:
this step's batch); the beam needs to see ahead, so the loop must know its batches.
"""

from __future__ import annotations

import math
import numbers
from copy import deepcopy
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ._rng import RNGSnapshot
from .errors import NonFiniteError, checked_int
from .line_search import FLOAT32_MAX, FLOAT32_TINY
from .checkpoint import torch_hooks_suspended
from .closures import CALL_NAME, running_statistics, takes_an_index
from .optimizer import FusedSaLSa
from .step_size import ScaledSchedule, check_factors, check_installed, is_number, scaled_by

#: Options of earlier versions, removed after their ablations lost (benchmarks/quality/NOTES.md
#: sections 11, 14-19); a state_dict that has them at a value other than 0 is refused.
REMOVED_OPTIONS = ("min_multiplier", "extensions", "downward_extensions", "move_confidence", "down_horizon",
                   "down_floor")

#: Seed 004's ``Factor_3``: halve, keep, double.
HALVE_KEEP_DOUBLE = (0.5, 1.0, 2.0)

IndexedClosure = Callable[[int], torch.Tensor]


def _step_without_hooks(opt: FusedSaLSa, closure):
    """``opt.step(closure)`` without torch's step hooks (the optimizer's and the global ones): a
    branch's steps are thrown away, so a hook (an EMA of the weights, logging, clipping) must not see
    them. ``FusedSaLSa.step`` runs them itself around ``_unhooked_step``; a subclass's own ``step``
    is wrapped by torch, and the function it wrapped is called, with the optimizer's own hooks set
    aside too (its ``super().step()`` runs none)."""
    step = type(opt).step
    if step is FusedSaLSa.step:
        return opt._unhooked_step(closure)
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    with torch_hooks_suspended(opt, "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        return raw(opt, closure) if raw is not None else opt.step(closure)


class _Snapshot:
    """Everything a branch can change, copied; :meth:`restore` writes it back in place (bitwise) and
    has the optimizer build its buckets again (the branches' set of gradients and counts of steps sat out
    are not the run's)."""

    def __init__(self, opt: FusedSaLSa, buffers: List[torch.Tensor]):
        self.opt = opt
        params = [p for group in opt.param_groups for p in group["params"]]
        with torch.no_grad():
            self.params = [(p, p.detach().clone()) for p in params]
            self.buffers = [(b, b.detach().clone()) for b in buffers]
            self.state = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else deepcopy(v))
                              for k, v in opt.state[p].items()} for p in params if p in opt.state}
        self.stateless = [p for p in params if p not in self.state]
        self.groups = [{k: deepcopy(v) for k, v in group.items() if k != "params"} for group in opt.param_groups]
        self.search = opt.search_state  # a deep copy
        self.collapse_checked = opt._collapse_checked
        self.counts = None if opt._counts is None else deepcopy(opt._counts)
        # the run's NaN/inf counts on their way to the host: read by the run, not by a branch
        self.counts_in_flight, opt._counts_in_flight = opt.__dict__.get("_counts_in_flight"), None
        handoff = opt._handoff
        self.handoff = (handoff.forward_rng, handoff.zero_grad_rng, handoff.bound_step, dict(handoff.zeroed))
        self.rng = RNGSnapshot.capture({p.device for p, _ in self.params})

    def restore(self) -> None:
        opt = self.opt
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
                p.grad = None
            for b, saved in self.buffers:
                b.copy_(saved)
            for p, saved in self.state.items():
                state = opt.state[p]
                for k in [k for k in state if k not in saved]:
                    del state[k]
                for k, v in saved.items():
                    if isinstance(v, torch.Tensor) and isinstance(state.get(k), torch.Tensor) \
                            and state[k].shape == v.shape and state[k].dtype == v.dtype:
                        state[k].copy_(v)
                    else:
                        state[k] = v.clone() if isinstance(v, torch.Tensor) else deepcopy(v)
        for p in [p for p in self.stateless if p in opt.state]:  # its first gradient came in a branch
            del opt.state[p]  # no state, as before it
        # The cache held the branches' buckets: which params had gradients there, and the moments made
        # there. Built again, the step after counts the steps each param sat out from the state put back.
        opt._buckets.clear()
        for group, saved in zip(opt.param_groups, self.groups):
            group.update(deepcopy(saved))
        opt._commit(deepcopy(self.search))
        opt._collapse_checked = self.collapse_checked
        opt._counts = None if self.counts is None else deepcopy(self.counts)
        opt._counts_in_flight = None  # a branch's own, if it took one
        handoff = opt._handoff
        handoff.forward_rng, handoff.zero_grad_rng, handoff.bound_step, zeroed = self.handoff
        handoff.zeroed = dict(zeroed)
        self.rng.set()

    def release(self) -> None:
        """After the last branch's restore: the run's counts in flight go back to the run."""
        self.opt._counts_in_flight = self.counts_in_flight


def _is_a_decision(decision) -> bool:
    """Whether ``decision`` is one of :attr:`StepSizeBeam.decisions`: its step, the factor kept and the multiplier."""
    if not isinstance(decision, dict):
        return False
    step = decision.get("step")
    return (isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and all(is_number(decision.get(key)) and 0 < decision[key] < math.inf for key in ("factor", "multiplier")))


class StepSizeBeam:
    """Keep, at a few steps, the factor on the applied step whose next ``H`` steps train best.

    Args:
        optimizer: a :class:`~salsa_fused.FusedSaLSa` (its ``schedule``, if any, is kept and
            multiplied).
        total_steps: the run length; the beam steps and the horizon are fractions of it.
        points: fractions of the run in (0, 1) at whose steps the beam runs (step
            ``max(1, round(p * total_steps))``, 0-based: never before the first step; a point that
            falls on the run's end or past it, on a short run, is left out: no step of the run is
            there, and past the end the beam decides nothing).
        horizon: the horizon ``H`` as a fraction of the run, ``H = max(1, round(horizon *
            total_steps))`` steps (cut at the run's end).
        factors: at least two distinct finite factors > 0, one branch each.
        buffers: tensors the closure changes besides the parameters (e.g. ``model.buffers()``:
            BatchNorm's running statistics), put back after every branch; by default (``None``) the
            running statistics of the optimizer's ``model=``, as :class:`~salsa_fused.lr_factor.LRFactorSearch`
            takes them (none without ``model=``).
        cooldown: the cooldown ``C`` as a fraction of ``H`` (0: none; the module docstring).
            The defaults (beam at 5, 10, 15% of the run, ``H`` = 3% of it, ``C = H``) are the
            configuration chosen on the quality zoo's development tasks (benchmarks/quality
            NOTES.md section 11); nothing is set per task.
        move_margin: the relative score a factor other than 1 must win by before the multiplier
            moves, in [0, 1) (0: the lowest score wins; the module docstring). Needs 1 among the
            factors.

    Use::

        beam = StepSizeBeam(opt, total_steps=len(batches), buffers=model.buffers())
        for k in range(len(batches)):
            loss = beam.step(lambda i: loss_fn(model, batches[k + i]))

    ``step`` zeroes the gradients and runs the one-phase ``opt.step(closure)`` itself.
    """

    def __init__(self, optimizer: FusedSaLSa, total_steps: int, *, points: Sequence[float] = (0.05, 0.1, 0.15),
                 horizon: float = 0.03, factors: Sequence[float] = HALVE_KEEP_DOUBLE,
                 buffers: Optional[Iterable[torch.Tensor]] = None, cooldown: float = 1.0,
                 move_margin: float = 0.0):
        if not isinstance(optimizer, FusedSaLSa):
            raise TypeError(f"optimizer must be a FusedSaLSa, got {type(optimizer).__name__}")
        if optimizer.next_batches() is not None:
            raise ValueError("StepSizeBeam's closure(i) is the loss of the i-th batch from the current step on, "
                             "but this FusedSaLSa's search rule (search_rule='labpal') reads several batches "
                             "per step through closure(i) of its own: the two contracts do not compose")
        if scaled_by(optimizer.schedule, StepSizeBeam):
            raise ValueError("this FusedSaLSa already has a StepSizeBeam on its schedule")
        total_steps = checked_int("total_steps", total_steps, 1)
        planned = getattr(optimizer.schedule, "total_steps", None)
        if isinstance(planned, numbers.Integral) and not isinstance(planned, bool) and planned != total_steps:
            raise ValueError(f"total_steps={total_steps} contradicts the optimizer's schedule, planned for "
                             f"{planned} steps: the beam's points and horizon are fractions of the run the "
                             "schedule plans; pass the same run length to both")
        if isinstance(points, (str, bytes)) or not isinstance(points, Iterable):
            raise TypeError(f"points must be a sequence of fractions of the run (e.g. (0.05, 0.1)), got {points!r}")
        points = tuple(points)
        for p in points:
            if not is_number(p) or not 0 < p < 1:
                raise ValueError(f"points must be fractions of the run in (0, 1), got {p!r} in {points}")
        points = tuple(map(float, points))  # a numpy scalar or Fraction: Python floats from here
        if not is_number(horizon) or not 0 < horizon <= 1:
            raise ValueError(f"horizon must be a fraction of the run in (0, 1], got {horizon!r}")
        horizon = float(horizon)
        factors = check_factors(factors)
        if not is_number(cooldown) or not (math.isfinite(cooldown) and cooldown >= 0):
            raise ValueError(f"cooldown must be a finite fraction of the horizon >= 0, got {cooldown!r}")
        if not is_number(move_margin) or not 0 <= move_margin < 1:
            raise ValueError(f"move_margin must be a relative score margin in [0, 1), got {move_margin!r}")
        cooldown, move_margin = float(cooldown), float(move_margin)
        if move_margin and 1.0 not in factors:
            raise ValueError(f"move_margin compares every factor with keeping the multiplier (factor 1), "
                             f"but 1 is not among the factors {tuple(factors)}")
        if buffers is not None:
            buffers = list(buffers)
            for b in buffers:
                if not isinstance(b, torch.Tensor):
                    raise TypeError(f"buffers must be tensors, got {type(b).__name__}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.points = points
        self.horizon = float(horizon)
        self.horizon_steps = max(1, int(round(horizon * total_steps)))
        self.factors = tuple(float(f) for f in factors)
        self.beam_steps = sorted(step for step in {max(1, int(round(p * total_steps))) for p in points}
                                 if step < total_steps)
        self.buffers = buffers
        self.cooldown_steps = int(round(cooldown * self.horizon_steps))
        self.move_margin = float(move_margin)
        self.multiplier = 1.0
        self._applied_multiplier = 1.0
        self.calls = 0
        self.branch_forward_evals = 0
        self.decisions: List[Dict] = []
        optimizer.schedule = ScaledSchedule(optimizer.schedule, self, "_applied_multiplier")

    @property
    def num_forward_evals(self) -> int:
        """Every forward: the optimizer's (its steps and their trials) and the branches'."""
        return self.optimizer.num_forward_evals + self.branch_forward_evals

    def step(self, closure: IndexedClosure):
        """Step ``calls`` of the run (running the beam first at a beam step); returns the loss."""
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if not takes_an_index(closure):
            raise TypeError("StepSizeBeam's closure takes the batch index: closure(i) returns the loss of the i-th "
                            "batch from the current step on (i = 0: this step's); the closure given takes no "
                            "argument. Nothing was stepped")
        check_installed(self.optimizer.schedule, self)
        before = (self.multiplier, len(self.decisions), self.branch_forward_evals)

        def first_batch():
            return closure(0)
        setattr(first_batch, CALL_NAME, "closure(0)")  # what the optimizer's messages call it
        try:
            if self.calls in self.beam_steps:
                self._decide(closure)
            self._applied_multiplier = self.multiplier
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.optimizer.step(first_batch)
        except BaseException:
            # the step did not happen (the optimizer put everything back): neither did this call's
            # decision, so a retry decides again from the same multiplier, and counts its branches'
            # forwards again (as the optimizer leaves a refused step's forwards out of its own count)
            self.multiplier, kept, self.branch_forward_evals = before
            del self.decisions[kept:]
            self._applied_multiplier = self.multiplier
            raise
        self.calls += 1
        return loss

    def _decide(self, closure: IndexedClosure) -> None:
        left = self.total_steps - self.calls
        if left <= 0:  # past the run's end (a checkpoint's beam step, say): no horizon to score
            return
        steps = min(self.horizon_steps, left)
        cool = min(self.cooldown_steps, left - steps)
        given = self.buffers
        snapshot = _Snapshot(self.optimizer, running_statistics(self.optimizer.model) if given is None else given)
        losses: List[float] = []
        failures: List[tuple] = []  # per branch that diverged: (its step, the error or None for a non-finite loss)
        try:
            for f in self.factors:
                losses.append(self._branch(closure, steps, cool, self.multiplier * f, failures))
                snapshot.restore()
            scores = dict(zip(self.factors, losses))
        except BaseException:
            snapshot.restore()
            self._applied_multiplier = self.multiplier
            raise
        finally:
            snapshot.release()
        if not any(math.isfinite(x) for x in scores.values()):
            self._applied_multiplier = self.multiplier
            if all(at == 0 for at, _ in failures):  # each branch's first step, from the same weights
                raise NonFiniteError(
                    f"every branch of the beam at step {self.calls} failed at its first step, from the current "
                    "weights, before its factor moved anything, so the fault is closure(0) at these weights, not a "
                    f"factor: {failures[0][1] or 'its loss was not finite'}. Nothing was stepped")
            raise NonFiniteError(f"every branch of the beam at step {self.calls} diverged "
                                 f"(horizon losses {losses}): no factor to keep")
        best = min(scores, key=lambda f: (scores[f], abs(math.log(f))))
        factor = best if self._clears_margin(scores, best) else 1.0
        self.multiplier *= factor
        decision = dict(step=self.calls, horizon=steps, cooldown=cool, losses=losses, factor=factor,
                        multiplier=self.multiplier)
        if self.move_margin:
            decision["lowest"] = best  # the factor of lowest score, kept or not
        self.decisions.append(decision)

    def _clears_margin(self, scores: Dict[float, float], best: float) -> bool:
        """Whether ``best`` (not 1) scores below ``L(1) - move_margin * |L(1)|``; True without a margin."""
        if not self.move_margin or best == 1.0:
            return True
        keep = scores[1.0]
        if not math.isfinite(keep):
            return True  # x1 diverged; ``best`` is finite (checked before)
        return scores[best] < keep - self.move_margin * abs(keep)

    def _branch(self, closure: IndexedClosure, steps: int, cool: int, multiplier: float,
                failures: List[tuple]) -> float:
        """``steps`` steps at ``multiplier``, then ``cool`` at a linearly falling one: the mean loss of
        the cooldown's steps (of the first ``steps`` without one); inf if a step raised
        NonFiniteError or a loss was NaN/inf (under data parallelism, a NonFiniteError the closure raised
        on this rank only propagates, as any exception of a search's forward: the optimizer raises it here
        and ClosureFailedOnAnotherRank on the other ranks; raised on every rank, it is an agreed divergence:
        NonFiniteOnEveryRank on every rank, inf). Counts the branch's forwards. Under data parallelism
        each step's loss is averaged over the optimizer's loss group first, so every rank scores,
        leaves and keeps alike (a rank's own loss kept different factors on different ranks). A branch that
        diverges appends (its step, the NonFiniteError or None) to ``failures``."""
        opt = self.optimizer
        opt._collapse_checked = True  # a branch that runs past the freeze does not warn: the run checks its own
        total = 0.0
        for i in range(steps + cool):
            j = i - steps
            self._applied_multiplier = multiplier if j < 0 else multiplier * (cool - j) / (cool + 1)
            if j == 0:
                total = 0.0  # scored on the cooldown only

            def counted(i=i):
                self.branch_forward_evals += 1
                try:
                    return closure(i)
                except NonFiniteError as error:
                    raised.append(error)
                    raise
            setattr(counted, CALL_NAME, f"closure({i})")
            raised: List[BaseException] = []
            opt.zero_grad(set_to_none=True)
            try:
                local = _step_without_hooks(opt, counted)
            except NonFiniteError as error:  # the optimizer's own check is collective: raised on every rank alike
                if opt.reduction.loss_group is not None and any(error is own for own in raised):
                    # the closure's own, on this rank alone (on every rank it comes as NonFiniteOnEveryRank): its
                    # peers raise ClosureFailedOnAnotherRank (a diverged branch here and an error there parted
                    # the ranks' collectives), so this rank raises
                    raise
                failures.append((i, error))
                return math.inf
            (loss,) = opt.reduction.average_loss(
                local.detach().reshape(1).to(device=opt._device, dtype=torch.float32)).tolist()
            if not math.isfinite(loss):
                failures.append((i, None))
                return math.inf
            total += loss
        return total / (cool if cool else steps)

    @property
    def last_decision(self) -> Optional[Dict]:
        return self.decisions[-1] if self.decisions else None

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """The multiplier, the step counter and the decisions (the optimizer's own state is in its
        ``state_dict``)."""
        return dict(total_steps=self.total_steps, beam_steps=list(self.beam_steps),
                    horizon_steps=self.horizon_steps, cooldown_steps=self.cooldown_steps,
                    factors=list(self.factors), move_margin=self.move_margin, calls=self.calls,
                    multiplier=self.multiplier, branch_forward_evals=self.branch_forward_evals,
                    decisions=deepcopy(self.decisions))

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume; the configuration (run length, beam steps, horizon, factors) must match."""
        expected = dict(total_steps=self.total_steps, beam_steps=list(self.beam_steps),
                        horizon_steps=self.horizon_steps, cooldown_steps=self.cooldown_steps,
                        factors=list(self.factors), move_margin=self.move_margin)
        state_dict = {"move_margin": 0.0, **state_dict}  # saved before ``move_margin`` existed: none
        for key in REMOVED_OPTIONS:  # brackets, a floor, move tests that lost their ablations (NOTES 11, 14-19)
            if state_dict.get(key, 0):
                raise ValueError(f"this StepSizeBeam state_dict was saved with {key}={state_dict[key]!r}, an "
                                 f"option removed after it lost its ablation (benchmarks/quality/NOTES.md): "
                                 f"it cannot be resumed here")
        for key, value in expected.items():
            if key not in state_dict:
                raise ValueError(f"StepSizeBeam state_dict lacks {key!r}")
            saved = list(state_dict[key]) if isinstance(value, list) else state_dict[key]
            if key == "beam_steps" and isinstance(state_dict.get("total_steps"), int):
                # saved before steps on the run's end were left out: they never ran a beam
                saved = [step for step in saved if step < state_dict["total_steps"]]
            if saved != value:
                raise ValueError(f"StepSizeBeam state_dict has {key}={saved!r}, this instance {value!r}")
        calls, multiplier = state_dict.get("calls"), state_dict.get("multiplier")
        forwards = state_dict.get("branch_forward_evals")
        for name, value in (("calls", calls), ("branch_forward_evals", forwards)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StepSizeBeam state_dict {name} must be an integer >= 0, got {value!r}")
        if not is_number(multiplier) or not FLOAT32_TINY <= multiplier <= FLOAT32_MAX:
            raise ValueError(f"StepSizeBeam state_dict multiplier must be a number > 0 that float32 holds, from "
                             f"{FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g}, got {multiplier!r}")
        decisions = state_dict.get("decisions", [])
        if not (isinstance(decisions, (list, tuple)) and all(map(_is_a_decision, decisions))):
            raise ValueError("StepSizeBeam state_dict decisions must be a list of decisions (dicts, as "
                             "StepSizeBeam.decisions: a step >= 0, and its factor and multiplier numbers > 0), got "
                             f"{decisions!r}")
        self.calls, self.multiplier = calls, float(multiplier)
        self._applied_multiplier = self.multiplier
        self.branch_forward_evals = forwards
        self.decisions = deepcopy(list(decisions))
