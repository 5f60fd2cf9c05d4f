"""FusedSaLSa: Adam whose step size is found by SaLSa's smoothed Armijo line search.

The class validates arguments, owns the per-parameter state (fp32 moments) and the
search state, runs the step's forward and backward (or takes the caller's), keeps the
random state and running statistics, and hands the step to the functional core
(:mod:`salsa_fused.functional`): either a plain Adam step (one fused pass per bucket, no
host read) or a search (a reduction pass for the slope ``q``, one host read, pass A, then
one forward and one small host read per trial, pass B between trials). The arithmetic of
every pass lives in the backends (:mod:`salsa_fused.backends`), every step they apply is
formed in :mod:`salsa_fused.applied`, and the decisions come from the search rule
(:mod:`salsa_fused.rules`; SaLSa's in :mod:`salsa_fused.line_search`). Its arguments are checked in
:mod:`salsa_fused.validation`, the closure's contract is kept by :mod:`salsa_fused.closures`, the
warn-once watchers are :mod:`salsa_fused.diagnostics`' and checkpoints :mod:`salsa_fused.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import numbers
import re
import sys
import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary
try:  # torch's registries of global step hooks (private): read to skip its step wrapper while both are empty
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:  # a torch that moved them: never empty here, so every step takes torch's wrapper
    _global_optimizer_pre_hooks = _global_optimizer_post_hooks = {"unknown": None}

from . import backends as _backends
from ._compat import OPTIMIZER_KEEPS_PARAMETER_NAMES, compile_disabled
from ._rng import RNGSnapshot
from .buckets import BucketCache, check_gradient, check_parameter, local_shard
from . import functional as F
from .backends import BACKEND_FLAGS
from .backends.base import GRADIENT, GROUP_HYPER_KEYS, MOMENTS_START, MOMENTUM, Bucket, Hyper, zero_moments
from .checkpoint import MOMENT_KEYS, SEARCH_KEY, Checkpointing, valid_moments_start, valid_step_count
from .errors import as_float, caller_stacklevel
from .distributed import (SearchReduction, ddp_modules, default_reduction, fsdp_modules, is_distributed,
                          shard_group_of, without_buffer_broadcast)
from .applied import GroupStep
from .line_search import FLOAT32_MAX, FLOAT32_TINY, MIN_SLOPE_AVG, SearchConfig, SearchState, StepPlan, fits_float32
from .rules import (Batches, checked_direction, moment_step, plan_step, plan_without_search,
                    resolve_rule, step_batches)
from .closures import (CLOSURE_BACKWARD_AT_TRIAL, CLOSURE_RAN_BACKWARD, LOSS_NOT_THE_CLOSURES, NO_GRAPH, SCALED_LOSS,
                       STALE_CLOSURE, call_indexed, call_name, call_plain, called_from_lightning,
                       forget_autocast_casts, from_lightning_manual, grad_scaler_records, gradients_watch,
                       IndexedReplay, is_stale_loss, leave_random_state, loss_mismatch, loss_scalar,
                       losses_with_values, running_statistics, same_value)
from .validation import (UNSUPPORTED_FLAGS, as_pair, as_the_step_sees, called_from, check_reduction, hyper_key,
                         refuse_a_model_of_other_parameters, refuse_a_set, refuse_a_zero_redundancy_shard,
                         refuse_group_replaced_by_hand, refuse_shared_storage, refuse_unread_search_arguments,
                         refuse_unsupported_flags, starts_probing, step_call_error, unexpected_arguments,
                         validate_group_hyper, warn_of_parameters_outside_the_model)
from .diagnostics import Diagnostics
from .step_size import (applied_scale, backs_off_on_loss_rise, check_freeze_below,
                        check_freeze_rule, freeze_if_collapsed, observe_search_loss, schedule_searches, warn_collapsed_level,
                        warn_past_end)

LossClosure = Callable[[], Union[torch.Tensor, float]]

RESTORE_STRATEGIES = ("copy", "inplace")
#: Adam's two directions; the backends' third, ``"raw"`` (``d = g``), is chosen by a rule (LABPAL's).
SEARCH_DIRECTIONS = (GRADIENT, MOMENTUM)
NONFINITE_POLICIES = ("raise", "skip")
_DeviceCounts = F.DeviceCounts  # its name before it moved to functional.py: pickled optimizers load
#: The error for a step under torch's Join that a rank which ran out of inputs would leave hanging.
JOIN_UNSHADOWED = (
    "FusedSaLSa cannot step under torch.distributed.algorithms.Join with throw_on_early_termination=False (Join's "
    "default): a rank that ran out of inputs shadows the model's collectives (DDP's) but not the optimizer's, whose "
    "number depends on the trials the ranks' searches take, so the ranks' collectives fall out of step (measured on "
    "gloo: a collective mismatch that aborts the joined rank; NCCL hangs). Use Join([model, opt], "
    "throw_on_early_termination=True), which raises on every rank at the step after one runs out, the weights alike, "
    "or give every rank the same number of steps (docs/training.md). Nothing was stepped")
JOIN_OPTIMIZER_FIRST = (
    "FusedSaLSa is the first joinable of torch.distributed.algorithms.Join: the first one announces each rank's "
    "iteration, before the model's forward, which the optimizer's step follows. List the model first: "
    "Join([model, opt], throw_on_early_termination=True). Nothing was stepped")


@dataclass
class _StepHandoff:
    """What a caller hands the next step: ``mark_forward()``'s random state, ``bind_closure()``'s
    closure and loss, ``zero_grad()``'s random state and zeroed gradients (id -> (grad, version)).

    One mutable object, so framework wrappers that run FusedSaLSa's methods on themselves
    (Lightning's ``LightningOptimizer`` forwards attribute reads to the optimizer, older versions
    copy its ``__dict__``) write into the optimizer's own handoff, not into a copy.
    """

    forward_rng: Optional[RNGSnapshot] = None
    #: the random state at zero_grad(), or where the last two-phase step left it when none came since
    zero_grad_rng: Optional[RNGSnapshot] = None
    step_end_rng: Optional[RNGSnapshot] = None  # the latter, kept to tell the two apart
    bound_step: Optional[tuple] = None
    zeroed: Dict[int, tuple] = field(default_factory=dict)


_ASKED_FOR = {_backends.FOREACH_BACKEND: "the torch backend (foreach ops)", _backends.FUSED: "compiled kernels"}


class _JoinedRankRefusal(JoinHook):
    """The join hook of :class:`FusedSaLSa`: a search's collectives cannot be shadowed (how many a step runs
    depends on its trials), so a rank that ran out of inputs raises where it would shadow them, as its peers
    refuse their step (:meth:`FusedSaLSa._refuse_unshadowed_join`)."""

    def main_hook(self) -> None:
        raise RuntimeError(JOIN_UNSHADOWED)


class FusedSaLSa(Checkpointing, Diagnostics, Optimizer, Joinable):
    r"""SaLSa (Stable Armijo Line Search Adaptation) on fused multi-tensor passes.

    Adam's direction ``d = g / (sqrt(v_hat) + eps)`` (or ``m_hat / (sqrt(v_hat) + eps)``
    with ``search_direction="momentum"``) and a level ``eta`` (the step along ``d``) found by backtracking
    until the smoothed decrease ``beta3*h + (1-beta3)*(f(w) - f(w - eta*d))`` reaches
    ``c * eta * s``, ``s`` the smoothed slope ``q = sum(search_lr * g * d)`` (the preconditioned gradient norm along
    the default direction; along ``search_direction="momentum"`` a slope that can be negative). The search runs at
    least every ``max_search_interval`` steps, more often while ``eta`` moves. With its
    defaults this reproduces the published ``salsa-optimizer`` 0.1.0 step for step.

    Args:
        params: parameters or param groups (per group: ``lr``, ``betas``, ``eps``, ``weight_decay``).
        lr: multiplier on the level ``eta`` (1.0: none), not a step size. A group's lr at
            construction is kept as its ``search_lr``: trials probe ``search_lr * eta`` and ``q``
            sums ``search_lr * g.d`` over groups. A scheduler's later ``lr`` scales only the
            applied step, by ``lr / search_lr``: a warmup from 0 warms up (the first steps move
            less) while the search keeps finding the level. A group with ``lr=0`` keeps its
            weights; with every group at 0 a step searches nothing (no trial forward, eta kept)
            until a group gets a positive lr. A group built at 0 then gets ``search_lr`` 1 (the
            neutral multiplier), so a warmup of ``lr`` by hand from 0 to 1 ends at the searched
            step, as a scheduler's warmup from 0 does.
        init_step_size: the level ``eta`` before the first search (``None``: 1.0). A schedule that stops
            the search before any search ran is refused unless it is given: the level is then the
            caller's, not a default.
        c: Armijo constant in (0, 1).
        betas: Adam's (beta1, beta2).
        beta3: smoothing of both sides of the Armijo test.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decoupled, ``w -= weight_decay * lr * s * eta * w`` each step (``s`` the
            schedule's scale; every applied quantity is formed in :mod:`salsa_fused.applied`).
        search_direction: ``"gradient"`` (0.1.0's default) or ``"momentum"`` (its ``use_mv``).
        adaptive_interval: search every ``L`` steps (True) or on every step (False).
        growth, backtrack, max_trials: the first trial is ``growth * eta``; each failed trial is
            followed by one ``backtrack`` times smaller, at most ``max_trials`` per search.
        max_search_interval, always_search_steps: search when ``L`` steps have passed since the
            last search, ``L = min(max_search_interval, 1 / (r - 1))`` with ``r`` the ratio of a
            fast and a slow average of ``eta``; always in the first ``always_search_steps`` steps
            (docs/api.md has every argument's default and meaning).
        restore: ``"copy"`` keeps a copy of the weights for exact trials and restores (one
            extra weight-sized buffer); ``"inplace"`` moves the weights by differences
            (no extra memory, one rounding per trial).
        backend: ``"auto"`` (triton on CUDA when it can run; cpp on the CPU when the C++
            extension is built, else torch with a one-time warning), ``"torch"`` (the reference,
            step for step 0.1.0's arithmetic), ``"triton"``, ``"cpp"``, ``"cuda"`` (the extension's
            CUDA kernels, where it was built with them), or a name added with
            :func:`salsa_fused.backends.register_backend`; chosen and checked here (a backend
            that cannot run raises with the reason).
        maximize, capturable, differentiable, amsgrad: torch.optim's flags, accepted at ``False``
            (their default) and refused otherwise, with the reason: the search minimizes the
            closure's loss on the host, and keeps Adam's two moments only.
        foreach, fused: torch.optim's flags, read as a choice of backend (one for every group):
            ``fused=True`` (or ``foreach=False``) asks for compiled kernels, ``"auto"`` then
            picking triton (or the extension's CUDA kernels) on CUDA and cpp on the CPU, and
            raising with the reason where none runs; ``foreach=True`` (or ``fused=False``) asks
            for the torch backend (``torch._foreach_*`` ops). ``None``: ``backend`` decides.
            Flags that contradict each other or ``backend`` raise ValueError. A group's own flags
            pass at ``None`` or where they ask for this backend; others are refused
            (:meth:`_refuse_another_backend`).
        nonfinite: ``"raise"`` a :class:`NonFiniteError` or ``"skip"`` (and count) a step whose
            loss or gradient is NaN/inf. Nothing non-finite is ever written either way.
        reduction: how losses and ``q`` are reduced across ranks (default: losses averaged
            over the world when ``torch.distributed`` is initialized).
        search_rule: a rule name (``"salsa"``, the default: the published smoothed Armijo
            test; ``"sls"``, ``"alsals"``: seed 001's, :mod:`salsa_fused.adam_sls`; ``"labpal"``,
            ``"labpal_sgd"``: seed 003's, :mod:`salsa_fused.labpal`, whose closure takes a batch
            index, below) or an object
            with :class:`salsa_fused.rules.SearchRule`'s methods. A search argument (``c``,
            ``beta3``, ``growth``, ``backtrack``, ``max_trials``, the interval settings,
            ``search_direction``) given by name that the rule does not read raises ValueError.
        schedule: ``None``, or an object with ``scale(step)`` (a multiplier on the applied
            step; trials still probe the level) and ``searches(step)`` (False
            freezes the level), e.g. :class:`salsa_fused.step_size.WarmupStableDecay`.
        model: the module holding every module the closure runs (a GAN's two optimizers both take
            ``torch.nn.ModuleList([G, D])``), or ``None``. Given, the buffers of its modules that
            track running statistics (``track_running_stats``: BatchNorm, SyncBatchNorm, tracked
            InstanceNorm) are put back after a search's extra forwards, so they end as the step's
            one training forward left them (the integrations pass it).

    ``step(closure)`` runs ``closure()`` (forward, returns the scalar loss) and the backward
    itself; ``loss.backward(); step(closure, loss=loss)`` is the two-phase form for loops
    that do their own backward. Trial forwards run under ``torch.no_grad()``. Under a rule that
    reads several batches per step (``"labpal"``) the closure is ``closure(i)``, the loss of batch
    ``i`` of the step (:class:`salsa_fused.rules.Batches` gives the contract, :meth:`next_batches`
    the counts of the next step).
    """

    _step_supports_amp_scaling = True

    @refuse_unread_search_arguments
    def __init__(self, params, lr: float = 1.0, *, init_step_size: Optional[float] = None, c: float = 0.5,
                 betas: Tuple[float, float] = (0.9, 0.999), beta3: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, search_direction: str = GRADIENT,
                 adaptive_interval: bool = True, max_search_interval: int = 10,
                 always_search_steps: int = 9, growth: float = 1.1, backtrack: float = 0.8,
                 max_trials: int = 100, restore: str = "copy", backend: str = "auto",
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, nonfinite: str = "raise", reduction: Optional[SearchReduction] = None,
                 search_rule: Optional[Callable] = None, schedule=None,
                 model: Optional[torch.nn.Module] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, amsgrad: bool = False, **unexpected):
        if unexpected:
            raise TypeError(unexpected_arguments(unexpected, FusedSaLSa.__init__))
        refuse_a_zero_redundancy_shard()
        refuse_unsupported_flags(maximize=maximize, capturable=capturable, differentiable=differentiable,
                                  amsgrad=amsgrad)
        self._init_step_size_given = init_step_size is not None
        init_step_size = 1.0 if init_step_size is None else init_step_size
        if (isinstance(init_step_size, bool) or not isinstance(init_step_size, numbers.Real)
                or not (math.isfinite(as_float("init_step_size", init_step_size))
                        and FLOAT32_TINY <= float(init_step_size) <= FLOAT32_MAX)):
            raise ValueError(f"init_step_size must be a finite number > 0 that float32 holds, from {FLOAT32_TINY:.4g} "
                             f"(below it the passes move by 0 or a subnormal) to {FLOAT32_MAX:.4g}, got "
                             f"{init_step_size!r}")
        if search_direction not in SEARCH_DIRECTIONS:
            raise ValueError(f"search_direction must be one of {SEARCH_DIRECTIONS}, got {search_direction!r} "
                             "(the raw gradient is a rule's direction: search_rule='labpal')")
        if restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore must be one of {RESTORE_STRATEGIES}, got {restore!r}")
        if backend not in _backends.names():
            raise ValueError(f"backend must be one of {_backends.names()}, got {backend!r}")
        backend = _backends.name_for_flags(backend, foreach, fused)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.search_config = SearchConfig(
            c=c, beta3=beta3, growth=growth, backtrack=backtrack, max_trials=max_trials,
            max_search_interval=max_search_interval, always_search_steps=always_search_steps,
            adaptive_interval=adaptive_interval)
        self.search_config.validate()
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.search_rule = resolve_rule(search_rule)
        checked_direction(self.search_rule, search_direction)  # a rule's own direction() checked now, not at a step
        self.schedule = schedule
        self.search_direction = search_direction
        self.restore_strategy = restore
        self.backend_name = backend
        self.foreach, self.fused = foreach, fused
        self.nonfinite = nonfinite
        self.init_step_size = float(init_step_size)
        self.model = model
        Joinable.__init__(self)  # Join sets its _join_config: read by _refuse_unshadowed_join
        self._device: Optional[torch.device] = None
        self._buckets = BucketCache()
        # weakly, by identity: a parameter swapped out of param_groups leaves with its copy (a dict kept every one)
        self._saved: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._counts: Optional[F.DeviceCounts] = None
        self._handoff = _StepHandoff()  # mark_forward(), bind_closure(), zero_grad(): for the next step
        self._in_step = False  # a step() is running: one called from inside it is refused
        self._auto_fallback_warned = False  # the one-time warning of "auto" sent to the torch backend
        self._start_watchers()
        defaults = dict(lr=lr, betas=as_pair(betas), eps=eps, weight_decay=weight_decay)
        refuse_a_set(params)  # torch.optim refuses one only inside a group
        super().__init__(params, defaults)
        refuse_shared_storage([p for group in self.param_groups for p in group["params"]], [],
                               refused="nothing was built")  # each group was compared with itself as it came
        if model is not None:
            refuse_a_model_of_other_parameters(model, self.param_groups)
        #: The live search state; state_dict()/load_state_dict() carry it as a dict.
        self._search = SearchState(step_size=self.init_step_size)
        # Detected after the groups exist: sharded DTensor params (FSDP2) also reduce q.
        self._reduction_given = reduction is not None
        if reduction is not None:
            check_reduction(reduction, [p for group in self.param_groups for p in group["params"]])
        self.reduction = reduction if reduction is not None else default_reduction(
            p for group in self.param_groups for p in group["params"])
        #: The backend module, chosen and checked here, once (raises with the reason it cannot run).
        self.backend = _backends.resolve(backend, self._device or torch.device("cpu"))
        self._fit_backend(self.param_groups)
        _load_accelerate_integration_if_imported()

    # ------------------------------------------------------------------ setup

    def _check_moves_fit_float32(self, plan, scale: float) -> None:
        """Refuse, before anything is written, a step whose moves float32 cannot hold: the passes take
        the step sizes in float32, where they would be inf and write inf weights (a scheduler's huge
        ``lr``, a level loaded from elsewhere). Checked: the first trial ``lr_g * eta * growth``, the
        applied step ``lr_g * s * eta * growth`` (no accepted trial is larger) and the decay. A level that grew
        untested (SaLSa's guard) is named as the cause where the move at the last tested level, ``growth ** n``
        times smaller, would have passed: then no lr or weight_decay set it."""
        untested = plan.state.untested_searches
        try:
            grown_by = self.search_config.growth ** untested if untested else 1.0
        except OverflowError:  # past float64 (a checkpoint's count of thousands): every move fitted there
            grown_by = math.inf
        grown = (f"; the level grew untested at the last {untested} search(es) in a row, by growth at each (each read "
                 f"a loss of exactly 0 or a smoothed slope under {MIN_SLOPE_AVG:g}, where SaLSa's rule moves without "
                 "a trial): a run that has converged, or a loss scaled far down (docs/api.md, 'A loss of exactly "
                 "zero')" if untested else "")
        for index, group in enumerate(self.param_groups):
            probing = as_the_step_sees(group)
            group_step = GroupStep.of(probing, scale, self._decay_level(plan.state))
            moves = {"the first trial": group_step.trial(plan.trial_step_size).step,
                     "the applied step": group_step.plain(plan.trial_step_size).step,
                     "the weight decay": Hyper.for_step(probing, 0).shrink(group_step.decay)}
            for what, size in moves.items():
                if not fits_float32(size):
                    raise ValueError(
                        f"param_groups[{index}]: {what} would be {size:.4g} times the direction, more than "
                        f"float32 holds ({FLOAT32_MAX:.4g}): lr={group['lr']!r}, search_lr={probing['search_lr']!r}, "
                        f"the level {plan.state.step_size:.4g}, the schedule's scale {scale:.4g}"
                        f"{grown if fits_float32(size / grown_by) else ''}; nothing was written")
            shrink = moves["the weight decay"]
            if shrink > 1.0:
                raise ValueError(
                    f"param_groups[{index}]: the weight decay would take {shrink:.4g} of the weights this step "
                    f"(weight_decay={group['weight_decay']!r} times the decay step lr * s * eta = "
                    f"{group_step.decay:.4g}); above 1 the decoupled decay w * (1 - weight_decay * lr * s * eta) "
                    "flips the weights' sign, and above 2 grows them until they overflow. "
                    + (f"The level is {plan.state.step_size:.4g}{grown}; nothing was written"
                       if untested and shrink / grown_by <= 1.0 else
                       "Lower weight_decay (as AdamW's lr * weight_decay, it must stay below 1); nothing was written"))

    def _refuse_inside_step(self, call: str, done: str) -> None:
        """Refuse ``call`` made from inside this optimizer's own step (its closure, a hook run in it): the step
        has collected the moments and groups it writes, and would finish on them, half of the old state and half
        of the new, without a word."""
        if self.__dict__.get("_in_step", False):
            raise RuntimeError(f"{call} was called from inside this {type(self).__name__}'s own step (its closure, or "
                               "a hook that runs in it): the step is half made, on the groups and moments it "
                               f"collected. Call it between steps; {done}")

    def add_param_group(self, param_group: dict) -> None:
        self._refuse_inside_step("add_param_group()", "nothing was added")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, as torch.optim takes it ({{'params': [...], ...}}), got "
                            f"{type(param_group).__name__}; nothing was added")
        if "params" not in param_group:
            raise ValueError(f"param_group has no 'params' (its keys: {sorted(map(str, param_group))}); nothing "
                             "was added")
        refuse_unsupported_flags(**{name: param_group[name] for name in UNSUPPORTED_FLAGS if name in param_group})
        params = param_group["params"]
        refuse_a_set(params)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator is consumed once, above
        if "betas" in param_group:
            param_group["betas"] = as_pair(param_group["betas"])
        candidate = {**self.defaults, **param_group, "params": params}
        validate_group_hyper(candidate)
        self._refuse_another_backend(candidate, f"param_groups[{len(self.param_groups)}]",
                                     "the group was not added" if "backend" in self.__dict__ else "nothing was built")
        devices = {self._device} if self._device is not None else set()
        # (name, tensor) pairs of named_parameters(): torch keeps the names in "param_names"
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p
                   for p in params]
        if not OPTIMIZER_KEEPS_PARAMETER_NAMES and any(t is not p for t, p in zip(tensors, params)):
            raise TypeError(f"FusedSaLSa takes model.named_parameters() where torch.optim keeps the names, from torch "
                            f"2.6 on; this is torch {torch.__version__}: pass model.parameters() (or upgrade torch)")
        for p in tensors:
            check_parameter(p)
            devices.add(p.device)
        meta = [t for t in tensors if t.device.type == "meta"]
        on_meta = (f"a parameter of shape {tuple(meta[0].shape)} is on the meta device, which holds no values to "
                   "update: materialize the model first (model.to_empty(device=...) and its initialization) and "
                   "build the optimizer on its parameters" if meta else "")
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(f"FusedSaLSa needs all parameters on one device, got {names}"
                             + (f"; {on_meta}" if meta else ""))
        if meta:
            raise ValueError(on_meta)
        if len(set(map(id, tensors))) != len(tensors):  # torch.optim warns; the backends would disagree
            raise ValueError("a parameter group lists the same parameter more than once")
        if SEARCH_KEY in param_group:
            raise ValueError(f"a param group has the key {SEARCH_KEY!r}, which state_dict() keeps for the search "
                             "state: name it otherwise (the group was not added)")
        built = "_search" in self.__dict__  # torch's __init__ is done
        refuse_shared_storage(tensors, [p for group in self.param_groups for p in group["params"]],
                               memory_of_existing=built,
                               refused="the group was not added" if built else "nothing was built")
        reduction = self.__dict__.get("reduction")
        if built and reduction is not None and reduction.shard_group is not None and not self._reduction_given:
            # the sharding detected at the build (FSDP2) holds the new parameters too: a plain one added (a learned
            # temperature outside fully_shard) took no averaged gradient, its share of q counted once per rank, and
            # the ranks' copies parted with every check passing (an FSDP2 audit's find)
            try:
                shard_group_of([p for group in self.param_groups for p in group["params"]] + tensors)
            except ValueError as error:
                raise ValueError(f"{error} (a group added to an optimizer of FSDP2-sharded parameters); the group "
                                 "was not added") from None
        param_group.setdefault("search_lr", candidate["lr"])  # what trials probe at (see lr)
        search = self.__dict__.get("_search")  # None while torch's __init__ adds the first groups
        taken = search.step if search is not None else 0
        if MOMENTS_START in param_group:
            start = param_group[MOMENTS_START]
            if not valid_step_count(start, taken):
                raise ValueError(f"param group key {MOMENTS_START!r} is the step count at which the group was added, "
                                 f"an int from 0 to the optimizer's {taken} steps, got {start!r} (the group was not "
                                 "added)")
        elif taken > 0:  # its moments start now: Adam's bias corrections count its own steps
            param_group[MOMENTS_START] = taken
        super().add_param_group(param_group)
        if devices:
            self._device = devices.pop()
        if "backend" in self.__dict__:  # a group added after construction
            try:
                self._fit_backend(self.param_groups[-1:], first_index=len(self.param_groups) - 1)
            except Exception:
                self.param_groups.pop()  # refused: not added, as torch.optim refuses a group
                raise
        for p in self.param_groups[-1]["params"]:
            if p.requires_grad:
                self._init_state(p)
        if built and self.__dict__.get("model") is not None:  # a group added after construction, with model=
            warn_of_parameters_outside_the_model(self.model, set(map(id, tensors)), "of the group added")
        if self.__dict__.get("_lr_checked") or self.__dict__.get("_lr_rising"):  # past the first step's look
            self._warn_if_group_lr_looks_like_a_step_size(len(self.param_groups) - 1, self.param_groups[-1])

    def _refuse_another_backend(self, group: dict, where: str, after: str) -> None:
        """Refuse ``group`` (named ``where``) whose ``foreach``/``fused`` asks for another backend than this
        optimizer's, one for every group; ``None`` (a torch.optim checkpoint's) and a flag that asks for the
        backend chosen pass. ``after``: what the refusal left as it was."""
        given = {name: group[name] for name in BACKEND_FLAGS if group.get(name) is not None}
        if not given:
            return
        flags = ", ".join(f"{name}={value!r}" for name, value in given.items())
        chosen = self.backend_name
        kind = _backends.FUSED if chosen in _backends.KERNEL_BACKENDS else chosen
        try:
            asked = _backends.name_for_flags(_backends.AUTO, given.get("foreach"), given.get("fused"))
        except (TypeError, ValueError) as error:
            asked, problem = None, f" ({error}):"
        if asked == kind:
            return
        built = ", ".join(f"{name}={value!r}" for name, value in (("foreach", self.foreach), ("fused", self.fused))
                          if value is not None)
        backend = "compiled kernels" if chosen == _backends.FUSED else (
            f"backend={chosen!r}" if chosen == _backends.AUTO else f"the {chosen!r} backend")
        backend += f" ({built})" if built else ""
        them = "it" if len(given) == 1 else "them"
        remedy = f"set the group's {' and '.join(map(repr, given))} to None (or leave {them} out)"
        if asked is not None:
            problem = f", which asks for {_ASKED_FOR[asked]}, but"
            remedy += (f", or build the optimizer with {flags} to run every group so (a group on another backend "
                       "needs an optimizer of its own)")
        raise ValueError(f"{where} has {flags}{problem} FusedSaLSa runs one backend for every group, chosen at "
                         f"construction: {backend}; {remedy}; {after}")

    def _fit_backend(self, groups: List[dict], first_index: int = 0) -> None:
        """A parameter the backend cannot take (``backend.unsupported``: float64 or a strided view
        for Triton) sends ``"auto"`` to the torch reference and is refused for a named backend."""
        unsupported = getattr(self.backend, "unsupported", None)
        if unsupported is None:
            return
        for i, group in enumerate(groups, start=first_index):
            for j, p in enumerate(group["params"]):
                reason = unsupported(p)
                if reason is None:
                    continue
                if self.backend_name == _backends.AUTO:
                    kernels = self.backend.name
                    self.backend = _backends.resolve("torch", self._device or torch.device("cpu"))
                    if not self._auto_fallback_warned:
                        self._auto_fallback_warned = True
                        params = [q for g in self.param_groups for q in g["params"]]
                        if all(unsupported(q) is not None for q in params):
                            advice = (f"none of its {len(params)} parameters suits those kernels: make them dense "
                                      "float32/bfloat16/float16 tensors to run them")
                        else:
                            advice = ("FusedSaLSa runs one backend for all its parameters: give that tensor an "
                                      "optimizer of its own, or make it a dense float32/bfloat16/float16 tensor, "
                                      f"and the others keep the {kernels} backend")
                        warnings.warn(
                            f"salsa_fused: backend='auto' runs every parameter on the torch backend (the reference, "
                            f"slower than the compiled {kernels} kernels) because param_groups[{i}]['params'][{j}] "
                            f"is {reason}; {advice}; backend='torch' says you chose this",
                            RuntimeWarning, stacklevel=caller_stacklevel())
                    return
                flags = ", ".join(f"{k}={v}" for k, v in (("foreach", self.foreach), ("fused", self.fused))
                                  if v is not None)
                if self.backend_name == _backends.FUSED:  # asked for by the flags, with backend="auto"
                    remedy = f"drop {flags} (the default picks the torch backend for it) or pass foreach=True"
                else:
                    flags = f"backend={self.backend_name!r}" + (f" ({flags})" if flags else "")
                    remedy = "use backend='torch' or 'auto'"
                raise ValueError(f"{flags} cannot take param_groups[{i}]['params'][{j}]: it is {reason} "
                                 f"for the {self.backend.name} backend; {remedy}")

    def _init_state(self, p: torch.Tensor) -> dict:
        """p's state, its moments created fp32 in p's memory layout, or laid out again in it (the
        compiled kernels stream one layout per tensor): ``model.to(memory_format=...)`` after
        construction, or a checkpoint saved in another layout, changes the weight's layout. Made
        outside ``torch.inference_mode()`` (an optimizer built under it): the steps write them in place."""
        state = self.state[p]
        with torch.inference_mode(False):
            if "exp_avg" not in state and "exp_avg_sq" not in state:  # none yet (check_moments refuses one alone)
                state["exp_avg"], state["exp_avg_sq"] = zero_moments(p)
            for name in MOMENT_KEYS:
                moment = state.get(name)
                if moment is not None and local_shard(moment).stride() != local_shard(p).stride():
                    relaid = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    with torch.no_grad():
                        relaid.copy_(moment)
                    state[name] = relaid
        return state

    # ------------------------------------------------------------------ search state
    @property
    def search_state(self) -> SearchState:
        """A copy of the search's scalars (k, eta, h, s, eta_fast, eta_slow, t, counters)."""
        return deepcopy(self._search)

    def _commit(self, state: SearchState) -> None:
        self._search = state

    @property
    def step_size(self) -> float:
        """The level ``eta``: what the search found (before ``lr``, the schedule and the growth
        factor; docs/api.md, "Words")."""
        return self._search.step_size

    @property
    def applied_steps(self) -> List[float]:
        """Per group, the step the next step applies when it does not search (where it searches, its first
        trial): ``lr * s * t``, ``t`` the plan's first trial (``eta * growth``; ``eta * 2^(1/b)`` for seed 001's
        rules; LABPAL's fitted rate, 0 before its first fit), as the step plans it: without a search where the
        schedule stops searching or no group moves (the rule's ``without_search``); ``s`` the schedule's scale at the
        next step, past a schedule's end the scale it holds there, capped at the hold
        ``search_state.scale_hold`` when it is > 0 (past the warm-up of a ``decay_from_hold`` schedule, scaled
        by ``h / peak`` instead) and times the back-off
        ``search_state.applied_backoff`` of ``backoff_on_loss_rise``:
        :func:`salsa_fused.step_size.applied_scale`)."""
        state, plan = self._plan_ahead()
        scale = applied_scale(self.schedule, state, plan.state.step)
        return [GroupStep.of(as_the_step_sees(group), scale, state.step_size).plain(plan.trial_step_size).step
                for group in self.param_groups]

    def _plan_ahead(self) -> Tuple[SearchState, StepPlan]:
        """The state the next step starts from and its plan, as :meth:`step` decides them: the level frozen where
        the schedule freezes it, and no search (the rule's ``without_search``) where the schedule stops searching or
        no group moves. What :attr:`applied_steps` and :meth:`next_batches` report."""
        rule, config, schedule = self.search_rule, self.search_config, self.schedule
        state = freeze_if_collapsed(schedule, self._search, self._search.step + 1, rule)
        plan = plan_step(rule, state, config)
        if plan.is_search and not (schedule_searches(schedule, state, plan.state.step) and self._some_group_moves()):
            plan = plan_without_search(rule, state, config, plan)
        return state, plan

    @property
    def schedule(self):
        """The step-size schedule (``None``, or an object with ``scale(step)`` and ``searches(step)``,
        e.g. :class:`salsa_fused.step_size.WarmupStableDecay`). Assigned here or at construction, it
        is checked alike before it is kept: its methods, its options, and its rule. Through a wrapper that
        subclasses the optimizer's class and forwards attribute reads (Lightning's ``LightningOptimizer``),
        both reach the wrapped optimizer's."""
        return getattr(self, "_schedule", None)

    @schedule.setter
    def schedule(self, schedule) -> None:
        wrapped = self.__dict__.get("_optimizer")
        if isinstance(wrapped, FusedSaLSa) and wrapped is not self:  # kept on the wrapper, it would never step
            wrapped.schedule = schedule
            return
        if schedule is not None and not (callable(getattr(schedule, "scale", None))
                                         and callable(getattr(schedule, "searches", None))):
            raise TypeError("schedule must have scale(step) and searches(step) methods, got "
                            f"{type(schedule).__name__}")
        if schedule is not None:  # a schedule of the caller's own: its options refused by name now, not at a step
            check_freeze_below(getattr(schedule, "freeze_below", 0.0))
            backs_off_on_loss_rise(schedule)
            if callable(getattr(schedule, "check_searches", None)):
                schedule.check_searches()
        check_freeze_rule(schedule, self.search_rule)
        planned_before = getattr(self.__dict__.get("_schedule"), "total_steps", None)
        self.__dict__["_schedule"] = schedule
        if getattr(schedule, "total_steps", None) != planned_before:  # a new plan: its end warns once in turn
            self.__dict__["_past_end_warned"] = False

    @property
    def effective_step_sizes(self) -> List[float]:
        """The earlier name of :attr:`applied_steps` (kept: the same list)."""
        return self.applied_steps

    def next_batches(self) -> Optional[Batches]:
        """Under a rule that reads several batches per step (``search_rule="labpal"``): how many
        the next step reads (:class:`salsa_fused.rules.Batches`: the two-phase form runs the
        backward of the first ``gradient`` itself); ``None`` for a rule whose closure takes no index."""
        return step_batches(self.search_rule, self._plan_ahead()[1])

    def _some_group_moves(self) -> bool:
        """Does a group with a positive ``lr`` now hold a parameter that requires grad? While none does
        nothing moves: no search runs (a group built at 0 gets ``search_lr`` 1 with its first positive
        ``lr``). Frozen or empty groups at a positive ``lr`` would give every search a slope of 0 (the
        groups at 0 add nothing to q), which 0.1.0's guard passes by growing the level untested."""
        return any(group["lr"] > 0 and any(p.requires_grad for p in group["params"]) for group in self.param_groups)

    @property
    def search_interval(self) -> float:
        """The interval ``L`` of the last step (searches come every ``ceil(L)`` steps past the first
        ``always_search_steps``). After step 1 it is ``max_search_interval``: the two averages of eta start
        equal, so ``L = min(L_max, 1 / (r - 1))`` has ``r = 1``; the first steps search whatever it says."""
        return self._search.search_interval

    @property
    def num_forward_evals(self) -> int:
        """Forwards run so far: one per step (its own, the closure's or the two-phase caller's) plus every
        trial forward of every search (docs/api.md says where a reference forward adds one)."""
        return self._search.num_forward_evals

    @property
    def num_searches(self) -> int:
        """Steps so far at which a search ran (its trials tested the level)."""
        return self._search.num_searches

    @property
    def num_backtracks(self) -> int:
        """Failed trials so far, each followed by one ``backtrack`` times smaller: a search of ``k`` trials
        adds ``k - 1``."""
        return self._search.num_backtracks

    @property
    def num_skipped_steps(self) -> int:
        """Steps that changed no weight because their loss or a search step's gradient was NaN/inf
        (``nonfinite="skip"``; docs/api.md, "NaN and inf")."""
        return self._search.num_skipped_steps

    @property
    def last_search_trials(self) -> int:
        """Trials of the last search (1 when its first trial, ``growth * eta``, passed)."""
        return self._search.last_trials

    @property
    def last_loss_decrease(self) -> float:
        """``f(w) - f(w - t d)`` at the last finite trial the search evaluated: the unsmoothed decrease
        that the smoothed Armijo test reads."""
        return self._search.last_loss_decrease

    def __repr__(self) -> str:
        """torch's listing of the groups, after the constructor's settings (a preset's optimizer and a hand-built
        one printed the same but for weight_decay)."""
        wrapped = self.__dict__.get("_optimizer")
        if isinstance(wrapped, FusedSaLSa) and wrapped is not self:  # Lightning's wrapper: the optimizer it wraps
            return repr(wrapped)
        if "backend" not in self.__dict__:  # a construction that raised (a debugger's or a traceback's look)
            return super().__repr__() if "param_groups" in self.__dict__ else f"{type(self).__name__} (not built)"
        rule = self.search_rule
        rule = rule.__name__ if isinstance(rule, type) else repr(rule)
        given = self.__dict__.get("_init_step_size_given", True)
        lines = [("backend", f"{self.backend_name!r} ({self.backend.name})"),
                 *((name, repr(value)) for name, value in (("foreach", self.foreach), ("fused", self.fused))
                   if value is not None),
                 ("search_direction", repr(self.search_direction)), ("search_rule", rule),
                 *((f.name, repr(getattr(self.search_config, f.name))) for f in dataclasses.fields(self.search_config)),
                 ("schedule", repr(self.schedule)),
                 ("init_step_size", repr(self.init_step_size) + ("" if given else " (none given: a placeholder)")),
                 ("restore", repr(self.restore_strategy)), ("nonfinite", repr(self.nonfinite)),
                 *((("model", type(self.model).__name__),) if self.model is not None else ()),
                 *((("reduction", type(self.reduction).__name__),) if self.__dict__.get("_reduction_given") else ())]
        search = "Search\n" + "".join(f"    {name}: {value}\n" for name, value in lines)
        head, _, groups = super().__repr__().partition("\n")
        return f"{head}\n{search}\n{groups}"

    def state_dict(self) -> dict:
        """As ``torch.optim``, with the search state in ``param_groups[0]["search"]`` (:mod:`salsa_fused.checkpoint`);
        the state-dict hooks see the whole of it (a post hook may return a replacement, as in torch)."""
        _load_accelerate_integration_if_imported()  # accelerate's prepare() reads it (device placement)
        return super().state_dict()

    #: What a copy (deepcopy, pickle, torch.save) keeps beside torch's defaults/state/param_groups;
    #: the backend is resolved again by name, caches and the hand-off to the next step start empty.
    _PICKLED = ("_search", "search_config", "search_rule", "_schedule", "search_direction",
                "restore_strategy", "backend_name", "foreach", "fused", "nonfinite", "init_step_size",
                "_init_step_size_given", "model", "_device", "_counts", "_reduction_given", "_auto_fallback_warned")

    def __copy__(self):
        raise TypeError(
            f"copy.copy() of {type(self).__name__} is refused: a shallow copy would share the moments (state) but "
            "not the search's step count, so each copy would apply bias corrections for steps the moments did not "
            "see; use copy.deepcopy(opt) for an independent copy, or opt.state_dict() and load_state_dict()")

    def __getstate__(self) -> dict:
        state = {**super().__getstate__(), **{name: self.__dict__[name] for name in self._PICKLED
                                               if name in self.__dict__}}
        if self.__dict__.get("_reduction_given"):
            state["reduction"] = self.reduction
        return state

    def __setstate__(self, state: dict) -> None:
        if "backend_name" not in state and "backend_name" not in self.__dict__ and "param_groups" in state:
            # pickled whole before __getstate__ (57bee1c): torch's three attributes, none of the search's
            raise TypeError(
                f"this {type(self).__name__} was pickled whole by a salsa_fused from before 2026-11-30 (57bee1c), "
                "which kept only torch.optim's defaults, param_groups and state, not its search configuration; this "
                "version cannot rebuild it. Unpickle it with the version that wrote it and save opt.state_dict(), "
                "which loads into a new optimizer across versions (docs/training.md); a state_dict is also what to "
                "save from now on")
        flags = set(state.get("defaults", self.__dict__.get("defaults", {})))
        super().__setstate__(state)
        if "differentiable" not in flags:  # torch's adds it: add_param_group would give a later group the key
            self.defaults.pop("differentiable", None)
        if "schedule" in self.__dict__:  # pickled before the schedule became a checked property
            self.__dict__["_schedule"] = self.__dict__.pop("schedule")
        for name, value in (("_buckets", BucketCache()), ("_saved", WeakIdKeyDictionary()), ("_counts", None), ("foreach", None),
                            ("fused", None), ("_init_step_size_given", True), ("_auto_fallback_warned", False),
                            ("_in_step", False)):
            self.__dict__.setdefault(name, value)
        self._start_watchers(keep=True)
        # load_state_dict() comes here too: a bind_closure()/mark_forward() it follows stays for the next step
        self.__dict__.setdefault("_handoff", _StepHandoff())
        if "_join_config" not in self.__dict__:  # not pickled: a copy is in no Join
            Joinable.__init__(self)
        if "backend_name" in self.__dict__:
            if "reduction" not in self.__dict__:  # the default: detected again where it is loaded
                self.reduction = default_reduction(p for group in self.param_groups for p in group["params"])
            self.backend = _backends.resolve(self.backend_name, self._device or torch.device("cpu"))
            self._fit_backend(self.param_groups)
        if "_search" not in self.__dict__:  # pickled with the search state in param_groups[0]
            saved = self.param_groups[0].pop(SEARCH_KEY, None) if self.param_groups else None
            self._search = SearchState.from_dict(saved) if saved is not None else SearchState()

    # ------------------------------------------------------------------ step
    def _collect_buckets(self, steps_taken: Optional[int] = None) -> List[Bucket]:
        """Buckets of the params that have gradients (kept across steps, see
        :mod:`salsa_fused.buckets`) at the step after ``steps_taken`` (the steps taken so far when not
        given); validates the gradients first."""
        saved = self._saved_buffer if self.restore_strategy == "copy" else None
        # a group built again (new weights: model.double(), model.half() ...) fits the backend first
        return self._buckets.collect(self.param_groups, self._init_state, saved, self.state, self._refit_backend,
                                     self._search.step if steps_taken is None else steps_taken)

    def _refit_backend(self) -> None:
        """The weights changed after construction: ``"auto"`` chooses again over all of them (a
        kernel backend or the torch reference), a named backend that cannot take one refuses it
        by name before anything is written."""
        if self.backend_name == _backends.AUTO:
            self.backend = _backends.resolve(_backends.AUTO, self._device or torch.device("cpu"))
        self._fit_backend(self.param_groups)

    def _saved_buffer(self, p: torch.Tensor) -> torch.Tensor:
        buffer, local = self._saved.get(p), local_shard(p)
        if buffer is None or ((buffer.shape, buffer.stride(), buffer.dtype, buffer.device)
                              != (local.shape, local.stride(), local.dtype, local.device)):
            buffer = torch.empty_like(local)  # new, or the param was cast or moved since
            self._saved[p] = buffer
        return buffer

    def _loss_tensor(self, value, what: str, need_grad: bool, closure: Optional[Callable] = None) -> torch.Tensor:
        """``value`` checked as a loss; ``what``: a closure call (``"closure()"``) or ``"loss"`` (step's argument),
        ``closure``'s own name for its call where it has one (:data:`CALL_NAME`)."""
        if (isinstance(value, torch.Tensor) and value.layout == torch.strided and value.numel() == 1
                and value.is_floating_point() and not value.is_complex() and not value.is_meta
                and (value.requires_grad or not need_grad)):
            return value
        if not need_grad and isinstance(value, numbers.Real) and not isinstance(value, bool):  # an ABC: a call
            return torch.tensor(float(value), dtype=torch.float32, device=self._device)
        what = what if closure is None else call_name(closure, what)
        must = f"{what} must return" if what.endswith(")") else f"step()'s {what}= must be"
        if not isinstance(value, torch.Tensor):
            if value is None and from_lightning_manual(closure):
                raise TypeError(
                    "step() ran Lightning's closure, which returns None in manual optimization, with nothing bound "
                    "and no backward run: bind the step first, after self.manual_backward(loss): "
                    "opt.bind_closure(lambda: <the loss of this batch>, loss=loss.detach()); opt.step() "
                    "(docs/integrations.md, examples/lightning_salsa.py); nothing was written")
            raise TypeError(f"{must} the loss as a scalar tensor{'' if need_grad else ' or a real number'}, "
                            f"got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{must} a dense loss, got a tensor of layout {value.layout} (a sparse reduction? "
                            "sum it to a dense scalar, e.g. loss.to_dense())")
        if value.numel() != 1:
            raise ValueError(f"{must} a loss of one element (a scalar, as loss.backward() takes), got a tensor of "
                             f"shape {tuple(value.shape)}")
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{must} a real floating-point loss, got {value.dtype}")
        if value.is_meta:
            raise ValueError(f"{must} a loss with a value, got a tensor on the meta device (shapes only: a "
                             "forward of a model still on 'meta'; move it with model.to_empty(device=...) and "
                             "initialize its weights before training)")
        if need_grad and not value.requires_grad:
            if torch.is_inference_mode_enabled() or value.is_inference():
                raise RuntimeError(f"{what} returned a loss with no grad path: it was computed under "
                                   "torch.inference_mode(), where no tensor gets one; call step() outside "
                                   "inference_mode (step() runs its backward itself)")
            raise RuntimeError(f"{what} returned a loss with no grad path (requires_grad=False): its "
                               "forward ran under torch.no_grad() (step() itself enables grad for the "
                               "closure), or the loss does not depend on the parameters")
        return value

    def _running_statistics(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) for the buffers of ``model``'s modules tracking running statistics,
        which every extra forward of a search would update."""
        return [(buffer, buffer.detach().clone()) for buffer in running_statistics(self.model)]

    def _trial_loss(self, closure: LossClosure, what: str = "closure()",
                    dtype: torch.dtype = torch.float32, step_losses: Sequence = (),
                    reruns: Optional[List[int]] = None) -> torch.Tensor:
        """``closure()`` under ``no_grad`` at the weights as they are: a 0-dim tensor of ``dtype``.
        The FSDP2 modules of ``model`` are resharded first, as :func:`fsdp_closure` does: the root
        keeps its parameters unsharded after a forward, and a trial would read them stale; so would a
        trial in an autocast region from autocast's cached casts (:func:`forget_autocast_casts`).
        ``step_losses``: :func:`losses_with_values` of the step's own losses; a trial loss that is one of
        them, or a view or ``detach()`` of one, still holding its value was not computed at the
        trial's weights: refused, unless one forward more (counted in ``reruns[0]``; in one process only, where
        it meets no peer's collectives) shows that the closure rewrites that memory (:func:`is_stale_loss`)."""
        for module in self._fsdp_modules():
            module.reshard()
        forget_autocast_casts()
        read = [{key: group[key] for key in GROUP_HYPER_KEYS + ("search_lr",) if key in group}
                for group in self.param_groups]
        with torch.no_grad(), without_buffer_broadcast(self._ddp_modules()):
            try:
                value = call_plain(closure)
            except RuntimeError as error:
                if NO_GRAPH in str(error):
                    raise RuntimeError(CLOSURE_BACKWARD_AT_TRIAL.format(what=what)) from error
                raise
        self._refuse_hyperparameters_written_by(what, read)
        loss = self._loss_tensor(value, what, need_grad=False)
        rerun = None
        if reruns is not None and not self.reduction.active:
            def rerun():
                reruns[0] += 1
                return closure()
        if is_stale_loss(loss, step_losses, rerun):
            raise RuntimeError(STALE_CLOSURE.format(what=what))
        return loss_scalar(loss, self._device, dtype)

    def _refuse_hyperparameters_written_by(self, what: str, read: List[dict]) -> None:
        """Refuse a trial forward that wrote a group's ``lr``, ``betas``, ``eps``, ``weight_decay`` or ``search_lr``
        (a scheduler stepped in the closure): the step checked and moves with the values it read at its start, and
        the closure's went unchecked (an ``lr`` of NaN surfaced as the weights' overflow). The values go back."""
        for index, (group, values) in enumerate(zip(self.param_groups, read)):
            written = [key for key, value in values.items() if not same_value(group.get(key), value)]
            if written:
                for key, value in values.items():
                    group[key] = value
                raise ValueError(f"{what} wrote param_groups[{index}]'s {', '.join(written)} during a forward of the "
                                 "search (a scheduler stepped in the closure?): the step checked, and moves with, the "
                                 "values it read at its start. Write them between steps; they are put back, and the "
                                 "weights and the optimizer's state are as before the step")

    def _modules_of_model(self, cached: str, find: Callable[[torch.nn.Module], list]) -> list:
        """``find(model)``, looked up once per ``model`` (kept in ``cached``): a framework's wrapper set in its
        place after the optimizer was built is looked up again; ``model=None``: none."""
        found = self.__dict__.get(cached)
        if found is None or found[0] is not self.model:
            found = self.__dict__[cached] = (self.model, find(self.model) if self.model is not None else [])
        return found[1]

    def _ddp_modules(self) -> list:
        """``model``'s ``DistributedDataParallel`` wrappers."""
        return self._modules_of_model("_ddp_module_list", ddp_modules)

    def _fsdp_modules(self) -> list:
        """``model``'s FSDP2 modules."""
        return self._modules_of_model("_fsdp_module_list", fsdp_modules)

    def _reshard_after_trials(self, closure) -> None:
        """After a search: the root keeps the last trial's weights unsharded (no backward followed
        its forward), and FSDP2's next forward would use them, not the move the step applied
        (which differs under a scheduler or a schedule's scale). Reshard ``model``'s FSDP2 modules,
        or those of an :func:`fsdp_closure`; the next forward all-gathers them anyway."""
        for module in self._fsdp_modules() or getattr(closure, "fsdp_modules", ()):
            module.reshard()

    def _sharded_groups(self) -> Sequence[dict]:
        """The param groups where the gradients are FSDP2's sharded DTensors, else none."""
        return self.param_groups if self.reduction.shard_group is not None else ()

    def _device_counts(self) -> F.DeviceCounts:
        if self._counts is None:
            self._counts = F.DeviceCounts.zeros(self._device)
        return self._counts

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim``; zeroed gradients kept as tensors are remembered (by version, no
        device read) so the one-phase form can tell them from gradients of a backward, and the
        random state, so the two-phase form can tell whether the caller's forward drew from it."""
        super().zero_grad(set_to_none)
        self._handoff.zero_grad_rng = RNGSnapshot.capture([self._device] if self._device is not None else [])
        self._handoff.zeroed = {} if set_to_none else {
            id(p.grad): (p.grad, p.grad._version) for group in self.param_groups
            for p in group["params"] if p.grad is not None}

    def _gradients_and_records(self):
        """(param, its gradient, the version :meth:`zero_grad` recorded for that very tensor, or
        ``None`` when it recorded none) for every present gradient."""
        zeroed = self._handoff.zeroed
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    recorded = zeroed.get(id(grad))
                    yield p, grad, recorded[1] if recorded is not None and recorded[0] is grad else None

    def _gradients_not_zeroed_here(self):
        """The gradients that :meth:`zero_grad` did not leave as they are now: present, and not the
        zeroed tensor it recorded at that version (a backward wrote them, or something else did)."""
        for _, grad, version in self._gradients_and_records():
            if version is None or version != grad._version:
                yield grad

    def _take_back_own_gradients(self) -> None:
        """After a one-phase step failed past its own backward: every gradient was ``None`` or a
        recorded zeroed tensor before it (checked), so a gradient the record does not hold is the
        backward's (back to ``None``) and one it holds is zeroed again (its new version recorded:
        a retry needs no device read). Nothing is read ahead of a failure: no cost per step."""
        zeroed = self._handoff.zeroed
        with torch.no_grad():
            for p, grad, version in list(self._gradients_and_records()):
                if version is None:
                    p.grad = None
                else:
                    grad.zero_()
                    zeroed[id(grad)] = (grad, grad._version)

    def _has_new_gradients(self) -> bool:
        """Has a backward run since ``zero_grad()``? (zeroed tensors compared by version)"""
        return next(self._gradients_not_zeroed_here(), None) is not None

    def _check_no_earlier_backward(self, closure: Optional[Callable] = None) -> None:
        """The one-phase form runs the backward itself: gradients of an earlier backward would be
        added to its own (the AdamW habit ``loss.backward(); opt.step(closure)``). Gradients this
        optimizer did not zero (``model.zero_grad(set_to_none=False)``) are read once: all zeros pass,
        and are remembered as zeroed (a device read on this path only; ``opt.zero_grad()`` avoids it)."""
        if self._has_new_gradients() and not self._remember_if_zeros():
            if from_lightning_manual(closure):
                raise RuntimeError(
                    "after a backward, step() got Lightning's closure (a closure passed to step() is inside it) "
                    "with no loss= and nothing bound, so it would run a backward of its own on top: in manual "
                    "optimization, after self.manual_backward(loss), bind the step: opt.bind_closure(lambda: <the "
                    "loss of this batch>, loss=loss.detach()); opt.step() (docs/integrations.md, "
                    "examples/lightning_salsa.py); nothing was written")
            raise RuntimeError(
                    "step(closure) runs the forward and the backward itself, but parameters already "
                    "have gradients (a backward ran before step(), or zero_grad() was not called): "
                    "they would be added to the step's own. Call this optimizer's zero_grad() before "
                    "step(closure) (under FSDP2 model.zero_grad() may not reach the sharded gradients), "
                    "or, to keep your own backward, use the two-phase form: "
                    "loss.backward(); step(closure, loss=loss). Under Lightning's automatic optimization "
                    "with accumulate_grad_batches the earlier micro-batches' backward left them: set "
                    "self.automatic_optimization = False and accumulate in the module, as "
                    "docs/integrations.md shows (accumulate_grad_batches and gradient_clip_val are "
                    "automatic-optimization flags)")

    def _remember_if_zeros(self) -> bool:
        """Are the gradients not zeroed by this optimizer all zeros? If so they are recorded as
        :meth:`zero_grad` records its own, and True. One device read for all of them."""
        unknown = list(self._gradients_not_zeroed_here())
        for p, grad, _ in self._gradients_and_records():
            if grad.layout != torch.strided:  # zeroed or not, no step takes it: named as such
                check_gradient(p, grad)
        with torch.no_grad():  # summed over the shard group under FSDP2, so every rank decides alike
            local = torch.stack([torch.count_nonzero(local_shard(g)).to(torch.float32) for g in unknown]).sum()
            nonzero = self.reduction.sum_over_shards(local.reshape(1))
        if float(nonzero) != 0:
            return False
        # the gradients there are now, all zeros: an earlier step's tensors (the caller zeroes new ones) are not kept
        self._handoff.zeroed = {id(g): (g, g._version) for _, g, _ in self._gradients_and_records()}
        return True

    def mark_forward(self) -> None:
        """Two-phase form with randomness (dropout): call right before the step's first forward
        (the first micro-batch under accumulation). The next step's trial forwards then replay
        the random state from this point, so a closure that draws as the caller's forwards did
        sees their masks. Without the mark they replay the state found at :meth:`zero_grad` (else
        where the last two-phase step left it; at a first step with neither, at the ``step()`` call)
        and, where the generators moved since, a search pays one reference forward at ``w0``.
        Either way the generators end where the caller's forwards left them."""
        devices = [self._device] if self._device is not None else []
        self._handoff.forward_rng = RNGSnapshot.capture(devices)

    def bind_closure(self, closure: LossClosure, *, loss=None) -> None:
        """Hand the next ``step()`` called without arguments its ``closure`` (and, with
        ``loss=``, the loss whose backward already ran: the two-phase form).

        For loops that call ``optimizer.step()`` themselves (Hugging Face ``Trainer``,
        accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): bind after the
        backward. The next step uses the binding and clears it (one given its own ``loss=`` clears it
        unused: a later ``step()`` never searches an older batch); a new binding replaces one not yet used.
        A wrapper that always passes a closure of its own (Lightning's, for its hooks) gets it
        called once; it must return ``None``, and the bound step runs.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if loss is not None:
            try:
                self._loss_tensor(loss, "loss", need_grad=False)
            except (TypeError, ValueError) as error:
                raise type(error)(str(error).replace("step()'s loss=", "bind_closure()'s loss=")) from None
        self._handoff.bound_step = (closure, loss)

    def step(self, *args, **kwargs):
        """One SaLSa step; returns the loss at the weights before the step.

        ``closure()`` must run the forward pass and return the scalar loss (no backward);
        with ``loss=`` the caller has already run forward and backward for this step.

        If the closure raises (or returns a bad value) during the trials, the exception
        propagates with the weights put back (bitwise with ``restore="copy"``, to rounding
        with ``"inplace"``), the moments bitwise (a search keeps a copy of m and v while it
        runs: 8 bytes per parameter) and the search state unchanged; in the one-phase form the
        random generators and ``model``'s running statistics go back to before the step's own
        forward (in the two-phase form, to where the caller's forward left them), and the
        gradients of the one-phase form's own backward are taken back: a caller may retry the
        step, and the retry runs the same forward.
        """
        if len(args) > 1 or (kwargs and (not kwargs.keys() <= {"closure", "loss"} or (args and "closure" in kwargs))):
            raise TypeError(step_call_error(args, kwargs))
        # torch wraps a step in its hooks and profiler range (Optimizer.profile_hook_step) at every call; here
        # only while a hook is registered or a profiler records (about a third of a plain step's host time).
        # A subclass's own step is wrapped by torch already: the hooks run there, once.
        if ((self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_optimizer_pre_hooks
             or _global_optimizer_post_hooks or torch.autograd._profiler_enabled())
                and type(self).step is FusedSaLSa.step):
            return self._hooked_step(*args, **kwargs)
        return self._unhooked_step(*args, **kwargs)

    @compile_disabled
    def _unhooked_step(self, closure: Optional[LossClosure] = None, *, loss=None):
        """:meth:`step` without torch's step hooks and profiler range."""
        if self._in_step:
            raise RuntimeError(
                f"step() was called again from inside this {type(self).__name__}'s own step (its closure, or a hook "
                "that runs in it, called opt.step()): the weights sit at a trial there and the step's state is half "
                "made. Call step() once per training step, from the training loop; this inner call did nothing")
        handoff = self._handoff
        pending = (handoff.forward_rng, handoff.zero_grad_rng, handoff.bound_step)
        for index, group in enumerate(self.param_groups):  # no call on the hot path but the refusal's
            if type(group) is not dict or "params" not in group or type(group["params"]) is not list:
                refuse_group_replaced_by_hand(index, group)
        probes = [group.get("search_lr") for group in self.param_groups]
        undo: List[Callable[[], None]] = []  # what the step did before it failed, undone
        self._in_step = True
        try:
            result = self._step(closure, loss, undo)
        except BaseException:
            # The step did not happen: what was handed to it waits for the retry, a group that
            # was to start probing at it has not, and the gradients of its own backward are gone.
            handoff.forward_rng, handoff.zero_grad_rng, handoff.bound_step = pending
            for group, probe in zip(self.param_groups, probes):
                if probe is not None:
                    group["search_lr"] = probe
            for action in undo:
                action()
            # GradScaler sets grad_scale/found_inf before step() and deletes them only after a
            # step that returns: drop them here so a later step cannot read a stale scale.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        finally:
            self._in_step = False
            forget_autocast_casts()  # the weights moved (or went back): a forward after the step reads them
            # the step has read its gradients: a caller that lets go of them without this optimizer
            # (model.zero_grad(), as HF Trainer does) must not find a gradient set kept through its next backward
            self._buckets.release_grads()
        two_phase = loss is not None or (pending[2] is not None and pending[2][1] is not None)  # bound with loss=
        if (two_phase and handoff.zero_grad_rng is None
                and (pending[1] is None or pending[1] is handoff.step_end_rng)):  # identity: tensors inside
            # no zero_grad() of this optimizer's (model.zero_grad(), p.grad = None): the next step reads
            # whether its caller's forward drew from here, and its trials replay from here
            handoff.zero_grad_rng = handoff.step_end_rng = RNGSnapshot.capture(
                [self._device] if self._device is not None else [])
        while self._deferred_warnings:  # once the step is whole: raised as an error (-W error), it undoes nothing
            warnings.warn(self._deferred_warnings.pop(0), RuntimeWarning, stacklevel=caller_stacklevel())
        return result

    #: torch's own wrapper: the step hooks, the profiler's range ``Optimizer.step#<class>.step``
    _hooked_step = Optimizer.profile_hook_step(_unhooked_step)
    step.__signature__ = inspect.signature(_unhooked_step)
    step.hooked = True  # torch.optim leaves a step so marked as it is (Optimizer._patch_step_function)

    def join_hook(self, **kwargs) -> JoinHook:
        """The hook torch's ``Join([model, opt], ...)`` runs on a rank that ran out of inputs: it raises, naming
        Join (a search's collectives cannot be shadowed); with ``throw_on_early_termination=True`` Join raises
        before it runs."""
        return _JoinedRankRefusal()

    @property
    def join_device(self) -> torch.device:
        return self._device or torch.device("cpu")

    @property
    def join_process_group(self):
        return self.reduction.loss_group if self.reduction.loss_group is not None else dist.group.WORLD

    def _refuse_unshadowed_join(self) -> None:
        """Refuse a step under a ``Join`` that lists this optimizer where a rank that runs out of inputs would
        leave its peers in the search's collectives: ``throw_on_early_termination=False``, or this optimizer
        listed first. Every rank refuses alike at its first step in it, before any collective or write. The
        optimizer then leaves the Join's setting (torch keeps it after the block), so that steps outside it run."""
        config = self._join_config
        if not config.enable or (config.throw_on_early_termination and not config.is_first_joinable):
            return
        Joinable.__init__(self)
        raise RuntimeError(JOIN_OPTIMIZER_FIRST if config.throw_on_early_termination else JOIN_UNSHADOWED)

    def _creates_state_as_distributed_checkpoint_asks(self) -> bool:
        """``torch.distributed.checkpoint.state_dict`` creates the state of an optimizer that has none (built
        while its parameters were frozen, say) by a step with no closure, every gradient zero and every
        ``lr`` 0: create the moments of the parameters with a gradient, move nothing, and say so (True).
        Read on the way to the refusal of a step without closure only, and only under that function (its state
        cleared by hand mid-run included): such a step of the user's own (a warm-up at lr 0, an opt.step() by
        habit) is refused as any step without closure."""
        checkpoint = sys.modules.get("torch.distributed.checkpoint.state_dict")
        if (checkpoint is None or self.state or any(group["lr"] != 0 for group in self.param_groups)
                or not called_from(getattr(checkpoint, "_init_optim_state", None), depth=12)):
            return False
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.layout != torch.strided or local_shard(p.grad).count_nonzero() for p in with_grad):  # one device read per tensor, this once
            return False
        for p in with_grad:
            self._init_state(p)
        return True

    def _step(self, closure: Optional[LossClosure], loss, undo: List[Callable[[], None]]):
        if self._join_config.enable:
            self._refuse_unshadowed_join()
        handoff = self._handoff
        if loss is None and handoff.bound_step is not None:
            wrapper_closure = closure
            (closure, loss), handoff.bound_step = handoff.bound_step, None
            if wrapper_closure is not None and wrapper_closure() is not None:
                raise RuntimeError("step(closure) was called with a closure returning a loss while a "
                                   "closure bound with bind_closure() was pending: call step() "
                                   "without arguments to run the bound step")
        elif handoff.bound_step is not None:  # given its loss, this step is the one the binding was for
            handoff.bound_step = None
        if closure is None:
            if loss is None and not any(p.grad is not None for g in self.param_groups for p in g["params"]):
                return None  # nothing to do, as torch.optim does for a step without gradients
            if loss is None and self._creates_state_as_distributed_checkpoint_asks():
                return None
            if loss is not None:
                raise TypeError(
                    "FusedSaLSa.step(loss=...) came without a closure: the search evaluates a function that "
                    "runs the forward pass and returns the loss at trial weights. A wrapper that steps "
                    "without the closure it was given (Lightning's 16-mixed GradScaler plugin) needs it "
                    "bound first: opt.bind_closure(closure, loss=loss); opt.step() (docs/integrations.md)")
            if self.next_batches() is not None:  # the integrations refuse such a rule: not the way out
                raise TypeError("FusedSaLSa.step() needs closure: this search rule reads several batches per step, "
                                "so closure(i) runs the forward pass on batch i of this step and returns its loss "
                                "(docs/api.md, several batches per step: closure(i))")
            if called_from_lightning():
                raise TypeError("FusedSaLSa.step() needs closure, and Lightning stepped without one: its automatic "
                                "optimization under 16-mixed with a GradScaler runs its closure (training_step "
                                "and the backward) itself, then steps without it, and a line search needs a "
                                "forward-only one. Set self.automatic_optimization = False and bind the step, as "
                                "docs/integrations.md shows: after self.manual_backward(loss), opt.bind_closure("
                                "lambda: <the loss of this batch>, loss=loss.detach()); opt.step(); nothing was "
                                "written")
            raise TypeError("FusedSaLSa.step() needs closure: a function that runs the forward pass "
                            "and returns the loss (SaLSa evaluates it at trial weights). Through a trainer "
                            "that calls step() itself: salsa_fused.integrations.transformers.SaLSaTrainer for "
                            "HF Trainer, salsa_fused.integrations.accelerate.SaLSaAccumulation for accelerate, or opt.bind_closure(closure) before "
                            "its step (docs/integrations.md)")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if "accelerate" in sys.modules and _ACCELERATE_INTEGRATION not in sys.modules:  # no call on the hot path
            _load_accelerate_integration_if_imported()  # built before accelerate's import: refusals from now on
        # Schedulers and users write here: check before any write. Groups whose every value read is
        # as it was at the last step that checked them (types too) are not checked again.
        hyper_keys = list(map(hyper_key, self.param_groups))
        checked = self.__dict__.get("_checked_hypers")
        for index, (group, key) in enumerate(zip(self.param_groups, hyper_keys)):
            if key is None or checked is None or index >= len(checked[0]) or key != checked[0][index]:
                validate_group_hyper(group, GROUP_HYPER_KEYS + ("search_lr",))
                self._refuse_another_backend(group, f"param_groups[{index}]", "nothing was written")
                start = group.get(MOMENTS_START, 0)
                if not valid_moments_start(start, self._search.step):
                    raise ValueError(f"param_groups[{index}] has {MOMENTS_START}={start!r} (set by hand): the step "
                                     f"count at which the group was added, an int up to the optimizer's "
                                     f"{self._search.step} steps (below 0 for moments that came with another "
                                     "optimizer's steps); Adam's bias corrections count from it; nothing was "
                                     "written")
        unscaled = None  # the one-phase form under a GradScaler, refused
        if loss is None and getattr(self, "grad_scale", None) is not None:
            unscaled = RuntimeError("under torch.amp.GradScaler use the two-phase form: "
                                    "scaler.scale(loss).backward(); scaler.step(opt, closure, loss=loss) "
                                    "(step() would run an unscaled backward itself)")
            if self.reduction.loss_group is None:
                raise unscaled
        if loss is None:
            self._check_no_earlier_backward(closure)
        if not self._lr_checked:
            # the lrs a rising scheduler's look records are this step's: a step that raises has not seen them
            undo.append(functools.partial(setattr, self, "_lr_rising", self._lr_rising))
            self._warn_if_lr_looks_like_a_step_size()
        rule, config = self.search_rule, self.search_config
        # kept once the step commits; freeze_below is checked with the rule here (a schedule assigned later)
        schedule = self.schedule  # a property: read once (nothing in this step assigns it)
        state = freeze_if_collapsed(schedule, self._search, self._search.step + 1, rule)
        backs_off_on_loss_rise(schedule)  # a schedule's options are checked before anything is written
        plan = plan_step(rule, state, config)
        scale = applied_scale(schedule, state, plan.state.step)
        if schedule is not None:
            if not self._past_end_warned:
                self._past_end_warned = warn_past_end(schedule, plan.state.step, state)
            if plan.is_search and not self._stacked_scheduler_warned:
                self._stacked_scheduler_warned = self._warn_if_a_scheduler_shapes_the_schedule()
            if not self._collapse_checked and not schedule.searches(plan.state.step):
                self._collapse_checked = True  # once, at the first frozen step
                warn_collapsed_level(schedule, state, plan.state.step)
            if plan.is_search and not schedule_searches(schedule, state, plan.state.step):
                if state.num_searches == 0 and not self._init_step_size_given:
                    stops = f"the schedule stops the search at step {plan.state.step}, before any search has run: "
                    level = (f"the level would stay at the default init_step_size ({self.init_step_size:g}) for the "
                             f"whole run ({type(schedule).__name__})")
                    if state.step == 0:
                        raise ValueError(
                            f"{stops}{level}. Let it search first, e.g. Cooldown(start, steps) with start >= 1 (the "
                            "first step searches), or pass init_step_size= for a level of your own. Nothing was "
                            "stepped")
                    raise ValueError(
                        f"{stops}none of steps 1-{state.step}, its search phase, searched, since no group could move "
                        "there: every param group's lr was 0 (a learning-rate scheduler holding lr at 0, a warm-up "
                        "from 0 longer than the search phase?) or held no parameter with a gradient. So "
                        f"{level}. Let lr rise above 0 within the search phase, or pass init_step_size= for a "
                        "level of your own. Nothing was stepped")
                plan = plan_without_search(rule, state, config, plan)
        # The groups read again: the schedule's and the rule's own code ran since the keys above.
        moves_keys = (list(map(hyper_key, self.param_groups)), type(scale), scale, type(plan.state.step_size),
                      plan.state.step_size, type(plan.trial_step_size), plan.trial_step_size)
        if checked is None or None in moves_keys[0] or moves_keys != checked[1] or moves_keys[0] != hyper_keys:
            self._check_moves_fit_float32(plan, scale)
        # both checks passed for these keys (a group whose key changed since was validated above: not kept)
        self._checked_hypers = (hyper_keys, moves_keys if moves_keys[0] == hyper_keys else None)
        for group in self.param_groups:
            if starts_probing(group):
                group["search_lr"] = 1.0  # built at 0: its first positive lr is a warmup's, not its level
        if plan.is_search:
            moves = self._some_group_moves()
            self._count_steps_at_lr_zero(moves)
            if not moves:
                plan = plan_without_search(rule, state, config, plan)  # every group at lr 0 now: nothing moves
        if plan.is_search and not self._fsdp_checked:
            self._warn_if_trials_may_read_stale_fsdp_weights(closure)
        batches = step_batches(rule, plan)
        devices = [self._device] if self._device is not None else []
        marked, handoff.forward_rng = handoff.forward_rng, None  # mark_forward(), used by this step only
        zeroed_at, handoff.zero_grad_rng = handoff.zero_grad_rng, None
        one_phase = loss is None
        if (plan.is_search and self.reduction.loss_group is None and not self.__dict__.get("_reduction_given", True)
                and is_distributed()):
            # the process group came up after the build (init_process_group after FusedSaLSa(...)): each rank
            # searched on its own loss and the weights parted, silently (a DDP audit's find). Read at a search
            # (the first step is one), not on plain steps, whose host path has no call to spare.
            self.reduction = default_reduction(p for group in self.param_groups for p in group["params"])
        if self.reduction.loss_group is not None and not self.__dict__.get("_ranks_compared", False):
            # At this optimizer's first step in the process, alike on every rank whatever was loaded before it
            # (a checkpoint loaded on one rank only is then named, not met as a collective of another size),
            # compared once the step's own backward has run in either form, so that a rank in the other form
            # meets it there, not in DDP's gradient all-reduce. A load after it is not compared.
            compare = functools.partial(self._refuse_ranks_that_differ, state)
        else:
            compare = None
        if one_phase and (compare is not None or unscaled is not None):
            # Refused after the step's own forward (by the comparison, or under a scaler, through the opening
            # exchange): the generators and running statistics go back, so that a retry runs the same forward.
            undo.append(functools.partial(leave_random_state, RNGSnapshot.capture(devices),
                                          self._running_statistics()))
        if batches is not None:
            return self._multi_batch_step(plan, scale, batches, closure, loss, devices, marked, zeroed_at, undo,
                                          compare, unscaled)
        running_at_start = []  # one-phase: the running statistics before the step's own forward
        if one_phase:
            rng_before = RNGSnapshot.capture(devices) if plan.is_search else None
            running_at_start = self._running_statistics() if plan.is_search else []
            forget_autocast_casts()  # in an autocast region, casts of weights another optimizer has moved since
            with torch.enable_grad():
                value = call_plain(closure)
            # torch's closure convention, backward(retain_graph=True) too; new tensors of zeros are not
            # a backward's (DDP's gradient_as_bucket_view swaps .grad for bucket views in a forward)
            if self._has_new_gradients() and not self._remember_if_zeros():
                raise RuntimeError(CLOSURE_RAN_BACKWARD.format(what=call_name(closure)))
            loss_tensor = self._loss_tensor(value, "closure()", need_grad=True, closure=closure)
            rng_after = RNGSnapshot.capture(devices) if plan.is_search else None
            undo.append(self._take_back_own_gradients)
            loss_tensor.backward()
        else:
            loss_tensor = self._loss_tensor(loss, "loss", need_grad=False)
            rng_after = RNGSnapshot.capture(devices) if plan.is_search else None
            # without a mark, the draws since zero_grad(): your forward's masks if it drew first after it
            rng_before = (marked or zeroed_at or rng_after) if plan.is_search else None
        if compare is not None:
            compare()
        if unscaled is not None and plan.is_search:
            # Refused once the step's own backward has run, where a rank in the two-phase form opens its search:
            # raised at once, this rank left its peers waiting in DDP's gradient all-reduce. At a plain step, in
            # that step's all-reduce (_plain_step).
            self._any_rank_opening(False, plan.state.step, unscaled, two_phase=False)
        # Two-phase without mark_forward(), when the generators moved since zero_grad() (or it was
        # not called): the caller's forward may have drawn random masks (dropout) the trials cannot
        # be sure to replay (other draws may have come first), so a search judges them against a
        # reference forward at w0 that replays what the trials replay, not against the caller's loss.
        # That choice is every rank's: the opening exchange of the two-phase form's search, whose status
        # refuses ranks in the other form (its first exchange is the search's loss at w0).
        needs_reference = (plan.is_search and not one_phase
                           and self._any_rank_opening(marked is None and not rng_after.same_as(zeroed_at),
                                                      plan.state.step))
        passes = self._passes(plan, scale, forwards=1, backwards=int(one_phase), undo=undo)
        if passes is None:  # none of this optimizer's parameters is in this loss: as torch.optim, a no-op
            if self.model is not None:  # unless the model's parameters are no longer these (fully_shard after it)
                refuse_a_model_of_other_parameters(self.model, self.param_groups, warn=False)
            if unscaled is not None:
                raise unscaled
            return loss_tensor.detach() if one_phase else loss
        f0 = loss_scalar(loss_tensor, self._device)
        if not plan.is_search:
            self._plain_step(passes, plan, f0, not one_phase, unscaled)
            return loss_tensor.detach() if one_phase else loss

        call = call_name(closure)
        gradients_unchanged = gradients_watch(passes, self._sharded_groups(), call)
        reruns = [0]  # the trials' extra forwards (_trial_loss)

        step_losses = losses_with_values([value if one_phase else loss])
        # The first search of the two-phase form that judges trials against loss= (no reference forward)
        # checks once that loss= is the closure's loss at w0 (not a sum of micro-batch means, not
        # scaler.scale(loss)): one forward at w0 (counted), the caller's loss kept for the search.
        checks_loss = not (one_phase or needs_reference or self.__dict__.get("_loss_checked", False))

        def forward(own_losses: Sequence = step_losses) -> torch.Tensor:
            loss = self._trial_loss(closure, call, step_losses=own_losses, reruns=reruns)
            gradients_unchanged()
            return loss

        running = self._running_statistics()

        def trial_loss() -> float:
            # each trial forward replays the step's random draws, and starts from the buffers the step's own
            # forward left (spectral norm's power iteration reads its u and v)
            leave_random_state(rng_before, running)
            return self.reduction.shared_loss(forward, torch.float32, self._device, not one_phase, plan.state.step)

        try:
            failure = None  # what this rank's forward at w0 raised, raised once its peers know (shared_forward)
            if needs_reference or checks_loss:  # one forward at w0, replaying the step's random draws
                leave_random_state(rng_before, running)
                # The check's forward is not tested for the step's own loss: at w0 a closure that writes
                # a static output buffer (CUDA graphs) holds loss='s very value in its memory; the trials test it.
                # That forward rewrites the buffer: loss= is read before it (a copy, once per optimizer).
                f0 = f0.clone() if checks_loss else f0
                at_w0, failure = self.reduction.shared_forward(
                    forward if needs_reference else functools.partial(forward, ()), torch.float32, self._device)
                plan.state.num_forward_evals += 1
                if checks_loss:
                    self._refuse_a_loss_not_the_closures(f0, at_w0, failure, plan.state.step)
                else:
                    f0 = at_w0
            self._search_step(passes, plan, f0, trial_loss, not one_phase, failure, reruns,
                              loss_dtype=loss_tensor.dtype)
            if checks_loss:
                self._loss_check_passed()
        except BaseException:
            # Not applied: in the one-phase form the generators and running statistics go back to
            # before the step's own forward, so that step(closure) again runs the same forward.
            leave_random_state(*((rng_before, running_at_start) if one_phase else (rng_after, running)))
            raise
        finally:
            self._reshard_after_trials(closure)
        # the generators end where the step's one forward left them, the running statistics too
        leave_random_state(rng_after, running)
        return loss_tensor.detach() if one_phase else loss

    def _refuse_ranks_that_differ(self, state: SearchState) -> None:
        """Every data-parallel rank must run the same search: ranks built or loaded otherwise (another
        init_step_size, preset or group) run other trials, their weights part, and their collectives
        fall out of step until a timeout that names nothing. One all-reduce at the optimizer's first step in
        the process (a resumed run's too); every rank raises alike."""
        def described(value) -> str:  # a dataclass by its fields, another object by its type
            return repr(value) if value is None or dataclasses.is_dataclass(value) else type(value).__name__

        def plain(value) -> str:
            return repr(value) if isinstance(value, (bool, int, float, str, tuple, list, type(None))) else \
                type(value).__name__

        groups = [(len(g["params"]), sum(p.numel() for p in g["params"]),
                   sorted((key, plain(value)) for key, value in g.items() if key not in ("params", "search_lr")))
                  for g in self.param_groups]
        texts = {"backend": repr(getattr(self.backend, "name", type(self.backend).__name__)),
                 "search_rule": described(self.search_rule), "search_direction": repr(self.search_direction),
                 "restore": repr(self.restore_strategy), "nonfinite": repr(self.nonfinite),
                 "schedule": described(self.schedule), "param_groups": repr(groups),
                 # the first search's decay reads it (_decay_level), and trial forwards of a model= skip DDP's
                 # buffer broadcast that a rank without one joins: each differing part the ranks silently (a
                 # DDP audit's finds: weights 4e-2 apart from step 0; a hang in the first search)
                 "init_step_size given": repr(self._init_step_size_given),
                 "model given": repr(self.model is not None)}
        # field by field, so that the error names the one that differs
        texts.update({f"search constants.{field.name}": repr(getattr(self.search_config, field.name))
                      for field in dataclasses.fields(self.search_config)})
        texts.update({f"search state.{name}": repr(value) for name, value in dataclasses.asdict(state).items()})
        texts = {name: re.sub(r" at 0x[0-9a-fA-F]+", "", text) for name, text in texts.items()}  # addresses differ
        differing = self.reduction.differing(texts, self._device)
        self._ranks_compared = not differing
        if differing:
            mine = "; ".join(f"{name} = {texts[name]}" for name in differing)
            loaded = (" The step counters differ: was a checkpoint loaded on some ranks only?"
                      if "search state.step" in differing else "")
            raise ValueError(
                f"FusedSaLSa is not the same on the {self.reduction.loss_ranks} data-parallel ranks: "
                f"{', '.join(differing)} differ (this rank's: {mine[:800]}).{loaded} Build every rank's optimizer "
                "alike (arguments, preset, param groups) and load the same checkpoint: ranks that search otherwise "
                "part their weights and their collectives. Nothing was stepped")

    def _passes(self, plan, scale: float, forwards: int, backwards: int,
                undo: List[Callable[[], None]]) -> Optional[F.Passes]:
        """The backend's passes over this step's buckets (gradients checked), the step's forward
        and backward counts added to ``plan.state``; ``None`` when no param has a gradient. The
        parameters' counts of steps sat out that the buckets' building wrote go back in ``undo``
        (or at once where no param has a gradient: the step is a no-op)."""
        try:
            buckets = self._collect_buckets(plan.state.step - 1)
        except BaseException:  # a gradient refused in a later group
            self._buckets.take_back_counts()
            raise
        if not buckets:
            self._buckets.take_back_counts()
            return None
        undo.append(self._buckets.take_back_counts)
        plan.state.num_forward_evals += forwards
        plan.state.num_backward_evals += backwards
        return F.Passes.of(self.backend, buckets, self.param_groups, moment_step(self.search_rule, plan.state.step),
                           scale, plan.state.step_size, getattr(self, "grad_scale", None),
                           decay_level=self._decay_level(plan.state))

    def _decay_level(self, state: SearchState) -> float:
        """The level the weight decay of this step multiplies: ``eta``, except up to and on the first search
        when ``init_step_size`` was not given. That level is a placeholder (1.0), not a rate: decaying by it
        shrank every trial of the first search by ``weight_decay`` times the step's scale whatever the trial
        (10% at 0.1 with no schedule; 2% under the preset's warm-up on a 50-step run), so on a trained model
        every trial failed and the level collapsed (under the preset, frozen there for the rest of the run).
        Until a search sets it, no decay (a schedule that stops the search before any search ran is refused
        at that step). A rule with ``level_is_set(state)`` says itself when its level is a rate: LABPAL's before its
        first successful fit is none (its steps move nothing then, failed fits counted as searches), so no decay."""
        if state.num_searches == 0 and not self._init_step_size_given:
            return 0.0
        if state.rule_state and not _rule_level_is_set(self.search_rule, state):  # no call for SaLSa's rules
            return 0.0
        return state.step_size

    def _plain_step(self, passes: F.Passes, plan, f0: torch.Tensor, two_phase: bool = True,
                    unscaled: Optional[Exception] = None) -> None:
        """A step without search along the rule's direction (Adam's ``m_hat`` unless it is ``raw``).
        ``two_phase``: the step's form; ``unscaled``: the one-phase form's refusal under a GradScaler with a
        loss group, raised on every rank alike in this step's all-reduce."""
        found_inf = getattr(self, "found_inf", None)
        reduction, scaler_skipped = self.reduction, None
        if reduction.loss_group is not None and (found_inf is not None or unscaled is not None):
            f0, found_inf, scaler_skipped = self._scaled_plain_exchange(f0, found_inf, two_phase, unscaled,
                                                                        plan.state.step)
            reduction = SearchReduction()  # f0 is averaged: the pass reduces nothing more
        at_point = self._report_plain_steps_without_search(plan.state)
        F.plain_step(passes, plan.trial_step_size, f0, found_inf, self._device_counts(),
                     reduction, checked_direction(self.search_rule, self.search_direction))
        if at_point:  # after the step's own counts: a NaN at this step goes with this copy
            self._counts_in_flight = F.CountsInFlight.take(self._device_counts(), self.reduction)
        state = plan.state
        if scaler_skipped is None:
            scaler_skipped = found_inf is not None and bool(found_inf.reshape(-1)[0] != 0)
        # GradScaler's skip leaves k and t where they were, read here (one host read, only under a
        # scaler): with no search to come (a frozen level) nothing else would take it back out.
        if scaler_skipped:
            self._device_counts().scaler_skips.sub_(1)  # the pass counted it for the next search
            state = dataclasses.replace(state, step=state.step - 1, steps_since_search=state.steps_since_search - 1)
        self._commit(state)

    def _scaled_plain_exchange(self, f0: torch.Tensor, found_inf: Optional[torch.Tensor], two_phase: bool,
                               unscaled: Optional[Exception], step: int) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """A plain step's all-reduce of ``f0`` and ``found_inf`` under a GradScaler with a loss group, carrying
        the ranks' forms (:meth:`SearchReduction.exchange`), read in the one host read such a step makes anyway
        (before the pass now, not after it), so that a rank in the one-phase form, refused there (``unscaled``),
        raises on every rank alike before anything is written: the mixed-forms ``ValueError``, or, where every
        rank stepped in that form, each its own refusal. ``found_inf`` is averaged with ``f0``: every rank skips
        where any rank's scaler found an inf (each FSDP2 rank checks its own shards where torch's DTensor does
        not all-reduce it). Returns the averaged ``f0``, the agreed ``found_inf`` (on the device, for the pass)
        and whether the scaler skips this step."""
        # GradScaler's found_inf is the int 0 where it found no gradient (the refused form's zero_grad())
        inf = found_inf.reshape(1).to(f0) if torch.is_tensor(found_inf) else f0.new_zeros(1)
        exchanged = self.reduction.exchange(torch.cat([f0.reshape(1), inf]), two_phase, unscaled)
        (_, any_inf, *status, own_inf) = torch.cat([exchanged, inf]).tolist()
        self.reduction.check(status, two_phase, unscaled, step)
        F.agree_scaler_found_inf(functools.partial(grad_scaler_records, self), own_inf != 0, any_inf != 0)
        agreed = exchanged[:2].to(torch.float32)  # the backends' found_inf is float32
        return agreed[0], agreed[1], any_inf != 0

    def _report_plain_steps_without_search(self, state: SearchState) -> bool:
        """Where no search comes for ``max_search_interval`` steps (a schedule's frozen level, past its
        end, LABPAL between its fits), the plain steps' NaN/inf counts are reported as a search would
        report them: every ``max_search_interval`` steps they are copied to the host without waiting,
        and read once the copy has landed (alone: the first plain step that finds it so; under
        DDP/FSDP2: the next such point, ``max_search_interval`` steps later, so that every rank reads
        at the same step without waiting). ``"raise"`` refuses the reading step, before it writes
        anything; ``"skip"`` adds the counts to the counters. Returns whether this step is a copy
        point (the caller takes the copy once the step has written its own counts)."""
        interval = self.search_config.max_search_interval
        at_point = state.steps_since_search >= interval and state.steps_since_search % interval == 0
        pending = self.__dict__.get("_counts_in_flight")
        if pending is not None:
            if not (at_point if self.reduction.active else pending.ready()):
                return False  # the copy in flight stays the one to read
            self._counts_in_flight = None
            elements, losses = pending.read(self._device_counts())
            F.report_plain_steps(state, self.nonfinite, elements, losses, state.step,
                                 where="read where no search came to report them: ")
            self._warn_if_every_step_was_skipped(losses, interval)
        return at_point

    def report_nonfinite(self) -> Tuple[int, int]:
        """Report now the plain steps' NaN/inf counts that no search has read yet, as a search
        would: ``nonfinite="raise"`` raises :class:`NonFiniteError` naming them, ``"skip"`` adds them
        to ``search_state.num_nonfinite_elements`` and ``num_skipped_steps``. For the end of a run
        or before a checkpoint (counts on the device are in neither). One host read; under
        FSDP2 a collective (the shards' counts are summed). Under DDP each rank reads its own
        counts; call it on every rank all the same, or the ranks' counters differ. Returns (elements left unmoved, for a NaN/inf
        gradient or a 16-bit overflow; losses) read; a second call returns ``(0, 0)``."""
        if self._counts is None:
            return 0, 0
        self._counts_in_flight = None  # a copy not read yet: its counts are still in the counters
        elements, losses = F.CountsInFlight.take(self._counts, self.reduction).read(self._counts)
        F.report_plain_steps(self._search, self.nonfinite, elements, losses, None,
                             where="read by report_nonfinite(): ")
        return elements, losses

    def _refuse_a_loss_not_the_closures(self, given: torch.Tensor, at_w0: torch.Tensor,
                                        failure: Optional[Exception], step: int) -> None:
        """Refuse ``loss=`` that is not ``at_w0``, the closure's loss at the same weights, as
        :func:`salsa_fused.closures.loss_mismatch` judges them (the caller marks the check done once its step
        is taken: :meth:`_loss_check_passed`).
        One host read; the decision is every rank's, and so is ``failure``, what this rank's forward of
        ``at_w0`` raised (:meth:`SearchReduction.shared_forward`)."""
        scaler = getattr(self, "grad_scale", None)
        values = [given.float().reshape(()), at_w0.float().reshape(()).to(given.device)]
        if scaler is not None:
            values.append(scaler.float().reshape(()).to(given.device))
        given_value, closure_value, *scale = torch.stack(values).tolist()
        scale = scale[0] if scale else 0.0
        ratio, looks_scaled, differs = loss_mismatch(given_value, closure_value, scale)
        if self._any_rank_opening(looks_scaled or differs, step, failure):
            if looks_scaled:
                raise ValueError(SCALED_LOSS.format(ratio=ratio, scale=scale))
            values = f"{given_value:.6g} against {closure_value:.6g}, the step's random draws replayed"
            raise ValueError(LOSS_NOT_THE_CLOSURES.format(
                what=f"loss= is {ratio:.4g}x the closure's loss at the same weights ({values})" if differs else
                f"loss= is not the closure's loss at the same weights on another data-parallel rank (this "
                f"rank's: {values})"))

    def _loss_check_passed(self) -> None:
        """The step whose loss= passed :meth:`_refuse_a_loss_not_the_closures` was taken: the check runs once
        per optimizer. Not before: a step refused after the check (a trial that raised, or returned the
        step's own loss) leaves the state as it was, the check not done, so its retry is checked."""
        self._loss_checked = True

    def _any_rank_opening(self, flag: bool, step: int, failure: Optional[Exception] = None,
                          two_phase: bool = True) -> bool:
        """``flag`` or-ed over the loss group, for a choice the two-phase form makes before its search (how
        many forwards, so how many collectives, it runs): the exchange carries the form (a rank in the
        one-phase form meets it with the loss at w0, of the same size and dtype on the wire, or, reading several
        batches, with this exchange in its form, ``two_phase=False``, before its forwards at w0) and ``failure``;
        refused alike on every rank."""
        if self.reduction.loss_group is None:
            self.reduction.check((), two_phase, failure, step)
            return flag
        flags = torch.tensor([float(flag)], device=self._device)
        (value, *status) = self.reduction.exchange(flags, two_phase, failure).tolist()
        self.reduction.check(status, two_phase, failure, step)
        return value > 0

    def _search_step(self, passes: F.Passes, plan, f0, trial_loss: Callable[[], float], two_phase: bool,
                     failure: Optional[Exception] = None, reruns: Sequence[int] = (0,),
                     loss_dtype: Optional[torch.dtype] = None) -> None:
        """The search step of ``plan`` from loss ``f0`` (:func:`salsa_fused.functional.search_step`);
        ``failure``: what this rank's forward of ``f0`` raised; ``reruns[0]``: the trials' extra forwards
        (:meth:`_trial_loss`), counted once the search has run; ``loss_dtype``: the step's loss's, for
        :meth:`_count_tied_search` (None: not counted)."""
        self._counts_in_flight = None  # the search reads (and zeroes) every count itself
        searches_before = self._search.num_searches
        state = F.search_step(
            passes, plan, self._search, f0, trial_loss, rule=self.search_rule, config=self.search_config,
            search_direction=self.search_direction, param_groups=self.param_groups,
            counts=self._device_counts(), found_inf=getattr(self, "found_inf", None), reduction=self.reduction,
            nonfinite=self.nonfinite, has_saved_copy=self.restore_strategy == "copy", device=self._device,
            two_phase=two_phase, failure=failure, scaler_records=functools.partial(grad_scaler_records, self))
        state.num_forward_evals += reruns[0]
        searched = state.num_searches > searches_before
        if searched:  # a search ran: the loss it read feeds the range test
            state = observe_search_loss(self.schedule, state)
        self._commit(state)
        if searched:
            self._count_tied_search(state, passes, loss_dtype)

    def _multi_batch_step(self, plan, scale: float, batches: Batches, closure, loss, devices, marked, zeroed_at,
                          undo: List[Callable[[], None]], compare: Optional[Callable[[], None]] = None,
                          unscaled: Optional[Exception] = None):
        """The step of a rule that reads several batches (:class:`salsa_fused.rules.Batches`): the
        gradient of ``closure(i)`` over ``i < batches.gradient`` (the caller's in the two-phase
        form), then a plain step or a search whose points each average ``batches.points`` batches.
        ``compare``: the first step's comparison of the ranks, run once the gradient batches' backward has.
        ``unscaled``: the one-phase form's refusal under a GradScaler with a loss group, raised where the
        single-batch form raises it (after the backward, through the search's opening exchange, or the plain
        step's all-reduce)."""
        k, n = batches.gradient, batches.points
        one_phase = loss is None
        points = plan.is_search and n > 0
        replay = None
        running_at_start = []  # one-phase search: the running statistics before the gradient forwards
        rng_at_start = None  # and the generators, where no replay's first call keeps them
        if one_phase and plan.is_search:
            running_at_start = self._running_statistics()
            if points:
                replay = IndexedReplay(closure, devices)
            else:
                rng_at_start = RNGSnapshot.capture(devices)
        reuse = True  # the point at w0 reuses the gradient batches' losses
        if one_phase:
            total = None  # the gradient batches' losses summed in float64
            dtype = None
            step_losses = []
            call = replay if replay is not None else functools.partial(call_indexed, closure)
            forget_autocast_casts()  # as the one-batch form's own forward
            for i in range(k):
                with torch.enable_grad():
                    value = call(i)
                if i == 0 and self._has_new_gradients() and not self._remember_if_zeros():
                    raise RuntimeError(CLOSURE_RAN_BACKWARD.format(what=f"closure({i})"))
                loss_i = self._loss_tensor(value, f"closure({i})", need_grad=True)
                step_losses.append(loss_i)
                if i == 0:
                    undo.append(self._take_back_own_gradients)
                (loss_i / k if k > 1 else loss_i).backward()
                dtype = loss_i.dtype
                loss_i = loss_i.detach().reshape(()).to(torch.float64)
                total = loss_i if total is None else total + loss_i
            gradient_sum = total
            loss_tensor = (total / k).to(dtype)
            if compare is not None:
                compare()
            if self.reduction.loss_group is not None and (points or (unscaled is not None and plan.is_search)):
                # Where a rank in the two-phase form opens its search (the exchange of its reuse choice): this
                # rank's forwards at w0 run collectives of their own (FSDP2's all-gathers), which met that
                # all-reduce and hung. One more small all-reduce per search, carrying the form. Refused there, the
                # generators and running statistics go back to before the gradient forwards, as in the search.
                # Under a scaler, at a search without points, the same exchange meets the search's first one.
                try:
                    self._any_rank_opening(False, plan.state.step, unscaled, two_phase=False)
                except BaseException:
                    if replay is not None:  # points read: else only a scaler's refusal, put back by undo
                        leave_random_state(replay.first.get(0), running_at_start)
                    raise
        else:
            loss_tensor = self._loss_tensor(loss, "loss", need_grad=False)
            if compare is not None:
                compare()
            step_losses = [loss]
            gradient_sum = loss_tensor.detach().reshape(()).to(torch.float64) * k
            if points:
                rng_after = RNGSnapshot.capture(devices)
                start = marked if (marked is not None and k == 1) else rng_after
                # The caller's forwards drew from the generators (dropout) and no mark covers every
                # gradient batch: their losses cannot be replayed, so the point at w0 is evaluated
                # again, every batch under the draws its trials replay.
                reuse = not self._any_rank_opening(
                    not ((marked is not None and k == 1) or rng_after.same_as(zeroed_at)), plan.state.step)
                # not reused: a single batch replays the draws since zero_grad() (its masks, if it drew first)
                first = ({i: start for i in range(k)} if reuse
                         else {0: zeroed_at} if k == 1 and zeroed_at is not None else {})
                replay = IndexedReplay(closure, devices, first=first, end=rng_after)
        passes = self._passes(plan, scale, forwards=k, backwards=k if one_phase else 0, undo=undo)
        if passes is None:  # none of this optimizer's parameters is in this loss: as torch.optim, a no-op
            if self.model is not None:  # unless the model's parameters are no longer these (fully_shard after it)
                refuse_a_model_of_other_parameters(self.model, self.param_groups, warn=False)
            if unscaled is not None:
                raise unscaled
            return loss_tensor.detach() if one_phase else loss
        if not plan.is_search:  # a one-phase step under a scaler is refused in the plain step's all-reduce
            self._plain_step(passes, plan, loss_scalar(loss_tensor, self._device), not one_phase, unscaled)
            return loss_tensor.detach() if one_phase else loss

        gradients_unchanged = gradients_watch(passes, self._sharded_groups(), "closure(i)")
        reruns = [0]  # the trials' extra forwards (_trial_loss)
        own_losses = losses_with_values(step_losses)

        def point_sum(first: int, end: int = n, own: Sequence = own_losses) -> torch.Tensor:
            """``sum closure(i)`` over ``first <= i < end`` at the weights as they are, in float64."""
            total = torch.zeros((), dtype=torch.float64, device=self._device)
            for i in range(first, end):
                leave_random_state(None, running)  # every forward from the buffers the gradient forwards left
                total = total + self._trial_loss(functools.partial(replay, i), f"closure({i})", torch.float64, own,
                                                 reruns)
                gradients_unchanged()
            return total

        def trial_loss() -> float:
            return self.reduction.shared_loss(lambda: point_sum(0) / n, torch.float64, self._device,
                                              not one_phase, plan.state.step)

        # As the single-batch form's check: the first search whose point at w0 reuses loss= (the mean over
        # the gradient batches) checks it once per optimizer against the closure's mean over those batches
        # at w0 (k forwards, counted), their random draws replayed as the trials replay them.
        checks_loss = points and reuse and not (one_phase or self.__dict__.get("_loss_checked", False))
        running = self._running_statistics()
        try:
            failure = None  # what this rank's forwards at w0 raised, raised once its peers know
            if points:  # the point at w0: the mean over n batches
                first = k if reuse else 0
                at_w0, failure = self.reduction.shared_forward(lambda: point_sum(first), torch.float64,
                                                               self._device)
                f0 = ((gradient_sum if reuse else 0.0) + at_w0) / n
                plan.state.num_forward_evals += n - first
                if checks_loss:  # after the point's own forwards, whose first calls set the replayed draws
                    # No step losses: at w0 a static output buffer holds loss='s value. Run on every rank, one whose
                    # point forwards raised too: its peers run these forwards (FSDP2's all-gathers) before the
                    # check's all-reduce, where that rank raises; the first failure is kept.
                    closures, failed = self.reduction.shared_forward(lambda: point_sum(0, k, ()) / k,
                                                                     torch.float64, self._device)
                    failure = failure if failure is not None else failed
                    plan.state.num_forward_evals += k
                    self._refuse_a_loss_not_the_closures(gradient_sum / k, closures, failure, plan.state.step)
            else:
                f0 = gradient_sum / k
            self._search_step(passes, plan, f0, trial_loss, not one_phase, failure, reruns)
            if checks_loss:
                self._loss_check_passed()
        except BaseException:
            # Not applied: in the one-phase form the generators and running statistics go back to
            # before the step's first gradient forward, so that step(closure) again runs the same forwards.
            if one_phase:
                leave_random_state(replay.first.get(0) if replay is not None else rng_at_start, running_at_start)
            else:
                leave_random_state(replay.end if replay is not None else None, running)
            raise
        finally:
            self._reshard_after_trials(closure)
        # the generators end where the step's first forward of each batch left them; the running
        # statistics where the gradient forwards left them
        leave_random_state(replay.end if replay is not None else None, running)
        return loss_tensor.detach() if one_phase else loss


# The constructor's signature as tools read it (LightningCLI's argument parser, HF's optimizer kwargs): its named
# arguments, without the **unexpected that only words a refusal; a signature with **kwargs reads as taking any.
FusedSaLSa.__init__.__signature__ = inspect.signature(FusedSaLSa.__init__).replace(parameters=[
    parameter for parameter in inspect.signature(FusedSaLSa.__init__).parameters.values()
    if parameter.kind is not inspect.Parameter.VAR_KEYWORD])


def _rule_level_is_set(rule, state: SearchState) -> bool:
    """A rule's own ``level_is_set(state)`` where it has one, else True."""
    level_is_set = getattr(rule, "level_is_set", None)
    return True if level_is_set is None else bool(level_is_set(state))


_ACCELERATE_INTEGRATION = "salsa_fused.integrations.accelerate"
_accelerate_integration_failed = False  # an accelerate the integration cannot take: not tried again


def _accelerate_imported_without_integration() -> bool:
    modules = sys.modules
    return "accelerate" in modules and _ACCELERATE_INTEGRATION not in modules and not _accelerate_integration_failed


def _load_accelerate_integration_if_imported() -> None:
    """Where accelerate is imported, import :mod:`salsa_fused.integrations.accelerate`: its ``AcceleratedOptimizer.step``
    refuses a closure on a micro-batch that accelerate skips (the micro-batch would never be trained). Called
    when the optimizer is built, at ``state_dict()`` (``accelerator.prepare`` reads it to place the state) and
    at a step given a closure, so a script that never imports the integration, or builds the optimizer before
    importing accelerate, gets it too; nothing is imported where accelerate is not."""
    global _accelerate_integration_failed
    if _accelerate_imported_without_integration():
        try:
            importlib.import_module(_ACCELERATE_INTEGRATION)
        except ImportError:
            _accelerate_integration_failed = True

