"""Automated learning-rate factor search (seed 004), on top of any optimizer.

Every ``interval`` calls, around the optimizer's own step: with the weights ``w0`` before
and ``w1`` after the step (the step ``delta = w1 - w0`` the optimizer took at its current
rate), the loss on one scoring batch is measured at ``w0 + f*delta`` for each factor ``f``,
the losses are normalized to z-scores ``x_f`` (sample standard deviation), scored
``s_f = exp(-x_f)``, and the rate is multiplied by the score-weighted geometric mean
``exp(sum s_f log f / sum s_f)``. The weights are put back to ``w1`` bitwise.

``f * delta`` is the step the optimizer would take at ``f`` times its rate whenever its
update is linear in the rate: SGD (with or without momentum), Adam/AdamW (decoupled decay
included), and FusedSaLSa's applied step. The seed's slides try ``theta - f*eta*grad`` before
the step and restore ``theta``; here the step at the old rate is kept and the new rate
applies from the next step (no extra optimizer step, no copy of the optimizer's state).

Where the factor goes (``target``):

- ``"lr"``: every param group's ``lr`` is multiplied (torch.optim's optimizers). A scheduler that
  multiplies the current ``lr`` (StepLR, ExponentialLR, CosineAnnealingLR) keeps the factor; one
  that writes ``lr`` from its base rates at every step (LambdaLR, OneCycleLR, CyclicLR) overwrites
  it and every decision is lost: put the search's running product in the formula,
  ``LambdaLR(opt, lambda k: search.scale * schedule(k))``.
- ``"schedule"``: FusedSaLSa's ``schedule`` scale, a multiplier on the applied step that
  the line search does not see. (FusedSaLSa's ``lr`` would do too, since trials probe at the
  ``search_lr`` fixed at construction and a later ``lr`` scales only the applied step; the
  schedule keeps the factor apart from a scheduler that writes ``lr``.)
- ``"auto"`` (default): ``"schedule"`` for FusedSaLSa, ``"lr"`` otherwise.

Cost per decision: one forward per factor on the scoring batch (no backward; counted in
``scoring_forward_evals``), two copies of the weights while it runs. Under ``torch.distributed`` the trial
losses are averaged over the ranks before scoring (one all-reduce per factor, of its loss and the ranks'
status), so every rank chooses the same rate, and a scoring forward that raises on one rank raises on every rank before
the next factor's forward: that rank its own exception, the others
:class:`~salsa_fused.ClosureFailedOnAnotherRank`. Trial forwards replay the random state of the first trial (equal
dropout masks) and leave the generators where one forward leaves them; the running statistics
of BatchNorm layers (``buffers=``, by default FusedSaLSa's ``model=``'s) go back to where the
optimizer's step left them. A step that moved no weight (GradScaler or a NaN loss skipped it)
decides nothing: every factor would score alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ._rng import RNGSnapshot
from .distributed import SearchReduction, default_reduction, without_buffer_broadcast
from .errors import NonFiniteError, checked_int
from .closures import forget_autocast_casts, is_stale_loss, running_statistics
from .optimizer import FusedSaLSa
from .step_size import ScaledSchedule, check_factors, check_installed, scaled_by

#: The factor lists of seed 004 (Factor_3 is the default).
FACTOR_3 = (2.0, 1.0, 0.5)
FACTOR_5 = (4.0, 2.0, 1.0, 0.5, 0.125)
FACTOR_7 = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)
TARGETS = ("auto", "lr", "schedule")


def _note(error: BaseException, text: str) -> None:
    """Add ``text`` to ``error``'s report (``add_note``, Python 3.11+; before it, into its message)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    elif error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} ({text})",) + error.args[1:]


