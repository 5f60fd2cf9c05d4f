"""Every applied step, trial and decay a pass moves by, formed in one place.

Words (docs/api.md, "Words"): the *level* ``eta`` is what the search finds and keeps
(``SearchState.step_size``); a *trial* is a level a search tries (the first ``eta * growth``,
then backtracked); the *applied step* is what the weights finally move by. For group ``g`` at a step whose schedule scale is
``s`` (1 without a schedule) and whose level before the step is ``eta``, ``lr_g`` is the group's
*probe* multiplier ``search_lr`` (its ``lr`` at construction; 1 for a group built at ``lr=0``,
from its first positive ``lr`` on) and ``s`` includes the ratio ``lr / search_lr`` of a scheduler's current ``lr`` to it
(capped at the hold ``h``, or scaled by ``h / peak`` past the warm-up with ``decay_from_hold``, and times the
back-off ``b`` of ``backoff_on_loss_rise``:
``salsa_fused.step_size.applied_scale``):
trials always probe at the probe multiplier, a warmup of ``lr`` scales only the applied step
(a group with ``search_lr = 0`` never moves):

    decay, every pass of the step:  w0 -> w0 * (1 - weight_decay * lr_g * s * eta)
    plain step:                     applied = lr_g * s * (eta * growth)          (along m_hat)
    search, trial t:                weights at decay(w0) - lr_g * t * d          (trials probe the level)
    search, final move t:           applied = lr_g * s * t          (SaLSa: t the accepted trial)
    search with the guard failed:   applied = lr_g * s * (eta * growth)          (along m_hat)
    restore:                        back to w0 from the current trial

The decay is the plain step's on every pass of a search too, so a search step and a plain
step of the same schedule shrink the weights alike. Up to and on the first search, with ``init_step_size``
not given, the decay's ``eta`` is 0 (``FusedSaLSa._decay_level``): the placeholder level 1.0 is no rate. ``FusedSaLSa.applied_steps`` reads :meth:`GroupStep.plain` for the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Move


@dataclass(frozen=True)
class GroupStep:
    """The scalars of one step for one param group: ``lr_g``, the schedule's scale, the level."""

    lr: float
    scale: float
    level: float

    @classmethod
    def of(cls, group: dict, scale: float, level: float) -> "GroupStep":
        """The scalars of param group ``group``: probes at ``search_lr``, applies ``lr``."""
        probe, lr = float(group["search_lr"]), float(group["lr"])  # numpy scalars from a scheduler: fp64
        return cls(probe, scale * (lr / probe) if probe > 0 else 0.0, level)

    @property
    def decay(self) -> float:
        """``lr_g * s * eta``: the decay step size of every pass of this step."""
        return self.lr * self.scale * self.level

    def plain(self, trial: float) -> Move:
        """A plain step along ``m_hat``; ``trial`` is ``eta * growth``."""
        return Move(step=self.lr * self.scale * trial, decay=self.decay)

    def guard_failed(self, trial: float) -> Move:
        """The one move of a search whose guard failed (zero loss or tiny slope), along ``m_hat``."""
        return Move(step=self.lr * (self.scale * trial), decay=self.decay)

    def trial(self, trial: float, previous: float = 0.0) -> Move:
        """Weights at trial ``trial`` (unscaled: trials probe the level), from trial ``previous``."""
        return Move(step=self.lr * trial, previous=self.lr * previous, decay=self.decay)

    def apply(self, step: float, trial: float) -> Move:
        """From the weights at trial ``trial`` to the applied step ``lr_g * s * step`` (the search's
        final move: ``step`` is the accepted trial for SaLSa)."""
        return Move(step=self.lr * (self.scale * step), previous=self.lr * trial, decay=self.decay)

    def restore(self, trial: float) -> Move:
        """Back to ``w0`` from the weights at trial ``trial``."""
        return Move(step=0.0, previous=self.lr * trial, decay=self.decay)
