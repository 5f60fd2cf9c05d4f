"""ALSALS: Armijo line search along Adam's direction with momentum (seed 001, section III).

Per step ``k``:

1. ``f = f_k(w)``, ``g = grad f_k(w)``; Adam's moments (seed 001, Eq. 3, ``beta1 != 0``).
2. ``eta^0_k = eta_{k-1} * 2^(1/b)`` (Eq. 2, kept from SLS).
3. Direction with momentum: ``d = m_hat / (sqrt(v_hat) + eps)`` (the move is ``w - eta*d``).
4. The gradient norm of the Armijo test is replaced by the gradient magnitude
   approximation ``f_a = (f_k(w) - f_k(w - lambda*d)) / lambda`` (Eq. 6), the loss decrease
   per unit step along ``d``; ``c_h = c`` if ``f_a > 0`` else ``1/c`` (Eq. 8).
5. Backtrack ``eta *= backtrack`` until ``f_k(w) - f_k(w - eta*d) >= c_h * eta * f_a`` (Eq. 9).
6. The accepted trial is the update (the search runs along the direction actually moved).

How ``f_a`` is evaluated (our decision, ``slope=``). The paper's probe ``lambda = 5e-8``
moves weight ``i`` by ``5e-8 * d_i`` (``|d_i| ~ 1`` for Adam): not at all where ``|w_i| >= 1``
(below half an fp32 ulp), by a few ulps where ``|w_i| ~ 0.1-1``, and never in bf16; and the
loss changes by ``~5e-8 * f_a``, a few ulps of an fp32 loss of order 1. So the literal probe
measures rounding as much as slope.
``f_a`` is the finite-difference estimate of the directional derivative ``g . d`` (``g`` is
the exact gradient of the same batch loss at ``w``), so the default evaluates that limit
exactly, ``slope="directional_derivative"``: ``f_a = sum g * m_hat / (sqrt(v_hat) + eps)``,
accumulated in float64, no extra forward. ``slope="probe"`` evaluates Eq. 6 literally in the
parameters' dtype (``probe_step = 5e-8``), kept to show the difference.

Defaults: ``c = 0.6`` (III-C), ``b = 500``; backtracking factor 0.9 and first step 1.0 as SLS.
"""

from __future__ import annotations

from typing import Callable, List

import torch

from ._adam import AdamMoments, dot, loss_and_grads, set_weights

SLOPES = ("directional_derivative", "probe")


class ALSALS:
    def __init__(self, params, init_step_size: float = 1.0, c: float = 0.6, b: float = 500.0,
                 backtrack: float = 0.9, max_trials: int = 100, betas=(0.9, 0.999), eps: float = 1e-8,
                 slope: str = "directional_derivative", probe_step: float = 5e-8):
        if slope not in SLOPES:
            raise ValueError(f"slope must be one of {SLOPES}, got {slope!r}")
        self.params: List[torch.Tensor] = list(params)
        self.adam = AdamMoments(self.params, betas, eps)
        self.eta = init_step_size
        self.c, self.b, self.backtrack, self.max_trials = c, b, backtrack, max_trials
        self.slope, self.probe_step = slope, probe_step
        self.history: List[dict] = []

    def gradient_magnitude(self, f0: float, grads, d, w0, closure) -> float:
        """``f_a`` (Eq. 6): the decrease per unit step along ``d`` at ``w``."""
        if self.slope == "directional_derivative":
            return dot(grads, d)
        set_weights(self.params, w0, self.probe_step, d)
        with torch.no_grad():
            f_probe = float(closure())
        return (f0 - f_probe) / self.probe_step

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        f0, grads = loss_and_grads(self.params, closure)
        self.adam.update(grads)
        d = [m * p for m, p in zip(self.adam.m_hat(), self.adam.preconditioner())]
        w0 = [p.detach().clone() for p in self.params]
        f_a = self.gradient_magnitude(f0, grads, d, w0, closure)
        c_h = self.c if f_a > 0 else 1 / self.c
        eta = self.eta * 2 ** (1 / self.b)
        trials, losses, accepted = [], [], False
        for _ in range(self.max_trials):
            set_weights(self.params, w0, eta, d)
            with torch.no_grad():
                f1 = float(closure())
            trials.append(eta)
            losses.append(f1)
            if f0 - f1 >= c_h * eta * f_a:
                accepted = True
                break
            eta *= self.backtrack
        if not accepted:
            eta = trials[-1]
        self.eta = eta
        # The weights hold the last trial, w0 - eta * d: that is the update.
        self.history.append(dict(loss=f0, slope=f_a, c_h=c_h, trial_step_sizes=trials, trial_losses=losses,
                                 accepted=accepted, step_size=eta))
        return f0
