"""The small models that several test files train, each defined once (the GPT is examples/gpt.py)."""

from __future__ import annotations

import torch


def tanh_mlp(*widths: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """``Linear`` layers of the given widths with ``Tanh`` between them, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)