def factor_scores(factors: Sequence[float], losses: Sequence[float]):
    """``(scores, factor)``: ``exp(-z)`` of each loss's z-score, and the score-weighted
    geometric mean of ``factors``. A non-finite loss scores 0 and is left out of the mean
    and standard deviation; equal losses (standard deviation 0) score 1 each.

    Seed 004 writes ``Normalize(Loss_list)`` without saying how; the z-score is this package's
    reading. It is scale-free: losses 0.999, 1.0, 1.003 and 0.9, 1.0, 1.3 choose the same factor
    (1.40 from ``(2, 1, 0.5)``), so differences at the noise level move the rate as much as large
    ones. Min-max scaling is as scale-free (1.23 for both); the loss over its mean is not (1.00 and
    1.09)."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite:
        raise NonFiniteError(f"every trial loss was NaN/inf ({list(losses)}): no factor to choose")
    mean = math.fsum(finite) / len(finite)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    scores = [0.0 if not math.isfinite(x) else (math.exp(-(x - mean) / std) if std > 0 else 1.0)
              for x in losses]
    log_mean = math.fsum(s * math.log(f) for s, f in zip(scores, factors)) / math.fsum(scores)
    return scores, math.exp(log_mean)


class LRFactorSearch:
    """Seed 004's automated learning-rate scheduler around an optimizer's step.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (e.g. AdamW) or a ``FusedSaLSa``.
        interval: decide every ``interval`` calls of :meth:`step` (the seed: once per epoch).
        factors: at least two distinct finite factors > 0 (seed 004's ``Factor_3`` by default).
        target: ``"auto"``, ``"lr"`` or ``"schedule"`` (module docstring).
        reduction: where trial losses are averaged (default: over the world when
            ``torch.distributed`` runs with more than one rank).
        buffers: tensors the scoring closure changes besides the parameters (``model.buffers()``:
            BatchNorm's running statistics), put back after the scoring forwards. Default: the
            running statistics of a FusedSaLSa's ``model=``, else none.

    Use::

        search = LRFactorSearch(opt, interval=len(loader))
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward()
            search.step(lambda: loss_fn(model(x), y))          # calls opt.step() itself
        # FusedSaLSa: search.step(score_closure, lambda: opt.step(train_closure))
    """

    def __init__(self, optimizer, interval: int, factors: Sequence[float] = FACTOR_3, *,
                 target: str = "auto", reduction: Optional[SearchReduction] = None,
                 buffers: Optional[Iterable[torch.Tensor]] = None):
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (with param_groups), "
                            f"got {type(optimizer).__name__}")
        interval = checked_int("interval", interval, 1)
        factors = check_factors(factors)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if buffers is not None:
            buffers = list(buffers)
            for b in buffers:
                if not isinstance(b, torch.Tensor):
                    raise TypeError(f"buffers must be tensors, got {type(b).__name__}")
        if target == "auto":
            target = "schedule" if isinstance(optimizer, FusedSaLSa) else "lr"
        if target == "schedule":
            if not isinstance(optimizer, FusedSaLSa):
                raise ValueError(f"target='schedule' needs a FusedSaLSa, got {type(optimizer).__name__}")
            if scaled_by(optimizer.schedule, LRFactorSearch):
                raise ValueError("this FusedSaLSa already has an LRFactorSearch on its schedule")
            optimizer.schedule = ScaledSchedule(optimizer.schedule, self, "scale")
        else:
            for i, group in enumerate(groups):
                lr = group.get("lr")
                if isinstance(lr, bool) or not isinstance(lr, (int, float)):
                    raise TypeError(f"target='lr' needs a float lr in every param group; group {i} has "
                                    f"{type(lr).__name__}")
        self.optimizer = optimizer
        self.interval = interval
        self.factors = tuple(float(f) for f in factors)
        self.target = target
        self.reduction = reduction
        self.buffers = buffers
        self.calls = 0
        self.scale = 1.0  # product of the chosen factors
        #: The scoring forwards run: one per factor per decision, and one more per factor whose loss, in a static
        #: output buffer, tied an earlier factor's bitwise (:func:`salsa_fused.closures.is_stale_loss`).
        self.scoring_forward_evals = 0
        self.last_decision: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ step
    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, closure: Callable[[], Any], optimizer_step: Optional[Callable[[], Any]] = None):
        """Take the optimizer's step (``optimizer_step()``; default ``optimizer.step()``, for a torch optimizer: a
        FusedSaLSa needs ``lambda: opt.step(train_closure)``) and,
        every ``interval`` calls, choose the factor; returns what ``optimizer_step`` returned.

        ``closure()`` runs the forward pass on the scoring batch and returns the scalar loss
        (called under ``torch.no_grad()``, once per factor, only on decision calls). If it
        raises or returns a bad value, the weights, the buffers and the random generators are put
        back to where the optimizer's step left them and the rate is unchanged; under data
        parallelism on every rank alike (the other ranks raise
        :class:`~salsa_fused.ClosureFailedOnAnotherRank`), so the run goes on alike from the next call.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if optimizer_step is None:
            if isinstance(self.optimizer, FusedSaLSa):
                raise TypeError("a FusedSaLSa steps through its own closure: pass it as optimizer_step, "
                                "search.step(score_closure, lambda: opt.step(train_closure)); opt.step() alone, "
                                "with no closure, would step nothing")
            optimizer_step = self.optimizer.step
        elif not callable(optimizer_step):
            raise TypeError(f"optimizer_step must be callable, got {type(optimizer_step).__name__}")
        if self.target == "schedule":
            check_installed(self.optimizer.schedule, self)
        if (self.calls + 1) % self.interval != 0:
            result = optimizer_step()
            self.calls += 1
            return result
        params = self._params()
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
        result = optimizer_step()
        self.calls += 1
        with torch.no_grad():
            after = [p.detach().clone() for p in params]
            device = before[0].device if before else torch.device("cpu")
            flags = [torch.ne(w0, w1).any().to(device) for w0, w1 in zip(before, after) if w0.numel()]
            moved = bool(torch.stack(flags).any()) if flags else False  # one host read
        if not self._moved_anywhere(moved, params):
            self.last_decision = dict(call=self.calls, losses=[], scores=[], factor=1.0, scale=self.scale,
                                      skipped=True)
            return result
        try:
            losses = self._trial_losses(closure, params, before, after)
            scores, factor = factor_scores(self.factors, losses)
        except Exception as error:
            _note(error, f"LRFactorSearch: the optimizer's step (call {self.calls}) was taken before the scoring "
                         "failed; the weights are where it left them and the rate is unchanged: do not "
                         "retake this step")
            raise
        self._apply(factor)
        self.last_decision = dict(call=self.calls, losses=losses, scores=scores, factor=factor, scale=self.scale,
                                  skipped=False)
        return result

    def _moved_anywhere(self, moved: bool, params: List[torch.Tensor]) -> bool:
        """Whether the step moved a weight on any rank (one all-reduce under data parallelism)."""
        reduction = self.reduction if self.reduction is not None else default_reduction()
        if reduction.loss_group is None:
            return moved
        device = params[0].device if params else torch.device("cpu")
        flag = torch.tensor([1.0 if moved else 0.0], device=device)
        return bool(reduction.average_loss(flag).item() > 0)

    def _running_statistics(self) -> List[torch.Tensor]:
        if self.buffers is not None:
            return self.buffers
        return running_statistics(self.optimizer.model if isinstance(self.optimizer, FusedSaLSa) else None)

    def _trial_losses(self, closure, params, before, after) -> List[float]:
        """The loss at each factor's weights, averaged over the ranks: one all-reduce per factor, which
        carries the ranks' status (:meth:`SearchReduction.shared_loss`): a rank whose scoring forward raised
        joins it flagged and raises its own exception, the others :class:`ClosureFailedOnAnotherRank`,
        before the next factor's forward. On any exception the weights go back to ``w1``, the buffers and
        the random generators to where the optimizer's step left them."""
        devices = {p.device for p in params}
        rng = RNGSnapshot.capture(devices)
        device = params[0].device if params else torch.device("cpu")
        reduction = self.reduction if self.reduction is not None else default_reduction()
        where = (f"in LRFactorSearch's scoring forward (call {self.calls}; that rank raised its own exception): "
                 "every rank raises, the weights, buffers and generators where the optimizer's step left them and "
                 "the rate unchanged, alike on every rank")
        with torch.no_grad():
            buffers = [(b, b.detach().clone()) for b in self._running_statistics()]
        values, returned = [], []

        def again() -> object:
            """The scoring forward once more, from the random state of the first (None under data parallelism)."""
            rng.set()
            self.scoring_forward_evals += 1
            return closure()
        rerun = None if reduction.active or any(hasattr(p, "_local_tensor") for p in params) else again

        def scored(f: float) -> torch.Tensor:
            """The loss at ``w0 + f * (w1 - w0)``, float64 on ``device``."""
            for p, w0, w1 in zip(params, before, after):
                p.copy_(w1 if f == 1.0 else torch.lerp(w0, w1, f))  # w0 + f * (w1 - w0)
            rng.set()
            forget_autocast_casts()
            self.scoring_forward_evals += 1
            value = closure()
            values.append(self._loss_value(value))
            if isinstance(value, torch.Tensor) and is_stale_loss(value, list(zip(returned, values)), rerun):
                raise RuntimeError(
                    "closure() returned the same loss tensor at two factors' weights: it must run "
                    "the forward again at each call (each factor's weights are scored by it), e.g. "
                    "lambda: loss_fn(model(x), y), not lambda: loss")
            returned.append(value)
            return values[-1].to(device)

        losses, scored_all = [], False
        wrappers = self.optimizer._ddp_modules() if isinstance(self.optimizer, FusedSaLSa) else []
        try:
            with torch.no_grad(), without_buffer_broadcast(wrappers):
                for f in self.factors:
                    losses.append(reduction.shared_loss(lambda f=f: scored(f), torch.float64, device, False,
                                                        self.calls, where))
            scored_all = True
        finally:
            with torch.no_grad():
                for p, w1 in zip(params, after):
                    p.copy_(w1)
                for b, saved in buffers:
                    b.copy_(saved)
            forget_autocast_casts()
            if not scored_all:  # where the step left them, not where a forward that raised did
                rng.set()
        return losses

    @staticmethod
    def _loss_value(value) -> torch.Tensor:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"closure() must return the loss as a scalar tensor or a real number, "
                            f"got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(f"closure() must return a loss of one element (a scalar), got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"closure() must return a real floating-point loss, got {value.dtype}")
        return value.detach().reshape(()).to(torch.float64, copy=True)  # a copy: the closure may reuse its buffer

    def _apply(self, factor: float) -> None:
        self.scale *= factor
        if self.target == "lr":
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """Counters, the scale and the last decision; the rate itself is in the optimizer's
        ``state_dict`` (``lr``) or, for ``target="schedule"``, in ``scale``."""
        return dict(interval=self.interval, factors=list(self.factors), target=self.target,
                    calls=self.calls, scale=self.scale, scoring_forward_evals=self.scoring_forward_evals,
                    last_decision=None if self.last_decision is None else dict(self.last_decision))

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume; the configuration (interval, factors, target) must match this instance. A state dict saved
        before ``scoring_forward_evals`` was kept loads with it at 0."""
        expected = dict(interval=self.interval, factors=list(self.factors), target=self.target)
        for key, value in expected.items():
            if key not in state_dict:
                raise ValueError(f"LRFactorSearch state_dict lacks {key!r}")
            saved = list(state_dict[key]) if key == "factors" else state_dict[key]
            if saved != value:
                raise ValueError(f"LRFactorSearch state_dict has {key}={saved!r}, this instance {value!r}")
        calls, scale = state_dict.get("calls"), state_dict.get("scale")
        forwards = state_dict.get("scoring_forward_evals", 0)
        for name, value in (("calls", calls), ("scoring_forward_evals", forwards)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LRFactorSearch state_dict {name} must be an integer >= 0, got {value!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"LRFactorSearch state_dict scale must be a finite number > 0, got {scale!r}")
        decision = state_dict.get("last_decision")
        if decision is not None and not _is_decision(decision, calls, scale):
            raise ValueError("LRFactorSearch state_dict last_decision must be None or a decision (a dict with "
                             f"call, an int from 1 to the {calls} calls; factor, a finite number > 0; scale, the "
                             "state's scale; losses and scores, lists of numbers; skipped, a bool; as "
                             f"LRFactorSearch.last_decision), got {decision!r}")
        self.calls, self.scale, self.scoring_forward_evals = calls, float(scale), forwards
        self.last_decision = None if decision is None else dict(decision)


def _is_decision(decision, calls: int, scale: float) -> bool:
    """Whether ``decision`` is one a call writes (:attr:`LRFactorSearch.last_decision`) after ``calls`` calls with
    the rate's multiplier at ``scale``: the scale it left is the state's, as no call since changed it."""
    def number(value, positive: bool = False) -> bool:
        return (not isinstance(value, bool) and isinstance(value, (int, float))
                and (not positive or (math.isfinite(value) and value > 0)))

    if not (isinstance(decision, dict) and {"call", "factor", "scale"} <= decision.keys()):
        return False
    call = decision["call"]
    lists = [decision.get(key, []) for key in ("losses", "scores")]
    return (type(call) is int and 1 <= call <= calls and number(decision["factor"], True)
            and decision["scale"] == scale and type(decision.get("skipped", False)) is bool
            and all(isinstance(values, list) and all(map(number, values)) for values in lists)
            and set(decision) <= {"call", "factor", "scale", "losses", "scores", "skipped"})
