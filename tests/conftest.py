"""Run Triton kernels under its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is imported and before any kernel is
defined, so it is set here, when pytest loads this file, ahead of every test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_intra_op_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures(...)``): intra-op
    threads only add contention there, up to 10x slower on a busy 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
