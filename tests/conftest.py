"""Run Triton kernels under its CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton is imported and before any kernel is
defined, so it is set here, when pytest loads this file, ahead of every test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
