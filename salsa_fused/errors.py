"""Errors raised by FusedSaLSa, and where its warnings point."""

import math
import numbers
import os
import sys
from typing import Optional

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


def checked_int(name: str, value, minimum: int, allow_none: bool = False):
    """``value`` as an int, if it is an integer (Python's or numpy's, not a bool) of at least ``minimum``
    (or None, with ``allow_none``); else ValueError naming ``name``, the bound and, for a value that is not
    an integer, its type."""
    if allow_none and value is None:
        return None
    wanted = f"{name} must be {'None or ' if allow_none else ''}an integer >= {minimum}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{wanted} (a {type(value).__name__}, not an integer)")
    if value < minimum:
        raise ValueError(wanted)
    return int(value)


def as_float(name: str, value: numbers.Real) -> float:
    """``float(value)``, or ValueError naming ``name`` where ``value`` is an integer too large for a float
    (``10**400`` raised a bare OverflowError that named no argument)."""
    try:
        return float(value)
    except OverflowError:
        bits = int(value).bit_length()  # str() of an int over 4300 digits raises: Python's conversion limit
        raise ValueError(f"{name} must be a finite number, got an integer of {bits} bits (about "
                         f"{int(bits * math.log10(2)) + 1} digits), too large for a float") from None


def checked_real(name: str, value, lower: float, upper: Optional[float] = None) -> float:
    """``value`` as a float, if it is a finite real number (Python's or numpy's, not a bool) above ``lower``
    (and below ``upper``, when given); else ValueError naming ``name``, the range and, for a value that is
    not a number, its type."""
    wanted = (f"{name} must lie in ({lower:g}, {upper:g})" if upper is not None
              else f"{name} must be a finite number > {lower:g}") + f", got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{wanted} (a {type(value).__name__}, not a number)")
    value = as_float(name, value)
    if not (math.isfinite(value) and lower < value and (upper is None or value < upper)):
        raise ValueError(wanted)
    return float(value)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this which names the
    first frame outside this package and torch: the caller's ``step()`` (or ``scaler.step()``),
    whatever wrappers torch puts around ``step`` (its hooks, ``torch.compiler.disable``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level
