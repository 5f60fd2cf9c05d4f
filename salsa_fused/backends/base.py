"""What every backend receives: tensor buckets and the scalars of one step.

A *bucket* holds the tensors of one param group that share a device and a dtype.
Every backend function works on one bucket with one launch (or one set of
``torch._foreach_*`` calls); none loops over tensors in Python on the hot path.

Notation (SPEC section 1), per element, with ``k`` the step counter after its
increment and ``lr`` the group's multiplier:

    v_new   = beta2 * v + (1 - beta2) * g^2
    m_new   = beta1 * m + (1 - beta1) * g
    v_hat   = v_new / (1 - beta2^(k+1))          m_hat = m_new / (1 - beta1^(k+1))   (Adam's k under "sls"/"alsals")
    precond = 1 / (sqrt(v_hat) + eps)
    d       = g * precond          (direction "gradient", 0.1.0's default)
            | m_hat * precond      (direction "momentum", 0.1.0's use_mv=True)
            | g                    (direction "raw": the gradient itself, g / grad_scale under GradScaler)
    update  = m_hat * precond      (a plain step's move, or g with direction "raw")
    w_dec   = w - weight_decay * decay_step_size * w
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Tuple, runtime_checkable

import torch

from .._compat import increment_versions

GRADIENT = "gradient"
MOMENTUM = "momentum"
RAW = "raw"  # no preconditioner: Adam's moments are neither read nor written
DIRECTIONS = (GRADIENT, MOMENTUM, RAW)


@dataclass
class Bucket:
    """Tensors of one (param group, device, dtype); lists are index-aligned.

    ``params`` are the weights (fp32, bf16 or fp16), ``grads`` their gradients
    (same dtype as the weights), ``exp_avg``/``exp_avg_sq`` the fp32 moments m, v,
    ``saved`` the copies of ``w0`` (same dtype as the weights) when the restore
    strategy is ``"copy"``, else ``None``.
    """

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    exp_avg: List[torch.Tensor]
    exp_avg_sq: List[torch.Tensor]
    saved: Optional[List[torch.Tensor]]
    device: torch.device
    dtype: torch.dtype
    group_index: int
    # Backends may cache per-bucket data here (pointer tables); keyed by backend.
    cache: dict = field(default_factory=dict)
    # True when every list but ``grads`` keeps its tensors and their storage for the bucket's
    # life (the optimizer's buckets: it makes a new bucket otherwise), so a backend's cache
    # needs no check of them; False for buckets built by hand.
    tensors_fixed: bool = False
    # ``data_ptr()`` of each gradient when the optimizer has read them already, else None.
    grad_pointers: Optional[tuple] = None
    #: the group's counted steps its tensors took no part in (:data:`STEPS_SAT_OUT`), which their
    #: bias corrections leave out: a bucket holds tensors that agree on it, or tensors whose own counts
    #: (``merged_sat_out``) give corrections of exactly 1 in its kernels' arithmetic, under 0
    steps_sat_out: int = 0
    #: each tensor's own count where the bucket merged several (:func:`corrections_are_one`), else ``()``
    merged_sat_out: Tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


#: The param-group key of a group added with ``add_param_group`` after ``s > 0`` steps: ``s``, from which
#: its moments (zero until then) count the steps of Adam's bias corrections (:meth:`Hyper.for_step`).
MOMENTS_START = "moments_start_step"
#: The per-parameter state key of the counted steps of its group (since :data:`MOMENTS_START`) in which a
#: parameter had no gradient: before its first one (a layer unfrozen late) and while its ``.grad`` was
#: ``None``. Its bias corrections count the steps it took, as torch's Adam counts a parameter's ``step``.
STEPS_SAT_OUT = "steps_sat_out"
#: The per-parameter state key, while a parameter with moments has no gradient, of the steps taken
#: before the first step it sat out (added to :data:`STEPS_SAT_OUT` when its gradient comes back).
SAT_OUT_SINCE = "sat_out_since"
#: :data:`SAT_OUT_SINCE` in a state dict for a parameter that takes part (the live state has no key then).
NOT_SITTING_OUT = -1
#: The hyperparameters every step reads from a param group.
GROUP_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


def zero_moments(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments before any gradient: fp32 zeros in ``p``'s memory layout (a DTensor's for a DTensor)."""
    return (torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format),
            torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format))


