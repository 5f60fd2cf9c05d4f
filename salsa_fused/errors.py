"""Errors raised by FusedSaLSa."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite; nothing non-finite was written."""
