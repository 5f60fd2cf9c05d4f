"""LABPAL: large-batch parabolic approximation line search (seed 003, Algorithm 1, Eq. 6).

The full-batch loss along the negative unit gradient, ``l(s) = L(theta - s * g/||g||)``, is
fitted by a parabola through three points, each the mean loss over the same
``approximation_batches`` inference batches (``|B_a| / |B_i| = 1280 / 128 = 10``). Its
minimum ``s_min`` (clipped to ``max_step``) gives the learning rate
``lambda = alpha * s_min / ||g||`` (Eq. 6, ``alpha = 1.8``), reused for ``sgd_steps`` (1000)
updates before the next approximation. Variants:

- ``"SGD"``: ``theta <- theta - lambda * g`` (the learning rate is reused);
- ``"NSGD"``: ``theta <- theta - alpha * s_min * g/||g||`` (the step length is reused).

Batch-size schedule ``k(t)`` (Algorithm 1): each update averages the gradient over ``k(t)``
inference batches, ``k = 1`` up to ``t_max/2``, 2 up to ``3*t_max/4``, 4 after; ``t`` counts
inference batches consumed (approximation batches included, as the paper counts them).
The direction of an approximation is the gradient of its first ``k(t)`` batches.

Closure contract (more than one batch per step): ``step(closure)`` calls ``closure(i)``
for ``i = 0, 1, ...``; ``closure(i)`` returns the loss (forward only, no backward) on the
``i``-th inference batch of *this* step, the same batch every time it is called with the
same ``i`` within the step. A plain update calls ``i < k(t)``; an approximation calls every
``i < approximation_batches`` at each of the three points.

Details the pseudo-code leaves open, taken from the published code (cogsys-tuebingen/LABPAL)
or chosen: the points are ``s = 0, mu, 2*mu`` with ``mu = 0.01`` (the code's
``parabolic_approximation_sample_step_size``; the code places its first two points
``1.77e-4`` apart and reads derivative and curvature off ``np.gradient``, which on an exact
parabola gives about twice its minimum: we use the exact parabola the paper describes);
``max_step = 1.0`` (Fig. 7); after an approximation the weights move to
``theta - alpha*s_min * g/||g||`` (as the code does), that move not counted in ``sgd_steps``;
a failed fit (curvature <= 0 or slope >= 0) keeps the previous learning rate, or, before the
first success, moves nothing and approximates again at the next step. The code's averaging
of the last 25 measured rates after 400 steps and its momentum option (default 0) are left out.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

MODES = ("SGD", "NSGD")


def parabola_minimum(points, losses):
    """``(a, b, s_min)`` of ``a*s^2 + b*s + c`` through three ``(s, loss)`` points; ``s_min`` is
    ``-b / (2a)``, or ``None`` when the fit has no minimum ahead (``a <= 0`` or ``b >= 0``)."""
    (s0, s1, s2), (l0, l1, l2) = points, losses
    slope01, slope12 = (l1 - l0) / (s1 - s0), (l2 - l1) / (s2 - s1)
    a = (slope12 - slope01) / (s2 - s0)
    b = slope01 - a * (s0 + s1)
    if not (a > 0 and b < 0):
        return a, b, None
    return a, b, -b / (2 * a)


class LABPAL:
    def __init__(self, params, mode: str = "NSGD", approximation_batches: int = 10, sgd_steps: int = 1000,
                 alpha: float = 1.8, sample_step: float = 0.01, max_step: float = 1.0,
                 t_max: Optional[int] = None, noise_factor: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.params: List[torch.Tensor] = list(params)
        self.mode = mode
        self.approximation_batches, self.sgd_steps = approximation_batches, sgd_steps
        self.alpha, self.sample_step, self.max_step, self.t_max = alpha, sample_step, max_step, t_max
        self.noise_factor = noise_factor  # epsilon of section 4.3 (Eq. 7): scales the schedule's batch counts
        self.t = 0  # inference batches consumed
        self.updates_since_approximation = 0
        self.learning_rate: Optional[float] = None  # SGD: lambda
        self.update_step: Optional[float] = None  # NSGD: alpha * s_min
        self.history: List[dict] = []

    def batch_multiplier(self) -> int:
        """``k(t)`` of Algorithm 1, times the noise factor (truncated, at least one batch)."""
        if self.t_max is None or self.t <= self.t_max // 2:
            base = 1
        else:
            base = 2 if self.t <= (3 * self.t_max) // 4 else 4
        return max(1, int(base * self.noise_factor))

    def _mean_gradient(self, closure, k: int):
        """Mean loss and gradient over batches ``0..k-1``."""
        grads = [torch.zeros_like(p) for p in self.params]
        total = 0.0
        for i in range(k):
            with torch.enable_grad():
                loss = closure(i)
            for acc, g in zip(grads, torch.autograd.grad(loss, self.params)):
                acc.add_(g, alpha=1 / k)
            total += float(loss.detach())
        return total / k, grads

    def _mean_loss(self, closure, n: int, first: int = 0) -> float:
        with torch.no_grad():
            return sum(float(closure(i)) for i in range(first, n))

    def _move(self, step: float, direction) -> None:
        with torch.no_grad():
            for p, d in zip(self.params, direction):
                p.sub_(step * d)

    def _place(self, origin, step: float, direction) -> None:
        """``theta = origin - step * direction``."""
        with torch.no_grad():
            for p, w0, d in zip(self.params, origin, direction):
                p.copy_(w0 - step * d)

    def step(self, closure: Callable[[int], torch.Tensor]) -> float:
        k = self.batch_multiplier()
        due = self.update_step is None or self.updates_since_approximation >= self.sgd_steps
        if due:
            return self._approximate(closure, k)
        loss, grads = self._mean_gradient(closure, k)
        self.t += k
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        if self.mode == "SGD":
            self._move(self.learning_rate, grads)
        else:
            self._move(self.update_step / norm, grads)
        self.updates_since_approximation += 1
        self.history.append(dict(kind="update", batches=k, loss=loss, grad_norm=norm,
                                 learning_rate=self.learning_rate, update_step=self.update_step))
        return loss

    def _approximate(self, closure, k: int) -> float:
        n = max(self.approximation_batches, k)  # Algorithm 1: at least one chunk of k(t) batches
        loss_dir, grads = self._mean_gradient(closure, k)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        unit = [g / norm for g in grads]
        theta = [p.detach().clone() for p in self.params]
        mu = self.sample_step
        points = (0.0, mu, 2 * mu)
        losses = [(loss_dir * k + self._mean_loss(closure, n, first=k)) / n]
        for s in points[1:]:
            self._place(theta, s, unit)
            losses.append(self._mean_loss(closure, n) / n)
        a, b, s_min = parabola_minimum(points, losses)
        self.t += n
        record = dict(kind="approximation", batches=n, direction_batches=k, grad_norm=norm, points=points,
                      losses=losses, a=a, b=b, s_min=s_min)
        if s_min is not None:
            self.update_step = self.alpha * min(s_min, self.max_step)
            self.learning_rate = self.update_step / norm
        # The move along this direction: alpha*s_min on success; after a failed fit the
        # previous rate (SGD: lambda*||g||) or step (NSGD); none before the first success.
        if self.update_step is None:
            move = 0.0
        else:
            move = self.learning_rate * norm if self.mode == "SGD" else self.update_step
            self.updates_since_approximation = 0
        self._place(theta, move, unit)
        record.update(learning_rate=self.learning_rate, update_step=self.update_step, move=move)
        self.history.append(record)
        return losses[0]