@dataclass(frozen=True)
class Hyper:
    """Scalars of one bucket for one step (host floats; nothing here lives on a device)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float  # 1 - beta1 ** (k + 1); 1 - beta1 ** k under seed 001's rules (rules.moment_step)
    bias_correction2: float  # 1 - beta2 ** (k + 1); likewise
    lr: float  # the group's probe multiplier on the level (its "search_lr")

    @classmethod
    def for_step(cls, group: dict, step: int, steps_sat_out: int = 0) -> "Hyper":
        """The scalars of param group ``group`` at step ``k = step`` (after its increment), for its
        tensors that sat out ``steps_sat_out`` of its steps.

        0.1.0 corrects with ``k + 1`` (SPEC section 1, step 5); seed 001's rules (``"sls"``, ``"alsals"``)
        correct with Adam's ``k``: :func:`salsa_fused.rules.moment_step` passes them ``step - 1``. A group added
        after ``s`` steps (``group[MOMENTS_START] = s``) counts its own, and a tensor the steps it took:
        ``k - s - steps_sat_out + 1``, as torch's Adam counts a parameter's steps.
        """
        beta1, beta2 = map(float, group["betas"])  # a scheduler may set numpy scalars: fp64 here
        k = max(1, step + 1 - group.get(MOMENTS_START, 0) - steps_sat_out)
        # positional, in the fields' order (beta1, beta2, eps, weight_decay, bias corrections, lr): keywords
        # cost a third more of this frozen class's construction, built once a group and step
        return cls(beta1, beta2, float(group["eps"]), float(group["weight_decay"]), 1 - beta1 ** k, 1 - beta2 ** k,
                   float(group.get("search_lr", group["lr"])))

    def shrink(self, decay_step_size: float) -> float:
        """``weight_decay * decay_step_size``: the fraction of the weights decoupled decay takes off (0.0
        without decay), in double; the decay factor, the float32 check and the every-trial-failed warning
        read it here."""
        return self.weight_decay * decay_step_size

    def decay_factor(self, decay_step_size: float) -> float:
        """``1 - weight_decay * decay_step_size``: what decoupled decay multiplies the weights by
        (exactly 1.0 without decay), in double; every backend takes it from here."""
        return 1 - self.shrink(decay_step_size)


_FLOAT32 = struct.Struct("f")


def corrections_are_one(hyper: Hyper, dtype: torch.dtype) -> bool:
    """Whether both bias corrections of ``hyper`` are exactly 1 where a bucket of ``dtype`` computes:
    every backend rounds them to float32 for weights of 16 or 32 bits, and keeps double for float64.
    Tensors whose corrections are 1 there step bitwise alike whatever their counts of steps sat out."""
    if dtype == torch.float64:
        return hyper.bias_correction1 == 1.0 and hyper.bias_correction2 == 1.0
    unpack, pack = _FLOAT32.unpack, _FLOAT32.pack
    return unpack(pack(hyper.bias_correction1))[0] == 1.0 and unpack(pack(hyper.bias_correction2))[0] == 1.0


@functools.lru_cache(maxsize=64)
def first_step_corrected_to_one(beta1: float, beta2: float, dtype: torch.dtype) -> int:
    """The least ``k >= 1`` from which both of Adam's bias corrections are exactly 1 where a bucket of
    ``dtype`` computes (:func:`corrections_are_one`): 338 steps for betas (0.9, 0.95) in float32, 17,321
    for (0.9, 0.999)."""
    group = {"betas": (beta1, beta2), "eps": 0.0, "weight_decay": 0.0, "lr": 0.0}

    def one(k: int) -> bool:  # Hyper.for_step corrects at k = step + 1
        return corrections_are_one(Hyper.for_step(group, k - 1), dtype)

    high = 1
    while not one(high):
        high *= 2
    low = high // 2  # not one(low), or low = 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if one(middle) else (middle, high)
    return high


@dataclass(frozen=True)
class Move:
    """How far one pass moves one bucket (a trial or an applied step, and the decay; formed by
    :mod:`salsa_fused.applied`).

    The weights go to ``decay(w0) - step * d`` with ``decay(w) = w - weight_decay * decay * w``;
    ``previous`` is the step the weights are at before the pass (``decay(w0) - previous * d``),
    read by an in-place retrial and by restore.
    """

    step: float
    previous: float = 0.0
    decay: float = 0.0


@dataclass(frozen=True)
class PassArgs:
    """Everything a pass receives beside the bucket's tensors (one typed argument for every pass)."""

    hyper: Hyper
    move: Move = Move(0.0)
    # Of the trials: "gradient", "momentum" or "raw". A plain step moves along m_hat, or along g
    # with "raw" (and then leaves the moments alone).
    direction: str = GRADIENT
    grad_scale: Optional[torch.Tensor] = None  # GradScaler's scale: g / grad_scale is the gradient


