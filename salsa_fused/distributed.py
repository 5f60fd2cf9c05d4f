"""Keeping every rank's search decision identical.

Each Armijo decision depends on the loss at the current and the trial weights; on a
data-parallel run every rank sees its own batch, so the losses are averaged over the
data-parallel group before the host decides (one small all-reduce per read). The
preconditioned gradient norm ``q`` is a sum over all elements of the model: with
replicated weights (DDP) every rank already holds all of it and it is not reduced;
with sharded weights (FSDP2) the per-shard partial sums are summed over the shard group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class SearchReduction:
    """Where the search's scalars are reduced; ``None`` groups mean 'do not reduce'."""

    loss_group: Optional[object] = None
    shard_group: Optional[object] = None

    @property
    def active(self) -> bool:
        return self.loss_group is not None or self.shard_group is not None

    def average_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Mean of ``losses`` (a 1-D fp32 tensor) over the loss group; the input is not modified."""
        if self.loss_group is None:
            return losses
        reduced = losses.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.loss_group)
        return reduced / dist.get_world_size(self.loss_group)

    def sum_over_shards(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """Sum of a shard's partial ``q`` over the shard group (no-op for replicated weights)."""
        if self.shard_group is None:
            return partial_sum
        reduced = partial_sum.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.shard_group)
        return reduced


def default_reduction() -> SearchReduction:
    """Losses averaged over the whole world when ``torch.distributed`` runs with >1 rank."""
    if not is_distributed():
        return SearchReduction()
    return SearchReduction(loss_group=dist.group.WORLD)
