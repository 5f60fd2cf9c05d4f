"""The optimizer's buckets, kept across steps and rebuilt only when a tensor changes.

A bucket (:class:`salsa_fused.backends.base.Bucket`) holds the tensors of one param group
that share a device and a dtype and have a gradient this step. Building one is a Python
loop over the tensors (gradient checks, state lookup); a step at 10,000 tensors spent most
of its host time there. :class:`BucketCache` builds the buckets of a group once and, on
later steps, only reads the gradients and compares, per group, three tuples made in C
(``map``): the params' ``id``, the data pointers of their local storage (``data_ptr()`` of
a DTensor's ``_local_tensor`` under FSDP2; ``id`` alone misses a reshard) and which params
have a gradient. Any difference rebuilds that group's buckets, so the backends see a new
bucket (and build new tables) when a weight moves, changes dtype (``.to()``, ``.data =``),
a group's params change, a gradient appears or vanishes, or the state is reloaded
(:meth:`BucketCache.clear`). Moments and saved copies are the optimizer's own: they are read
when a bucket is built and stay with it.

Gradients are validated (layout, dtype, device, shape) when their data pointers, dtypes and
strides were not seen together in the last few steps of that bucket
(``zero_grad(set_to_none=True)`` cycles the allocator through a few addresses); a bucket
carries its gradients' pointers so a backend need not read them again.

With the C++ extension loaded (either build, :func:`salsa_fused._ext.module`),
``group_signature`` reads a group's gradients and all of the above (ids, weight pointers,
gradient pointers and dtypes, whether each gradient has its weight's strides) in one C++ loop.
A group remembers the signatures of its last few gradient layouts (``VALIDATED_GRAD_LAYOUTS``,
most recent first; forgotten when the group is rebuilt or the cache cleared), each with its
buckets' gradient pointers; a signature among them keeps the buckets as they are (same tensors,
same storage, gradients already validated at those addresses) and only takes this step's
gradient objects and that layout's pointers.
Any other signature, or no extension, takes the Python path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .backends.base import (MOMENTS_START, NOT_SITTING_OUT, SAT_OUT_SINCE, STEPS_SAT_OUT, Bucket, same_memory_order,
                            first_step_corrected_to_one)

# (gradient pointers, dtypes) remembered per bucket as already validated.
VALIDATED_GRAD_LAYOUTS = 4

_grad_of = operator.attrgetter("grad")
_local_of = operator.attrgetter("_local_tensor")
_has_value = functools.partial(operator.is_not, None)
_data_ptr = torch.Tensor.data_ptr


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


def check_gradient(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Raise RuntimeError naming the problem when ``grad`` cannot be a gradient of ``p``."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(f"FusedSaLSa does not support sparse gradients (a parameter of shape {tuple(p.shape)} has "
                           f"a {grad.layout} gradient): build nn.Embedding / nn.EmbeddingBag with sparse=False, "
                           "the default")
    if grad.is_complex():
        raise RuntimeError("FusedSaLSa does not support complex gradients")
    if grad.device != p.device:
        raise RuntimeError(f"gradient on {grad.device} for a parameter on {p.device}")
    if grad.shape != p.shape:
        raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for a parameter of "
                           f"shape {tuple(p.shape)}")
    if grad.dtype != p.dtype:
        raise RuntimeError(f"gradient of dtype {grad.dtype} for a parameter of dtype {p.dtype}: "
                           "gradients must have the dtype of their parameters")


def _dims_by_stride(tensor: torch.Tensor) -> Optional[List[Tuple[int, int]]]:
    """``tensor``'s ``(size, stride)`` pairs of size above 1, largest stride first, where each stride
    exceeds how far the dims after it reach (a slice or permutation of a dense tensor): then each
    element has an address of its own, and an address's index is found one dim at a time. None where
    the strides do not nest so (``as_strided`` by hand, say)."""
    dims = sorted(((n, stride) for n, stride in zip(tensor.shape, tensor.stride()) if n > 1),
                  key=operator.itemgetter(1), reverse=True)
    reach = 0
    for n, stride in reversed(dims):
        if stride <= reach:
            return None
        reach += (n - 1) * stride
    return dims


_OFFSET_CHUNK = 1 << 20  # elements whose offsets are made at once: 8 MiB of int64 in each of a few tensors


def _element_offsets(tensor: torch.Tensor):
    """The storage offsets (in elements, from ``tensor``'s first) of its elements, in chunks of int64 tensors."""
    shape, strides = tensor.shape, tensor.stride()
    for start in range(0, tensor.numel(), _OFFSET_CHUNK):
        index = torch.arange(start, min(start + _OFFSET_CHUNK, tensor.numel()), dtype=torch.int64)
        offsets = torch.zeros_like(index)
        for n, stride in zip(reversed(shape), reversed(strides)):
            offsets += (index % n) * stride
            index //= n
        yield offsets


def _has_overlapping_elements(tensor: torch.Tensor) -> bool:
    """Whether two of ``tensor``'s elements are one place in memory."""
    if tensor.numel() < 2 or _dims_by_stride(tensor) is not None:
        return False
    if any(stride == 0 and n > 1 for n, stride in zip(tensor.shape, tensor.stride())):
        return True
    return torch.cat(list(_element_offsets(tensor))).unique().numel() < tensor.numel()


def _blocks_share(a: torch.Tensor, b: torch.Tensor) -> Optional[bool]:
    """For views with one ndim and one set of strides (blocks of one tensor: column blocks, tiles), whether they
    have an element in one place, without listing elements: ``a``'s element ``i`` and ``b``'s ``j`` meet where
    ``sum_d (i_d - j_d) s_d`` is ``b``'s first element's offset from ``a``'s, with ``i_d - j_d`` in
    ``[1 - nb_d, na_d - 1]``; where the strides nest over both sizes, at most two values of ``i_d - j_d`` leave a
    remainder the later dims can reach. None where this cannot be told so (other strides, sizes, alignment)."""
    size = a.element_size()
    if a.dim() != b.dim() or a.stride() != b.stride() or b.element_size() != size:
        return None
    shift, misaligned = divmod(b.data_ptr() - a.data_ptr(), size)
    if misaligned:
        return None
    dims = sorted(((stride, na, nb) for stride, na, nb in zip(a.stride(), a.shape, b.shape) if na > 1 or nb > 1),
                  reverse=True)
    above = [0] * (len(dims) + 1)  # above[d], below[d]: how far dims d.. reach up (a's sizes) and down (b's)
    below = [0] * (len(dims) + 1)
    for d in range(len(dims) - 1, -1, -1):
        stride, na, nb = dims[d]
        if stride <= max(above[d + 1], below[d + 1]):
            return None
        above[d], below[d] = above[d + 1] + (na - 1) * stride, below[d + 1] + (nb - 1) * stride

    def meet(d: int, rest: int) -> bool:
        if d == len(dims):
            return rest == 0
        stride, na, nb = dims[d]
        low = rest // stride
        return any(1 - nb <= k <= na - 1 and -below[d + 1] <= rest - k * stride <= above[d + 1]
                   and meet(d + 1, rest - k * stride) for k in (low, low + 1))

    return meet(0, shift)


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether strided ``a`` and ``b``, whose byte spans overlap, have an element in one place: in closed form
    for blocks of one tensor (:func:`_blocks_share`), else exact where one of them nests its strides
    (:func:`_dims_by_stride`) and both have one element size and an alignment in common; True (they may)
    where that cannot be told."""
    blocks = _blocks_share(a, b)
    if blocks is not None:
        return blocks
    if _dims_by_stride(b) is None or (_dims_by_stride(a) is not None and a.numel() > b.numel()):
        a, b = b, a
    dims, size = _dims_by_stride(b), a.element_size()
    shift, misaligned = divmod(a.data_ptr() - b.data_ptr(), size)
    if dims is None or misaligned or b.element_size() != size:
        return True
    for offsets in _element_offsets(a):
        rest = offsets + shift  # a's elements, as offsets from b's first
        inside = rest >= 0
        for n, stride in dims:
            index = rest.div(stride, rounding_mode="floor")
            inside &= index < n
            rest -= index * stride
        if bool((inside & (rest == 0)).any()):
            return True
    return False


def first_sharing_memory(tensors: List[torch.Tensor]) -> Optional[Tuple[int, int]]:
    """Indices of two of the strided ``tensors`` that have an element in one place in memory, None where
    none do. Views of one storage that interleave but share no element (column blocks of one matrix,
    ``x[0::2]`` and ``x[1::2]``) do not."""
    tensors = list(map(local_shard, tensors))
    reaching: List[Tuple[int, int]] = []  # (end, index) of the spans before that reach past this one's start
    for (first, end), i in sorted((_span(t), i) for i, t in enumerate(tensors) if t.numel() and t.data_ptr()):
        reaching = [(reach, j) for reach, j in reaching if reach > first]
        for _, j in reaching:
            if _share_elements(tensors[j], tensors[i]):
                return j, i
        reaching.append((end, i))
    return None


def check_parameter(p) -> None:
    """Raise (TypeError, ValueError) naming the problem when ``p`` cannot be a parameter: checked where a
    group is added and, for a tensor put into ``param_groups`` by hand, where a step builds its group's
    buckets."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"FusedSaLSa can only optimize Tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError("FusedSaLSa does not support complex parameters: keep a real one of its own, "
                         "p = torch.nn.Parameter(torch.view_as_real(z.detach()).clone()), and use "
                         "torch.view_as_complex(p) in the forward (torch.view_as_real(z) itself is not a "
                         "leaf tensor and cannot be optimized)")
    if not p.is_floating_point():
        raise ValueError(f"FusedSaLSa needs floating-point parameters, got {p.dtype}")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"unsupported parameter dtype {p.dtype}")
    if p.layout == torch.strided and not p.is_meta and _has_overlapping_elements(local_shard(p)):
        expanded = any(stride == 0 and size > 1 for stride, size in zip(p.stride(), p.shape))
        raise ValueError(f"a parameter of shape {tuple(p.shape)} has elements that share memory "
                         f"({'an expanded tensor, ' if expanded else ''}strides {p.stride()}): an update cannot "
                         "write it in place; make it a parameter of its own memory (.clone() or .contiguous())")


