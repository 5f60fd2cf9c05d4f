"""Mechanic's learned scale on a base optimizer (Cutkosky, Defazio, Mehta, arXiv 2306.00144): a screen
for issue 14 (NOTES.md section 38), not part of the package.

The base optimizer takes its own step; its updates accumulate in ``Δ`` (descent sign), and the weights are
``x = x_ref - s·Δ`` with ``s = Σ_j s_j`` a scale learned online, one coin-betting tuner per ``β_j``:

    h_t = <g_t + λ s ‖g_t‖/‖x_t‖ x_t, Δ_t>          (``-d f/d s`` at ``x_t``, with a scaled weight decay)
    m_j = max(β_j m_j, |h_t| + ε)      v_j = β_j² v_j + h_t²      r_j = β_j r_j + s_j h_t
    s_j = (s_init/n · m_j + max(0, r_j)) / (√v_j + ε)

The scale starts at ``n·s_init`` and grows while continuing along ``Δ`` keeps lowering the loss: a signal
over the whole run so far, from the gradients alone (no extra forward).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from salsa_fused.errors import NonFiniteError

BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class Mechanic:
    """Wraps ``base`` (a ``torch.optim.Optimizer``; its ``step`` is called as given) and rescales the
    accumulated updates by a learned ``scale``. ``param_groups`` are the base's (so an LR scheduler on
    the base applies), ``scale`` is ``s``; the applied rate is ``scale`` times the base's rate."""

    def __init__(self, base: torch.optim.Optimizer, betas: Sequence[float] = BETAS, weight_decay: float = 0.01,
                 s_init: float = 1e-8, eps: float = 1e-8):
        self.base = base
        self.params = [p for g in base.param_groups for p in g["params"]]
        self.betas = torch.tensor(betas, dtype=torch.float64)
        self.weight_decay, self.s_init, self.eps = weight_decay, s_init, eps
        n = len(betas)
        self.s = torch.full((n,), s_init, dtype=torch.float64)
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.r = torch.zeros(n, dtype=torch.float64)
        self.x_ref: Optional[list] = None
        self.delta: Optional[list] = None

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def scale(self) -> float:
        return float(self.s.sum())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """``h`` from one host read, then the base's step, ``Δ``, the tuners and ``x = x_ref - s·Δ``. A
        non-finite gradient or weight raises :class:`NonFiniteError` before anything moves."""
        if self.x_ref is None:
            self.x_ref = [p.detach().clone() for p in self.params]
            self.delta = [torch.zeros_like(p) for p in self.params]
        live = [(p.detach().double(), p.grad.detach().double(), d.double())
                for p, d in zip(self.params, self.delta) if p.grad is not None]
        if live:  # per tensor: |g|^2, |x|^2, <g, Δ>, <x, Δ>, summed; one read
            sums = torch.stack([torch.stack([g.pow(2).sum(), x.pow(2).sum(), (g * d).sum(), (x * d).sum()])
                                for x, g, d in live]).sum(0)
            grad_sq, param_sq, g_dot_delta, x_dot_delta = sums.tolist()
        else:
            grad_sq = param_sq = g_dot_delta = x_dot_delta = 0.0
        decay = self.weight_decay * self.scale * math.sqrt(grad_sq) / (math.sqrt(param_sq) + self.eps)
        h = g_dot_delta + decay * x_dot_delta  # <g + decay * x, Δ>
        if not (math.isfinite(h) and math.isfinite(grad_sq) and math.isfinite(param_sq)):
            raise NonFiniteError(f"Mechanic: a non-finite gradient or weight (h = {h}); nothing was moved")
        before = [p.detach().clone() for p in self.params]
        loss = self.base.step(closure)
        for p, old, d in zip(self.params, before, self.delta):
            d.sub_(p.detach() - old)  # Δ += -(base update)
        self.m = torch.maximum(self.betas * self.m, torch.tensor(abs(h) + self.eps, dtype=torch.float64))
        self.v = self.betas ** 2 * self.v + h * h
        self.r = self.betas * self.r + self.s * h
        wealth = self.s_init / len(self.betas) * self.m + self.r.clamp(min=0.0)
        self.s = wealth / (self.v.sqrt() + self.eps)
        s_new = self.scale
        for p, x0, d in zip(self.params, self.x_ref, self.delta):
            p.copy_(x0 - s_new * d)
        return loss
