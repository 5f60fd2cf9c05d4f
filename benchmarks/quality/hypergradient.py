"""A multiplier on the searched level learned by hypergradient descent (Baydin et al., "Online Learning
Rate Adaptation with Hypergradient Descent", ICLR 2018, arXiv 1703.04782; its multiplicative form): a
screen for issue 14 (NOTES.md section 53), not part of the package.

The applied step's derivative along the last update ``u_{t-1} = w_t - w_{t-1}`` is ``g_t . u_{t-1} / m``:
a gradient that still points along the last move's descent (``g_t . u_{t-1} < 0``) says the step was
short, one that opposes it says the step overshot. Normalized to a cosine and taken multiplicatively,

    c_t = cos(g_t, u_{t-1})        m <- clip(m * exp(-beta * c_t), 1/M, M)

and ``m`` scales the optimizer's applied step through every group's ``lr`` (``FusedSaLSa`` keeps its
``search_lr`` from construction, so trials still probe the searched level and ``m`` moves only what is
applied). No extra forward; one copy of the weights and one of the last update.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

#: How far the multiplier may move from 1, either way (a bound, not a rate: it caps a runaway).
MAX_MULTIPLIER = 16.0


class HypergradientMultiplier:
    """Learns ``m`` for ``optimizer`` (a ``FusedSaLSa`` whose groups were built at ``lr=1``): call
    :meth:`before_step` before each ``optimizer.step`` and :meth:`after_step` after it (the step's
    gradients still in ``.grad``). ``start_step``: the first step (1-based) whose gradient updates
    ``m`` (before it ``m`` stays 1: the search phase finds the level unhindered)."""

    def __init__(self, optimizer: torch.optim.Optimizer, beta: float, start_step: int = 1,
                 max_multiplier: float = MAX_MULTIPLIER):
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if not max_multiplier >= 1.0:
            raise ValueError(f"max_multiplier must be >= 1, got {max_multiplier!r}")
        for index, group in enumerate(optimizer.param_groups):
            if group["lr"] != 1.0:
                raise ValueError(f"param_groups[{index}] has lr={group['lr']!r}: the multiplier is written there "
                                 "and needs groups built at lr=1")
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.beta, self.start_step, self.max_multiplier = float(beta), int(start_step), float(max_multiplier)
        self.multiplier = 1.0
        self.steps = 0
        self.cosines: List[float] = []
        self._before: Optional[List[torch.Tensor]] = None
        self._last_update: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def before_step(self) -> None:
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        """Read ``cos(g_t, u_{t-1})`` (one host read), update ``m``, write it to every group's ``lr``,
        and keep ``u_t`` for the next step."""
        self.steps += 1
        if self._last_update is not None and self.steps >= self.start_step:
            pairs = [(p.grad.detach().double(), u.double()) for p, u in zip(self.params, self._last_update)
                     if p.grad is not None]
            if pairs:
                sums = torch.stack([torch.stack([(g * u).sum(), g.pow(2).sum(), u.pow(2).sum()])
                                    for g, u in pairs]).sum(0)
                dot, g_sq, u_sq = sums.tolist()
                if math.isfinite(dot) and g_sq > 0 and u_sq > 0:
                    cosine = dot / math.sqrt(g_sq * u_sq)
                    self.cosines.append(cosine)
                    self.multiplier = min(self.max_multiplier, max(1.0 / self.max_multiplier,
                                                                   self.multiplier * math.exp(-self.beta * cosine)))
        self._last_update = [p.detach() - w0 for p, w0 in zip(self.params, self._before)]
        self._before = None
        for group in self.optimizer.param_groups:
            group["lr"] = self.multiplier
