"""The one home of torch's private multi-tensor APIs used by this package, and of what differs
between the torch (and Triton) releases it runs on.

``torch._foreach_*`` ops are stable in practice but private; every call site
goes through the names below so a torch release that moves them is a one-file fix.
"""

from __future__ import annotations

import functools
from typing import Callable, List, TypeVar

import torch
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

TensorList = List[torch.Tensor]

#: torch's (major, minor) release.
TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
#: torch.optim takes ``model.named_parameters()`` and keeps the names in ``param_groups[i]["param_names"]``
#: from torch 2.6 on; older releases refuse the ``(name, tensor)`` pairs.
OPTIMIZER_KEEPS_PARAMETER_NAMES = TORCH_RELEASE >= (2, 6)
#: Where FSDP2's ``fully_shard`` and ``FSDPModule`` live: public from torch 2.6, private on 2.4 and 2.5.
FSDP2_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")

#: Bump the autograd version counter of every tensor of a list, as a torch in-place op bumps the tensor it writes
#: (a kernel that writes through raw pointers must say so): one call from torch 2.5, which takes the list.
if TORCH_RELEASE >= (2, 5):
    increment_versions = torch._C._increment_version
else:
    def increment_versions(tensors: TensorList) -> None:
        for tensor in tensors:
            torch._C._increment_version(tensor)

foreach_add = torch._foreach_add
foreach_add_ = torch._foreach_add_
foreach_addcmul_ = torch._foreach_addcmul_
foreach_copy_ = torch._foreach_copy_
foreach_div = torch._foreach_div
foreach_div_ = torch._foreach_div_
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_norm = torch._foreach_norm
foreach_reciprocal_ = torch._foreach_reciprocal_
foreach_sqrt_ = torch._foreach_sqrt_
foreach_zero_ = torch._foreach_zero_


_Function = TypeVar("_Function", bound=Callable)


def compile_disabled(fn: _Function) -> _Function:
    """``torch.compiler.disable(fn)``, made at the first call: the decorator imports ``torch._dynamo``
    (2 s on a 2-core CPU), which ``import salsa_fused`` should not cost. A process that trains still
    imports it, at its first ``zero_grad`` or step: torch.optim defers its own decorators the same way
    (``torch._disable_dynamo``, private)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = call.__dict__.get("_disabled")
        if disabled is None:
            disabled = call._disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]


def power_iteration_buffers(module: torch.nn.Module) -> TensorList:
    """Spectral norm's ``u`` and ``v`` that a training forward of ``module`` itself updates: the buffers of
    ``torch.nn.utils.parametrizations.spectral_norm``'s (private) ``_SpectralNorm`` module, and those of the
    older ``torch.nn.utils.spectral_norm``'s forward pre hook (read from ``module._forward_pre_hooks``)."""
    if isinstance(module, _SpectralNorm):
        return list(module.buffers(recurse=False))
    return [getattr(module, hook.name + suffix) for hook in module._forward_pre_hooks.values()
            if isinstance(hook, SpectralNorm) for suffix in ("_u", "_v")]


def upcast_16bit(tensors: TensorList) -> TensorList:
    """The list itself when no tensor is 16-bit, else a list with the 16-bit ones upcast to fp32: the
    weights' arithmetic (fp64 weights stay fp64, so a step keeps their precision)."""
    if not any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return tensors
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def to_float32(tensors: TensorList) -> TensorList:
    """The list itself when every tensor is fp32, else a list with upcast copies."""
    if all(t.dtype == torch.float32 for t in tensors):
        return tensors
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def fsdp2():
    """The module that holds FSDP2's ``fully_shard`` and ``FSDPModule`` on this torch, or None without FSDP2."""
    import importlib
    for name in FSDP2_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "FSDPModule"):
            return module
    return None


def triton_kernel_source(fn, signature: dict, constexprs: dict, attrs: dict):
    """``triton.compiler.ASTSource`` of the JIT function ``fn`` for an ahead-of-time ``triton.compile``:
    ``signature`` and ``constexprs`` keyed by argument name, ``attrs`` as ``{(index,): [["tt.divisibility", 16]]}``.
    Triton 3.0 (torch 2.4's pin) keys both by argument index, takes the constexprs as ``constants`` and the
    alignment as an ``AttrsDescriptor``."""
    import inspect

    from triton.compiler import ASTSource
    if "constexprs" in inspect.signature(ASTSource).parameters:
        return ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.compiler.compiler import AttrsDescriptor
    index = fn.arg_names.index
    return ASTSource(fn, signature={index(name): kind for name, kind in signature.items() if name not in constexprs},
                     constants={index(name): value for name, value in constexprs.items()},
                     attrs=AttrsDescriptor(divisible_by_16={i for (i,), _ in attrs.items()}))
