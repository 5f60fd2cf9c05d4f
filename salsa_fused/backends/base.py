"""What every backend receives: tensor buckets and the scalars of one step.

A *bucket* holds the tensors of one param group that share a device and a dtype.
Every backend function works on one bucket with one launch (or one set of
``torch._foreach_*`` calls); none loops over tensors in Python on the hot path.

Notation (SPEC section 1), per element, with ``k`` the step counter after its
increment and ``lr`` the group's multiplier:

    v_new   = beta2 * v + (1 - beta2) * g^2
    m_new   = beta1 * m + (1 - beta1) * g
    v_hat   = v_new / (1 - beta2^(k+1))          m_hat = m_new / (1 - beta1^(k+1))
    precond = 1 / (sqrt(v_hat) + eps)
    d       = g * precond          (direction "gradient", 0.1.0's default)
            | m_hat * precond      (direction "momentum", 0.1.0's use_mv=True)
    update  = m_hat * precond      (a plain step always moves along this)
    w_dec   = w - weight_decay * decay_step_size * w
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

GRADIENT = "gradient"
MOMENTUM = "momentum"
DIRECTIONS = (GRADIENT, MOMENTUM)


@dataclass
class Bucket:
    """Tensors of one (param group, device, dtype); lists are index-aligned.

    ``params`` are the weights (fp32, bf16 or fp16), ``grads`` their gradients
    (same dtype as the weights), ``exp_avg``/``exp_avg_sq`` the fp32 moments m, v,
    ``saved`` the copies of ``w0`` (same dtype as the weights) when the restore
    strategy is ``"copy"``, else ``None``.
    """

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    exp_avg: List[torch.Tensor]
    exp_avg_sq: List[torch.Tensor]
    saved: Optional[List[torch.Tensor]]
    device: torch.device
    dtype: torch.dtype
    group_index: int
    # Backends may cache per-bucket data here (pointer tables); keyed by backend.
    cache: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass(frozen=True)
class Hyper:
    """Scalars of one bucket for one step (host floats; nothing here lives on a device)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float  # 1 - beta1 ** (k + 1)
    bias_correction2: float  # 1 - beta2 ** (k + 1)
    lr: float  # the group's multiplier on the searched step size