_MOMENTS = ("exp_avg", "exp_avg_sq")


def check_moments(p: torch.Tensor, state: Mapping) -> None:
    """Raise ValueError naming the problem when ``p``'s state (``opt.state[p]``, changed by hand)
    holds a moment the kernels cannot read: each is a float32 strided tensor of ``p``'s shape on
    its device, and neither or both are there (none: created at the first step)."""
    where = f"opt.state[p] of a parameter of shape {tuple(p.shape)}"
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is a {type(state).__name__}, not a dict (set by hand?): it holds the "
                         "parameter's moments by name ('exp_avg', 'exp_avg_sq'); nothing was written")
    present = [name for name in _MOMENTS if name in state]
    if len(present) == 1:
        (lacking,) = set(_MOMENTS) - set(present)
        raise ValueError(f"{where} has {present[0]!r} but no {lacking!r} (changed by hand?); nothing was written")
    for name in present:
        moment = state[name]
        if not isinstance(moment, torch.Tensor):
            raise ValueError(f"{where} holds {name!r} as a {type(moment).__name__}, not a tensor (changed by "
                             "hand?); nothing was written")
        if (moment.dtype != torch.float32 or moment.layout != torch.strided or moment.is_meta
                or moment.device != p.device or moment.shape != p.shape
                or local_shard(moment).shape != local_shard(p).shape):
            resized = moment.shape != p.shape and moment.dtype == torch.float32 and moment.layout == torch.strided
            if resized and moment.numel() == p.numel():
                cause = ("the parameter reshaped after its moments were made, by p.data = p.data.view(...) or "
                         ".t()? Reshape the module's tensors before building the optimizer, or reshape "
                         "opt.state[p]'s moments alike")
            elif resized:
                cause = ("the parameter changed size after its moments were made (p.data = p.data[:n]?), or its "
                         "moments were set by hand: resize the module's tensors before building the optimizer, or "
                         "give opt.state[p] moments of the parameter's shape")
            else:
                cause = "changed by hand?"
            raise ValueError(f"{where} holds {name!r} as a {moment.dtype} tensor of shape {tuple(moment.shape)} on "
                             f"{moment.device}{' (meta)' if moment.is_meta else ''}: the moments are float32 "
                             f"tensors of the parameter's shape on its device ({p.device}) ({cause}); "
                             "nothing was written")


