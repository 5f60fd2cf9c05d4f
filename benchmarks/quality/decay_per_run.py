"""Weight decay set by the run length, not by the searched level: a candidate for the ``pretrain`` preset
(issue 14, NOTES.md section 79), not part of the package.

The package's decoupled decay is ``w <- w - wd * a_t * w`` with ``a_t`` the applied step, so a level that
overshoots decays as much too. Here the decay of step ``t`` (1-based, of ``T``) is

    w <- (1 - kappa * s_t / T) w,        s_t = schedule.scale(t) / schedule.peak   (0 .. 1)

on the tensors the zoo decays (its groups with weight decay above 0), the optimizer's own decay set to 0:
over the run the weights shrink by about ``exp(-kappa * mean(s))`` whatever the level, the EMA timescale
``1 / (eta lambda)`` of Wang and Aitchison (2024) held at a fixed share of the run. ``kappa`` is one constant for
every task (section 79 takes the median of the zoo's AdamW at its best rate on the development tasks,
``lr * 0.1 * T * mean(warm-up + cosine)``: 0.99). It is applied by a step post-hook, after the step's update.
"""

from __future__ import annotations

import math
from typing import List

import torch


class DecayPerRun:
    """After every step of ``optimizer`` (a FusedSaLSa with a schedule that has ``scale`` and ``peak``),
    multiply ``params`` by ``1 - kappa * s_t / total_steps`` (module docstring)."""

    def __init__(self, optimizer, params: List[torch.Tensor], kappa: float, total_steps: int):
        if isinstance(total_steps, bool) or not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if isinstance(kappa, bool) or not (isinstance(kappa, (int, float)) and math.isfinite(kappa)
                                           and 0 <= kappa < total_steps):
            raise ValueError(f"kappa must be a finite number in [0, total_steps={total_steps}) (a step at the "
                             f"schedule's peak multiplies by 1 - kappa / total_steps, which must stay above 0), "
                             f"got {kappa!r}")
        schedule = optimizer.schedule
        if schedule is None or not hasattr(schedule, "scale") or not hasattr(schedule, "peak"):
            raise ValueError("DecayPerRun reads the shape of the optimizer's schedule: it needs one with "
                             "scale(step) and peak")
        if any(group["weight_decay"] for group in optimizer.param_groups):
            raise ValueError("the optimizer decays weights itself: set its weight_decay to 0, so the decay "
                             "is this one alone")
        self.params = list(params)
        self.kappa = float(kappa)
        self.total_steps = total_steps
        self.steps = 0
        self.schedule = schedule
        self.handle = optimizer.register_step_post_hook(self._after_step)

    def factor(self, step: int) -> float:
        """The multiplier of step ``step`` (1-based)."""
        shape = self.schedule.scale(min(step, self.total_steps)) / self.schedule.peak
        return 1.0 - self.kappa * shape / self.total_steps

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        factor = self.factor(self.steps)
        if factor != 1.0:
            torch._foreach_mul_(self.params, factor)
