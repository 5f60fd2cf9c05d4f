"""ScheduleFree+ (Defazio, arXiv 2605.19095): schedule-free AdamW whose rate is a Polyak step from the
loss itself. A reference for issue 14 (NOTES.md section 47), not part of the package; written from the
paper's update, at the defaults of its authors' reference implementation.

Three sequences as in schedule-free AdamW: the gradient is taken at ``y``, the Adam step moves ``z``,
and ``x`` (the weights to evaluate) averages ``z``. The rate of step ``t`` (gradient ``g`` and loss
``F`` at ``y``) is

    I = β <g, z - x>                       e = β_p e + (1 - β_p) ‖g‖₁ √(π/2),   ê = e / (1 - β_p^t)
    α = γ_t · lr · max(0, F + I) / ê       (Polyak's step with f* = 0, along an Adam step that is about
                                            sign(g), so <g, step> ≈ ‖g‖₁)
    z ← z - α² λ y - α m̂ / (√v̂ + ε)        x ← (1 - c) x + c z        y = β x + (1 - β) z

with ``c = 1`` over the first ``c_warmup`` steps and then ``c = w / Σw``, ``w = t^r · max(ε, max_{s≤t} α_s)^p``,
each per parameter group (``lr`` floored at ``ε``), as the reference implementation keeps them.
``γ_t`` is the warm-up factor (linear over ``warmup_steps``, 1 after). The rate needs the loss: call
``step(loss)`` with the loss at the current weights (``y``); no extra forward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from salsa_fused.errors import NonFiniteError


class ScheduleFreePlus(torch.optim.Optimizer):
    """ScheduleFree+ (module docstring). ``train()`` / ``eval()`` put ``y`` / ``x`` in the parameters,
    as schedule-free optimizers do. ``param_groups[0]["scheduled_lr"]`` is the last step's rate ``α``."""

    def __init__(self, params, lr: float = 1.0, betas: Tuple[float, float] = (0.9, 0.95), sf_beta: float = 0.9,
                 eps: float = 1e-8, weight_decay: float = 0.0, r: float = 0.0, weight_lr_power: float = 2.0,
                 polyak_beta: float = 0.0, warmup_steps: int = 0, c_warmup: int = 0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1 and 0 <= sf_beta < 1 and 0 <= polyak_beta < 1):
            raise ValueError(f"betas, sf_beta and polyak_beta must be in [0, 1), got {betas}, {sf_beta}, {polyak_beta}")
        if warmup_steps < 0 or c_warmup < 0:
            raise ValueError(f"warmup_steps and c_warmup must be >= 0, got {warmup_steps}, {c_warmup}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rate_max=eps,
                                      weight_sum=0.0, scheduled_lr=0.0, average_weight=1.0))
        self.sf_beta, self.r, self.weight_lr_power = sf_beta, r, weight_lr_power
        self.polyak_beta, self.warmup_steps, self.c_warmup = polyak_beta, warmup_steps, c_warmup
        self.t = 0
        self.l1_average = 0.0
        self.training = False

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def train(self):
        """Put ``y`` (where gradients are taken) in the parameters."""
        if not self.training:
            for p in self._params():
                state = self.state.get(p)
                if state:
                    p.copy_(state["y"])
            self.training = True

    @torch.no_grad()
    def eval(self):
        """Put ``x`` (the average) in the parameters."""
        if self.training:
            for p in self._params():
                state = self.state.get(p)
                if state:
                    p.copy_(state["x"])
            self.training = False

    def warmup_factor(self, t: int) -> float:
        """``γ_t`` for step ``t`` (1-based): linear up to ``warmup_steps``."""
        return min(1.0, t / self.warmup_steps) if self.warmup_steps else 1.0

    @torch.no_grad()
    def step(self, loss) -> float:
        """One step, given ``loss``: the loss at the current weights (``y``), whose gradients are in
        ``.grad``. Returns the rate ``α`` it applied. Raises :class:`NonFiniteError` on a non-finite loss
        or gradient before anything moves."""
        if not self.training:
            raise RuntimeError("ScheduleFreePlus.step() in eval mode: call train() first")
        value = float(loss)
        params = [p for p in self._params() if p.grad is not None]
        if not math.isfinite(value):
            raise NonFiniteError(f"loss is {value}")
        l1 = 0.0
        inner = 0.0
        for p in params:
            g = p.grad
            if not torch.isfinite(g).all():
                raise NonFiniteError("a gradient has a non-finite entry")
            l1 += float(g.abs().sum(dtype=torch.float64))
            state = self.state.get(p)  # .get: a refused step leaves no state behind
            if state and "z" in state:
                inner += float((g.double() * (state["z"].double() - state["x"].double())).sum())
        self.t += 1
        t = self.t
        self.l1_average = self.polyak_beta * self.l1_average + (1 - self.polyak_beta) * l1 * math.sqrt(math.pi / 2)
        l1_hat = self.l1_average / (1 - self.polyak_beta ** t)
        polyak = max(0.0, value + self.sf_beta * inner) / l1_hat if l1_hat > 0 else 0.0
        gamma = self.warmup_factor(t)
        for group in self.param_groups:
            rate = group["scheduled_lr"] = gamma * max(group["lr"], group["eps"]) * polyak
            group["rate_max"] = max(group["rate_max"], rate)
            if t <= self.c_warmup:
                group["average_weight"] = 1.0
            else:
                weight = t ** self.r * group["rate_max"] ** self.weight_lr_power
                group["weight_sum"] += weight
                group["average_weight"] = weight / group["weight_sum"]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rate, eps, decay, c = group["scheduled_lr"], group["eps"], group["weight_decay"], group["average_weight"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                    state["y"] = p.detach().clone()
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                z, x, y = state["z"], state["x"], state["y"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if decay:
                    z.sub_(y, alpha=rate * rate * decay)
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                z.addcdiv_(m, denominator, value=-rate / (1 - beta1 ** t))
                x.mul_(1 - c).add_(z, alpha=c)
                y.copy_(x).mul_(self.sf_beta).add_(z, alpha=1 - self.sf_beta)
                p.copy_(y)
        return self.param_groups[0]["scheduled_lr"]