def _span(tensor: torch.Tensor) -> Tuple[int, int]:
    """The bytes ``tensor`` reaches, as ``(first, end)``: from its first element to past its last."""
    local = local_shard(tensor)
    reach = sum((size - 1) * stride for size, stride in zip(local.shape, local.stride())) + 1
    return local.data_ptr(), local.data_ptr() + reach * local.element_size()


def refuse_shared_moments(param_groups: List[dict], state: Mapping) -> None:
    """Raise ValueError when a weight or a moment in ``state`` of a parameter with a gradient overlaps
    another in memory (set by hand: ``s["exp_avg"] = s["exp_avg_sq"] = torch.zeros_like(p)``, or weights
    tied after the optimizer took them, ``b.data = a.data``): each write of one would change the other."""
    tensors, owners = [], []  # owners: (what, its parameter, whether it is a moment)
    for p in (p for group in param_groups for p in group["params"] if p.grad is not None):
        tensors.append(p)
        owners.append(("the weight", p, False))
        moments = state[p] if p in state and isinstance(state[p], Mapping) else {}
        for name in _MOMENTS:
            moment = moments.get(name)
            if isinstance(moment, torch.Tensor) and moment.layout == torch.strided and moment.numel():
                tensors.append(moment)
                owners.append((f"opt.state[p][{name!r}]", p, True))
    shared = first_sharing_memory(tensors)
    if shared is None:
        return
    (what, p, moment), (other, q, other_moment) = (owners[i] for i in shared)
    if moment or other_moment:
        raise ValueError(f"{what} of a parameter of shape {tuple(p.shape)} and {other} of a parameter of "
                         f"shape {tuple(q.shape)}{' (the same one)' if p is q else ''} share memory (set "
                         "by hand?): a step that writes one would change the other. Give each moment a "
                         "tensor of its own (torch.zeros_like(p) for each); nothing was written")
    raise ValueError(f"the weights of two parameters (shapes {tuple(p.shape)}, {tuple(q.shape)}) share "
                     "memory, tied after the optimizer took them (b.data = a.data, or a view of one put into "
                     "param_groups by hand?): each would be stepped "
                     "from the other's writes. Tie them before building the optimizer and pass the tied "
                     "parameter once, or give each its own tensor; nothing was written")


def refuse_relaid_in_place(params, weights, weight_pointers, entry: "_GroupEntry", state: Mapping) -> None:
    """Raise ValueError when a weight with moments kept its address but not its strides since the
    buckets were built: ``p.data = p.data.t()`` (or ``.view(...)``) moves the values, not the memory,
    so neither a moment of the old shape nor one copied by index is that weight's."""
    if entry.param_ids != tuple(map(id, params)):
        return
    for p, weight, pointer, old_pointer, old_strides in zip(params, weights, weight_pointers, entry.weight_pointers,
                                                           entry.weight_strides):
        if (pointer == old_pointer and not same_memory_order(weight.shape, weight.stride(), old_strides)
                and p in state and state[p]):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} was laid out anew at its own address (strides "
                             f"{old_strides} -> {weight.stride()}: p.data = p.data.view(...) or .t()?) after its "
                             "moments were made, which no longer match its elements. Reshape the module's tensors "
                             "before building the optimizer, or lay out opt.state[p]'s moments alike; nothing was "
                             "written")


def refuse_repeated_params(param_groups: List[dict]) -> None:
    """Raise ValueError when a tensor is in ``param_groups`` more than once (a list changed by
    hand: the constructor and ``add_param_group`` refuse it): it would take one update per entry."""
    seen = set()
    for index, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in param_groups more than once "
                                 f"(again in group {index}; changed by hand?): it would be updated once per "
                                 "entry; nothing was written")
            seen.add(id(p))


@dataclass
class _Slot:
    """One bucket of a group and where its params sit in the group's list."""

    bucket: Bucket
    params: List[torch.Tensor]  # the group's params (DTensors stay DTensors), for the checks
    positions: Optional[List[int]]  # the bucket's params in the group's list; None: all of them
    members: Optional[operator.itemgetter]  # picks them from a list
    shapes: Tuple[torch.Size, ...] = ()  # of the params: their gradients must match
    #: of the bucket's weights, fixed for the slot's life (a weight laid out anew rebuilds the group)
    weight_strides: Tuple[tuple, ...] = ()
    validated: "collections.OrderedDict[tuple, None]" = field(default_factory=collections.OrderedDict)
    #: the last gradients' strides found to put every element where the weights do (:func:`same_memory_order`)
    same_order_strides: Tuple[tuple, ...] = ()


