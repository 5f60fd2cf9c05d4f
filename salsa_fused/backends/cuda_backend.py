"""Backend ``"cuda"``: the C++ extension's CUDA kernels (csrc/cuda/) by name.

The passes are :mod:`.cpp_backend`'s: each is one call of a ``torch.ops.salsa_fused`` op,
which dispatches on the tensors' device to the CUDA kernels (one launch per bucket on the
multi-tensor chunking engine of ``csrc/cuda/multi_tensor.cuh``). This name only insists
on CUDA tensors and on kernels built for them, so that ``backend="cuda"`` never runs
anything else in their place.
"""

from __future__ import annotations

import torch

from . import cpp_backend
from .cpp_backend import first_trial, plain_step, restore, retrial, slope, unsupported  # noqa: F401 (the passes)

name = "cuda"


def is_available() -> bool:
    """The extension is built with its CUDA kernels and a CUDA device is present."""
    return torch.cuda.is_available() and cpp_backend.supports(torch.device("cuda"))


def check(device: torch.device) -> None:
    """Raise RuntimeError unless ``device`` is a CUDA device the extension has kernels for."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"backend 'cuda' runs the extension's CUDA kernels; these tensors are on {device} "
                           "(use backend='cpp' or 'auto' for CPU tensors)")
    cpp_backend.check(device)
