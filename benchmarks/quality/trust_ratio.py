"""Per-tensor trust ratios (LAMB's) on the searched step: a candidate for the ``pretrain`` preset (issue 14,
NOTES.md section 95), not part of the package.

Every tensor gets its own param group, and group ``W``'s probe multiplier ``search_lr`` (and its ``lr``, kept
equal, so that a schedule's scale is untouched) is the trust ratio

    r_W = rms(W) / rms(d_W)            (tensors of 2 or more dimensions; 1 for the others)

with ``d_W = m_hat / (sqrt(v_hat) + eps)`` the direction the preset moves along. Trials then probe
``W - eta * r_W * d_W`` and the slope sums ``r_W * g.d`` over groups, so the search finds the level ``eta`` of a
relative step: every matrix moves by ``eta`` times its own scale, as LAMB's (You et al., 2020) global rate does;
biases and norms' scales keep Adam's absolute step (LAMB's exclusion of them from layer adaptation, as in BERT's
recipe). A ratio is 1 where either norm is 0 or not finite (LAMB's rule).

With ``normalized``, the ratios of the matrices are divided by their geometric mean at every step: only the
allocation between layers changes, and the level keeps Adam's units.

``d`` is read after each step from the moments that step wrote, and sets the ratio of the next step (one step
of lag, no extra pass); a tensor that sat the step out (no gradient) keeps its ratio. The first step's ratio uses the first direction's known size: with the moments at zero
``d = c * sign(g)`` with ``c = ((1 - beta1) / bc1) / (sqrt((1 - beta2) / bc2) + eps)``, whose RMS is ``c`` for a
dense gradient.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from salsa_fused.backends.base import STEPS_SAT_OUT, Hyper


def per_tensor_groups(groups: List[dict]) -> List[dict]:
    """``groups`` with every tensor in a group of its own, each keeping its group's other keys."""
    return [{**{k: v for k, v in group.items() if k != "params"}, "params": [p]}
            for group in groups for p in group["params"]]


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().float().pow(2).mean().sqrt()) if tensor.numel() else 0.0


def _ratio(weight_rms: float, direction_rms: float) -> float:
    ratio = weight_rms / direction_rms if direction_rms > 0 else 0.0
    return ratio if ratio > 0 and math.isfinite(ratio) else 1.0


class TrustRatio:
    """Set each one-tensor group's ``search_lr`` and ``lr`` of ``optimizer`` (a FusedSaLSa whose groups are
    :func:`per_tensor_groups`) to its trust ratio before every step (module docstring)."""

    def __init__(self, optimizer, normalized: bool = False):
        groups = optimizer.param_groups
        if any(len(group["params"]) != 1 for group in groups):
            raise ValueError("TrustRatio needs one tensor per param group: build the groups with per_tensor_groups")
        self.optimizer = optimizer
        self.normalized = bool(normalized)
        self.ratios: List[float] = []
        first: Dict[int, float] = {}
        for index, group in enumerate(groups):
            hyper = Hyper.for_step(group, 1)
            first[index] = ((1 - hyper.beta1) / hyper.bias_correction1) / (
                math.sqrt((1 - hyper.beta2) / hyper.bias_correction2) + hyper.eps)
        self._set({i: _ratio(_rms(g["params"][0]), first[i]) if g["params"][0].dim() >= 2 else 1.0
                   for i, g in enumerate(groups)})
        self.handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._update())

    def _direction_rms(self, group: dict) -> float:
        p = group["params"][0]
        state = self.optimizer.state.get(p, {})
        if "exp_avg" not in state:
            return 0.0
        hyper = Hyper.for_step(group, self.optimizer.search_state.step, int(state.get(STEPS_SAT_OUT, 0)))
        m_hat = state["exp_avg"].float() / hyper.bias_correction1
        v_hat = state["exp_avg_sq"].float() / hyper.bias_correction2
        return _rms(m_hat / (v_hat.sqrt() + hyper.eps))

    def _update(self) -> None:
        """Each ratio from the step just taken; a tensor that sat it out (no gradient) keeps its ratio: its moments
        did not move, and a count of the step it sat out would bias-correct them as if they had."""
        groups = self.optimizer.param_groups
        self._set({i: (self._raw[i] if g["params"][0].grad is None else
                       _ratio(_rms(g["params"][0]), self._direction_rms(g)) if g["params"][0].dim() >= 2 else 1.0)
                   for i, g in enumerate(groups)})

    def _set(self, ratios: Dict[int, float]) -> None:
        self._raw = dict(ratios)
        if self.normalized:
            logs = [math.log(r) for i, r in ratios.items() if self.optimizer.param_groups[i]["params"][0].dim() >= 2]
            if logs:
                mean = math.exp(sum(logs) / len(logs))
                ratios = {i: (r / mean if self.optimizer.param_groups[i]["params"][0].dim() >= 2 else r)
                          for i, r in ratios.items()}
        for index, ratio in ratios.items():
            group = self.optimizer.param_groups[index]
            group["search_lr"] = group["lr"] = ratio
        self.ratios = [ratios[i] for i in range(len(ratios))]