@dataclass(frozen=True)
class _MergeGuard:
    """What a group's buckets of merged counts were built at (:func:`merged_counts`)."""

    betas: Tuple[float, float]
    moments_start: int
    #: the group's counted steps from which a count now apart can share a bucket, or None
    due: Optional[int]
    #: the counts of steps sat out present, per (device, dtype), and those moved under 0 (:func:`merge_plan`)
    present: Mapping[tuple, Tuple[int, ...]]
    moved: frozenset


@dataclass
class _GroupEntry:
    """The buckets of one param group and what they were built from."""

    param_ids: Tuple[int, ...]
    weight_pointers: Tuple[int, ...]
    #: each weight's strides: ``p.data = p.data.view(...)`` (or ``.t()``) keeps its address, not its
    #: strides, which its moments must follow
    weight_strides: Tuple[tuple, ...]
    has_grad: Tuple[bool, ...]
    distributed: bool  # some param is a DTensor: read local shards
    slots: List[_Slot]
    #: each weight's dtype and shape: ``p.data = p.data[:n]`` keeps its address and strides, and a weight of
    #: another dtype can land on its old address; the kernels read both from the bucket as it was built
    #: (two tuples: a pair per weight cost two thirds more to build, 767 us for 2000 weights against 460)
    weight_dtypes: Tuple[torch.dtype, ...] = ()
    weight_shapes: Tuple[torch.Size, ...] = ()
    #: ``group_signature``'s bytes of the last few layouts every slot took and checked, most
    #: recent first, each with the slots' ``grad_pointers`` for it.
    layouts: List[Tuple[bytes, Tuple[tuple, ...]]] = field(default_factory=list)
    #: where its counts of steps sat out share buckets, or can later (:func:`merged_counts`)
    merge_guard: Optional["_MergeGuard"] = None

    def merge_holds(self, group: Mapping, steps_taken: int) -> bool:
        """False when the group must be built again after ``steps_taken`` steps: its first moment step changed,
        a count can now join a bucket, or its betas changed and with them which counts share one (a merged
        bucket's corrections may no longer be 1). Betas that keep the buckets (a scheduler's every step) keep them."""
        guard = self.merge_guard
        start = group.get(MOMENTS_START, 0)
        if guard.moments_start != start:
            return False
        betas = tuple(map(float, group["betas"]))
        if betas != guard.betas:
            moved, due = merge_plan(guard.present, betas, steps_taken - start)
            if moved != guard.moved:
                return False
            guard = self.merge_guard = dataclasses.replace(guard, betas=betas, due=due)
        return guard.due is None or steps_taken - start < guard.due

    def known_layout(self, signature: bytes) -> Optional[Tuple[tuple, ...]]:
        """The slots' gradient pointers for ``signature`` if it is remembered (it becomes the
        most recent), else None. A scan of a few ``==`` (each stops at the first differing byte)
        costs less than hashing this step's new bytes object, 32 bytes per param."""
        for position, (known, pointers) in enumerate(self.layouts):
            if known == signature:
                if position:
                    self.layouts.insert(0, self.layouts.pop(position))
                return pointers
        return None

    def remember(self, signature: bytes) -> None:
        """Keep ``signature`` with the slots' current gradient pointers, forgetting the oldest."""
        self.layouts.insert(0, (signature, tuple(slot.bucket.grad_pointers for slot in self.slots)))
        del self.layouts[VALIDATED_GRAD_LAYOUTS:]


