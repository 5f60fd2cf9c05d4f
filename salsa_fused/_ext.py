"""The compiled extension: loads ``salsa_fused._C`` (built by setup.py), or JIT-builds it.

Importing the library registers the ops ``torch.ops.salsa_fused.*`` (csrc/). With
``SALSA_FUSED_JIT=1`` the sources of a source checkout are compiled on first use by
``torch.utils.cpp_extension.load`` (ninja; cached in torch's extensions directory) into the
module ``salsa_fused_jit``. Either build is a Python module with the same functions
(csrc/python_module.cpp); :func:`module` gives the one that was loaded. A failure is kept and
re-raised by :func:`require` with a build hint; the package works without the extension (the
torch and triton backends).
"""

from __future__ import annotations

import importlib
import os
import types
from typing import Optional

import torch

from . import _build_flags

_loaded = False
_error: Optional[BaseException] = None
_module: Optional[types.ModuleType] = None

JIT_MODULE_NAME = "salsa_fused_jit"

def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_a_checkout() -> bool:
    """Whether the csrc/ sources lie beside the package (a source checkout, an editable install)."""
    return all(os.path.exists(os.path.join(_root(), path))
               for path in [_build_flags.PYTHON_MODULE_SOURCE] + _build_flags.CPU_SOURCES)


def _compiled_in(directory: str) -> bool:
    """Whether a compiled ``_C`` (built by setup.py) lies in the package directory ``directory``."""
    return os.path.isdir(directory) and any(name.startswith("_C.") and name.endswith((".so", ".pyd"))
                                            for name in os.listdir(directory))


def _installed_elsewhere() -> Optional[str]:
    """The package directory of an installed (not editable) ``salsa-fused`` other than the one imported, where
    it holds a compiled ``_C``: Python started in a checkout imports the checkout's package ahead of it. Every
    distribution of that name is read: ``pip install .`` leaves the checkout's own ``salsa_fused.egg-info``, which
    the checkout's directory on ``sys.path`` finds first, and which names the checkout's package."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from importlib import metadata
        found = [dist for dist in metadata.distributions()
                 if (dist.metadata["Name"] or "").lower().replace("_", "-") == "salsa-fused"]
    except Exception:  # metadata that cannot be read
        return None
    for dist in found:
        try:
            installed = os.path.abspath(str(dist.locate_file("salsa_fused")))
        except Exception:  # metadata that names no files
            continue
        if installed != here and _compiled_in(installed):
            return installed
    return None


def build_hint() -> str:
    """How to build the extension from where the package is: the JIT variable only where the
    sources it compiles are, and not again where it is already set (its failure is the reason); where a
    compiled extension is there after all (an installed copy the checkout hides, or SALSA_FUSED_JIT=1 set in
    an installed package), what makes Python load it."""
    here = os.path.dirname(os.path.abspath(__file__))
    jit = os.environ.get("SALSA_FUSED_JIT") == "1"
    if _in_a_checkout():
        elsewhere = None if jit else _installed_elsewhere()
        if elsewhere is not None:
            hint = (f"Python imported the source checkout's salsa_fused ({here}), which has no compiled _C, ahead "
                    f"of the installed copy that has one ({elsewhere}): run from outside the checkout, or build it "
                    "here too with `python setup.py build_ext --inplace` (or an editable install, "
                    "`pip install --no-build-isolation -e .`)")
        else:
            hint = ("build it with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`) "
                    "here")
        if not jit:
            hint += ", or set SALSA_FUSED_JIT=1 to compile it on first use"
    elif jit and _compiled_in(here):
        return ("SALSA_FUSED_JIT=1 compiles the csrc/ sources of a source checkout, which an installed package has "
                "not; unset it to load the extension compiled into this installation")
    else:
        hint = ("reinstall from a source checkout or the sdist with `pip install --no-build-isolation <source>`, "
                "torch, setuptools, wheel and ninja installed first (`pip -v` shows why a build failed)")
    return hint + "; it needs a C++ compiler"


def _jit_build() -> types.ModuleType:
    from torch.utils import cpp_extension

    root = _root()
    sources = [os.path.join(root, path)
               for path in [_build_flags.PYTHON_MODULE_SOURCE] + _build_flags.CPU_SOURCES]
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += [os.path.join(root, path) for path in _build_flags.CUDA_SOURCES]
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError("SALSA_FUSED_JIT=1 compiles the csrc/ sources of a source checkout, and this "
                                f"installed package has none (missing {len(missing)} files, e.g. {missing[0]})")
    return cpp_extension.load(name=JIT_MODULE_NAME, sources=sources, extra_cflags=_build_flags.CXX_FLAGS,
                              extra_cuda_cflags=_build_flags.NVCC_FLAGS if with_cuda else None,
                              extra_ldflags=_build_flags.LINK_FLAGS, is_python_module=True)


def load() -> bool:
    """Load the ops once; True when they are registered."""
    global _loaded, _error, _module
    if _loaded or _error is not None:
        return _loaded
    try:
        if os.environ.get("SALSA_FUSED_JIT") == "1":
            loaded = _jit_build()
        else:
            loaded = importlib.import_module("salsa_fused._C")
    except (ImportError, OSError, RuntimeError) as error:
        _error = error
        return False
    _register_fakes()
    _module, _loaded = loaded, True
    return True


def never_built() -> bool:
    """Whether the extension did not load because there is none (no ``salsa_fused._C``), not because a
    built one fails to load (built against another torch, a damaged file: its error says which)."""
    return isinstance(_error, ImportError) and str(_error) == "No module named 'salsa_fused._C'"


def module() -> Optional[types.ModuleType]:
    """The loaded extension module (``salsa_fused._C`` or the JIT build's), None when it did not load."""
    return _module if load() else None


def require() -> None:
    """Load the ops or raise a RuntimeError that says how to build them."""
    if not load():
        raise RuntimeError(f"the salsa_fused C++ extension is not available ({_error}); {build_hint()}") from _error


def _register_fakes() -> None:
    """Shapes for torch.compile's fake tensors: the passes write in place; q is a 0-dim fp32."""

    @torch.library.register_fake("salsa_fused::slope")
    def _slope(grads, exp_avg, exp_avg_sq, beta1, beta2, bias_correction1, bias_correction2, eps, direction,
               grad_scale):
        device = exp_avg_sq[0].device if exp_avg_sq else torch.device("cpu")
        return torch.empty((), dtype=torch.float32, device=device)

    for name in ("first_trial_", "retrial_", "restore_", "plain_step_"):
        torch.library.register_fake(f"salsa_fused::{name}")(lambda *args, **kwargs: None)
