"""The Triton backend: each pass of a bucket is one multi-tensor kernel launch.

Same functions and signatures as ``torch_backend`` (the executable spec); the kernels
and their formulas are in ``triton_kernels``. Per bucket, a table of the tensors'
data pointers and a block map are built once and cached in ``bucket.cache["triton"]``,
keyed by the data pointers of every stream but the gradients and the numel and dtype of
weights and gradients (the optimizer's buckets, whose tensors never change, skip that
key: the optimizer makes a new bucket instead); a moved or replaced weight, moment or
saved copy makes a new table, new gradient storage a table with a new gradient column,
kept for the last few gradient layouts. Tensors whose streams all start on a 16-byte boundary (all of them, in
practice) share one launch on the vectorized path; any others take a second launch
without alignment hints.

Bytes moved per parameter with fp32 weights, gradients and state (reads + writes):
slope reduction 8 along the gradient (12 along the momentum), plain step 28, first trial 32 with a saved copy (28 without), retrial 16,
restore 8 from the copy (16 in place). Along ``"raw"`` (no moments): slope 4, plain step 12,
first trial 16 (12 without a copy), retrial 12, restore 8 (12 in place). Nothing here reads
a device value on the host.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import (DIRECTIONS, GRADIENT, MOMENTUM, RAW, Bucket, Hyper, PassArgs, count_step, dense, kernel_unsupported,
                   mark_written, same_memory_order)

try:
    import triton
    import triton.language as tl

    from . import triton_kernels as K
except ImportError as error:  # the package works without Triton: the torch backend remains
    triton = None
    _IMPORT_ERROR: Optional[ImportError] = error
else:
    _IMPORT_ERROR = None

name = "triton"

# Elements per program and warps per program of every kernel: 8 elements per thread,
# two 128-bit accesses per fp32 stream, one per bf16/fp16 stream. 16 per thread needed
# 160-250 registers (benchmarks/kernel_audit.py); 8 keeps every kernel without spills.
BLOCK = 2048
NUM_WARPS = 8
# The unaligned launch moves scalars, so 8 elements per thread buy no vector width there;
# 2 keep every GradScaler variant there without spills (at 4 and 8, the slow path of the
# IEEE division by the scale spilled 8-32 bytes in some; ptxas -v).
UNALIGNED_BLOCK = 512
ALIGNMENT_BYTES = 16
_MAX_CACHED_TABLES = 4
# Register caps of the plain step with 16-bit weights on the aligned path from sm_90 on, so
# that 3 blocks of 8 warps share an SM instead of 2 (at most 80 registers), without spills
# (the ptxas -v of Triton's own compile, sm_90a): bf16 fits in 72 under a cap of 80; fp16
# spills 8 bytes under 80 but is allocated 80 without spills under 88. fp32 weights, the
# unaligned path and sm_80 spill under any cap that would gain a block.
PLAIN_STEP_16BIT_MAXNREG = {"bf16": 80, "fp16": 88}

# Kernel launches by kernel name; tests and benchmarks read it to count launches per step.
LAUNCH_COUNTER: collections.Counter = collections.Counter()


#: The oldest Triton whose CPU interpreter follows a pointer loaded from memory. The kernels read their tensors'
#: addresses from a table; under Triton 3.0's and 3.1's interpreter those loads and stores reach nothing, and a
#: step moved no weight and no moment, silently (seen with torch 2.4.1; compiled kernels are another path).
MIN_INTERPRETER_TRITON = (3, 2)


def _interpreter_refusal() -> Optional[str]:
    """Why the kernels cannot run under this Triton's interpreter, or None (not interpreting, or a new enough one)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or _IMPORT_ERROR is not None:
        return None
    release = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if release >= MIN_INTERPRETER_TRITON:
        return None
    return (f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) does not follow the tensor "
            f"addresses the kernels load from their tables, so its steps would move nothing; it needs Triton "
            f">= {'.'.join(map(str, MIN_INTERPRETER_TRITON))} (`pip install 'triton>=3.2' --no-deps` beside an "
            "older torch's pin), or backend='torch' / 'cpp' on the CPU")


