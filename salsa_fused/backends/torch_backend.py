"""The torch reference backend: the executable spec of every pass.

Built from ``torch._foreach_*`` ops (one call per op over a whole bucket), in the
operation forms of the published ``salsa-optimizer`` 0.1.0 so that fp32 runs on
the CPU reproduce it to the bit: ``precond = reciprocal(sqrt(v / bc2) + eps)``,
``d = precond * g``, ``w = w0.add(d, alpha=-eta)``, per-tensor sums added in
list order. The Triton and CUDA backends are tested against these functions.

Low-precision weights (bf16, fp16) are upcast to fp32 for the arithmetic and the
result is rounded once when written back; moments are always fp32.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from .. import _compat as C
from .base import GRADIENT, MOMENTUM, Bucket, Hyper, PassArgs, count_step

name = "torch"


def check(device: torch.device) -> None:
    """The reference runs wherever torch does."""


def _grads_fp32(bucket: Bucket, grad_scale: Optional[torch.Tensor]) -> List[torch.Tensor]:
    grads = C.to_float32(bucket.grads)
    if grad_scale is not None:
        grads = C.foreach_div(grads, grad_scale.to(torch.float32))
    return grads


def _new_moments(bucket: Bucket, hyper: Hyper, grads: List[torch.Tensor]):
    """(m_new, v_new) as fresh lists; 0.1.0's forms: ``(1-b2)*g^2 + b2*v``, ``(1-b1)*g + b1*m``."""
    grad_sq = C.foreach_mul(grads, grads)
    C.foreach_mul_(grad_sq, 1 - hyper.beta2)
    exp_avg_sq = C.foreach_mul(bucket.exp_avg_sq, hyper.beta2)
    C.foreach_add_(exp_avg_sq, grad_sq)
    scaled_grads = C.foreach_mul(grads, 1 - hyper.beta1)
    exp_avg = C.foreach_mul(bucket.exp_avg, hyper.beta1)
    C.foreach_add_(exp_avg, scaled_grads)
    return exp_avg, exp_avg_sq


def _preconditioner(exp_avg_sq: List[torch.Tensor], hyper: Hyper) -> List[torch.Tensor]:
    """``1 / (sqrt(v / (1 - beta2^(k+1))) + eps)``, a fresh list."""
    precond = C.foreach_div(exp_avg_sq, hyper.bias_correction2)
    C.foreach_sqrt_(precond)
    C.foreach_add_(precond, hyper.eps)
    C.foreach_reciprocal_(precond)
    return precond


def _direction(precond, grads, exp_avg, hyper: Hyper, direction: str):
    """d = precond * g  or  precond * m_hat (consumes ``precond``)."""
    if direction == GRADIENT:
        C.foreach_mul_(precond, grads)
    elif direction == MOMENTUM:
        C.foreach_mul_(precond, C.foreach_div(exp_avg, hyper.bias_correction1))
    else:
        raise ValueError(f"unknown direction {direction!r}")
    return precond


def _current_direction(bucket: Bucket, hyper: Hyper, direction: str, grad_scale) -> List[torch.Tensor]:
    """d from the already-updated moments stored in the bucket."""
    grads = _grads_fp32(bucket, grad_scale) if direction == GRADIENT else None
    precond = _preconditioner(bucket.exp_avg_sq, hyper)
    return _direction(precond, grads, bucket.exp_avg, hyper, direction)


def _write_weights(params: List[torch.Tensor], values: List[torch.Tensor]) -> None:
    if values is params:
        return
    C.foreach_copy_(params, values)


def _decayed(weights_fp32: List[torch.Tensor], hyper: Hyper, decay_step_size: float) -> List[torch.Tensor]:
    """``w - weight_decay * decay_step_size * w`` (the list itself when there is no decay)."""
    if hyper.weight_decay == 0 or decay_step_size == 0:
        return weights_fp32
    return C.foreach_mul(weights_fp32, 1 - hyper.weight_decay * decay_step_size)


def slope(bucket: Bucket, args: PassArgs) -> torch.Tensor:
    """q = sum over the bucket of ``g * d`` with the moments updated by this step's g (not written).

    Returns a 0-dim fp32 tensor on the bucket's device; per-tensor sums are added in list order.
    Reads g, m, v; writes nothing. Non-finite gradients make q non-finite.
    """
    hyper = args.hyper
    grads = _grads_fp32(bucket, args.grad_scale)
    exp_avg, exp_avg_sq = _new_moments(bucket, hyper, grads)
    precond = _preconditioner(exp_avg_sq, hyper)
    if args.direction == GRADIENT:
        per_tensor = [(g * g * p).sum() for g, p in zip(grads, precond)]
    else:
        d = _direction(precond, grads, exp_avg, hyper, MOMENTUM)
        per_tensor = [torch.inner(g.flatten(), dd.flatten()) for g, dd in zip(grads, d)]
    total = torch.zeros((), dtype=torch.float32, device=bucket.device)
    for value in per_tensor:
        total = total + value
    return total


