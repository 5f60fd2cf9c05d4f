"""accelerate keeps process-wide singletons (mixed precision, accumulation); reset them per test."""

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
    except ImportError:
        yield
        return
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
