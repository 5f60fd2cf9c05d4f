"""Snapshots of the random generators a forward pass draws from.

A search replays the first forward's random state for every trial forward (equal
dropout masks), then leaves the generators where that one forward left them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch


@dataclass
class RNGSnapshot:
    cpu: torch.Tensor
    cuda: Dict[int, torch.Tensor]

    @classmethod
    def capture(cls, devices: Iterable[torch.device]) -> "RNGSnapshot":
        cuda_indices = sorted({d.index if d.index is not None else torch.cuda.current_device()
                               for d in devices if d.type == "cuda"})
        return cls(cpu=torch.get_rng_state(),
                   cuda={i: torch.cuda.get_rng_state(i) for i in cuda_indices})

    def same_as(self, other: Optional["RNGSnapshot"]) -> bool:
        """Are the generators in the same state (read on the host, no device sync)?"""
        return (other is not None and self.cuda.keys() == other.cuda.keys()
                and torch.equal(self.cpu, other.cpu)
                and all(torch.equal(state, other.cuda[i]) for i, state in self.cuda.items()))

    def set(self) -> None:
        """Put every captured generator back in the captured state."""
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
