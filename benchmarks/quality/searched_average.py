"""Schedule-free averaging (Defazio et al., 2024) of FusedSaLSa's searched steps: a candidate for the run
of unknown length (issue 14, NOTES.md section 60), not part of the package.

The optimizer's parameters hold ``y``, where the gradients and the search's trial losses are taken. Each
step FusedSaLSa moves them by its applied step ``Δ = -γ d`` (its search, direction and weight decay as
configured). That move is given to ``z``, and the weights to evaluate, ``x``, average ``z``:

    z ← z + Δ        c = γ_max² / Σ γ_max²        x ← (1 - c) x + c z        y = β x + (1 - β) z

with ``γ_max`` the largest level applied so far (schedule-free AdamW's weighting: ``lr_max ** 2``,
``r = 0``) and ``β = 0.9`` (its default). Nothing reads the run length. ``eval()`` puts ``x`` in the
parameters, ``train()`` puts ``y`` back.
"""

from __future__ import annotations

import math
from typing import List

import torch

from salsa_fused import FusedSaLSa
from salsa_fused.step_size import applied_scale


class ScheduleFreeAverage:
    """Keeps ``z`` and ``x`` for ``optimizer``'s parameters and moves them after each of its steps (a step
    post-hook; a step in ``eval()`` mode is refused by a pre-hook, before anything moves); the module
    docstring gives the update."""

    def __init__(self, optimizer: FusedSaLSa, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.optimizer, self.beta = optimizer, beta
        self.params: List[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            self.z = [p.detach().clone() for p in self.params]
            self.x = [p.detach().clone() for p in self.params]
            self.y = [p.detach().clone() for p in self.params]
        self.level_max = 0.0
        self.weight_sum = 0.0
        self.training = True
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def applied_level(self) -> float:
        """The level the optimizer's last step applied, in the units of a rate (group 0's ``lr`` times
        ``eta * growth`` times the schedule's scale)."""
        opt, state = self.optimizer, self.optimizer.search_state
        scale = applied_scale(opt.schedule, state, state.step)
        return opt.param_groups[0]["lr"] * state.step_size * opt.search_config.growth * scale

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self.training:
            raise RuntimeError("ScheduleFreeAverage: step() in eval() mode; call train() first")

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        moves = torch._foreach_sub(self.params, self.y)  # Δ, the optimizer's applied step at y
        torch._foreach_add_(self.z, moves)
        level = self.applied_level()
        if math.isfinite(level) and level > self.level_max:
            self.level_max = level
        weight = self.level_max ** 2
        self.weight_sum += weight
        c = weight / self.weight_sum if self.weight_sum > 0 else 1.0
        torch._foreach_lerp_(self.x, self.z, c)
        for y, z, x in zip(self.y, self.z, self.x):
            torch.lerp(z, x, self.beta, out=y)
        torch._foreach_copy_(self.params, self.y)

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` (the average) in the parameters."""
        if self.training:
            torch._foreach_copy_(self.params, self.x)
            self.training = False

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` (where gradients are taken) back in the parameters."""
        if not self.training:
            torch._foreach_copy_(self.params, self.y)
            self.training = True
