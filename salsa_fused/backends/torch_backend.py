"""The torch reference backend: the executable spec of every pass.

Built from ``torch._foreach_*`` ops (one call per op over a whole bucket), in the
operation forms of the published ``salsa-optimizer`` 0.1.0 so that fp32 runs on
the CPU reproduce it to the bit: ``precond = reciprocal(sqrt(v / bc2) + eps)``,
``d = precond * g``, ``w = w0.add(d, alpha=-eta)``, per-tensor sums added in
list order. The Triton and CUDA backends are tested against these functions.

Direction ``"raw"`` (``d = g``, base.py) skips Adam entirely: no pass reads or writes the
moments, and the plain step moves along ``g`` too.

Low-precision weights (bf16, fp16) are upcast to fp32 for the arithmetic and the
result is rounded once when written back; fp64 weights take the (fp32) step in fp64, so
they keep their precision. Moments, and so the direction, are always fp32.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _compat as C
from .base import GRADIENT, MOMENTUM, RAW, Bucket, Hyper, Move, PassArgs, count_step

name = "torch"


def check(device: torch.device) -> None:
    """The reference runs wherever torch does."""


def _grads_fp32(grads: List[torch.Tensor], grad_scale: Optional[torch.Tensor]) -> List[torch.Tensor]:
    grads = C.to_float32(grads)
    if grad_scale is not None:
        grads = C.foreach_div(grads, grad_scale.to(torch.float32))
    return grads


class _ForeachOps:
    """The ops the arithmetic below is written in, over tensor lists: one ``torch._foreach_*``
    call each; the non-in-place forms return new lists (``into`` is ignored)."""

    @staticmethod
    def mul(a, b, into: int):
        return C.foreach_mul(a, b)

    @staticmethod
    def div(a, b, into: int):
        return C.foreach_div(a, b)

    @staticmethod
    def add(a, b, alpha: float, into: int):
        return C.foreach_add(a, b, alpha=alpha)

    @staticmethod
    def weights(a, into: int):
        return C.upcast_16bit(a)

    @staticmethod
    def mul_(a, b):
        C.foreach_mul_(a, b)

    @staticmethod
    def add_(a, b, alpha: float = 1):
        if isinstance(b, (int, float)):  # eps
            C.foreach_add_(a, b)
        else:
            C.foreach_add_(a, b, alpha=alpha)

    @staticmethod
    def sqrt_(a):
        C.foreach_sqrt_(a)

    @staticmethod
    def reciprocal_(a):
        C.foreach_reciprocal_(a)

    @staticmethod
    def copy_(a, b):
        C.foreach_copy_(a, b)


class _BlockOps:
    """The same ops on single tensors (one block of a tensor's elements, see
    :func:`_plain_step_blocked`), the non-in-place forms written into scratch row ``into`` (two
    fp32 rows of the block's length, reused by every block). Same kernels as the foreach forms:
    same bits."""

    def __init__(self, rows: Tuple[torch.Tensor, torch.Tensor]):
        self.rows = rows

    def mul(self, a, b, into: int):
        return torch.mul(a, b, out=self.rows[into])

    def div(self, a, b, into: int):
        return torch.div(a, b, out=self.rows[into])

    def add(self, a, b, alpha: float, into: int):
        return torch.add(a, b, alpha=alpha, out=self.rows[into])

    def weights(self, a, into: int):
        """16-bit weights upcast into an fp32 row (fp64 weights do not come here: the rows are fp32)."""
        return a if a.dtype == torch.float32 else self.rows[into].copy_(a)

    @staticmethod
    def mul_(a, b):
        a.mul_(b)

    @staticmethod
    def add_(a, b, alpha: float = 1):
        a.add_(b, alpha=alpha)

    @staticmethod
    def sqrt_(a):
        a.sqrt_()

    @staticmethod
    def reciprocal_(a):
        a.reciprocal_()

    @staticmethod
    def copy_(a, b):
        a.copy_(b)


_FOREACH = _ForeachOps()


# ---------------------------------------------------------------- Adam's arithmetic, written once
# Every pass below is made of these functions, on whole buckets (_FOREACH) or on blocks
# (_BlockOps); the C++ and Triton kernels follow the same operation forms, and every host-side
# scalar they take (bias corrections, decay factor) comes from Hyper (base.py).

def _new_moments(ops, exp_avg, exp_avg_sq, grads, hyper: Hyper, in_place: bool = False, grad_sq=None):
    """``v = beta2*v + (1-beta2)*g^2``, ``m = beta1*m + (1-beta1)*g`` in 0.1.0's operation forms:
    written into ``exp_avg``/``exp_avg_sq`` (``in_place``), or new lists (the same bits; _FOREACH only).
    ``grad_sq``: ``g*g`` when the caller has formed it already (into row 0), else formed here."""
    if grad_sq is None:
        grad_sq = ops.mul(grads, grads, 0)
    ops.mul_(grad_sq, 1 - hyper.beta2)
    if in_place:
        ops.mul_(exp_avg_sq, hyper.beta2)
    else:
        exp_avg_sq = ops.mul(exp_avg_sq, hyper.beta2, 1)
    ops.add_(exp_avg_sq, grad_sq)
    scaled_grads = ops.mul(grads, 1 - hyper.beta1, 0)
    if in_place:
        ops.mul_(exp_avg, hyper.beta1)
    else:
        exp_avg = ops.mul(exp_avg, hyper.beta1, 1)
    ops.add_(exp_avg, scaled_grads)
    return exp_avg, exp_avg_sq


def _preconditioner(ops, exp_avg_sq, hyper: Hyper):
    """``1 / (sqrt(v_hat) + eps)`` with ``v_hat = v / bias_correction2``, new."""
    precond = ops.div(exp_avg_sq, hyper.bias_correction2, 0)
    ops.sqrt_(precond)
    ops.add_(precond, hyper.eps)
    ops.reciprocal_(precond)
    return precond


def _direction(ops, precond, grads, exp_avg, hyper: Hyper, direction: str):
    """``d = precond * g``  or  ``precond * m_hat`` with ``m_hat = m / bias_correction1``
    (written into ``precond``)."""
    if direction == GRADIENT:
        ops.mul_(precond, grads)
    elif direction == MOMENTUM:
        ops.mul_(precond, ops.div(exp_avg, hyper.bias_correction1, 1))
    else:
        raise ValueError(f"unknown direction {direction!r}")
    return precond


def _decayed(ops, weights, hyper: Hyper, decay_step_size: float):
    """``w * (1 - weight_decay * decay_step_size)`` (``weights`` itself when the factor is 1)."""
    factor = hyper.decay_factor(decay_step_size)
    if factor == 1:
        return weights
    return ops.mul(weights, factor, 1)


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# The smallest fp32 magnitude that rounds (to nearest even) to inf in each 16-bit dtype.
_OVERFLOW = {torch.float16: 65520.0, torch.bfloat16: 3.39617752923046e38}


def _move_from(ops, params, weights, d, hyper: Hyper, step_size: float, decay_step_size: float,
               kept: Optional[torch.Tensor] = None) -> None:
    """``params = decay(weights) - step_size * d``; in place when fp32 (or fp64) without decay, as 0.1.0 does.
    With ``kept`` (a plain step's counter) a 16-bit weight whose new value would round to inf
    keeps its value and is counted into ``kept``."""
    weights = _decayed(ops, weights, hyper, decay_step_size)
    if weights is params:
        ops.add_(params, d, alpha=-step_size)
    elif kept is None or not _has_sixteen_bit(params):
        ops.copy_(params, ops.add(weights, d, -step_size, 1))
    else:
        _copy_finite(params, ops.add(weights, d, -step_size, 1), kept)


def _has_sixteen_bit(params) -> bool:
    """Whether a list of weights (or one block) holds a 16-bit tensor, which the plain step checks."""
    return any(p.dtype in _SIXTEEN_BIT for p in (params if isinstance(params, (list, tuple)) else [params]))


def _copy_finite(params, new_fp32, kept: torch.Tensor) -> None:
    """``params = new_fp32`` rounded to their dtype, except 16-bit elements that would round to inf
    (or are NaN): those keep their value and are counted into ``kept``. Lists or single tensors.
    One host read (each 16-bit tensor's extremes against its dtype's bound) picks the masked copy."""
    pairs = list(zip(params, new_fp32)) if isinstance(params, (list, tuple)) else [(params, new_fp32)]
    checked = [(param, new) for param, new in pairs if param.dtype in _SIXTEEN_BIT and param.numel()]
    for param, new in pairs:
        if param.dtype not in _SIXTEEN_BIT or not param.numel():
            param.copy_(new)
    if not checked:
        return
    bounds = [_OVERFLOW[param.dtype] for param, _ in checked]
    extremes = torch.stack([torch.stack(torch.aminmax(new)).abs().max() for _, new in checked]).tolist()
    for (param, new), extreme, bound in zip(checked, extremes, bounds):
        if extreme < bound:  # False for NaN
            param.copy_(new)
            continue
        rounded = new.to(param.dtype)
        ok = torch.isfinite(rounded)
        torch.where(ok, rounded, param, out=param)
        kept.add_(ok.numel()).sub_(ok.sum())


def _adam_move(ops, params, grads, exp_avg, exp_avg_sq, hyper: Hyper, move: Move, direction: str,
               grad_sq=None, kept: Optional[torch.Tensor] = None) -> None:
    """Moments updated in place, then ``w = decay(w) - move.step * d`` along ``direction``: the plain
    step (along ``m_hat``) and a search's first trial, on a whole bucket or on one block."""
    exp_avg, exp_avg_sq = _new_moments(ops, exp_avg, exp_avg_sq, grads, hyper, in_place=True, grad_sq=grad_sq)
    d = _direction(ops, _preconditioner(ops, exp_avg_sq, hyper), grads, exp_avg, hyper, direction)
    _move_from(ops, params, ops.weights(params, 1), d, hyper, move.step, move.decay, kept)


def _current_direction(bucket: Bucket, hyper: Hyper, direction: str, grad_scale) -> List[torch.Tensor]:
    """d from the already-updated moments stored in the bucket (along ``"raw"``: the fp32
    gradients, which may be the bucket's own tensors: not to be written)."""
    if direction == RAW:
        return _grads_fp32(bucket.grads, grad_scale)
    grads = _grads_fp32(bucket.grads, grad_scale) if direction == GRADIENT else None
    precond = _preconditioner(_FOREACH, bucket.exp_avg_sq, hyper)
    return _direction(_FOREACH, precond, grads, bucket.exp_avg, hyper, direction)


# ---------------------------------------------------------------- the passes

def slope(bucket: Bucket, args: PassArgs) -> torch.Tensor:
    """q = sum over the bucket of ``g * d`` with the moments updated by this step's g (not written).

    Returns a 0-dim fp32 tensor on the bucket's device; per-tensor sums are added in list order.
    Reads g, m, v (along ``"raw"``: g only, ``q = sum g * g``); writes nothing. Non-finite
    gradients make q non-finite.
    """
    hyper = args.hyper
    grads = _grads_fp32(bucket.grads, args.grad_scale)
    if args.direction == RAW:
        return _sum_in_order([(g * g).sum() for g in grads], bucket.device)
    exp_avg, exp_avg_sq = _new_moments(_FOREACH, bucket.exp_avg, bucket.exp_avg_sq, grads, hyper)
    precond = _preconditioner(_FOREACH, exp_avg_sq, hyper)
    if args.direction == GRADIENT:
        per_tensor = [(g * g * p).sum() for g, p in zip(grads, precond)]
    else:
        # where g * g overflows, v_hat is inf and precond 0: the term is NaN, as (g * g) * precond is
        positive = [(p > 0).all() for p in precond]
        d = _direction(_FOREACH, precond, grads, exp_avg, hyper, MOMENTUM)  # written into precond
        per_tensor = [torch.inner(g.flatten(), dd.flatten()).where(ok, math.nan)
                      for g, dd, ok in zip(grads, d, positive)]
    return _sum_in_order(per_tensor, bucket.device)


def _sum_in_order(per_tensor: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for value in per_tensor:
        total = total + value
    return total


def first_trial(bucket: Bucket, args: PassArgs) -> None:
    """Pass A of a search step: write m, v, the saved copy of w, and the first trial weights.

    ``saved = w`` (when the bucket keeps copies);  ``w = w_dec - step * d``. Along ``"raw"``
    the moments are not touched (``d = g``).
    """
    if bucket.saved is not None:
        C.foreach_copy_(bucket.saved, bucket.params)
    grads = _grads_fp32(bucket.grads, args.grad_scale)
    if args.direction == RAW:
        _move_from(_FOREACH, bucket.params, C.upcast_16bit(bucket.params), grads, args.hyper, args.move.step,
                   args.move.decay)
        return
    _adam_move(_FOREACH, bucket.params, grads, bucket.exp_avg, bucket.exp_avg_sq, args.hyper, args.move, args.direction)


def retrial(bucket: Bucket, args: PassArgs) -> None:
    """Pass B: move the weights to the trial ``w_dec - step * d``.

    With a saved copy: ``w = decay(saved) - step * d`` (exact). In place:
    ``w += (previous - step) * d`` (one rounding per trial).
    """
    move = args.move
    d = _current_direction(bucket, args.hyper, args.direction, args.grad_scale)
    if bucket.saved is not None:
        weights = _decayed(_FOREACH, C.upcast_16bit(bucket.saved), args.hyper, move.decay)
        C.foreach_copy_(bucket.params, C.foreach_add(weights, d, alpha=-move.step))
    else:
        weights = C.upcast_16bit(bucket.params)
        if args.direction == RAW:  # d is the gradient: scaled into a new list
            d = C.foreach_mul(d, move.previous - move.step)
        else:
            C.foreach_mul_(d, move.previous - move.step)
        C.foreach_copy_(bucket.params, C.foreach_add(weights, d))


def restore(bucket: Bucket, args: PassArgs) -> None:
    """Put back the weights from before the step: ``w = saved`` (exact), or in place
    ``w = (w + previous * d) / (1 - weight_decay * decay)`` (to rounding)."""
    if bucket.saved is not None:
        C.foreach_copy_(bucket.params, bucket.saved)
        return
    hyper, move = args.hyper, args.move
    d = _current_direction(bucket, hyper, args.direction, args.grad_scale)
    weights = C.foreach_add(C.upcast_16bit(bucket.params), d, alpha=move.previous)
    factor = hyper.decay_factor(move.decay)
    if factor != 1:
        C.foreach_div_(weights, factor)
    C.foreach_copy_(bucket.params, weights)


def plain_step(bucket: Bucket, args: PassArgs, loss: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
               nonfinite_count: Optional[torch.Tensor] = None, step_counts: Optional[torch.Tensor] = None) -> None:
    """Pass A of a plain step: m, v updated and ``w = w_dec - step * m_hat * precond``, or
    along ``"raw"`` ``w = w_dec - step * g`` with m, v untouched (:func:`_raw_plain_step`).

    Changes nothing when ``loss`` is non-finite or ``found_inf`` is set (such a step is
    counted into ``step_counts``, when given: ``base.count_step``). An element whose gradient
    is non-finite keeps its weight and moments, one whose new 16-bit weight would overflow its
    dtype keeps its weight (its moments take the finite gradient); the number of such elements is
    added to ``nonfinite_count`` (an int64 0-dim tensor). fp32 and fp64 weights are not checked.

    The reference is :func:`_adam_move` on the whole bucket (:func:`_guarded_plain_step` when a
    gradient is non-finite). On contiguous CPU tensors the same function runs block by block
    (:func:`_plain_step_blocked`: the same bits, tested). This reference reads one flag on the
    host to pick the guarded path (free on the CPU; a sync on an accelerator, where the kernel
    backends guard on the device).
    """
    if step_counts is not None:
        count_step(step_counts, loss, found_inf)
    step_ok = torch.isfinite(loss.detach().to(torch.float32)).all()
    if found_inf is not None:
        step_ok = step_ok & (found_inf.to(step_ok.device) == 0)
    if not bool(step_ok):
        return
    grads = _grads_fp32(bucket.grads, args.grad_scale)
    if nonfinite_count is None:  # the 16-bit overflow check counts somewhere
        nonfinite_count = torch.zeros((), dtype=torch.int64, device=bucket.device)
    if args.direction == RAW:
        _raw_plain_step(bucket.params, grads, args.hyper, args.move, nonfinite_count)
        return
    tensors = (bucket.params, grads, bucket.exp_avg, bucket.exp_avg_sq)
    if (bucket.device.type == "cpu" and bucket.dtype != torch.float64
            and all(t.is_contiguous() for stream in tensors for t in stream)):
        _plain_step_blocked(*tensors, args.hyper, args.move, nonfinite_count)
        return
    _foreach_plain_step(*tensors, args.hyper, args.move, nonfinite_count)


def _foreach_plain_step(params, grads, exp_avg, exp_avg_sq, hyper: Hyper, move: Move,
                        nonfinite_count: torch.Tensor) -> None:
    """The plain step on lists with the foreach ops: one host read (every gradient's norm finite)
    picks :func:`_adam_move` or :func:`_guarded_plain_step` (NaN/inf in g, or a norm overflowing)."""
    if bool(torch.isfinite(torch.stack(C.foreach_norm(grads))).all()):
        _adam_move(_FOREACH, params, grads, exp_avg, exp_avg_sq, hyper, move, MOMENTUM, kept=nonfinite_count)
    else:
        _guarded_plain_step(params, grads, exp_avg, exp_avg_sq, hyper, move, nonfinite_count)


def _stays_finite(finite: List[torch.Tensor], new_params: List[torch.Tensor]) -> List[torch.Tensor]:
    """``finite`` and, for 16-bit weights, the new weight finite in its dtype (float16 overflows at
    65520 where fp32 does not); fp32 and fp64 weights are not checked."""
    return [ok & torch.isfinite(p) if p.dtype in _SIXTEEN_BIT else ok for ok, p in zip(finite, new_params)]


def _guarded_plain_step(params, grads, exp_avg, exp_avg_sq, hyper: Hyper, move: Move,
                        nonfinite_count: Optional[torch.Tensor]) -> None:
    """The guarded path: an element whose gradient is non-finite stays as it is (weight and
    moments); one whose new 16-bit weight overflows keeps its weight.

    :func:`_adam_move` on copies with the non-finite gradients zeroed, then only the elements that
    pass kept (the same bits as the unguarded path where all pass).
    """
    finite = [torch.isfinite(g * g) for g in grads]  # g*g overflowing would write v = inf
    safe_grads = [torch.where(ok, g, torch.zeros_like(g)) for ok, g in zip(finite, grads)]
    new_params, new_exp_avg, new_exp_avg_sq = ([t.clone() for t in ts] for ts in (params, exp_avg, exp_avg_sq))
    _adam_move(_FOREACH, new_params, safe_grads, new_exp_avg, new_exp_avg_sq, hyper, move, MOMENTUM)
    moves = _stays_finite(finite, new_params)
    for i, (ok, ok_weight) in enumerate(zip(finite, moves)):
        for target, value in ((exp_avg[i], new_exp_avg[i]), (exp_avg_sq[i], new_exp_avg_sq[i])):
            target.copy_(torch.where(ok, value, target))
        params[i].copy_(torch.where(ok_weight, new_params[i], params[i]))
    if nonfinite_count is not None:  # summed on the device: no host read
        nonfinite_count.add_(torch.stack([(~ok).sum() for ok in moves]).sum())


def _raw_plain_step(params, grads, hyper: Hyper, move: Move, nonfinite_count: Optional[torch.Tensor]) -> None:
    """``w = decay(w) - move.step * g`` on the whole bucket; an element whose ``g`` is NaN/inf (one
    host read picks that path), or whose new 16-bit weight overflows, keeps its weight and is counted
    into ``nonfinite_count``."""
    if not params:
        return
    if bool(torch.isfinite(torch.stack(C.foreach_norm(grads))).all()):
        _move_from(_FOREACH, params, C.upcast_16bit(params), grads, hyper, move.step, move.decay, nonfinite_count)
        return
    # The rare path (also taken when a norm overflows with finite elements: same bits then).
    finite = [torch.isfinite(g) for g in grads]
    safe_grads = [torch.where(ok, g, torch.zeros_like(g)) for ok, g in zip(finite, grads)]
    new_params = [p.clone() for p in params]
    _move_from(_FOREACH, new_params, C.upcast_16bit(new_params), safe_grads, hyper, move.step, move.decay)
    finite = _stays_finite(finite, new_params)
    for ok, target, value in zip(finite, params, new_params):
        target.copy_(torch.where(ok, value, target))
    if nonfinite_count is not None:  # summed on the device: no host read
        nonfinite_count.add_(torch.stack([(~ok).sum() for ok in finite]).sum())


# Elements per block of the CPU plain step: large enough that each op splits well over
# the intra-op threads (smaller blocks measured slower), small enough that a block's streams
# (g, m, v, w and the fp32 temporaries) stay in cache through all of its ops.
CPU_BLOCK = 1 << 18


def cpu_step_units(numels: Sequence[int]) -> List[Tuple[bool, List[int]]]:
    """How the CPU plain step walks a bucket's tensors (by index): ``(True, indices)`` a group of
    tensors below ``CPU_BLOCK // 8`` elements each, up to a block's worth in all, stepped together
    by the foreach ops; ``(False, [i])`` a larger tensor, stepped block by block. One at a time,
    a small tensor's ~14 ops and host read (about 0.2 ms) cost more than its arithmetic (a model
    of 160 tensors ran 5x foreach AdamW's plain step)."""
    units, group, grouped = [], [], 0
    for i, n in enumerate(numels):
        if n >= CPU_BLOCK // 8:
            units.append((False, [i]))
            continue
        group.append(i)
        grouped += n
        if grouped >= CPU_BLOCK:
            units.append((True, group))
            group, grouped = [], 0
    if group:
        units.append((True, group))
    return units


def _plain_step_blocked(params, grads, exp_avg, exp_avg_sq, hyper: Hyper, move: Move,
                        nonfinite_count: Optional[torch.Tensor]) -> None:
    """The plain step on the CPU, block by block: :func:`_adam_move` on one block of elements at a
    time (:class:`_BlockOps`: two block-sized scratch rows replace the whole-bucket form's
    weight-sized temporaries), so the block stays in cache across all of its ops. Finiteness is
    checked per block on ``sum(g^2)`` while the block is in cache (no separate pass over the
    gradients); a block that fails takes :func:`_guarded_plain_step`. Small tensors go in groups
    through the whole-bucket form (:func:`cpu_step_units`). Bitwise the whole-bucket form.
    """
    largest = max((p.numel() for p in params), default=0)
    if largest == 0:
        return
    scratch = torch.empty(2, min(CPU_BLOCK, largest), dtype=torch.float32)
    for grouped, indices in cpu_step_units([g.numel() for g in grads]):
        if grouped:
            _foreach_plain_step(*([stream[i] for i in indices] for stream in (params, grads, exp_avg, exp_avg_sq)),
                                hyper, move, nonfinite_count)
            continue
        (i,) = indices
        w, g, m, v = params[i].view(-1), grads[i].view(-1), exp_avg[i].view(-1), exp_avg_sq[i].view(-1)
        for start in range(0, g.numel(), CPU_BLOCK):
            wb, gb, mb, vb = (t[start:start + CPU_BLOCK] for t in (w, g, m, v))
            ops = _BlockOps(tuple(scratch[:, :gb.numel()]))
            grad_sq = ops.mul(gb, gb, 0)
            if math.isfinite(float(grad_sq.sum())):  # NaN/inf in g, or g^2 overflowing fp32
                _adam_move(ops, wb, gb, mb, vb, hyper, move, MOMENTUM, grad_sq, kept=nonfinite_count)
            else:
                _guarded_plain_step([wb], [gb], [mb], [vb], hyper, move, nonfinite_count)