@runtime_checkable
class Backend(Protocol):
    """The passes a backend implements; every one works on one bucket with O(1) launches.

    ``torch_backend`` is the executable spec of each; a module with these names is a backend.
    """

    name: str

    def check(self, device: torch.device) -> None:
        """Raise RuntimeError saying why this backend cannot run on ``device``."""

    def slope(self, bucket: Bucket, args: PassArgs) -> torch.Tensor:
        """``q = sum g * d`` (0-dim fp32; may be negative along the momentum) with this step's
        moments, nothing written; ``sum g * g`` along ``"raw"`` (reads g only)."""

    def first_trial(self, bucket: Bucket, args: PassArgs) -> None:
        """Pass A of a search: m, v written, ``saved = w``, ``w = decay(w) - move.step * d``
        (along ``"raw"`` m, v are not touched)."""

    def retrial(self, bucket: Bucket, args: PassArgs) -> None:
        """Pass B: ``w = decay(saved) - move.step * d``, or in place
        ``w += (move.previous - move.step) * d``."""

    def restore(self, bucket: Bucket, args: PassArgs) -> None:
        """The weights from before the step: ``w = saved``, or in place
        ``w = (w + move.previous * d) / (1 - weight_decay * move.decay)``."""

    def plain_step(self, bucket: Bucket, args: PassArgs, loss: torch.Tensor,
                   found_inf: Optional[torch.Tensor] = None,
                   nonfinite_count: Optional[torch.Tensor] = None,
                   step_counts: Optional[torch.Tensor] = None) -> None:
        """m, v written and ``w = decay(w) - move.step * m_hat * precond`` (``args.direction``
        "gradient" or "momentum"), or ``w = decay(w) - move.step * g`` with m, v untouched
        (``"raw"``); nothing written when ``loss`` is non-finite or ``found_inf`` is set;
        non-finite gradient elements keep their weight and moments and are counted into
        ``nonfinite_count`` (int64, on the device).
        ``step_counts`` (int64 ``[2]``), when given, gets ``count_step``'s increments once per
        call. No host read on an accelerator."""


def mark_written(bucket: Bucket, moments: bool) -> None:
    """Bump the version counters of what a kernel pass wrote through raw pointers: the weights, and the moments
    where ``moments``, as torch's in-place ops (the torch backend's, AdamW's) bump theirs. A graph that saved a
    weight before the step then refuses its backward instead of running it on the new weights, and code that keys
    a cache on ``_version`` (a derived weight) sees every trial's weights."""
    increment_versions(bucket.params)
    if moments:
        increment_versions(bucket.exp_avg)
        increment_versions(bucket.exp_avg_sq)


#: The weight dtypes the compiled kernels (Triton, C++, CUDA) take.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def same_memory_order(shape, strides: tuple, other_strides: tuple) -> bool:
    """Do two tensors of ``shape`` with these strides put every element at the same offset? Their strides
    agree on each dimension longer than 1 (a dimension of size 1 is indexed at 0 only: its stride addresses
    nothing, and autograd or ``view`` may give it any value, as channels_last does to ``Conv2d(1, ...)``'s).
    The kernels' layout checks read one such layout as one (csrc/tensor_layout.h is the C++ twin)."""
    return strides == other_strides or all(a == b for n, a, b in zip(shape, strides, other_strides) if n > 1)


def dense(t: torch.Tensor) -> bool:
    """Every element of ``t`` sits in one gap-free span of memory (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_unsupported(param: torch.Tensor) -> Optional[str]:
    """Why the compiled kernels cannot take ``param`` (a backend's ``unsupported``, checked at
    construction: ``"auto"`` then runs the torch backend, a named backend refuses), or ``None``."""
    if param.dtype not in KERNEL_DTYPES:
        return f"{param.dtype} (the kernels take float32, bfloat16 and float16)"
    if not dense(getattr(param, "_local_tensor", param)):
        return "not dense (a strided view with gaps: the kernels read one flat span)"
    return None


def count_step(step_counts: torch.Tensor, loss: torch.Tensor, found_inf: Optional[torch.Tensor]) -> None:
    """``step_counts += [loss is NaN/inf and found_inf == 0, found_inf != 0]`` on the device: a
    plain step that changed nothing, counted for the next search (the torch form; kernels do it
    in the pass). A step GradScaler skips is its skip, not also a NaN loss."""
    bad_loss = torch.isfinite(loss.detach().to(torch.float32)).logical_not().reshape(())
    if found_inf is None:
        step_counts[0].add_(bad_loss)
        return
    skipped = (found_inf.reshape(()) != 0).to(step_counts.device)
    step_counts[0].add_(bad_loss.to(step_counts.device) & ~skipped)
    step_counts[1].add_(skipped.to(torch.int64))
