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


class StaticLoss(torch.nn.Module):
    """``model``'s MSE loss (times ``weight``) returned in one static output tensor, the same object at every
    forward and rewritten by each, as CUDA graph trees (``torch.compile(mode="reduce-overhead")``) return
    the same tensor from replay to replay; the caller's backward runs through the write."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.out = model, torch.zeros(())

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.out.detach_()  # the graph of the last forward's write: not this one's
        return self.out.copy_(loss * weight if weight != 1.0 else loss)