def is_available() -> bool:
    """Triton imports, and kernels can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1) of a Triton
    that runs them."""
    if _IMPORT_ERROR is not None or _interpreter_refusal() is not None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def check(device: torch.device) -> None:
    """Raise RuntimeError with the reason when kernels cannot run on ``device``."""
    if _IMPORT_ERROR is not None:
        missing = getattr(_IMPORT_ERROR, "name", None) or ""
        if missing and missing.split(".")[0] != "triton":  # numpy: Triton's CPU interpreter imports it
            raise RuntimeError(f"backend='triton': the `triton` package does not import here, for want of "
                               f"`{missing}` ({_IMPORT_ERROR}): pip install {missing.split('.')[0]}; backend='torch' "
                               "works without either") from _IMPORT_ERROR
        raise RuntimeError(f"backend='triton' needs the `triton` package, which does not import here "
                           f"({_IMPORT_ERROR}); backend='torch' works without it") from _IMPORT_ERROR
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' cannot run on {device}: Triton needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 set before triton is imported for the CPU interpreter")
    refusal = _interpreter_refusal()
    if refusal is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {refusal}")


unsupported = kernel_unsupported


def _require_triton() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError("the triton backend needs the `triton` package "
                           "(pip install triton); the torch backend works without it") from _IMPORT_ERROR


def _triton_dtype(dtype: torch.dtype):
    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype not in table:
        raise TypeError(f"the triton backend supports fp32, bf16 and fp16 tensors, not {dtype}")
    return table[dtype]


@dataclass
class _Launch:
    """One launch over a subset of the bucket's tensors: its block map and alignment."""

    block_table: torch.Tensor  # int32 [n_blocks, 2] on the device: (tensor index, block index)
    n_blocks: int
    aligned: bool
    block: int = BLOCK  # elements per program


@dataclass
class _Tables:
    tensor_table: torch.Tensor  # int64 [n_tensors, K.TABLE_WIDTH] on the device
    launches: Tuple[_Launch, ...]  # aligned first; empty for a bucket without elements
    n_blocks: int
    w_dtype: object  # triton dtypes of the weight (and saved) stream and of the gradients
    g_dtype: object
    has_saved: bool
    grad_pointers: Tuple[int, ...] = ()  # the gradient addresses the table's column holds
    params_contiguous: bool = False
    host_table: Optional[torch.Tensor] = None  # the table on the host, gradient column as built
    # (gradient pointers, device table) of the last few gradient layouts, most recent first
    by_grads: List[Tuple[tuple, torch.Tensor]] = field(default_factory=list)


def _streams(bucket: Bucket) -> Tuple[Sequence[torch.Tensor], ...]:
    streams = (bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq)
    return streams + (bucket.saved,) if bucket.saved is not None else streams


_dtype_of = operator.attrgetter("dtype")


def _table_key(bucket: Bucket) -> tuple:
    """Data pointers of every stream but the gradients, numel and dtype of weights and grads.

    The optimizer-owned streams (moments, saved copies) are created with the weights' shape
    and a fixed dtype (checked when the table is built), so their pointers identify them.
    Gradients are left out: ``zero_grad(set_to_none=True)`` gives them new storage every
    step, and only their column of the table is rewritten then (``_tables``).
    Built with ``map`` (loops in C): a few hundred ns per tensor and stream on the host.
    """
    streams = (bucket.params, bucket.exp_avg, bucket.exp_avg_sq)
    streams = streams + (bucket.saved,) if bucket.saved is not None else streams
    pointers = tuple(tuple(map(torch.Tensor.data_ptr, stream)) for stream in streams)
    return pointers + tuple(tuple(map(torch.Tensor.numel, stream)) + tuple(map(_dtype_of, stream))
                            for stream in (bucket.params, bucket.grads))


