"""The automated learning-rate scheduler of seed 004 (Algorithm 1 of its slides).

At an interval (the slides: every epoch), with learning rate ``eta_t`` and a list of
factors ``f_1..f_N``:

1. ``grad L(theta_t; B)`` on one batch ``B`` (forward and backprop);
2. for each factor: ``theta' = theta_t - f * eta_t * grad``, ``loss_f = L(theta'; B)``;
3. normalize the losses, ``x_f = (loss_f - mean) / std`` (the authors' code: z-scores with
   the sample standard deviation; the slides only say "Normalize"); ``std = 0`` gives ``x = 0``;
4. score ``s_f = exp(-x_f)``;
5. ``eta_{t+1} = eta_t * exp(sum_f s_f * log f / sum_f s_f)`` (the score-weighted geometric mean).

The weights are put back to ``theta_t`` after the trials. Factors from the slides:
``Factor_3 = (2, 1, 0.5)`` (the default here), ``Factor_5``, ``Factor_7``.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import torch

FACTOR_3 = (2.0, 1.0, 0.5)
FACTOR_5 = (4.0, 2.0, 1.0, 0.5, 0.125)
FACTOR_7 = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)


def weighted_factor(factors: Sequence[float], losses: Sequence[float]):
    """``(scores, factor)``: ``exp(-zscore(loss))`` per factor and their weighted geometric mean."""
    n = len(losses)
    mean = sum(losses) / n
    std = math.sqrt(sum((loss - mean) ** 2 for loss in losses) / (n - 1))
    scores = [math.exp(-(loss - mean) / std) if std > 0 else 1.0 for loss in losses]
    log_mean = sum(s * math.log(f) for s, f in zip(scores, factors)) / sum(scores)
    return scores, math.exp(log_mean)


class LRFactorScheduler:
    """Seed 004's scheduler driving plain SGD (the slides' step 6 is an SGD step)."""

    def __init__(self, params, lr: float, factors: Sequence[float] = FACTOR_3):
        self.params: List[torch.Tensor] = list(params)
        self.lr = lr
        self.factors = tuple(factors)
        self.history: List[dict] = []

    def choose(self, closure: Callable[[], torch.Tensor]) -> float:
        """One decision on the batch ``closure`` evaluates; returns the new learning rate."""
        with torch.enable_grad():
            loss = closure()
        grads = torch.autograd.grad(loss, self.params)
        theta = [p.detach().clone() for p in self.params]
        losses = []
        with torch.no_grad():
            for f in self.factors:
                for p, w, g in zip(self.params, theta, grads):
                    p.copy_(w - f * self.lr * g)
                losses.append(float(closure()))
            for p, w in zip(self.params, theta):
                p.copy_(w)
        scores, factor = weighted_factor(self.factors, losses)
        self.history.append(dict(lr=self.lr, losses=losses, scores=scores, factor=factor))
        self.lr = self.lr * factor
        return self.lr