class BucketCache:
    """Buckets of every param group, rebuilt per group only when its tensors change."""

    def __init__(self) -> None:
        self._groups: Dict[int, _GroupEntry] = {}
        #: Group rebuilds so far (tests and benchmarks read it).
        self.rebuilds = 0
        self._state: Optional[Mapping] = None  # the optimizer's state the buckets' moments came from
        self._state_fingerprint: tuple = ()  # its moments (held: their addresses are not reused)
        self._state_signature: Optional[bytes] = None  # their addresses, read by the extension
        self._steps_taken = 0  # the optimizer's counted steps before the one collecting
        #: the counts of steps sat out that this step's collection wrote, with what they replaced
        self._counted: list = []

    def release_grads(self) -> None:
        """Let go of the gradients the buckets took, once the step that read them ends (else they held a gradient
        set alive through the caller's next backward, whatever freed the caller's own); the next step puts its own in."""
        for entry in self._groups.values():
            for slot in entry.slots:
                slot.bucket.grads = []

    def clear(self, checked_state: Optional[Mapping] = None) -> None:
        """Forget every bucket (after ``load_state_dict``: new moments). ``checked_state``: an optimizer state
        whose moments were checked (``load_state_dict``'s): a moment put into it by hand after now is read by
        :func:`refuse_replaced_moments_values` at the next step, as after any step."""
        self._groups.clear()
        self._state = None
        self._counted = []
        if checked_state is not None:
            self._state, self._state_fingerprint = checked_state, _fingerprint(checked_state)
            signature_of = _extension_function("moments_signature")
            self._state_signature = signature_of(checked_state) if signature_of is not None else None

    def _moments_current(self, state: Mapping) -> bool:
        """Is ``state`` the optimizer state the buckets read, with the same moment tensors?
        (``opt.state`` replaced or cleared, a param's dict or a moment replaced: not; an in-place
        write keeps them current.) Identity checks in C loops, no device read."""
        if state is not self._state:
            return False
        if self._state_signature is not None:
            unchanged = _extension_function("moments_unchanged")(state, self._state_signature)
            if unchanged is not None:
                return unchanged
        return _same_objects(_fingerprint(state), self._state_fingerprint)

    def __len__(self) -> int:
        return sum(len(entry.slots) for entry in self._groups.values())

    def take_back_counts(self) -> None:
        """Put back the counts of steps sat out that the last :meth:`collect` wrote (its step did not
        happen: nothing had a gradient, or it failed) and forget every bucket, so that the next step
        counts them again from the state as it was."""
        written, self._counted = self._counted, []
        for entry, key, old in reversed(written):
            if old is _MISSING:
                entry.pop(key, None)
            else:
                entry[key] = old
        if written:
            # every bucket forgotten, the moments' fingerprint kept: a moment replaced by hand since the last
            # step that ran (or after this one) is still new to it, and read at the next (a review's find)
            self._groups.clear()

    def collect(self, param_groups: List[dict], init_state: Callable[[torch.Tensor], dict],
                saved_buffer: Optional[Callable[[torch.Tensor], torch.Tensor]],
                state: Optional[Mapping] = None, fit: Optional[Callable[[], None]] = None,
                steps_taken: int = 0) -> List[Bucket]:
        """The buckets of the params that have gradients, their gradients checked.

        ``init_state(p)`` gives p's state dict (moments created if missing);
        ``saved_buffer(p)`` its copy of ``w0`` for ``restore="copy"`` (None: no copies);
        ``state``: the optimizer's state mapping; where its moments are no longer those the
        buckets hold (replaced, cleared), every group is built again;
        ``fit()``, called once where a group is built, after the parameters are checked and before
        any state is created, raises for weights the backend cannot take;
        ``steps_taken``: the optimizer's counted steps before this one, from which a group being built
        counts the steps its params sat out (:func:`count_steps_sat_out`).
        Raises before anything is created when a gradient or a parameter is unusable.
        """
        self._counted = []
        self._steps_taken = steps_taken
        if state is not None and not self._moments_current(state):
            if state is self._state:
                refuse_replaced_moments_values(state, self._state_fingerprint)
            self._groups.clear()
        rebuilds = self.rebuilds
        buckets = self._collect(param_groups, init_state, saved_buffer, state, fit)
        if state is not None and (self.rebuilds != rebuilds or state is not self._state):
            self._state, self._state_fingerprint = state, _fingerprint(state)
            signature_of = _extension_function("moments_signature")
            self._state_signature = signature_of(state) if signature_of is not None else None
        return buckets

    def _collect(self, param_groups, init_state, saved_buffer, state, fit) -> List[Bucket]:
        for index in [i for i in self._groups if i >= len(param_groups)]:
            del self._groups[index]  # groups do not shrink in torch.optim, but a reload may
        buckets: List[Bucket] = []
        checked = False  # the repeats and the backend's fit: once per step that rebuilds a group
        signature_of = _group_signature()
        for index, group in enumerate(param_groups):
            params = group["params"]
            entry = self._groups.get(index)
            # built again below: its counts of steps sat out share buckets otherwise from now
            regroup = entry is not None and entry.merge_guard is not None and not entry.merge_holds(
                group, self._steps_taken)
            distributed = entry.distributed if entry is not None else False
            native = (_native_signature(signature_of, params) if signature_of is not None and not distributed
                      else None)
            if native is not None:
                grads, signature = native
                known = entry.known_layout(signature) if entry is not None and not regroup else None
                if known is not None:
                    for slot, pointers in zip(entry.slots, known):  # same tensors, gradients
                        slot.bucket.grads = grads if slot.members is None else _picked(slot, grads)
                        slot.bucket.grad_pointers = pointers  # validated at these addresses
                        buckets.append(slot.bucket)
                    continue
            else:
                grads, signature = list(map(_grad_of, params)), None
            try:
                weights = list(map(_local_of, params)) if distributed else params
                weight_pointers = tuple(map(_data_ptr, weights))
            except (AttributeError, RuntimeError):  # a param became (or stopped being) a DTensor
                weight_pointers = None
            has_grad = tuple(map(_has_value, grads))
            if (regroup or entry is None or weight_pointers is None or entry.weight_pointers != weight_pointers
                    or entry.has_grad != has_grad or entry.param_ids != tuple(map(id, params))
                    or entry.weight_strides != tuple(map(_stride_of, weights))
                    or entry.weight_dtypes != tuple(map(_dtype_of, weights))
                    or entry.weight_shapes != tuple(map(_shape_of, weights))):
                if not checked:
                    refuse_repeated_params(param_groups)
                    for p in [p for g in param_groups for p in g["params"]]:
                        check_parameter(p)  # one put into param_groups by hand
                    if state is not None:
                        refuse_shared_moments(param_groups, state)
                    if fit is not None:
                        fit()
                    checked = True
                if entry is not None and weight_pointers is not None and state is not None:
                    refuse_relaid_in_place(params, weights, weight_pointers, entry, state)
                entry = self._build(index, params, grads, has_grad, init_state, saved_buffer, state, group)
                self._groups[index] = entry
            relaid = False
            for slot in entry.slots:
                relaid = self._attach_grads(slot, grads, entry.distributed) or relaid
                buckets.append(slot.bucket)
            if signature is not None and not relaid:  # once every slot took its gradients (a check may raise)
                entry.remember(signature)
        return buckets

    @staticmethod
    def _attach_grads(slot: _Slot, grads: List[torch.Tensor], distributed: bool) -> bool:
        """Put this step's gradients into the slot's bucket; check them unless their pointers
        are among the last few validated. A gradient laid out otherwise than its weight (strides
        of a transpose, a non-dense view, an expanded tensor) goes in as a copy in the weight's
        layout, which the kernels stream alongside it: True then, and the layout is not cached. Strides
        that differ on size-1 dimensions only address every element where the weight's do
        (:func:`same_memory_order`): the kernels take such a gradient as it is (a channels_last 1x1
        convolution's under a second loss term), and its layout is cached."""
        mine = grads if slot.members is None else _picked(slot, grads)
        if distributed:
            mine = list(map(local_shard, mine))
        try:
            # with the dtypes, strides and shapes: a gradient of another dtype, layout or shape (a
            # transpose of a persistent buffer, a narrower view of it) can land on an address seen before
            pointers = tuple(map(_data_ptr, mine))
            key = (pointers, tuple(map(_dtype_of, mine)), tuple(map(_stride_of, mine)), tuple(map(_shape_of, mine)))
        except RuntimeError:  # no storage (sparse): the check below says so
            pointers = key = None
        if key is None or key not in slot.validated:
            if not _match(slot, mine if not distributed else picked_global(slot, grads)):
                for i in range(len(slot.params)) if slot.positions is None else slot.positions:
                    check_gradient(slot.params[i], grads[i])
            # the strides the key read, compared as one tuple (148 stride() calls a pair were 17 us a step), with the
            # weights' or with the last ones found to address the same elements (size-1 dimensions' strides apart)
            odd = [] if key is not None and key[2] in (slot.weight_strides, slot.same_order_strides) else [
                i for i, (g, p) in enumerate(zip(mine, slot.bucket.params))
                if not same_memory_order(p.shape, g.stride(), p.stride())]
            if not odd and key is not None:
                slot.same_order_strides = key[2]
            if odd:
                mine = list(mine)
                with torch.no_grad():
                    for i in odd:
                        mine[i] = torch.empty_like(slot.bucket.params[i]).copy_(mine[i])
                slot.bucket.grads = mine
                slot.bucket.grad_pointers = tuple(map(_data_ptr, mine))
                return True
            slot.validated[key] = None
            if len(slot.validated) > VALIDATED_GRAD_LAYOUTS:
                slot.validated.popitem(last=False)
        else:
            slot.validated.move_to_end(key)
        slot.bucket.grads = mine
        slot.bucket.grad_pointers = pointers
        return False

    def _build(self, index: int, params: List[torch.Tensor], grads: List[Optional[torch.Tensor]],
               has_grad: Tuple[bool, ...], init_state, saved_buffer, state: Optional[Mapping],
               group: Mapping) -> _GroupEntry:
        """The group's buckets, one per (device, dtype, steps sat out) among params with gradients; the
        counts whose bias corrections are exactly 1 at this step (:func:`merged_counts`) share one, under 0."""
        moments_start = group.get(MOMENTS_START, 0)
        self.rebuilds += 1
        for p, grad in zip(params, grads):  # all checked before any state is created
            if grad is not None:
                check_gradient(p, grad)
                if state is not None and p in state:
                    check_moments(p, state[p])
        sat_out = (count_steps_sat_out(params, has_grad, state, self._steps_taken - moments_start, self._counted)
                   if state is not None else {})
        first = {position for position, (p, present) in enumerate(zip(params, has_grad))  # moments made now
                 if present and sat_out.get(position) and not _has_moments(state, p)}
        members: Dict[tuple, List[int]] = {}
        for position, (p, present) in enumerate(zip(params, has_grad)):
            if present:
                members.setdefault((p.device, p.dtype, sat_out.get(position, 0)), []).append(position)
        group_steps = self._steps_taken - moments_start
        members, merge_guard = merged_counts(members, group, group_steps)
        distributed = any(hasattr(p, "_local_tensor") for p in params)
        slots = []
        for (device, dtype, steps_sat_out), positions in members.items():
            chosen = [params[i] for i in positions]
            states = [init_state(p) for p in chosen]
            for position, p_state in zip(positions, states):
                if position in first:
                    # not in the journal: the count goes with the moments made now, which a failed
                    # step keeps (a retry finds them, and would read no count without it)
                    p_state[STEPS_SAT_OUT] = sat_out[position]
                    p_state.pop(SAT_OUT_SINCE, None)  # a stretch begun without moments (set by hand)
            own = tuple(sat_out.get(position, 0) for position in positions)
            bucket = Bucket(params=[local_shard(p) for p in chosen], grads=[],
                            exp_avg=[local_shard(s["exp_avg"]) for s in states],
                            exp_avg_sq=[local_shard(s["exp_avg_sq"]) for s in states],
                            saved=[saved_buffer(p) for p in chosen] if saved_buffer is not None else None,
                            device=device, dtype=dtype, group_index=index, tensors_fixed=True,
                            steps_sat_out=steps_sat_out,
                            merged_sat_out=own if any(count != steps_sat_out for count in own) else ())
            whole = len(positions) == len(params)
            slots.append(_Slot(bucket, params, None if whole else positions,
                               None if whole else operator.itemgetter(*positions),
                               tuple(p.shape for p in chosen), tuple(map(_stride_of, bucket.params))))
        weights = [local_shard(p) for p in params]
        return _GroupEntry(tuple(map(id, params)), tuple(map(_data_ptr, weights)), tuple(map(_stride_of, weights)),
                           has_grad, distributed, slots, tuple(map(_dtype_of, weights)),
                           tuple(map(_shape_of, weights)), merge_guard=merge_guard)


