"""Adam's moments and directions, shared by the Adam+SLS and ALSALS references (seed 001, Eq. 3)."""

from __future__ import annotations

from typing import List

import torch


class AdamMoments:
    """``m = beta1*m + (1-beta1)*g``, ``v = beta2*v + (1-beta2)*g^2``, bias-corrected at step ``k``
    (the standard Kingma & Ba correction; Eq. 3 of seed 001 writes ``m_{k-1}``, a typo)."""

    def __init__(self, params: List[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.k = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def update(self, grads: List[torch.Tensor]) -> None:
        self.k += 1
        for m, v, g in zip(self.m, self.v, grads):
            m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)

    def preconditioner(self) -> List[torch.Tensor]:
        """``1 / (sqrt(v_hat) + eps)`` per parameter."""
        bc2 = 1 - self.beta2 ** self.k
        return [1 / ((v / bc2).sqrt() + self.eps) for v in self.v]

    def m_hat(self) -> List[torch.Tensor]:
        bc1 = 1 - self.beta1 ** self.k
        return [m / bc1 for m in self.m]


def dot(xs: List[torch.Tensor], ys: List[torch.Tensor]) -> float:
    """``sum_i x_i . y_i`` over a list of tensors, in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def set_weights(params: List[torch.Tensor], origin: List[torch.Tensor], step: float,
                direction: List[torch.Tensor]) -> None:
    """``w = origin - step * direction`` (in place, no autograd)."""
    with torch.no_grad():
        for p, w0, d in zip(params, origin, direction):
            p.copy_(w0 - step * d)


def loss_and_grads(params: List[torch.Tensor], closure):
    """``f(w)`` and ``grad f(w)`` from a closure that returns the loss (no backward inside)."""
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = closure()
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach() for g in grads]
