"""accelerate keeps process-wide singletons (mixed precision, accumulation); reset them per test.
Tiny models: one intra-op thread (much faster than two on a busy 2-core machine)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _tiny_tensors_one_thread(one_intra_op_thread):
    """Every integration test here uses tiny models (see tests/conftest.py)."""
    yield

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
