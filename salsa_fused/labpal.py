"""LABPAL, the large-batch parabolic approximation line search (seed 003), as an optimizer.

LABPAL moves along the raw gradient (SGD), not Adam's direction, so it does not run on
FusedSaLSa's Adam passes: this module is plain ``torch._foreach_*`` arithmetic (through
:mod:`salsa_fused._compat`), apart from the Adam backends, and keeps no moments.

**Why it is not a FusedSaLSa search rule.** The decisions fit :mod:`salsa_fused.rules`: an
approximation is a search whose trials sit at ``0, mu, 2 mu`` along ``g / ||g||`` (``||g||`` is
``sqrt(q)`` when the direction is ``g``), whose ``observe`` collects the three losses and whose
``final`` is ``alpha * s_min`` (the state in ``SearchState.rule_state``; ``plan`` says when an
approximation is due). What the protocol and the passes under it lack:

1. *Several batches per step.* ``FusedSaLSa.step`` takes one loss and one gradient from one
   ``closure()`` and reads one loss per trial. LABPAL takes the gradient as the mean over the
   first ``k(t)`` batches and judges every point by the mean over ``n`` batches, the point at
   ``s = 0`` reusing the gradient batches' losses. It needs a closure taking a batch index and a
   rule hook saying how many batches the gradient and each trial read; that touches the
   one-phase and two-phase forms, ``bind_closure`` (the integrations), the random-state replay
   and DDP's loss averaging: not a small change.
2. *A third direction,* ``d = g`` without Adam's preconditioner, in every pass of every backend
   (the slope, the trials, the final move; torch, Triton kernels, C++ CPU and CUDA), which today
   know ``g / (sqrt(v_hat) + eps)`` and ``m_hat / (sqrt(v_hat) + eps)`` only.
3. *Plain steps the rule sizes.* A plain step is Adam's ``m_hat`` move at ``eta * growth``
   without a host read; LABPAL's plain step is ``lambda * g`` (SGD) or ``alpha s_min g / ||g||``
   (NSGD, a norm read every step). A search with no trial whose ``final`` moves along ``g``
   would express both, once (2) exists.
4. The passes update Adam's moments on every step; LABPAL reads none (16 bytes/param of
   traffic and 8 of state for nothing, results unchanged).

Every ``sgd_steps`` updates (and at the first step) an *approximation*: with ``g`` the mean
gradient of the step's first ``k(t)`` inference batches, ``u = g / ||g||``, the loss along
``-u`` is measured at ``s = 0, mu, 2*mu`` as the mean over ``approximation_batches`` (``n``)
inference batches, a parabola ``a s^2 + b s + c`` is fitted exactly through the three
points, and its minimum ``s_min = -b / 2a`` (at most ``max_step``) sets the update step
``alpha * s_min`` (``alpha = 1.8``); the weights move there. Between approximations:

- ``mode="SGD"``: ``w -= lambda * g`` with ``lambda = alpha * s_min / ||g||`` of the approximation;
- ``mode="NSGD"``: ``w -= alpha * s_min * g / ||g||`` (the step length is kept).

A failed fit (``a <= 0`` or ``b >= 0``, or a non-finite point loss) keeps the previous rate, or
before any success moves nothing and approximates again at the next step. Batch-size schedule
(Algorithm 1, ``t_max`` given): ``k(t) = 1`` up to ``t_max/2`` inference batches consumed, 2 up
to ``3 t_max / 4``, 4 after (approximation batches count in ``t``).

**Closure contract.** ``step(closure)`` calls ``closure(i)`` for inference batch ``i`` of this
step (``i = 0, 1, ...``, ``batches_needed()`` of them): it runs the forward pass on that batch
and returns the mean loss, the same batch whenever called with the same ``i`` within a step.
The optimizer runs the backward of ``closure(i) / k`` for ``i < k(t)`` (any gradient already
in ``.grad`` is replaced), so the schedule's larger batches are gradient accumulation.
``accumulation=A`` splits each inference batch in ``A`` micro-batches: the closure is then
called for ``A`` times as many indices, each a micro-batch of ``1/A`` of the batch.

Under DDP each rank's closure returns the loss of its own shard of batch ``i``: the backward
averages the gradients, and the three point losses are averaged over the ranks (one
all-reduce of 3 numbers) before the fit, so every rank takes the same decision.

Cost: an update is ``k`` forwards and backwards; an approximation ``k`` forwards and
backwards plus ``3n - k`` forwards and one weight-sized copy, once per ``sgd_steps`` updates.
Defaults are the paper's (``n = 10``, ``sgd_steps = 1000``, ``alpha = 1.8``, ``max_step = 1``)
and its published code's (``mu = 0.01``; the code differences ``np.gradient`` on unevenly spaced
points, which doubles ``s_min`` on an exact parabola: the exact fit is used here).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Optional

import torch
from torch.optim import Optimizer

from . import _compat as C
from .distributed import SearchReduction, default_reduction
from .errors import NonFiniteError

MODES = ("SGD", "NSGD")
_STATE_KEY = "labpal"  # where state_dict() carries the scalars (param_groups[0])


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


@dataclass
class LABPALState:
    """The scalars LABPAL carries from step to step; ``state_dict`` holds them."""

    step: int = 0  # updates and approximations taken
    batches_consumed: int = 0  # t, in inference batches
    updates_since_approximation: int = 0
    learning_rate: Optional[float] = None  # SGD's lambda = alpha * s_min / ||g||
    update_step: Optional[float] = None  # alpha * s_min
    num_approximations: int = 0
    num_failed_fits: int = 0
    num_forward_evals: int = 0  # closure calls
    num_backward_evals: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "LABPALState":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LABPAL state keys {sorted(unknown)}")
        state = cls(**values)
        for name in ("step", "batches_consumed", "updates_since_approximation", "num_approximations",
                     "num_failed_fits", "num_forward_evals", "num_backward_evals"):
            value = getattr(state, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LABPAL state {name} must be an integer >= 0, got {value!r}")
        for name in ("learning_rate", "update_step"):
            value = getattr(state, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LABPAL state {name} must be None or a finite number > 0, got {value!r}")
        return state


class LABPAL(Optimizer):
    """LABPAL (seed 003): SGD or normalized SGD whose step comes from a parabola fitted to the
    loss along the gradient over several batches, refitted every ``sgd_steps`` updates.

    Args:
        params: parameters or param groups (no per-group hyperparameters: one step for all).
        mode: ``"NSGD"`` (the step length is kept) or ``"SGD"`` (the learning rate is kept).
        approximation_batches: ``n``, inference batches averaged at each parabola point.
        sgd_steps: updates between approximations.
        alpha: multiplier on the parabola's minimum.
        sample_step: ``mu``; the points are ``0, mu, 2 mu`` along the unit gradient.
        max_step: upper bound on ``s_min``.
        t_max: the run's length in inference batches for the batch-size schedule (None: k = 1).
        accumulation: micro-batches per inference batch (the closure is called per micro-batch).
        reduction: how point losses are averaged across ranks (default: the world when
            ``torch.distributed`` is initialized).
    """

    def __init__(self, params, mode: str = "NSGD", *, approximation_batches: int = 10, sgd_steps: int = 1000,
                 alpha: float = 1.8, sample_step: float = 0.01, max_step: float = 1.0,
                 t_max: Optional[int] = None, accumulation: int = 1,
                 reduction: Optional[SearchReduction] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("approximation_batches", approximation_batches), ("sgd_steps", sgd_steps),
                            ("accumulation", accumulation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if approximation_batches < 4:
            raise ValueError("approximation_batches must be >= 4 (the largest k(t) of the schedule), "
                             f"got {approximation_batches}")
        for name, value in (("alpha", alpha), ("sample_step", sample_step), ("max_step", max_step)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, int) or t_max < 1):
            raise ValueError(f"t_max must be None or an integer >= 1, got {t_max!r}")
        self.mode = mode
        self.approximation_batches, self.sgd_steps, self.accumulation = approximation_batches, sgd_steps, accumulation
        self.alpha, self.sample_step, self.max_step, self.t_max = float(alpha), float(sample_step), float(max_step), t_max
        super().__init__(params, {})
        self._labpal = LABPALState()
        self.reduction = reduction if reduction is not None else default_reduction(
            p for group in self.param_groups for p in group["params"])
        #: What the last step decided (kind, batches, and for an approximation the fit and move).
        self.last_decision: dict = {}

    # ------------------------------------------------------------------ schedule
    @property
    def labpal_state(self) -> LABPALState:
        return LABPALState(**asdict(self._labpal))

    def batch_multiplier(self) -> int:
        """``k(t)`` of Algorithm 1, in inference batches."""
        t = self._labpal.batches_consumed
        if self.t_max is None or t <= self.t_max // 2:
            return 1
        return 2 if t <= (3 * self.t_max) // 4 else 4

    def approximation_due(self) -> bool:
        state = self._labpal
        return state.update_step is None or state.updates_since_approximation >= self.sgd_steps

    def batches_needed(self) -> int:
        """How many indices the next ``step`` passes to ``closure`` (micro-batches)."""
        batches = self.approximation_batches if self.approximation_due() else self.batch_multiplier()
        return batches * self.accumulation

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["param_groups"][0][_STATE_KEY] = asdict(self._labpal)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if not groups or _STATE_KEY not in groups[0]:
            raise ValueError("not a LABPAL state_dict: param_groups[0] has no 'labpal' entry")
        labpal = LABPALState.from_dict(dict(groups[0][_STATE_KEY]))
        groups = [{k: v for k, v in group.items() if k != _STATE_KEY} for group in groups]
        super().load_state_dict({**state_dict, "param_groups": groups})
        self._labpal = labpal

    # ------------------------------------------------------------------ step
    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _loss(self, closure, index: int, need_grad: bool) -> torch.Tensor:
        value = closure(index)
        self._labpal.num_forward_evals += 1
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"closure({index}) must return the scalar loss as a floating-point tensor, "
                            f"got {value!r:.80}")
        if need_grad and not value.requires_grad:
            raise RuntimeError(f"closure({index}) returned a loss with no grad path: call step() outside "
                               "torch.no_grad()")
        return value.reshape(())

    def _gradient(self, closure, params, k: int) -> float:
        """Mean loss of inference batches ``0..k-1`` (micro-batches ``0..k*A-1``) and their mean
        gradient in ``.grad`` (the backward of each micro-batch's loss over ``k*A``)."""
        micro = k * self.accumulation
        for p in params:
            p.grad = None
        total = 0.0
        for i in range(micro):
            with torch.enable_grad():
                loss = self._loss(closure, i, need_grad=True)
            (loss / micro).backward()
            self._labpal.num_backward_evals += 1
            total += float(loss.detach())
        return total / micro

    def _mean_loss(self, closure, first: int, last: int) -> float:
        """Sum of the losses of micro-batches ``first..last-1`` over their count per point."""
        with torch.no_grad():
            return sum(float(self._loss(closure, i, need_grad=False)) for i in range(first, last))

    def step(self, closure: Callable[[int], torch.Tensor]) -> float:
        """One LABPAL step (an update, or an approximation and its move); returns the mean loss
        of the step's gradient batches at the weights before the step."""
        if not callable(closure):
            raise TypeError("LABPAL.step() needs closure: closure(i) runs the forward pass on inference "
                            "batch i of this step and returns its loss")
        params = self._params()
        if not params:
            raise RuntimeError("LABPAL has no parameter that requires grad")
        k = self.batch_multiplier()
        due = self.approximation_due()
        loss = self._gradient(closure, params, k)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = math.sqrt(sum(float(n.double()) ** 2 for n in C.foreach_norm(grads)))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at "
                                 f"LABPAL step {self._labpal.step + 1}; the weights are unchanged")
        state = self._labpal
        if norm == 0:  # no direction: nothing moves, the batches are consumed
            state.batches_consumed += k
            self.last_decision = dict(kind="zero_gradient", batches=k, loss=loss, grad_norm=0.0)
        elif due:
            self._approximate(closure, params, grads, k, loss, norm)
        else:
            step = state.learning_rate if self.mode == "SGD" else state.update_step / norm
            with torch.no_grad():
                C.foreach_add_(params, C.foreach_mul(grads, -step))
            state.batches_consumed += k
            state.updates_since_approximation += 1
            self.last_decision = dict(kind="update", batches=k, loss=loss, grad_norm=norm)
        state.step += 1
        return loss

    @torch.no_grad()
    def _approximate(self, closure, params, grads, k: int, loss_k: float, norm: float) -> None:
        state, n, acc = self._labpal, self.approximation_batches, self.accumulation
        unit = C.foreach_div(grads, norm)
        origin = [p.detach().clone() for p in params]
        mu = self.sample_step
        points = (0.0, mu, 2 * mu)

        def place(step: float) -> None:
            C.foreach_copy_(params, origin)
            if step:
                C.foreach_add_(params, C.foreach_mul(unit, -step))

        try:
            sums = [loss_k * k * acc + self._mean_loss(closure, k * acc, n * acc)]
            for s in points[1:]:
                place(s)
                sums.append(self._mean_loss(closure, 0, n * acc))
        except BaseException:
            place(0.0)
            raise
        local = torch.tensor([x / (n * acc) for x in sums], dtype=torch.float64, device=params[0].device)
        losses = self.reduction.average_loss(local).tolist()  # over the ranks, in float64
        a, b, s_min = parabola_minimum(points, losses)
        state.batches_consumed += n
        state.num_approximations += 1
        if s_min is not None:
            state.update_step = self.alpha * min(s_min, self.max_step)
            state.learning_rate = state.update_step / norm
        else:
            state.num_failed_fits += 1
        if state.update_step is None:
            move = 0.0
        else:
            move = state.learning_rate * norm if self.mode == "SGD" else state.update_step
            state.updates_since_approximation = 0
        place(move)
        self.last_decision = dict(kind="approximation", batches=n, direction_batches=k, grad_norm=norm,
                                  points=points, losses=losses, a=a, b=b, s_min=s_min, move=move)
