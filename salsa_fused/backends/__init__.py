"""Backends by name: ``"torch"`` (the reference), ``"triton"`` (fused kernels), ``"cpp"`` (the
compiled extension, csrc/, for CPU and CUDA tensors), ``"cuda"`` (the extension's CUDA
kernels only), and ``"auto"``.

A backend is a module (or object) with the passes of :class:`.base.Backend`. Adding one is one
module, one line in ``REGISTRY`` (or a :func:`register_backend` call from outside the package)
and one line in the tests' backend table. ``FusedSaLSa`` selects and checks its backend once,
in ``__init__``, with :func:`resolve`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, Tuple, Union

import torch

from .base import Backend

#: name -> the module that implements it (imported on first use: Triton stays optional).
REGISTRY: Dict[str, Union[str, Backend]] = {
    "torch": "salsa_fused.backends.torch_backend",
    "triton": "salsa_fused.backends.triton_backend",
    "cpp": "salsa_fused.backends.cpp_backend",
    "cuda": "salsa_fused.backends.cuda_backend",
}
AUTO = "auto"
#: The backends that run a pass as compiled kernels (what ``fused=True`` asks for).
KERNEL_BACKENDS = ("triton", "cpp", "cuda")
#: The backend of ``torch._foreach_*`` ops (what ``foreach=True`` asks for).
FOREACH_BACKEND = "torch"
#: :func:`name_for_flags`' answer to ``fused=True`` with ``backend="auto"``: kernels for the device.
FUSED = "auto:fused"
#: torch.optim's per-group backend flags: FusedSaLSa reads them at construction, as one choice for every group
#: (:meth:`FusedSaLSa._refuse_another_backend <salsa_fused.FusedSaLSa._refuse_another_backend>`).
BACKEND_FLAGS = ("foreach", "fused")


def names() -> Tuple[str, ...]:
    """Every name ``backend=`` accepts."""
    return (AUTO, *REGISTRY)


def register_backend(name: str, backend: Union[str, Backend]) -> None:
    """Add backend ``name``: a module path (imported when first chosen) or an object with the passes."""
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"a backend name must be a non-empty string other than {AUTO!r}, got {name!r}")
    if not isinstance(backend, str) and not isinstance(backend, Backend):
        raise TypeError(f"backend {name!r} lacks passes of salsa_fused.backends.base.Backend")
    REGISTRY[name] = backend


def load(name: str) -> Backend:
    """The backend registered as ``name`` (imported, not checked against a device)."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {names()}, got {name!r}")
    backend = REGISTRY[name]
    if isinstance(backend, str):
        backend = importlib.import_module(backend)
        if not isinstance(backend, Backend):
            raise TypeError(f"backend module {REGISTRY[name]} lacks passes of salsa_fused.backends.base.Backend")
    return backend


def usable(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device``."""
    try:
        load(name).check(device)
    except (ImportError, RuntimeError):
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1``."""
    return usable("triton", device)


_cpp_fallback_noted = False


_cuda_fallback_noted = False


def _auto(device: torch.device) -> str:
    """triton on CUDA when it can run, else the extension's CUDA kernels when built; cpp on the CPU when the
    extension is built; else torch.

    Where it falls back to torch on the CPU or on CUDA, says so once per process (a warning, not silence): on
    CUDA the torch backend's plain step reads its guards on the host (two syncs a bucket).
    """
    global _cpp_fallback_noted, _cuda_fallback_noted
    if device.type == "cuda":
        if triton_usable(device):
            return "triton"
        if usable("cpp", device):
            return "cpp"
        if not _cuda_fallback_noted:
            _cuda_fallback_noted = True
            from .. import _ext
            why = ("is not built" if _ext.never_built() else f"does not load ({_ext._error})" if _ext._error is not None
                   else "was built without CUDA")
            warnings.warn("salsa_fused: backend='auto' uses the torch backend on CUDA: Triton cannot run here "
                          f"(pip install 'salsa_fused[triton]') and the C++ extension, with its CUDA kernels, {why}; "
                          "the torch backend's plain step reads its guards on the host, two syncs per bucket at every "
                          "step", RuntimeWarning, stacklevel=5)
        return "torch"
    if device.type == "cpu":
        if usable("cpp", device):
            return "cpp"
        if not _cpp_fallback_noted:
            _cpp_fallback_noted = True
            from .. import _ext
            # stacklevel: _auto, resolve, FusedSaLSa.__init__, its argument check, the caller
            why = "is not built" if _ext.never_built() else f"does not load ({_ext._error})"
            warnings.warn(f"salsa_fused: backend='auto' uses the torch backend on the CPU: the C++ extension "
                          f"{why}; {_ext.build_hint()}", RuntimeWarning, stacklevel=5)
    return "torch"


def name_for_flags(backend: str, foreach, fused) -> str:
    """The backend ``FusedSaLSa(backend=..., foreach=..., fused=...)`` asks for, as torch.optim reads
    its flags: ``fused=True`` or ``foreach=False``: compiled kernels (``"auto"`` picks them for
    the device: triton or the extension's CUDA kernels on CUDA, cpp on the CPU, never torch);
    ``foreach=True`` or ``fused=False``: the torch reference, which runs ``torch._foreach_*`` ops.
    ``None`` leaves ``backend`` alone. Flags that contradict each other or ``backend`` raise
    ValueError naming both (FusedSaLSa has no per-tensor loop: ``foreach=False, fused=False`` too)."""
    for flag, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{flag} must be True, False or None, got {value!r}")
    if foreach is not None and fused is not None and foreach == fused:
        raise ValueError("`fused` and `foreach` cannot both be True" if fused else
                         "foreach=False and fused=False leave no implementation: FusedSaLSa runs "
                         "either compiled kernels (fused) or torch's foreach ops")
    wants_kernels = fused is True or foreach is False
    wants_foreach = foreach is True or fused is False
    if not (wants_kernels or wants_foreach):
        return backend
    flags = ", ".join(f"{k}={v}" for k, v in (("foreach", foreach), ("fused", fused)) if v is not None)
    if wants_foreach:
        if backend not in (AUTO, FOREACH_BACKEND):
            raise ValueError(f"{flags} asks for the torch backend (foreach ops), but backend={backend!r}")
        return FOREACH_BACKEND
    if backend != AUTO and backend not in KERNEL_BACKENDS:
        raise ValueError(f"{flags} asks for compiled kernels ({', '.join(KERNEL_BACKENDS)}), "
                         f"but backend={backend!r}")
    return FUSED if backend == AUTO else backend


def _fused(device: torch.device) -> str:
    """The kernel backend for ``device`` (``fused=True`` with ``backend="auto"``), or RuntimeError
    with each candidate's reason."""
    candidates = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    reasons = []
    for name in candidates:
        try:
            load(name).check(device)
            return name
        except (ImportError, RuntimeError) as error:
            reasons.append(f"{name}: {error}")
    raise RuntimeError(f"fused=True or foreach=False (compiled kernels): no compiled backend runs on "
                       f"{device.type} here ({'; '.join(reasons)})")


def resolve(name: str, device: torch.device) -> Backend:
    """The backend for ``name`` on ``device``, checked: raises RuntimeError with the reason when it
    cannot run there. ``"auto"``: triton on CUDA when it can run, cpp on the CPU when the extension
    is built, else torch."""
    if name == AUTO:
        name = _auto(device)
    elif name == FUSED:
        name = _fused(device)
    backend = load(name)
    backend.check(device)
    return backend