def _uniform_dtype(stream: Sequence[torch.Tensor], what: str) -> torch.dtype:
    dtypes = {t.dtype for t in stream}
    if len(dtypes) > 1:
        raise TypeError(f"all {what} of a bucket must share one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _build_tables(bucket: Bucket) -> _Tables:
    """Pointer table and block maps of a bucket (a Python loop over tensors, run once per layout)."""
    streams = _streams(bucket)
    n_tensors = len(bucket.params)
    if any(len(stream) != n_tensors for stream in streams):
        raise ValueError("the lists of a bucket must have one entry per parameter")
    w_dtype = _uniform_dtype(bucket.params, "weights") if n_tensors else bucket.dtype
    g_dtype = _uniform_dtype(bucket.grads, "gradients") if n_tensors else bucket.dtype
    for stream, what in ((bucket.exp_avg, "exp_avg"), (bucket.exp_avg_sq, "exp_avg_sq")):
        if n_tensors and _uniform_dtype(stream, what) != torch.float32:
            raise TypeError(f"{what} must be fp32")
    if bucket.saved is not None and n_tensors and _uniform_dtype(bucket.saved, "saved copies") != w_dtype:
        raise TypeError("saved copies must have the weights' dtype")
    rows: List[List[int]] = []
    aligned: List[bool] = []
    for index in range(n_tensors):
        tensors = [stream[index] for stream in streams]
        param = tensors[0]
        for t in tensors:
            if t.numel() != param.numel() or t.device != param.device:
                raise ValueError(f"tensor {index} of the bucket: streams differ in numel or device")
            one_layout = t.shape == param.shape and same_memory_order(param.shape, t.stride(), param.stride())
            if not (dense(t) and (one_layout or (t.is_contiguous() and param.is_contiguous()))):
                raise ValueError(f"tensor {index} of the bucket: streams must be dense with one memory layout")
        pointers = [t.data_ptr() for t in tensors]
        rows.append([param.numel()] + pointers + [0] * (K.TABLE_WIDTH - 1 - len(pointers)))
        aligned.append(all(p % ALIGNMENT_BYTES == 0 for p in pointers))
    device = bucket.device
    host_table = torch.tensor(rows, dtype=torch.int64).reshape(n_tensors, K.TABLE_WIDTH)
    tensor_table = _to_device(host_table, device)
    is_aligned = torch.tensor(aligned, dtype=torch.bool)
    launches = []
    for want_aligned, block in ((True, BLOCK), (False, UNALIGNED_BLOCK)):
        blocks_per_tensor = torch.tensor([-(-row[0] // block) for row in rows], dtype=torch.int64)
        block_table = _block_table(torch.where(is_aligned == want_aligned, blocks_per_tensor, 0))
        if block_table.shape[0]:
            launches.append(_Launch(_to_device(block_table, device), block_table.shape[0], want_aligned, block))
    grad_pointers = tuple(row[K.GRAD_COLUMN] for row in rows)
    return _Tables(tensor_table, tuple(launches), sum(launch.n_blocks for launch in launches),
                   _triton_dtype(w_dtype), _triton_dtype(g_dtype), bucket.saved is not None,
                   grad_pointers=grad_pointers,
                   params_contiguous=all(map(torch.Tensor.is_contiguous, bucket.params)),
                   host_table=host_table,
                   by_grads=[(grad_pointers, tensor_table)])


#: The most blocks one launch table holds: int32 indices, and CUDA's largest grid dimension.
_MAX_BLOCKS = 2 ** 31 - 1


def _block_table(blocks_per_tensor: torch.Tensor) -> torch.Tensor:
    """int32 [sum(blocks), 2]: (tensor index, block index within it) for every block, tensor-major."""
    n_blocks = int(blocks_per_tensor.sum())
    if n_blocks > _MAX_BLOCKS:  # the table's int32 indices and CUDA's grid (2^31 - 1 blocks) would wrap
        raise ValueError(f"the triton backend launches one program per block: this bucket needs {n_blocks} "
                         f"blocks, more than {_MAX_BLOCKS}; split the parameters into more param groups or use "
                         "backend='cuda'")
    tensor_index = torch.repeat_interleave(torch.arange(blocks_per_tensor.numel()), blocks_per_tensor)
    first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    block_index = torch.arange(n_blocks) - first_block[tensor_index]
    return torch.stack([tensor_index, block_index], dim=1).to(torch.int32).contiguous()


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host table to the device without a host sync (from pinned memory on CUDA)."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _tables(bucket: Bucket) -> _Tables:
    """The cached tables of the bucket's current tensors (built on first use or after a change)."""
    if bucket.tensors_fixed:
        # The optimizer's bucket: only the gradients can differ from the last call.
        tables = bucket.cache.get(name)
        if tables is None:
            _require_triton()
            tables = bucket.cache[name] = _build_tables(bucket)
        return _with_grads(tables, bucket)
    cache: Dict[tuple, _Tables] = bucket.cache.setdefault(name, {})
    key = _table_key(bucket)
    tables = cache.get(key)
    if tables is not None:
        tables = cache[key] = _with_grads(tables, bucket)
        return tables
    _require_triton()
    tables = _build_tables(bucket)
    if len(cache) >= _MAX_CACHED_TABLES:
        cache.pop(next(iter(cache)))
    cache[key] = tables
    return tables


def _with_grads(tables: _Tables, bucket: Bucket) -> _Tables:
    """``tables`` pointing at the bucket's gradients (rebuilt in place when they cannot be).

    The table of each of the last few gradient layouts stays on the device, so gradient
    storage cycling through a few addresses (``zero_grad(set_to_none=True)`` with a caching
    allocator) costs no host-to-device copy after the first steps.
    """
    grad_pointers = bucket.grad_pointers
    if grad_pointers is None:
        grad_pointers = tuple(map(torch.Tensor.data_ptr, bucket.grads))
    if grad_pointers is tables.grad_pointers:
        return tables
    table = _known_table(tables, grad_pointers)
    if table is None and (tables.params_contiguous and len(grad_pointers) == tables.tensor_table.shape[0]
                          and all(map(torch.Tensor.is_contiguous, bucket.grads))
                          and not bool(torch.any(torch.tensor(grad_pointers, dtype=torch.int64) % ALIGNMENT_BYTES))
                          and (bucket.tensors_fixed or _same_shapes(bucket))):
        # New gradient storage, same layout and alignment class: a table with the new
        # column (one small host-to-device copy); the tables in use stay as they are.
        # (The optimizer has checked its buckets' gradients against the weights already.)
        host = tables.host_table.clone()
        host[:, K.GRAD_COLUMN] = torch.tensor(grad_pointers, dtype=torch.int64)
        table = _to_device(host, bucket.device)
        tables.by_grads.insert(0, (grad_pointers, table))
        del tables.by_grads[_MAX_CACHED_TABLES:]
    elif table is None:
        rebuilt = _build_tables(bucket)
        if bucket.tensors_fixed:
            bucket.cache[name] = rebuilt
        return rebuilt
    tables.tensor_table, tables.grad_pointers = table, grad_pointers
    return tables


def _known_table(tables: _Tables, grad_pointers: tuple) -> Optional[torch.Tensor]:
    """The device table of a cached layout with these gradient pointers, else None; it becomes
    the most recent and is keyed by this very tuple. The optimizer's bucket cache hands the same
    tuple object for a layout it remembers, so a hit is an identity test, not 10,000 integer
    compares or a hash of them; unequal tuples differ in their first pointers as a rule."""
    for position, (known, table) in enumerate(tables.by_grads):
        if known is grad_pointers or known == grad_pointers:
            del tables.by_grads[position]
            tables.by_grads.insert(0, (grad_pointers, table))
            return table
    return None


def _same_shapes(bucket: Bucket) -> bool:
    """The gradients have their weights' numel and dtype (checked when a table is reused)."""
    return (list(map(torch.Tensor.numel, bucket.grads)) == list(map(torch.Tensor.numel, bucket.params))
            and len({g.dtype for g in bucket.grads} | {bucket.params[0].dtype}) == 1)


def _supports_maxnreg() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


_MAXNREG = triton is not None and _supports_maxnreg()


def plain_step_maxnreg(w_dtype, aligned: bool, capability: int) -> Optional[int]:
    """The plain step's register cap for weights of triton dtype ``w_dtype`` on compute
    capability ``capability`` (e.g. 90), or None (see PLAIN_STEP_16BIT_MAXNREG)."""
    if not aligned or capability < 90:
        return None
    if w_dtype == tl.bfloat16:
        return PLAIN_STEP_16BIT_MAXNREG["bf16"]
    if w_dtype == tl.float16:
        return PLAIN_STEP_16BIT_MAXNREG["fp16"]
    return None


_CAPABILITY: Dict[torch.device, int] = {}


def _plain_step_options(tables: _Tables, launch: _Launch, device: torch.device) -> dict:
    """Compile options of one plain-step launch: the register cap where it pays."""
    if not _MAXNREG or device.type != "cuda":
        return {}
    capability = _CAPABILITY.get(device)
    if capability is None:
        major, minor = torch.cuda.get_device_capability(device)
        capability = _CAPABILITY[device] = 10 * major + minor
    cap = plain_step_maxnreg(tables.w_dtype, launch.aligned, capability)
    return {} if cap is None else {"maxnreg": cap}


def _launch(kernel, tables: _Tables, launch: _Launch, *args, **constexprs) -> None:
    LAUNCH_COUNTER[kernel.__name__] += 1
    device = tables.tensor_table.device
    # Triton launches on the current CUDA device: make it the bucket's (params on cuda:1, cuda:0 current).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(launch.n_blocks,)](tables.tensor_table, launch.block_table, *args, ALIGNED=launch.aligned,
                                   BLOCK=launch.block, num_warps=NUM_WARPS, enable_fp_fusion=False, **constexprs)


def _direction_code(direction: str) -> int:
    """The kernels' DIRECTION constexpr for ``direction``; raises on an unknown name."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    _require_triton()
    return {GRADIENT: K.GRADIENT_DIRECTION, MOMENTUM: K.MOMENTUM_DIRECTION, RAW: K.RAW_DIRECTION}[direction]


def _moment_scalars(hyper: Hyper) -> Tuple[float, ...]:
    """beta1, beta2, 1 - beta1, 1 - beta2 (formed in double, as the reference does)."""
    return (float(hyper.beta1), float(hyper.beta2), float(1 - hyper.beta1), float(1 - hyper.beta2))


def _decay_factor(hyper: Hyper, decay_step_size: float) -> float:
    return float(hyper.decay_factor(decay_step_size))


def _optional(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor; the placeholder is never read (constexpr off)."""
    return placeholder if tensor is None else tensor


def slope(bucket: Bucket, args: PassArgs) -> torch.Tensor:
    """q = sum over the bucket of ``g * d`` with this step's moments (not written); 0-dim fp32.

    One launch writes a partial sum per block; the partials are added in a fixed order
    (deterministic, no float atomics).
    """
    hyper, grad_scale = args.hyper, args.grad_scale
    direction = _direction_code(args.direction)
    tables = _tables(bucket)
    if tables.n_blocks == 0:
        return torch.zeros((), dtype=torch.float32, device=bucket.device)
    partials = torch.empty(tables.n_blocks, dtype=torch.float32, device=bucket.device)
    first = 0
    for launch in tables.launches:
        _launch(K._slope_kernel, tables, launch, partials[first:],
                _optional(grad_scale, partials), *_moment_scalars(hyper), float(hyper.bias_correction1),
                float(hyper.bias_correction2), float(hyper.eps), G_DTYPE=tables.g_dtype,
                DIRECTION=direction, HAS_GRAD_SCALE=grad_scale is not None)
        first += launch.n_blocks
    return partials.sum(dtype=torch.float64).to(torch.float32)


def first_trial(bucket: Bucket, args: PassArgs) -> None:
    """Pass A of a search step: m, v, the saved copy of w, and ``w = w_dec - step * d``."""
    hyper, move, grad_scale = args.hyper, args.move, args.grad_scale
    direction = _direction_code(args.direction)
    tables = _tables(bucket)
    for launch in tables.launches:
        _launch(K._first_trial_kernel, tables, launch, _optional(grad_scale, tables.tensor_table),
                *_moment_scalars(hyper), float(hyper.bias_correction1), float(hyper.bias_correction2),
                float(hyper.eps), _decay_factor(hyper, move.decay), float(-move.step),
                W_DTYPE=tables.w_dtype, G_DTYPE=tables.g_dtype, DIRECTION=direction,
                HAS_SAVED=tables.has_saved, HAS_GRAD_SCALE=grad_scale is not None)
    mark_written(bucket, args.direction != RAW)


def retrial(bucket: Bucket, args: PassArgs) -> None:
    """Pass B: ``w = decay(saved) - step * d`` or in place ``w += (previous - step) * d``."""
    hyper, move, grad_scale = args.hyper, args.move, args.grad_scale
    direction = _direction_code(args.direction)
    tables = _tables(bucket)
    for launch in tables.launches:
        _launch(K._retrial_kernel, tables, launch, _optional(grad_scale, tables.tensor_table),
                float(hyper.bias_correction1), float(hyper.bias_correction2), float(hyper.eps),
                _decay_factor(hyper, move.decay), float(-move.step),
                float(move.previous - move.step), W_DTYPE=tables.w_dtype, G_DTYPE=tables.g_dtype,
                DIRECTION=direction, HAS_SAVED=tables.has_saved,
                HAS_GRAD_SCALE=grad_scale is not None and args.direction != MOMENTUM)
    mark_written(bucket, False)


def restore(bucket: Bucket, args: PassArgs) -> None:
    """Weights from before the step: ``w = saved``, or ``w = (w + previous * d) / (1 - wd * decay)``."""
    hyper, move, grad_scale = args.hyper, args.move, args.grad_scale
    direction = _direction_code(args.direction)
    tables = _tables(bucket)
    for launch in tables.launches:
        _launch(K._restore_kernel, tables, launch, _optional(grad_scale, tables.tensor_table),
                float(hyper.bias_correction1), float(hyper.bias_correction2), float(hyper.eps),
                _decay_factor(hyper, move.decay), float(move.previous),
                W_DTYPE=tables.w_dtype, G_DTYPE=tables.g_dtype, DIRECTION=direction,
                HAS_SAVED=tables.has_saved,
                HAS_GRAD_SCALE=grad_scale is not None and args.direction != MOMENTUM and not tables.has_saved)
    mark_written(bucket, False)


def plain_step(bucket: Bucket, args: PassArgs, loss: torch.Tensor, found_inf: Optional[torch.Tensor] = None,
               nonfinite_count: Optional[torch.Tensor] = None, step_counts: Optional[torch.Tensor] = None) -> None:
    """Pass A of a plain step, guarded on the device (no host sync).

    ``w = w_dec - step * m_hat * precond`` and m, v updated (along ``"raw"``:
    ``w = w_dec - step * g``, m, v untouched), unless ``loss`` is non-finite or ``found_inf``
    is set (then nothing is written). An element whose gradient is non-finite keeps its
    weight and moments, and is counted into ``nonfinite_count``
    (an int64 0-dim tensor). ``step_counts`` (int64 ``[2]``): the first launch adds
    ``[loss non-finite, found_inf != 0]`` (``base.count_step``), no torch op.
    """
    hyper, move, grad_scale = args.hyper, args.move, args.grad_scale
    # The plain step moves along Adam's update (m_hat * precond) unless the direction is raw.
    direction = _direction_code(RAW if args.direction == RAW else MOMENTUM)
    tables = _tables(bucket)
    if loss.numel() != 1:
        raise ValueError("plain_step needs a one-element loss tensor")
    if nonfinite_count is not None and nonfinite_count.dtype != torch.int64:
        raise TypeError("nonfinite_count must be an int64 tensor")
    if step_counts is not None and (step_counts.dtype != torch.int64 or step_counts.numel() != 2):
        raise TypeError("step_counts must be an int64 tensor of 2 elements")
    if step_counts is not None and not tables.launches:
        count_step(step_counts, loss, found_inf)  # an empty bucket launches nothing
    for i, launch in enumerate(tables.launches):
        counts = step_counts if i == 0 else None
        _launch(K._plain_step_kernel, tables, launch, loss.detach(), _optional(found_inf, loss),
                _optional(grad_scale, loss), _optional(nonfinite_count, tables.tensor_table),
                _optional(counts, tables.tensor_table),
                *_moment_scalars(hyper), float(hyper.bias_correction1), float(hyper.bias_correction2),
                float(hyper.eps), _decay_factor(hyper, move.decay), float(-move.step),
                W_DTYPE=tables.w_dtype, G_DTYPE=tables.g_dtype, DIRECTION=direction,
                HAS_FOUND_INF=found_inf is not None,
                HAS_GRAD_SCALE=grad_scale is not None, HAS_COUNTER=nonfinite_count is not None,
                HAS_STEP_COUNTS=counts is not None,
                **_plain_step_options(tables, launch, bucket.device))
    mark_written(bucket, args.direction != RAW)
