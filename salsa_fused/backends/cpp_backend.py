"""The C++ backend: each pass of a bucket is one call of a compiled torch op (csrc/).

The passes of :class:`.base.Backend`, tested against ``torch_backend`` (the executable
spec). The ops (``torch.ops.salsa_fused.*``, registered with ``TORCH_LIBRARY`` so they
compose with ``torch.compile``) take the bucket's tensor lists whole: on the CPU one
``at::parallel_for`` over fixed-size chunks of all tensors, vectorized (AVX2+FMA where
the processor has it), with the reference's operation forms. Their square root is IEEE
(correctly rounded), so results agree with the torch backend to the bit when its square
root is too, and to an ulp of the preconditioner otherwise (q: to rounding, summed in a
fixed order). A CUDA build adds kernels for CUDA tensors (csrc/cuda/).

Bytes moved per parameter with fp32 weights, gradients and state (reads + writes):
q 8 along the gradient (12 along the momentum), plain step 28, first trial 32 with a
saved copy (28 without), retrial 16, restore 8 from the copy (16 in place); along ``"raw"``
(no moments read or written) q 4, plain step 12, first trial 16 (12 without a copy),
retrial 12, restore 8 (12 in place). No pass allocates a tensor but q's 0-dim result.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .base import GRADIENT, MOMENTUM, RAW, Bucket, Hyper, Move, PassArgs, count_step, kernel_unsupported, mark_written

name = "cpp"


def is_available() -> bool:
    """The extension is built (or JIT-built with SALSA_FUSED_JIT=1) and its ops are registered."""
    return _ext.load()


def supports(device: torch.device) -> bool:
    """The ops have kernels for ``device``: the CPU always, CUDA when the CUDA kernels were built."""
    if not _ext.load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("salsa_fused::plain_step_", key)


def check(device: torch.device) -> None:
    """Raise RuntimeError when the extension is not built, or has no kernels for ``device``."""
    _ext.require()
    if not supports(device):
        raise RuntimeError(f"the salsa_fused C++ extension has no kernels for {torch.device(device).type} "
                           f"tensors (built without CUDA?); {_ext.build_hint()}")


unsupported = kernel_unsupported


def _ops():
    if not _ext._loaded:  # loaded once: later calls only read the flag (require() would call load() again)
        _ext.require()
    return torch.ops.salsa_fused


# The ops' ``direction`` argument (csrc/salsa_math.h, salsa::Direction).
_DIRECTION_CODES = {GRADIENT: 0, MOMENTUM: 1, RAW: 2}


def _direction(direction: str) -> int:
    code = _DIRECTION_CODES.get(direction)
    if code is None:
        raise ValueError(f"unknown direction {direction!r}")
    return code


def _decay_factor(hyper: Hyper, move: Move) -> float:
    return hyper.decay_factor(move.decay)


def _saved(bucket: Bucket):
    return bucket.saved if bucket.saved is not None else []


def slope(bucket: Bucket, args: PassArgs) -> torch.Tensor:
    """q = sum over the bucket of ``g * d`` with this step's moments (not written); 0-dim fp32.

    Chunk sums (fp32 lanes within a chunk) are added in double in chunk order: the same
    bits with any number of threads.
    """
    h = args.hyper
    return _ops().slope(bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, h.beta1, h.beta2, h.bias_correction1,
                        h.bias_correction2, h.eps, _direction(args.direction), args.grad_scale)


def first_trial(bucket: Bucket, args: PassArgs) -> None:
    """Pass A of a search step: m, v, the saved copy of w, and ``w = w_dec - step * d``."""
    h, move = args.hyper, args.move
    direction = _direction(args.direction)
    _ops().first_trial_(bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, _saved(bucket),
                        h.beta1, h.beta2, h.bias_correction1, h.bias_correction2, h.eps,
                        _decay_factor(h, move), move.step, direction, args.grad_scale)
    mark_written(bucket, args.direction != RAW)


def retrial(bucket: Bucket, args: PassArgs) -> None:
    """Pass B: ``w = decay(saved) - step * d`` or in place ``w += (previous - step) * d``."""
    h, move = args.hyper, args.move
    direction = _direction(args.direction)
    _ops().retrial_(bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, _saved(bucket),
                    h.bias_correction1, h.bias_correction2, h.eps, _decay_factor(h, move), move.step,
                    move.previous, direction, args.grad_scale)
    mark_written(bucket, False)


def restore(bucket: Bucket, args: PassArgs) -> None:
    """Weights from before the step: ``w = saved``, or ``w = (w + previous * d) / (1 - wd * decay)``."""
    h, move = args.hyper, args.move
    direction = _direction(args.direction)
    _ops().restore_(bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, _saved(bucket),
                    h.bias_correction1, h.bias_correction2, h.eps, _decay_factor(h, move), move.previous,
                    direction, args.grad_scale)
    mark_written(bucket, False)


def plain_step(bucket: Bucket, args: PassArgs, loss: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
               nonfinite_count: Optional[torch.Tensor] = None, step_counts: Optional[torch.Tensor] = None) -> None:
    """Pass A of a plain step: m, v updated and ``w = w_dec - step * m_hat * precond``, or along
    ``"raw"`` ``w = w_dec - step * g`` with m, v untouched.

    Changes nothing when ``loss`` is non-finite or ``found_inf`` is set. An element whose
    gradient is non-finite keeps its weight and moments and is counted into
    ``nonfinite_count`` (an int64 0-dim tensor). The guards are read inside the op;
    ``step_counts`` (``base.count_step``) is counted beside it: on the host for CPU tensors
    (the extension's ``count_plain_step``), with torch ops otherwise.
    """
    if step_counts is not None:
        on_host = getattr(_ext.module(), "count_plain_step", None)  # None: not loaded, or built before it
        if on_host is None or not on_host(step_counts, loss, found_inf):
            count_step(step_counts, loss, found_inf)
    h, move = args.hyper, args.move
    along = _DIRECTION_CODES[RAW if args.direction == RAW else MOMENTUM]
    _ops().plain_step_(bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, h.beta1, h.beta2,
                       h.bias_correction1, h.bias_correction2, h.eps, _decay_factor(h, move), move.step, along,
                       loss, found_inf, args.grad_scale, nonfinite_count)
    mark_written(bucket, along != _DIRECTION_CODES[RAW])