def first_trial(bucket: Bucket, args: PassArgs) -> None:
    """Pass A of a search step: write m, v, the saved copy of w, and the first trial weights.

    ``saved = w`` (when the bucket keeps copies);  ``w = w_dec - step * d``.
    """
    hyper, move = args.hyper, args.move
    grads = _grads_fp32(bucket, args.grad_scale)
    exp_avg, exp_avg_sq = _new_moments(bucket, hyper, grads)
    C.foreach_copy_(bucket.exp_avg, exp_avg)
    C.foreach_copy_(bucket.exp_avg_sq, exp_avg_sq)
    if bucket.saved is not None:
        C.foreach_copy_(bucket.saved, bucket.params)
    precond = _preconditioner(exp_avg_sq, hyper)
    d = _direction(precond, grads, exp_avg, hyper, args.direction)
    _move_from(bucket.params, C.to_float32(bucket.params), d, hyper, move.step, move.decay)


def retrial(bucket: Bucket, args: PassArgs) -> None:
    """Pass B: move the weights to the trial ``w_dec - step * d``.

    With a saved copy: ``w = decay(saved) - step * d`` (exact). In place:
    ``w += (previous - step) * d`` (one rounding per trial).
    """
    move = args.move
    d = _current_direction(bucket, args.hyper, args.direction, args.grad_scale)
    if bucket.saved is not None:
        weights = _decayed(C.to_float32(bucket.saved), args.hyper, move.decay)
        _write_weights(bucket.params, C.foreach_add(weights, d, alpha=-move.step))
    else:
        weights = C.to_float32(bucket.params)
        C.foreach_mul_(d, move.previous - move.step)
        _write_weights(bucket.params, C.foreach_add(weights, d))


def restore(bucket: Bucket, args: PassArgs) -> None:
    """Put back the weights from before the step: ``w = saved`` (exact), or in place
    ``w = (w + previous * d) / (1 - weight_decay * decay)`` (to rounding)."""
    if bucket.saved is not None:
        C.foreach_copy_(bucket.params, bucket.saved)
        return
    hyper, move = args.hyper, args.move
    d = _current_direction(bucket, hyper, args.direction, args.grad_scale)
    weights = C.foreach_add(C.to_float32(bucket.params), d, alpha=move.previous)
    if hyper.weight_decay != 0 and move.decay != 0:
        C.foreach_div_(weights, 1 - hyper.weight_decay * move.decay)
    _write_weights(bucket.params, weights)


def plain_step(bucket: Bucket, args: PassArgs, loss: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
               nonfinite_count: Optional[torch.Tensor] = None, step_counts: Optional[torch.Tensor] = None) -> None:
    """Pass A of a plain step: m, v updated and ``w = w_dec - step * m_hat * precond``.

    Changes nothing when ``loss`` is non-finite or ``found_inf`` is set (such a step is
    counted into ``step_counts``, when given: ``base.count_step``). An element whose gradient
    is non-finite keeps its weight and moments; the number of such elements is added to
    ``nonfinite_count`` (an int64 0-dim tensor).

    This reference reads one flag on the host to pick the guarded path (free on the
    CPU; a sync on an accelerator, where the kernel backends guard on the device).
    """
    if step_counts is not None:
        count_step(step_counts, loss, found_inf)
    step_ok = torch.isfinite(loss.detach().to(torch.float32)).all()
    if found_inf is not None:
        step_ok = step_ok & (found_inf.to(step_ok.device) == 0)
    if not bool(step_ok):
        return
    hyper, step_size, decay_step_size = args.hyper, args.move.step, args.move.decay
    grads = _grads_fp32(bucket, args.grad_scale)
    if bucket.device.type == "cpu" and all(t.is_contiguous() for stream in (
            grads, bucket.params, bucket.exp_avg, bucket.exp_avg_sq) for t in stream):
        _plain_step_blocked(bucket, hyper, step_size, decay_step_size, grads, nonfinite_count)
        return
    grad_norms = C.foreach_norm(grads)
    if not bool(torch.isfinite(torch.stack(grad_norms)).all()):
        _guarded_plain_step(bucket, hyper, step_size, decay_step_size, grads, nonfinite_count)
        return
    exp_avg, exp_avg_sq = _new_moments(bucket, hyper, grads)
    C.foreach_copy_(bucket.exp_avg, exp_avg)
    C.foreach_copy_(bucket.exp_avg_sq, exp_avg_sq)
    precond = _preconditioner(exp_avg_sq, hyper)
    update = _direction(precond, grads, exp_avg, hyper, MOMENTUM)
    _move_from(bucket.params, C.to_float32(bucket.params), update, hyper, step_size, decay_step_size)


def _move_from(params, weights_fp32, d, hyper: Hyper, step_size: float, decay_step_size: float) -> None:
    """``params = decay(weights) - step_size * d``; in place when fp32 without decay, as 0.1.0 does."""
    weights = _decayed(weights_fp32, hyper, decay_step_size)
    if weights is params:
        C.foreach_add_(params, d, alpha=-step_size)
    else:
        _write_weights(params, C.foreach_add(weights, d, alpha=-step_size))


