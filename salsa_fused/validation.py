"""The checks of what FusedSaLSa is handed: its arguments, its param groups and hand edits of them. Each refusal
names what is wrong and comes before anything is written.

:func:`validate_group_hyper` is the one check of a group's hyperparameters (at construction, at
``add_param_group``, at ``load_state_dict`` and at each step whose values changed since the last check:
:func:`hyper_key`). The rest refuse unknown keywords (with the argument meant: :func:`unexpected_arguments`),
salsa-optimizer 0.1.0's arguments named otherwise and search arguments the chosen rule does not read, torch.optim's
flags it cannot honour, a ``ZeroRedundancyOptimizer`` shard, a set of parameters, parameters over shared memory, a
``model=`` of other parameters (and warn of one that leaves some out), a group replaced by hand, a ``reduction``
without the shard group FSDP2 needs, and a ``step()`` called with other arguments. Beside them: how torch.optim's
values are taken (:func:`as_pair` for ``betas``; :func:`starts_probing`, a group built at ``lr=0``) and
:func:`called_from`, which finds a caller by its code.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import math
import numbers
import sys
import warnings
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .backends import BACKEND_FLAGS
from .backends.base import GROUP_HYPER_KEYS, MOMENTS_START
from .buckets import first_sharing_memory
from .distributed import SearchReduction, is_distributed, shard_group_of
from .errors import as_float, caller_stacklevel
from .line_search import FLOAT32_MAX, FLOAT32_TINY
from .rules import check_arguments, resolve_rule


#: salsa-optimizer 0.1.0's constructor arguments that this one names otherwise, and how.
_PUBLISHED_ARGUMENTS = {
    "momentum": "momentum=(beta1, beta2, beta3) is betas=(beta1, beta2), beta3=beta3",
    "speed_up": "speed_up is adaptive_interval (True: a search every L steps)",
    "use_mv": "use_mv=True is search_direction='momentum'",
}


def refuse_unread_search_arguments(init):
    """``FusedSaLSa.__init__`` that first refuses a search argument given by name that the chosen
    rule does not read (:func:`salsa_fused.rules.check_arguments`), before anything is built. It
    sees the keywords as the caller passed them: a default left alone is never refused."""

    @functools.wraps(init)
    def checked_init(self, params, lr=1.0, **options):
        published = [name for name in _PUBLISHED_ARGUMENTS if name in options]
        if published:
            raise TypeError(f"FusedSaLSa takes no {', '.join(published)}: salsa-optimizer 0.1.0's argument"
                            f"{'s' if len(published) > 1 else ''}, named here "
                            + "; ".join(_PUBLISHED_ARGUMENTS[name] for name in published))
        chosen = options.get("search_rule")
        check_arguments(resolve_rule(chosen), options, chosen)
        init(self, params, lr, **options)

    return checked_init


#: torch.optim's flags this optimizer cannot honour, and why: accepted at False (their default) in the
#: constructor, and refused when set there, in a group added, loaded or changed by hand.
UNSUPPORTED_FLAGS = {
    "maximize": "the line search minimizes the closure's loss: return the negated objective instead",
    "capturable": "a search reads its trial losses on the host, which a CUDA graph cannot capture",
    "differentiable": "a search decides on host floats, so the step is not differentiable",
    "amsgrad": "it keeps no running maximum of the second moment (AdamW's amsgrad)",
}


def starts_probing(group: dict) -> bool:
    """A group built at ``lr=0`` whose ``lr`` is positive now: its step sets ``search_lr`` to 1."""
    return group["search_lr"] == 0 and group["lr"] > 0


_PLAIN_NUMBERS = frozenset((float, int))


_FLAG_NAMES = frozenset(UNSUPPORTED_FLAGS)


def hyper_key(group: dict) -> Optional[tuple]:
    """Everything :func:`validate_group_hyper` reads of ``group`` (with ``search_lr``), as
    types and values, when each value is an exact ``float`` or ``int``, ``betas`` a tuple or list and no
    unsupported flag is set; else None. Two equal keys pass or fail those checks alike (the types are
    part of the key, so ``True`` is not ``1``, nor ``1`` ``1.0``; NaN equals nothing), and so does the
    float32 fit of the moves at the same scale and level: a step whose keys equal those of the last
    step that checked them skips both checks. A group with ``foreach`` or ``fused`` set has none."""
    try:
        lr, probe, eps, wd, betas = (group["lr"], group["search_lr"], group["eps"], group["weight_decay"],
                                     group["betas"])
    except KeyError:
        return None
    if type(betas) not in (tuple, list) or len(betas) != 2:
        return None
    beta1, beta2 = betas
    types = (type(lr), type(probe), type(eps), type(wd), type(beta1), type(beta2))
    if not _PLAIN_NUMBERS.issuperset(types):
        return None
    if not _FLAG_NAMES.isdisjoint(group) and any(group.get(name, False) not in (False, None) for name in _FLAG_NAMES):
        return None
    if ("foreach" in group or "fused" in group) and any(group.get(name) is not None for name in BACKEND_FLAGS):
        return None  # checked at every step: a hand edit is refused at the next one
    start = group[MOMENTS_START] if MOMENTS_START in group else 0  # no call: this runs at every step
    if start.__class__ is not int:
        return None
    return types, lr, probe, eps, wd, beta1, beta2, start


#: Why a tensor is refused where torch.optim's AdamW takes one (lr, betas, eps, weight_decay).
HOST_SCALAR = (" (not a tensor: the step's scalars are host arithmetic, which a tensor would make a device read a "
                "step)")


def as_pair(betas):
    """``betas`` as torch.optim takes them: a sequence of two other than a tuple or list (Hydra's ``ListConfig``, a
    numpy array) as a tuple of Python numbers; anything else as it is (the group's check names what is wrong)."""
    if isinstance(betas, (tuple, list, str, bytes, torch.Tensor)):
        return betas
    if not (isinstance(betas, collections.abc.Sequence) or getattr(betas, "ndim", None) == 1):
        return betas
    try:
        if len(betas) != 2:
            return betas
        return tuple(beta.item() if callable(getattr(beta, "item", None)) else beta for beta in betas)
    except (TypeError, ValueError):
        return betas


def as_the_step_sees(group: dict) -> dict:
    """``group`` with the ``search_lr`` its next step will give it (1 when it starts probing)."""
    return {**group, "search_lr": 1.0} if starts_probing(group) else group


def flag_off(value) -> bool:
    """Whether a torch.optim flag is off as torch reads it: False, None or a number 0."""
    return value is None or (isinstance(value, numbers.Number) and not isinstance(value, complex) and not value)


def unexpected_arguments(unexpected: Mapping, init: Callable) -> str:
    """Python's words for an unknown keyword, with what was meant: a preset's name and length (users wrote
    ``FusedSaLSa(params, preset="pretrain", total_steps=N)``), or the nearest argument's name of ``init``
    (FusedSaLSa's constructor; a typo)."""
    known = [name for name in inspect.signature(init).parameters
             if name not in ("self", "params", "unexpected")]
    presetting = [name for name in unexpected if name in ("preset", "total_steps")]
    hints = [f"{' and '.join(map(repr, presetting))}: a preset is built by presets.from_preset(params, 'pretrain', "
             "total_steps=N), or presets.recommended(params, total_steps=N) (from salsa_fused import presets); a "
             "schedule of one's own goes in schedule="] if presetting else []
    for name in unexpected:
        if name not in presetting:
            close = difflib.get_close_matches(str(name), known, n=1)
            hints.append(f"{name!r}: did you mean {close[0]!r}?" if close else
                         f"{name!r}: not an argument of FusedSaLSa (docs/api.md lists them)")
    words = "keyword argument" if len(unexpected) == 1 else "keyword arguments"
    return f"FusedSaLSa() got an unexpected {words} {', '.join(map(repr, unexpected))}; " + "; ".join(hints)


ZERO_REDUNDANCY_REFUSED = (
    "torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=FusedSaLSa) is not supported: each rank's "
    "FusedSaLSa would hold a shard of the parameters as plain tensors, so its trials would move only that shard "
    "while the loss reads them all, and ZeRO's state_dict() drops the search state (a resume would start the "
    "search over); shard with FSDP2 (fully_shard), or use DDP (docs/training.md); nothing was built")


def called_from(function, depth: int = 8) -> bool:
    """Whether ``function`` is among the ``depth`` callers above the caller (subclasses' ``__init__`` and wrappers
    stand between): its code object compared, frame by frame. No frame's locals are read: on Python 3.11 and 3.12
    reading them keeps a snapshot of each frame's variables alive until the frame returns."""
    # a decorated function's frame runs the code it wraps (functools.wraps keeps it in __wrapped__)
    code = getattr(inspect.unwrap(function), "__code__", None) if function is not None else None
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None or code is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def refuse_a_zero_redundancy_shard() -> None:
    """Refuse construction by ``ZeroRedundancyOptimizer``'s ``_init_local_optimizer``, which builds its rank's
    optimizer. Not imported: not ZeRO."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is not None and called_from(zero.ZeroRedundancyOptimizer._init_local_optimizer, depth=16):
        raise RuntimeError(ZERO_REDUNDANCY_REFUSED)


def refuse_unsupported_flags(**flags) -> None:
    for name, value in flags.items():
        if not flag_off(value):
            raise ValueError(f"FusedSaLSa does not support {name}={value!r}: {UNSUPPORTED_FLAGS[name]} "
                             f"({name}=False, the default, is accepted)")


def refuse_a_set(params) -> None:
    if isinstance(params, (set, frozenset)):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                        "ordering of tensors in sets will change between runs (a checkpoint would put "
                        "moments on the wrong tensors): pass a list")


def step_call_error(args: tuple, kwargs: dict) -> str:
    """What is wrong with ``step(*args, **kwargs)``: its one positional argument is the closure."""
    if len(args) > 1:
        return (f"step() takes the closure as its one positional argument, got {len(args)} positional arguments: "
                "pass the loss of the two-phase form by name, step(closure, loss=loss)")
    unknown = ", ".join(repr(k) for k in kwargs if k not in ("closure", "loss"))
    if not unknown:
        return "step() got the closure twice, by position and as closure="
    return f"step() takes closure and loss=, got the keyword argument(s) {unknown}"


def refuse_shared_storage(new: Sequence[torch.Tensor], existing: Sequence[torch.Tensor], memory_of_existing: bool = True,
                           refused: str = "the group was not added") -> None:
    """ValueError if a tensor of ``new`` has an element where another of ``new`` or of ``existing`` has one:
    each pass reads a parameter's weights and writes them back, so two parameters over the same memory
    (``b.data = a.data``, overlapping slices of one tensor) would each be stepped from the other's writes,
    differently on every backend. Views of disjoint parts of one storage (a flat buffer, column blocks of
    one matrix) are fine. The same tensor twice is named as torch names it (its own check comes after
    this one). Meta tensors and tensor subclasses (DTensor) hold no memory to compare here.
    ``memory_of_existing=False`` compares ``new``'s memory among itself only (the constructor's groups, one at a
    time, then all at once: once per group over every earlier one took O(groups^2), 2 s at 1,000 groups)."""
    existing_ids = set(map(id, existing))
    if any(id(p) in existing_ids for p in new):
        raise ValueError(f"some parameters appear in more than one parameter group ({refused})")
    tensors = [p for p in (list(existing) if memory_of_existing else []) + list(new)
               if type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type != "meta"]
    shared = first_sharing_memory(tensors)
    if shared is not None:
        shapes = ", ".join(str(tuple(tensors[k].shape)) for k in shared)
        raise ValueError(f"two parameters (shapes {shapes}) share memory: each would be stepped from the "
                         "other's writes. Give each its own tensor (b.data = a.data.clone()), or pass the "
                         f"tied parameter once ({refused})")


def refuse_a_model_of_other_parameters(model: torch.nn.Module, param_groups: List[dict], warn: bool = True) -> None:
    """Refuse (ValueError) a ``model=`` none of whose parameters this optimizer steps: another model's running
    statistics would be put back after the searches, and this one's, left out, would take every trial forward.
    Read at the build and at a step where no parameter has a gradient (``warn=False``): ``fully_shard`` after the
    build replaces every parameter, and each step did nothing, silently (an FSDP2 audit's find)."""
    mine = {id(p) for group in param_groups for p in group["params"]}
    theirs = list(model.parameters())
    if theirs and mine and not any(id(p) in mine for p in theirs):
        raise ValueError(f"model= is the module the closure runs, whose running statistics (BatchNorm's) a search "
                         f"puts back after its extra forwards, but none of the {len(theirs)} parameters of the "
                         f"{type(model).__name__} given is one this optimizer steps: pass the model whose parameters "
                         "you gave (FSDP2's fully_shard, or a .to() that makes new parameters, replaces them: build "
                         "the optimizer after it)")
    if warn:
        warn_of_parameters_outside_the_model(model, mine, "this optimizer steps")


def warn_of_parameters_outside_the_model(model: torch.nn.Module, mine: set, whose: str) -> None:
    """Warn where some of ``mine`` (parameter ids) are not ``model``'s: the modules they belong to are outside it."""
    theirs = {id(p) for p in model.parameters()}
    outside = len(mine - theirs)
    if theirs and outside:
        warnings.warn(f"model= is the module the closure runs, but {outside} of the {len(mine)} parameters {whose} "
                      f"are not the {type(model).__name__}'s: the running statistics (BatchNorm's) of modules the "
                      "closure runs outside it take every trial forward of a search. Pass every module the closure runs, "
                      "the whole model (it may hold more parameters than this optimizer steps: a GAN's optimizers "
                      "both take torch.nn.ModuleList([G, D]); a parameter outside any module, a learned temperature, "
                      "needs none)", UserWarning, stacklevel=caller_stacklevel())


def refuse_group_replaced_by_hand(index: int, group) -> None:
    """Raise for ``param_groups[index]`` that is not a dict holding a list (or tuple) of parameters, or pass one
    that is (a dict subclass, a list subclass). A generator set by hand (``group["params"] = model.parameters()``) was
    used up by the step's first pass: every later step moved nothing, silently (an audit's find)."""
    if not isinstance(group, dict):
        raise ValueError(f"param_groups[{index}] is a {type(group).__name__}, not a dict (replaced by hand?): a group "
                         "is a dict of 'params' and its settings; add groups with add_param_group; nothing was "
                         "written")
    params = group.get("params")
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"param_groups[{index}]['params'] is a {type(params).__name__}, not a list (set by hand?): "
                         "a generator such as model.parameters() is used up by one pass, and the steps after it "
                         "would move nothing; set a list (list(model.parameters())), as add_param_group makes "
                         "it; nothing was written")


