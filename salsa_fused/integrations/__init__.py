"""FusedSaLSa inside training stacks: Hugging Face Trainer, accelerate, Lightning.

A line search must evaluate the loss of the *same* batch at trial weights, so every
integration does the same three things after the framework's own forward and backward:

1. remember each micro-batch of the accumulation window and the random state its
   forward started from (:class:`AccumulatedLoss`);
2. build a forward-only loss function over the whole window (the sum of the
   micro-batch losses, scaled as the backward scaled them, each micro-batch's forward
   replaying its recorded random state, so dropout draws the masks of the backward);
3. bind it, with the accumulated loss, to the optimizer
   (:meth:`FusedSaLSa.bind_closure`), whose next ``step()`` — called by the framework
   without arguments — runs the two-phase step ``step(closure, loss=total)``.

A rule that reads several batches per step (``search_rule="labpal"``, whose closure takes a batch
index) cannot be fed by these loops: they see one update's batches. :func:`one_batch_salsa`
refuses it with that reason when the integration is set up (and again at every binding).

The framework modules (``salsa_fused.integrations.transformers``, ``.accelerate``)
import their framework; this package imports none.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch

from .._rng import RNGSnapshot
from ..optimizer import FusedSaLSa

__all__ = ["AccumulatedLoss", "one_batch_salsa", "unwrap_salsa"]


def unwrap_salsa(optimizer: Any) -> FusedSaLSa:
    """The :class:`FusedSaLSa` inside framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``: each keeps the wrapped optimizer in ``.optimizer``)."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, FusedSaLSa):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if seen is None:
            break
    raise TypeError(f"expected a FusedSaLSa (possibly wrapped), got {type(optimizer).__name__}")


def one_batch_salsa(optimizer: Any, integration: str) -> FusedSaLSa:
    """:func:`unwrap_salsa`, refusing a FusedSaLSa whose rule reads several batches per step
    (``search_rule="labpal"``): these integrations hand the step the batches of one update only,
    and the rule's ``closure(i)`` needs more (``rules.Batches``), so it would judge a wrong loss."""
    salsa = unwrap_salsa(optimizer)
    if salsa.next_batches() is not None:
        raise ValueError(f"{integration} binds a closure over one update's batches, but this FusedSaLSa's "
                         "search rule reads several batches per step through closure(i) (search_rule="
                         "'labpal'): drive the loop yourself with step(closure) or "
                         "loss.backward(); step(closure, loss=loss), closure(i) the loss of batch i of "
                         "the step (docs/api.md, the closure contract)")
    return salsa


def check_micro_batch_loss(loss: Any, where: str) -> None:
    """A TypeError naming what ``where`` got unless ``loss`` is a one-element tensor (a micro-batch's loss)."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return
    if isinstance(loss, torch.Tensor):
        got = f"a tensor of shape {tuple(loss.shape)} (reduce it to the mean loss)"
    else:
        got = type(loss).__name__ + (" (a model output: return its .loss)" if hasattr(loss, "loss") else "")
    raise TypeError(f"{where} needs the micro-batch's scalar loss tensor, got {got}")


def _param_devices(optimizer: FusedSaLSa) -> List[torch.device]:
    return sorted({p.device for g in optimizer.param_groups for p in g["params"]}, key=str)


class AccumulatedLoss:
    """The micro-batches of one accumulation window, and the loss function over all of them.

    ``add(batch, loss, rng)`` after each micro-batch's backward (``loss``: the loss whose
    backward ran, already divided as the backward divided it); ``bind(optimizer, loss_of)``
    hands the optimizer ``closure() = sum_i loss_of(batch_i)`` — each term evaluated after
    restoring ``rng_i`` — together with ``total = sum_i loss_i``, and starts a new window.
    ``loss_of(batch)`` must return the same scaled loss the backward saw for that batch.
    """

    def __init__(self) -> None:
        self._entries: List[Tuple[Any, Optional[RNGSnapshot]]] = []
        self._total: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total(self) -> Optional[torch.Tensor]:
        """The summed (detached) loss of the window so far; ``None`` when empty."""
        return self._total

    @staticmethod
    def snapshot(devices: Iterable[torch.device]) -> RNGSnapshot:
        """The random state now (CPU and the CUDA devices among ``devices``)."""
        return RNGSnapshot.capture(list(devices))

    def add(self, batch: Any, loss: torch.Tensor, rng: Optional[RNGSnapshot] = None) -> None:
        check_micro_batch_loss(loss, "AccumulatedLoss.add")
        loss = loss.detach().reshape(())
        self._total = loss if self._total is None else self._total + loss
        self._entries.append((batch, rng))

    def forward(self, loss_of: Callable[[Any], torch.Tensor], batch: Any,
                devices: Iterable[torch.device] = ()) -> torch.Tensor:
        """``loss_of(batch)`` with grad, recorded with the random state it started from."""
        rng = self.snapshot(devices)
        loss = loss_of(batch)
        self.add(batch, loss, rng)
        return loss

    def closure(self, loss_of: Callable[[Any], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The forward-only loss of the window as it is now (later ``add`` calls do not change it)."""
        entries = list(self._entries)
        if not entries:
            raise RuntimeError("AccumulatedLoss.closure: no micro-batch recorded in this window")

        def closure() -> torch.Tensor:
            total = None
            for batch, rng in entries:
                if rng is not None:
                    rng.set()
                value = loss_of(batch)
                total = value if total is None else total + value
            return total

        return closure

    def bind(self, optimizer: Any, loss_of: Callable[[Any], torch.Tensor]) -> None:
        """Bind ``(closure, total)`` to the FusedSaLSa inside ``optimizer``; start a new window."""
        salsa = one_batch_salsa(optimizer, "AccumulatedLoss.bind")
        # The closure replays each micro-batch's recorded random state itself: its trials compare
        # like with like against the window's loss, so the step needs no reference forward.
        salsa.mark_forward()
        salsa.bind_closure(self.closure(loss_of), loss=self._total)
        self.clear()

    def clear(self) -> None:
        self._entries = []
        self._total = None
