"""A power-function EMA of the weights beside a run (Karras et al., 2024): a candidate annealing for the
run of unknown length (issue 14, NOTES.md section 62), not part of the package.

After step ``t`` (1-based) the average moves toward the trained weights ``w_t``:

    ema ← β_t ema + (1 - β_t) w_t,        β_t = (1 - 1/t)^(γ+1)

which makes ``ema`` the average of ``w_1 .. w_t`` weighted as ``t^γ``: a window whose width is a fixed
fraction of the run so far (relative standard deviation ``sqrt((γ+1) / ((γ+2)² (γ+3)))``), so it reads
no run length. The average lives in a copy of the model: its forwards leave the trained model's
buffers (BatchNorm statistics) and, with the generator put back, its random stream as they were.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch


def relative_width(gamma: float) -> float:
    """The power EMA's standard deviation over the run so far, as a fraction of its length."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA:
    """The power-function EMA of ``model``'s parameters (module docstring), kept in a copy of ``model``."""

    def __init__(self, model: torch.nn.Module, gamma: float):
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > -1):
            raise ValueError(f"gamma must be a finite number above -1, got {gamma!r}")
        self.gamma = float(gamma)
        self.steps = 0
        self.source = model
        self.model = copy.deepcopy(model)
        self._trained = list(model.parameters())
        self._averaged = list(self.model.parameters())

    def beta(self, step: int) -> float:
        """``β_t`` for step ``t``: 0 at the first step (the average starts at ``w_1``)."""
        return (1.0 - 1.0 / step) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average after a step of the trained model."""
        self.steps += 1
        weight = 1.0 - self.beta(self.steps)
        torch._foreach_lerp_(self._averaged, [p.detach() for p in self._trained], weight)

    @torch.no_grad()
    def loss(self, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> float:
        """``loss_of(averaged model)`` in the trained model's mode, its random draws taken back."""
        self.model.train(self.source.training)
        state = torch.get_rng_state()
        try:
            return float(loss_of(self.model))
        finally:
            torch.set_rng_state(state)

    @torch.no_grad()
    def evaluated_model(self) -> torch.nn.Module:
        """The averaged parameters with the trained model's buffers (its running statistics), for evaluation."""
        for averaged, trained in zip(self.model.buffers(), self.source.buffers()):
            averaged.copy_(trained)
        return self.model
