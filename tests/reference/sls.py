"""Adam+SLS: stochastic Armijo line search for Adam (seed 001, section II).

Per step ``k`` (seed 001, Eqs. 2, 3 and 5; SLS of Vaswani et al. 2019 and its Adam form):

1. ``f = f_k(w)``, ``g = grad f_k(w)`` on the step's batch; Adam's moments ``m, v`` (Eq. 3).
2. ``eta^0_k = eta_{k-1} * 2^(1/b)`` (Eq. 2, ``b = 500``).
3. The search direction is Adam's with ``beta1 = 0``: ``d = g / (sqrt(v_hat) + eps)``, and the
   gradient norm is the preconditioned one, ``q = sum g^2 / (sqrt(v_hat) + eps) = g . d``.
4. Backtrack ``eta *= backtrack`` until ``f_k(w - eta*d) <= f_k(w) - c*eta*q`` (Eq. 5), at
   most ``max_trials`` trials (if all fail the last ``eta`` is kept).
5. The update uses ``beta1 != 0`` (end of II-B): ``w <- w - eta * m_hat / (sqrt(v_hat) + eps)``,
   so the accepted trial is *not* the final move.

Defaults: ``c = 0.1`` (the original Armijo constant, seed 001 II-A and III-C), ``b = 500``;
the paper does not restate the backtracking factor or the first step size: ``0.9`` and
``1.0`` are SLS's (Vaswani et al. 2019). No smoothing of either side of the test.
"""

from __future__ import annotations

from typing import Callable, List

import torch

from ._adam import AdamMoments, dot, loss_and_grads, set_weights


class AdamSLS:
    def __init__(self, params, init_step_size: float = 1.0, c: float = 0.1, b: float = 500.0,
                 backtrack: float = 0.9, max_trials: int = 100, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params: List[torch.Tensor] = list(params)
        self.adam = AdamMoments(self.params, betas, eps)
        self.eta = init_step_size
        self.c, self.b, self.backtrack, self.max_trials = c, b, backtrack, max_trials
        self.history: List[dict] = []

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        f0, grads = loss_and_grads(self.params, closure)
        self.adam.update(grads)
        precond = self.adam.preconditioner()
        d = [g * p for g, p in zip(grads, precond)]  # beta1 = 0: the gradient, preconditioned
        q = dot(grads, d)
        w0 = [p.detach().clone() for p in self.params]
        eta = self.eta * 2 ** (1 / self.b)
        trials, losses, accepted = [], [], False
        for _ in range(self.max_trials):
            set_weights(self.params, w0, eta, d)
            with torch.no_grad():
                f1 = float(closure())
            trials.append(eta)
            losses.append(f1)
            if f1 <= f0 - self.c * eta * q:
                accepted = True
                break
            eta *= self.backtrack
        if not accepted:
            eta = trials[-1]
        self.eta = eta
        update = [m * p for m, p in zip(self.adam.m_hat(), precond)]  # beta1 != 0 for the move
        set_weights(self.params, w0, eta, update)
        self.history.append(dict(loss=f0, grad_norm=q, trial_step_sizes=trials, trial_losses=losses,
                                 accepted=accepted, step_size=eta))
        return f0