def check_reduction(reduction, params) -> None:
    """A given ``reduction`` is a :class:`SearchReduction`, and has a shard group where the parameters
    are sharded DTensors (FSDP2): without one each rank's slope ``q`` would come from its own shard,
    the ranks would decide differently and their collectives fall out of step."""
    if not isinstance(reduction, SearchReduction):
        raise TypeError("reduction must be a salsa_fused.distributed.SearchReduction(loss_group=..., "
                        f"shard_group=...), or None for the default, got {type(reduction).__name__} {reduction!r}")
    if reduction.shard_group is not None or not is_distributed():
        return
    detected = shard_group_of(params)
    if detected is not None and dist.get_world_size(detected) > 1:
        raise ValueError(f"the parameters are DTensors sharded over {dist.get_world_size(detected)} ranks (FSDP2), "
                         "but the reduction given has no shard_group: each rank's slope q would come from its own "
                         "shard alone and the ranks would decide differently; pass SearchReduction(loss_group=..., "
                         "shard_group=<the group the shards are spread over>), or omit reduction to have both "
                         "detected")


def validate_group_hyper(group: dict, keys: Tuple[str, ...] = GROUP_HYPER_KEYS) -> None:
    """Raise (ValueError, TypeError) naming what of ``group``'s ``keys`` (lr, betas, eps, weight_decay;
    search_lr where present) a step cannot take, and any of torch.optim's flags set that it does not support;
    nothing is written."""
    if not all(map(group.__contains__, keys)):
        lacking = [key for key in keys if key not in group]
        raise ValueError(f"a param group has no {', '.join(map(repr, lacking))}: every step reads it "
                         "(deleted by hand, or the group appended to param_groups by hand: add groups with "
                         "add_param_group, which fills in what they leave out); nothing was written")
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor):
        raise ValueError("a tensor lr is not supported: lr must be a Python float (a host-side "
                         "multiplier on the level the search finds)")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}"
                            f"{HOST_SCALAR if isinstance(value, torch.Tensor) else ''}")
    # compared as Python floats: a numpy float16 would cast the float32 bounds to its own type (and warn)
    lr, eps, wd = as_float("lr", lr), as_float("eps", eps), as_float("weight_decay", wd)
    if not (math.isfinite(lr) and 0 <= lr <= FLOAT32_MAX):
        raise ValueError(f"lr must be a finite number >= 0 that float32 holds (at most {FLOAT32_MAX:.4g}), got {lr}")
    probe = group.get("search_lr", lr)
    if isinstance(probe, bool) or not isinstance(probe, numbers.Real) or not (
            math.isfinite(as_float("search_lr", probe)) and 0 <= float(probe) <= FLOAT32_MAX):
        raise ValueError(f"search_lr must be a finite number >= 0 that float32 holds (at most {FLOAT32_MAX:.4g}), "
                         f"got {probe!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), a tuple or a list, got {type(betas).__name__} "
                         f"{betas!r}" + (" (set by hand: tuple(betas) converts it; the constructor and "
                                         "add_param_group do so)" if as_pair(betas) is not betas else ""))
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"betas[{i}] must be a number, got {type(beta).__name__}"
                            f"{HOST_SCALAR if isinstance(beta, torch.Tensor) else ''}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must lie in [0, 1), got {beta}")
    if not (math.isfinite(eps) and FLOAT32_TINY <= eps <= FLOAT32_MAX):
        raise ValueError(f"eps must be a finite number > 0 that float32 holds, from {FLOAT32_TINY:.4g} to "
                         f"{FLOAT32_MAX:.4g} (the moments are float32: a smaller eps is 0 there, and "
                         f"0 / (sqrt(0) + 0) is NaN), got {eps}")
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd}")
    for name, why in UNSUPPORTED_FLAGS.items():
        if not flag_off(group.get(name, False)):
            raise ValueError(f"a param group has {name}={group[name]!r}, which FusedSaLSa does not support: "
                             f"{why} (set it to False, or leave it out)")
