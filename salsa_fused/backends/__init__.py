"""Backend selection: ``"torch"`` (reference), ``"triton"`` (fused kernels), ``"auto"``."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def _triton_module() -> ModuleType:
    return importlib.import_module("salsa_fused.backends.triton_backend")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        module = _triton_module()
    except ImportError:
        return False
    return module.is_available()


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; ``"auto"`` is triton on CUDA when it imports."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        from . import torch_backend
        return torch_backend
    if name == "auto":
        if triton_usable(device):
            return _triton_module()
        from . import torch_backend
        return torch_backend
    if not triton_usable(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device}: Triton needs CUDA tensors, or TRITON_INTERPRET=1 "
            "set before triton is imported for the CPU interpreter")
    return _triton_module()
