"""Triton's CPU interpreter without the repeated patching of ``triton.language`` at device-function calls.

Under ``TRITON_INTERPRET=1`` (tests/conftest.py), Triton swaps ``triton.language``'s builtins for the
interpreter's at each launch (``GridExecutor.__call__``, undone when the launch ends), and again at every
call of a ``@triton.jit`` device function inside the kernel (``InterpretedFunction.__call__``). The second
finds every builtin already swapped by the launch and sets the same attributes again; each call walks the
language modules with ``inspect.getmembers``, about 2 ms. The kernels of salsa_fused/backends/triton_kernels.py
call device functions in their loops, so in tests/test_spec.py's Triton cases the repatching took 54 s of
the 86 s that the kernels ran (cProfile, 2026-12-06: 27,554 patches for 628 launches).

:func:`install` skips a device function's patch when the launch in progress already patched every language
module that function sees, and leaves every other patch to Triton: the kernels run the same code on the same
builtins. It changes nothing where Triton's interpreter lacks the internals it wraps (another Triton
version): the kernels then run at Triton's own speed. tests/test_triton_interpreter.py checks the results
against Triton's own patching.
"""

from __future__ import annotations

import inspect
import threading
from typing import Callable, Dict, FrozenSet, Optional

_INTERNALS = ("_patch_lang", "_LangPatchScope", "GridExecutor", "InterpretedFunction")


class _LaunchState(threading.local):
    #: a launch is running in this thread
    in_launch: bool = False
    #: ids of the language modules the running launch has patched (None: none yet)
    patched: Optional[FrozenSet[int]] = None


_STATE = _LaunchState()
_ORIGINALS: dict = {}


_MODULES_SEEN: Dict[Callable, FrozenSet[int]] = {}


def _language_modules(fn: Callable) -> FrozenSet[int]:
    """The language modules ``_patch_lang(fn)`` patches: ``triton.language`` and its ``core`` in fn's globals
    (looked up once per function: a kernel module imports them at its top)."""
    modules = _MODULES_SEEN.get(fn)
    if modules is None:
        import triton.language as tl

        modules = _MODULES_SEEN[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                                if inspect.ismodule(value) and (value is tl or value is tl.core))
    return modules


def installed() -> bool:
    return bool(_ORIGINALS)


def install() -> bool:
    """Wrap the interpreter's patching (once); False where this Triton lacks the internals it wraps."""
    if _ORIGINALS:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not all(hasattr(interpreter, name) for name in _INTERNALS):
        return False
    if list(inspect.signature(interpreter._patch_lang).parameters) != ["fn"]:
        return False
    patch_lang = interpreter._patch_lang
    launch = interpreter.GridExecutor.__call__

    def patch_lang_once_per_launch(fn):
        modules = _language_modules(fn)
        # a function that sees no language module goes to Triton, whose check refuses it
        if _STATE.in_launch and _STATE.patched is not None and modules and modules <= _STATE.patched:
            return interpreter._LangPatchScope()  # the launch patched these; nothing to undo
        scope = patch_lang(fn)
        if _STATE.in_launch:
            _STATE.patched = modules | (_STATE.patched or frozenset())
        return scope

    def launch_tracking_its_patches(self, *args, **kwargs):
        outer = (_STATE.in_launch, _STATE.patched)
        _STATE.in_launch, _STATE.patched = True, None
        try:
            return launch(self, *args, **kwargs)
        finally:
            _STATE.in_launch, _STATE.patched = outer

    _ORIGINALS.update(patch_lang=patch_lang, launch=launch)
    interpreter._patch_lang = patch_lang_once_per_launch
    interpreter.GridExecutor.__call__ = launch_tracking_its_patches
    return True


def uninstall() -> None:
    """Put Triton's own patching back."""
    if not _ORIGINALS:
        return
    from triton.runtime import interpreter

    interpreter._patch_lang = _ORIGINALS.pop("patch_lang")
    interpreter.GridExecutor.__call__ = _ORIGINALS.pop("launch")