def merged_counts(members: Dict[tuple, List[int]], group: Mapping,
                  group_steps: int) -> Tuple[Dict[tuple, List[int]], Optional[_MergeGuard]]:
    """``members`` (positions by device, dtype and count of steps sat out) with the counts whose bias
    corrections are exactly 1 where their dtype computes (:func:`~salsa_fused.backends.base.corrections_are_one`)
    moved under count 0, whose corrections are then 1 too (:func:`merge_plan`). The other counts keep a launch
    of each pass apiece (an MoE's experts left out of some steps). Also the guard that builds the group again
    when the plan changes (None: nothing is merged and nothing can be).

    Each pass's ``k`` is checked again where its scalars are formed (:meth:`salsa_fused.functional.Passes.of`),
    since a step taken back lowers it."""
    betas = tuple(map(float, group["betas"]))
    counts: Dict[tuple, List[int]] = {}
    for device, dtype, count in members:
        counts.setdefault((device, dtype), []).append(count)
    present = {key: tuple(sorted(found)) for key, found in counts.items()}
    moved, due = merge_plan(present, betas, group_steps)
    if not moved and due is None:
        return members, None
    guard = _MergeGuard(betas, group.get(MOMENTS_START, 0), due, present, moved)
    if not moved:
        return members, guard
    merged: Dict[tuple, List[int]] = {}
    for (device, dtype, count), positions in members.items():
        merged.setdefault((device, dtype, 0 if (device, dtype, count) in moved else count), []).extend(positions)
    for positions in merged.values():
        positions.sort()
    return merged, guard


