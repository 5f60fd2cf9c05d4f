"""A ceiling on the applied step from the weights' scale at the start: a candidate for the ``pretrain``
preset (issue 14, NOTES.md section 84), not part of the package.

Adam moves each coordinate by about the applied step ``a`` per step, so ``a / rms(W)`` is the relative change
of a matrix ``W`` per step (Adafactor's relative step size; LAMB's trust ratio, per tensor). The ceiling is

    a_t <= C = K * gmean_W rms(W_0)

the geometric mean over the tensors of two or more dimensions that are not all zero, read once, at
construction. ``K`` is one constant for every task. After every step each group's
``lr`` is set to ``search_lr * min(1, C / a)``, with ``a`` the group's applied step of the next plain step at
``lr = search_lr`` (``FusedSaLSa.applied_steps``). The search probes as before; only the applied step, and the
decay that is proportional to it, are capped. The first step is not capped: before its search the level is a
placeholder (and the preset's warm-up makes that step's applied step small).

With ``at_peak`` (section 85) ``a`` is instead the applied step the schedule's peak would take at the current
level, ``search_lr * peak * eta * growth``: the factor ``min(1, C / a)`` then scales the whole schedule, warm-up,
hold and decay alike, so the multiple of the level becomes ``min(peak, C / (eta * growth))``. Once the level is
frozen, the factor is fixed, and the cooldown keeps its shape.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch


def weight_scale(params: Iterable[torch.Tensor]) -> float:
    """``gmean_W rms(W)`` over the tensors of ``params`` with two or more dimensions and a non-zero RMS."""
    logs = [math.log(rms) for rms in (float(p.detach().float().pow(2).mean().sqrt()) for p in params
                                      if p.dim() >= 2 and p.numel() > 0) if rms > 0 and math.isfinite(rms)]
    if not logs:
        raise ValueError("the relative ceiling needs a matrix (a tensor of 2 or more dimensions) with non-zero "
                         "finite weights: it has none to read the weights' scale from")
    return math.exp(sum(logs) / len(logs))


class RelativeCeiling:
    """Keep the applied step of ``optimizer`` (a FusedSaLSa) at most ``relative * weight_scale`` of its
    parameters at construction; with ``at_peak``, the applied step its schedule's peak would take (module
    docstring)."""

    def __init__(self, optimizer, relative: float, at_peak: bool = False):
        if isinstance(relative, bool) or not (isinstance(relative, (int, float)) and math.isfinite(relative)
                                              and relative > 0):
            raise ValueError(f"relative must be a finite number > 0, got {relative!r}")
        self.optimizer = optimizer
        self.relative = float(relative)
        self.at_peak = bool(at_peak)
        if self.at_peak and getattr(optimizer.schedule, "peak", None) is None:
            raise ValueError("at_peak scales the schedule by its peak: the optimizer needs a schedule with a peak")
        self.ceiling = self.relative * weight_scale(p for g in optimizer.param_groups for p in g["params"])
        self.handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._cap())

    def _cap(self) -> None:
        groups: List[dict] = self.optimizer.param_groups
        for group in groups:
            group["lr"] = group["search_lr"]
        if self.at_peak:
            opt = self.optimizer
            level = opt.search_state.step_size * opt.search_config.growth * opt.schedule.peak
            uncapped = [group["search_lr"] * level for group in groups]
        else:
            uncapped = self.optimizer.applied_steps
        for group, step in zip(groups, uncapped):
            if step > self.ceiling:
                group["lr"] = group["search_lr"] * self.ceiling / step