# Elements per block of the CPU plain step: large enough that each op splits well over
# the intra-op threads (smaller blocks measured slower), small enough that a block's streams
# (g, m, v, w and two fp32 scratch rows of 1 MiB) stay in cache through all of its ops.
CPU_BLOCK = 1 << 18


def _plain_step_blocked(bucket: Bucket, hyper: Hyper, step_size: float, decay_step_size: float,
                        grads: List[torch.Tensor], nonfinite_count: Optional[torch.Tensor]) -> None:
    """The plain step on the CPU, block by block.

    The same operations as the foreach form above, in the same order and with the same
    roundings (bitwise equal), applied to one block of elements at a time so that the
    block stays in cache across them; moments are updated in place and two block-sized
    scratch rows replace the foreach form's weight-sized temporaries. Finiteness is
    checked per block on ``sum(g^2)`` while the block is in cache (no separate pass over
    the gradients); a block that fails takes the element-wise guarded path.
    """
    largest = max((p.numel() for p in bucket.params), default=0)
    if largest == 0:
        return
    scratch = torch.empty(2, min(CPU_BLOCK, largest), dtype=torch.float32)
    beta1, beta2, bc1, bc2 = hyper.beta1, hyper.beta2, hyper.bias_correction1, hyper.bias_correction2
    decay = hyper.weight_decay != 0 and decay_step_size != 0
    factor = 1 - hyper.weight_decay * decay_step_size
    fp32_weights = bucket.dtype == torch.float32
    for g, m, v, w in zip(grads, bucket.exp_avg, bucket.exp_avg_sq, bucket.params):
        g, m, v, w = g.view(-1), m.view(-1), v.view(-1), w.view(-1)
        for start in range(0, g.numel(), CPU_BLOCK):
            end = min(start + CPU_BLOCK, g.numel())
            gb, mb, vb, wb = g[start:end], m[start:end], v[start:end], w[start:end]
            s, t = scratch[0, :end - start], scratch[1, :end - start]
            torch.mul(gb, gb, out=s)  # v = beta2*v + (1-beta2)*g^2
            if not math.isfinite(float(s.sum())):  # NaN/inf in g (or g^2 overflowing fp32)
                block = Bucket(params=[wb], grads=[gb], exp_avg=[mb], exp_avg_sq=[vb], saved=None,
                               device=bucket.device, dtype=bucket.dtype, group_index=bucket.group_index)
                _guarded_plain_step(block, hyper, step_size, decay_step_size, [gb], nonfinite_count)
                continue
            s.mul_(1 - beta2)
            vb.mul_(beta2)
            vb.add_(s)
            torch.mul(gb, 1 - beta1, out=s)  # m = beta1*m + (1-beta1)*g
            mb.mul_(beta1)
            mb.add_(s)
            torch.div(vb, bc2, out=s)  # precond = 1 / (sqrt(v_hat) + eps)
            s.sqrt_()
            s.add_(hyper.eps)
            s.reciprocal_()
            torch.div(mb, bc1, out=t)  # update = precond * m_hat
            s.mul_(t)
            if fp32_weights and not decay:
                wb.add_(s, alpha=-step_size)
                continue
            if fp32_weights:
                torch.mul(wb, factor, out=t)
            else:
                t.copy_(wb)
                if decay:
                    t.mul_(factor)
            t.add_(s, alpha=-step_size)
            wb.copy_(t)


def _guarded_plain_step(bucket, hyper, step_size, decay_step_size, grads, nonfinite_count) -> None:
    """The rare path: some gradient elements are non-finite; those elements stay as they are."""
    finite = [torch.isfinite(g * g) for g in grads]  # g*g overflowing would write v = inf
    safe_grads = [torch.where(ok, g, torch.zeros_like(g)) for ok, g in zip(finite, grads)]
    exp_avg, exp_avg_sq = _new_moments(bucket, hyper, safe_grads)
    precond = _preconditioner(exp_avg_sq, hyper)
    update = _direction(precond, safe_grads, exp_avg, hyper, MOMENTUM)
    weights = _decayed(C.to_float32(bucket.params), hyper, decay_step_size)
    new_weights = C.foreach_add(weights, update, alpha=-step_size)
    for i, ok in enumerate(finite):
        bucket.exp_avg[i].copy_(torch.where(ok, exp_avg[i], bucket.exp_avg[i]))
        bucket.exp_avg_sq[i].copy_(torch.where(ok, exp_avg_sq[i], bucket.exp_avg_sq[i]))
        bucket.params[i].copy_(torch.where(ok, new_weights[i], bucket.params[i].float()))
    if nonfinite_count is not None:
        skipped = sum(int((~ok).sum()) for ok in finite)
        nonfinite_count.add_(skipped)