def merge_plan(present: Mapping[tuple, Tuple[int, ...]], betas: Tuple[float, float],
               group_steps: int) -> Tuple[frozenset, Optional[int]]:
    """Of the counts of steps sat out ``present`` per (device, dtype), the (device, dtype, count) that move under
    count 0 at the step after ``group_steps`` counted steps of the group: a tensor's ``k`` there is at least
    ``group_steps + 1 - count`` (:meth:`Hyper.for_step <salsa_fused.backends.base.Hyper.for_step>` at the
    smaller ``moment_step``), and its corrections stay 1 while ``k`` grows and the betas stay. Also the
    group's counted steps from which one more count can share a bucket (None: none can)."""
    moved = set()
    due = None
    for (device, dtype), counts in present.items():
        full = first_step_corrected_to_one(betas[0], betas[1], dtype)
        apart = [count for count in counts if count and group_steps + 1 - count < full]
        moved.update((device, dtype, count) for count in counts if count and group_steps + 1 - count >= full)
        # the lowest apart joins count 0's bucket if there is one; else the second lowest joins the lowest
        zero = 0 in counts or len(apart) < sum(1 for count in counts if count)
        joins = apart[0] if apart and zero else (apart[1] if len(apart) > 1 else None)
        if joins is not None:
            due = min(due, full - 1 + joins) if due is not None else full - 1 + joins
    return frozenset(moved), due



_MISSING = object()


def _has_moments(state: Optional[Mapping], p: torch.Tensor) -> bool:
    entry = state[p] if state is not None and p in state else None
    return isinstance(entry, Mapping) and "exp_avg" in entry


def _write(entry: dict, key: str, value, journal: list) -> None:
    """``entry[key] = value`` (``del`` for :data:`_MISSING`), its old value kept in ``journal``."""
    journal.append((entry, key, entry.get(key, _MISSING)))
    if value is _MISSING:
        del entry[key]
    else:
        entry[key] = value


def count_steps_sat_out(params: List[torch.Tensor], has_grad: Tuple[bool, ...], state: Mapping,
                        group_steps: int, journal: list) -> Dict[int, int]:
    """Each param's :data:`STEPS_SAT_OUT`, by its position in ``params``, where its group is built after
    ``group_steps`` counted steps of its own (which of its params have a gradient changed, or its tensors).

    A param with moments and no gradient starts sitting out (:data:`SAT_OUT_SINCE` = ``group_steps``);
    one whose gradient is back adds the steps since then; one whose first gradient comes now (no
    moments yet: it was frozen when the group was added) sat out every step before. Any rebuild at one
    step reads the same counts. Each write goes into ``journal`` (see :meth:`BucketCache.take_back_counts`)."""
    for p in params:  # every count read here checked before any is written
        if _has_moments(state, p):
            _check_sat_out_counts(p, state[p], group_steps)
    counts: Dict[int, int] = {}
    for position, (p, present) in enumerate(zip(params, has_grad)):
        if not _has_moments(state, p):
            if present and group_steps > 0:
                counts[position] = group_steps
            continue
        entry = state[p]
        since = entry.get(SAT_OUT_SINCE)
        if since == NOT_SITTING_OUT:  # a saved entry copied in past load_state_dict (ZeroRedundancyOptimizer's)
            since = None
        if present and since is not None:
            _write(entry, STEPS_SAT_OUT, entry.get(STEPS_SAT_OUT, 0) + max(0, group_steps - since), journal)
            _write(entry, SAT_OUT_SINCE, _MISSING, journal)
        elif not present and since is None:
            _write(entry, SAT_OUT_SINCE, group_steps, journal)
        counts[position] = min(entry.get(STEPS_SAT_OUT, 0), max(0, group_steps))
    return counts


def _check_sat_out_counts(p: torch.Tensor, entry: Mapping, group_steps: int) -> None:
    """Raise ValueError when ``opt.state[p]``'s count of steps sat out, or the step its stretch began, set by hand,
    is not a Python int of 0 or more (``sat_out_since`` may also be -1, "not sitting out"): used as they were, -5,
    2.5 or a numpy int moved the bias corrections, and the checkpoint they went into was refused by the
    optimizer's own ``load_state_dict`` (an audit's and a review's finds). A count above the group's
    ``group_steps`` is read as all of them (:func:`count_steps_sat_out`): ``moments_start_step`` moved by hand,
    which the docs allow, leaves such counts behind."""
    for name in (STEPS_SAT_OUT, SAT_OUT_SINCE):
        if name not in entry:
            continue
        value = entry[name]
        if type(value) is not int or not (value >= 0 or (name == SAT_OUT_SINCE and value == NOT_SITTING_OUT)):
            raise ValueError(f"opt.state[p][{name!r}] of a parameter of shape {tuple(p.shape)} is {value!r}: a count "
                             f"of its group's steps, a Python int of 0 or more (its group has taken {group_steps}; "
                             "set by hand?); nothing was written")


