"""Errors raised by FusedSaLSa, and where its warnings point."""

import os
import sys

import torch

_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite; nothing non-finite was written."""


class ClosureFailedOnAnotherRank(RuntimeError):
    """Under DDP/FSDP2 a search's forward raised on another rank: this rank raises too, with the
    weights and the optimizer's state as before the step (the failing rank raises its own exception)."""


class NonFiniteOnEveryRank(NonFiniteError):
    """Under DDP/FSDP2 the closure raised :class:`NonFiniteError` on every rank in a forward whose loss the
    ranks share (a search's, ``LRFactorSearch``'s scoring): each rank raises this, from its own error, where
    it would have raised that error. An agreed divergence, which :class:`~salsa_fused.StepSizeBeam` scores
    as a diverged branch, as it scores the closure's own error in one process."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this which names the
    first frame outside this package and torch: the caller's ``step()`` (or ``scaler.step()``),
    whatever wrappers torch puts around ``step`` (its hooks, ``torch.compiler.disable``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level