_EXP_AVG, _EXP_AVG_SQ = operator.itemgetter("exp_avg"), operator.itemgetter("exp_avg_sq")


def refuse_replaced_moments_values(state: Mapping, fingerprint: tuple) -> None:
    """Raise ValueError when a moment put into ``state`` by hand since ``fingerprint`` (:func:`_fingerprint`
    of the moments the buckets held) holds NaN/inf, or ``exp_avg_sq`` a negative value: a plain step reads no
    value on the host, and ``sqrt`` of a negative ``exp_avg_sq`` wrote NaN into every weight (an audit's find).
    ``load_state_dict`` checks a checkpoint's moments so; here only the tensors that are new since are read
    (one device read), so that a step with no such change reads nothing."""
    held = {id(tensor) for moments in fingerprint for tensor in moments if tensor is not None}
    new = [(p, name, entry[name]) for p, entry in state.items() if isinstance(entry, Mapping)
           for name in _MOMENTS if isinstance(entry.get(name), torch.Tensor) and id(entry[name]) not in held
           and entry[name].dtype == torch.float32 and entry[name].layout == torch.strided
           and not entry[name].is_meta and local_shard(entry[name]).numel()]
    if not new:
        return
    with torch.no_grad():
        flags = []
        for _, name, moment in new:
            low, high = torch.aminmax(local_shard(moment))
            bad = ~(torch.isfinite(low) & torch.isfinite(high))
            flags.append((bad | (low < 0)) if name == "exp_avg_sq" else bad)
        flags = torch.stack(flags).tolist()  # the one device read (the optimizer's moments share its device)
    for (p, name, _), bad in zip(new, flags):
        if bad:
            what = "NaN/inf or a negative value" if name == "exp_avg_sq" else "NaN/inf"
            raise ValueError(f"opt.state[p][{name!r}] of a parameter of shape {tuple(p.shape)}, put there by hand, "
                             f"holds {what}: the step would write NaN into the weights (sqrt of a negative "
                             "exp_avg_sq, or a non-finite moment). Give it finite values (exp_avg_sq >= 0), or "
                             "torch.zeros_like(p) to start it over; nothing was written")


def _fingerprint(state: Mapping) -> tuple:
    """The moment tensors of an optimizer state, in its order (a dict replaced without them, or
    with others, changes them; the same tensors in a new dict are the same moments)."""
    entries = state.values()
    try:
        return tuple(map(_EXP_AVG, entries)), tuple(map(_EXP_AVG_SQ, entries))
    except (KeyError, TypeError):  # a dict without moments (a param that never had a gradient), or no dict
        # (set by hand: the entry itself stands for both, so the groups are built again and check_moments says so)
        return (tuple(entry.get("exp_avg") if isinstance(entry, Mapping) else entry for entry in entries),
                tuple(entry.get("exp_avg_sq") if isinstance(entry, Mapping) else entry for entry in entries))


def _same_objects(a: tuple, b: tuple) -> bool:
    return all(len(x) == len(y) and all(map(operator.is_, x, y)) for x, y in zip(a, b))


def _picked(slot: _Slot, grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """The slot's gradients out of its group's list (the slot holds part of the group)."""
    picked = slot.members(grads)
    return list(picked) if isinstance(picked, tuple) else [picked]


_extension_functions: Dict[str, Optional[Callable]] = {}


def _extension_function(name: str) -> Optional[Callable]:
    """The loaded extension's host helper ``name`` (setup.py's build or the JIT's), None without
    one; looked up once: ``group_signature`` (a group's gradients and what identifies its tensors),
    ``moments_signature`` (the addresses of every state entry's moments), ``moments_unchanged``
    (whether they are still those)."""
    if name not in _extension_functions:
        from . import _ext

        _extension_functions[name] = getattr(_ext.module(), name, None)
    return _extension_functions[name]


def _group_signature() -> Optional[Callable[[list], Optional[tuple]]]:
    return _extension_function("group_signature")


def _native_signature(signature_of, params: list) -> Optional[tuple]:
    """``signature_of(params)``, or None where it cannot read them (the Python path decides)."""
    try:
        return signature_of(params)
    except RuntimeError:  # a tensor without storage the check in C++ did not foresee
        return None


_layout_of = operator.attrgetter("layout")
_dtype_of = operator.attrgetter("dtype")
_stride_of = operator.methodcaller("stride")
_device_of = operator.attrgetter("device")
_shape_of = operator.attrgetter("shape")


def picked_global(slot: _Slot, grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """The slot's gradients as the params hold them (DTensors stay DTensors)."""
    return grads if slot.positions is None else [grads[i] for i in slot.positions]


def _match(slot: _Slot, grads: List[torch.Tensor]) -> bool:
    """Every gradient dense with its weight's shape, the bucket's dtype and device (loops in C);
    False sends the caller to the per-tensor check, which names the problem."""
    bucket = slot.bucket
    return (set(map(_layout_of, grads)) == {torch.strided}
            and set(map(_dtype_of, grads)) == {bucket.dtype}
            and set(map(_device_of, grads)) == {bucket.device}
            and tuple(map(_shape_of, grads)) == slot.shapes)
