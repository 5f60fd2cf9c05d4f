"""FusedSaLSa: Adam whose step size is found by SaLSa's smoothed Armijo line search.

The class validates arguments, owns the per-parameter state (fp32 moments) and the
search state, and drives one step: forward and backward (or the caller's), then
either a plain Adam step (one fused pass per bucket, no host read) or a search
(a reduction pass for the slope ``q``, one host read, pass A, then one forward and one
small host read per trial, pass B between trials). The arithmetic of every pass lives in
the backends (:mod:`salsa_fused.backends`), every step size they apply is formed in
:mod:`salsa_fused.applied`, and the decisions come from the search rule
(:mod:`salsa_fused.rules`; SaLSa's in :mod:`salsa_fused.line_search`).
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.optim import Optimizer

from . import backends as _backends
from ._rng import RNGSnapshot
from .backends.base import DIRECTIONS, GRADIENT, MOMENTUM, Bucket, Hyper, PassArgs
from .distributed import SearchReduction, default_reduction
from .errors import NonFiniteError
from .applied import GroupStep
from .line_search import SearchConfig, SearchState, plan_step
from .rules import Verdict, resolve_rule

LossClosure = Callable[[], Union[torch.Tensor, float]]

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_SEARCH_KEY = "search"  # where state_dict() carries the search state (param_groups[0])
RESTORE_STRATEGIES = ("copy", "inplace")
NONFINITE_POLICIES = ("raise", "skip")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


@dataclass
class _DeviceCounts:
    """int64 device scalars counted on plain steps (no host read), read and zeroed by the next search."""

    nonfinite_elements: torch.Tensor  # gradient elements left unchanged
    nonfinite_losses: torch.Tensor  # steps whose loss was NaN/inf (they changed nothing)
    scaler_skips: torch.Tensor  # steps GradScaler skipped (found_inf)

    @classmethod
    def zeros(cls, device: Optional[torch.device]) -> "_DeviceCounts":
        return cls(*(torch.zeros((), dtype=torch.int64, device=device) for _ in range(3)))


class FusedSaLSa(Optimizer):
    r"""SaLSa (Stable Armijo Line Search Adaptation) on fused multi-tensor passes.

    Adam's direction ``d = g / (sqrt(v_hat) + eps)`` (or ``m_hat / (sqrt(v_hat) + eps)``
    with ``search_direction="momentum"``) and a step size ``eta`` found by backtracking
    until the smoothed decrease ``beta3*h + (1-beta3)*(f(w) - f(w - eta*d))`` reaches
    ``c * eta * s``, ``s`` the smoothed preconditioned gradient norm. The search runs at
    least every ``max_search_interval`` steps, more often while ``eta`` moves. With its
    defaults this reproduces the published ``salsa-optimizer`` 0.1.0 step for step.

    Args:
        params: parameters or param groups (per group: ``lr``, ``betas``, ``eps``, ``weight_decay``).
        lr: multiplier on the searched step size (1.0: none). Group ``g`` moves by
            ``lr_g * eta``; ``q`` sums ``lr_g * g.d`` over groups, so the Armijo test
            judges the move actually made. Schedulers may change it.
        init_step_size: ``eta`` before the first search.
        c: Armijo constant in (0, 1).
        betas: Adam's (beta1, beta2).
        beta3: smoothing of both sides of the Armijo test.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decoupled, ``w -= weight_decay * lr * s * eta * w`` each step (``s`` the
            schedule's scale; every applied quantity is formed in :mod:`salsa_fused.applied`).
        search_direction: ``"gradient"`` (0.1.0's default) or ``"momentum"`` (its ``use_mv``).
        adaptive_interval: search every ``L`` steps (True) or on every step (False).
        max_search_interval, always_search_steps, growth, backtrack, max_trials: SPEC section 1.
        restore: ``"copy"`` keeps a copy of the weights for exact trials and restores (one
            extra weight-sized buffer); ``"inplace"`` moves the weights by differences
            (no extra memory, one rounding per trial).
        backend: ``"auto"`` (triton on CUDA when it can run; cpp on the CPU when the C++
            extension is built, else torch with a one-time warning), ``"torch"`` (the reference,
            step for step 0.1.0's arithmetic), ``"triton"``, ``"cpp"``, or a name added with
            :func:`salsa_fused.backends.register_backend`; chosen and checked here (a backend
            that cannot run raises with the reason).
        nonfinite: ``"raise"`` a :class:`NonFiniteError` or ``"skip"`` (and count) a step whose
            loss or gradient is NaN/inf. Nothing non-finite is ever written either way.
        reduction: how losses and ``q`` are reduced across ranks (default: losses averaged
            over the world when ``torch.distributed`` is initialized).
        search_rule: a rule name (``"salsa"``, the default: the published smoothed Armijo
            test) or an object with :class:`salsa_fused.rules.SearchRule`'s methods.
        schedule: ``None``, or an object with ``scale(step)`` (a multiplier on the applied
            step; trials still probe the searched level) and ``searches(step)`` (False
            freezes the level), e.g. :class:`salsa_fused.step_size.WarmupStableDecay`.

    ``step(closure)`` runs ``closure()`` (forward, returns the scalar loss) and the backward
    itself; ``loss.backward(); step(closure, loss=loss)`` is the two-phase form for loops
    that do their own backward. Trial forwards run under ``torch.no_grad()``.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1.0, *, init_step_size: float = 1.0, c: float = 0.5,
                 betas: Tuple[float, float] = (0.9, 0.999), beta3: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, search_direction: str = GRADIENT,
                 adaptive_interval: bool = True, max_search_interval: int = 10,
                 always_search_steps: int = 9, growth: float = 1.1, backtrack: float = 0.8,
                 max_trials: int = 100, restore: str = "copy", backend: str = "auto",
                 nonfinite: str = "raise", reduction: Optional[SearchReduction] = None,
                 search_rule: Optional[Callable] = None, schedule=None):
        if not (math.isfinite(init_step_size) and init_step_size > 0):
            raise ValueError(f"init_step_size must be a finite number > 0, got {init_step_size}")
        if search_direction not in DIRECTIONS:
            raise ValueError(f"search_direction must be one of {DIRECTIONS}, got {search_direction!r}")
        if restore not in RESTORE_STRATEGIES:
            raise ValueError(f"restore must be one of {RESTORE_STRATEGIES}, got {restore!r}")
        if backend not in _backends.names():
            raise ValueError(f"backend must be one of {_backends.names()}, got {backend!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.search_config = SearchConfig(
            c=c, beta3=beta3, growth=growth, backtrack=backtrack, max_trials=max_trials,
            max_search_interval=max_search_interval, always_search_steps=always_search_steps,
            adaptive_interval=adaptive_interval)
        self.search_config.validate()
        if schedule is not None and not (callable(getattr(schedule, "scale", None))
                                         and callable(getattr(schedule, "searches", None))):
            raise TypeError("schedule must have scale(step) and searches(step) methods")
        self.search_rule = resolve_rule(search_rule)
        self.schedule = schedule
        self.search_direction = search_direction
        self.restore_strategy = restore
        self.backend_name = backend
        self.nonfinite = nonfinite
        self.init_step_size = float(init_step_size)
        self._device: Optional[torch.device] = None
        self._buckets: Dict[tuple, Bucket] = {}
        self._saved: Dict[torch.Tensor, torch.Tensor] = {}
        self._counts: Optional[_DeviceCounts] = None
        self._forward_rng: Optional[RNGSnapshot] = None  # mark_forward(), for the next step only
        self._bound_step: Optional[tuple] = None  # bind_closure(), for the next step only
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        #: The live search state; state_dict()/load_state_dict() carry it as a dict.
        self._search = SearchState(step_size=self.init_step_size)
        # Detected after the groups exist: sharded DTensor params (FSDP2) also reduce q.
        self.reduction = reduction if reduction is not None else default_reduction(
            p for group in self.param_groups for p in group["params"])
        #: The backend module, chosen and checked here, once (raises with the reason it cannot run).
        self.backend = _backends.resolve(backend, self._device or torch.device("cpu"))

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _validate_group_hyper(group: dict) -> None:
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float (it is a host-side multiplier); got a tensor")
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)):
                raise TypeError(f"betas[{i}] must be a number, got {type(beta).__name__}")
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must lie in [0, 1), got {beta}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if not (math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {wd}")

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator is consumed once, above
        candidate = {**self.defaults, **param_group, "params": params}
        self._validate_group_hyper(candidate)
        devices = {self._device} if self._device is not None else set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"FusedSaLSa can only optimize Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise ValueError("FusedSaLSa does not support complex parameters "
                                 "(view them as real with torch.view_as_real)")
            if not p.is_floating_point():
                raise ValueError(f"FusedSaLSa needs floating-point parameters, got {p.dtype}")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise ValueError(f"unsupported parameter dtype {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(f"FusedSaLSa needs all parameters on one device, got {names}")
        super().add_param_group(param_group)
        if devices:
            self._device = devices.pop()
        for p in self.param_groups[-1]["params"]:
            if p.requires_grad:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
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
        """The searched step size ``eta`` (before the growth factor and the group multipliers)."""
        return self._search.step_size

    @property
    def effective_step_sizes(self) -> List[float]:
        """Per group, the step the next plain step applies: ``lr * s * eta * growth`` (``s`` the
        schedule's scale at the next step; 0 past a schedule's end that decays to 0)."""
        state = self._search
        scale = 1.0 if self.schedule is None else float(self.schedule.scale(state.step + 1))
        trial = state.step_size * self.search_config.growth
        return [GroupStep(group["lr"], scale, state.step_size).plain(trial).step
                for group in self.param_groups]

    @property
    def search_interval(self) -> float:
        """The interval ``L`` of the last step (searches come every ``ceil(L)`` steps)."""
        return self._search.search_interval

    @property
    def num_forward_evals(self) -> int:
        return self._search.num_forward_evals

    @property
    def num_searches(self) -> int:
        return self._search.num_searches

    @property
    def num_backtracks(self) -> int:
        return self._search.num_backtracks

    @property
    def num_skipped_steps(self) -> int:
        return self._search.num_skipped_steps

    @property
    def last_search_trials(self) -> int:
        return self._search.last_trials

    @property
    def last_loss_decrease(self) -> float:
        return self._search.last_loss_decrease

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["param_groups"][0][_SEARCH_KEY] = self._search.to_dict()  # a deep copy
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as ``torch.optim`` does, but keep the moments fp32 (torch would cast them to
        the parameter dtype) and validate the search state before anything changes."""
        groups = state_dict["param_groups"]
        search = None
        if groups and _SEARCH_KEY in groups[0]:
            search = SearchState.from_dict(deepcopy(groups[0][_SEARCH_KEY]))
            search.validate()  # unknown keys, bad values
        groups = [{k: v for k, v in group.items() if k != _SEARCH_KEY} for group in groups]
        for group in groups:
            self._validate_group_hyper({**self.defaults, **group})
        stripped_state, moments = {}, {}
        for key, value in state_dict["state"].items():
            moments[key] = {k: v for k, v in value.items() if k in _MOMENT_KEYS}
            stripped_state[key] = {k: v for k, v in value.items() if k not in _MOMENT_KEYS}
        super().load_state_dict({**state_dict, "param_groups": groups, "state": stripped_state})
        params = [p for group in self.param_groups for p in group["params"]]
        index_of = {}
        for group in groups:
            for position, saved_id in enumerate(group["params"]):
                index_of[saved_id] = len(index_of)
        for saved_id, values in moments.items():
            param = params[index_of[saved_id]]
            state = self.state[param]
            for k, v in values.items():
                state[k] = v.to(device=param.device, dtype=torch.float32, copy=True)
        self._search = search if search is not None else SearchState(step_size=self.init_step_size)
        self._buckets.clear()
        self._counts = None  # counts of the replaced run

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_search": self._search}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name, value in (("_buckets", {}), ("_saved", {}), ("_counts", None), ("_forward_rng", None),
                            ("_bound_step", None)):
            self.__dict__.setdefault(name, value)
        if "_search" not in self.__dict__:  # pickled with the search state in param_groups[0]
            saved = self.param_groups[0].pop(_SEARCH_KEY, None) if self.param_groups else None
            self._search = SearchState.from_dict(saved) if saved is not None else SearchState()

    # ------------------------------------------------------------------ step
    def _collect_buckets(self) -> List[Bucket]:
        """Buckets of the params that have gradients; validates the gradients first."""
        members: Dict[tuple, List[torch.Tensor]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError("FusedSaLSa does not support sparse gradients")
                if grad.is_complex():
                    raise RuntimeError("FusedSaLSa does not support complex gradients")
                if grad.device != p.device:
                    raise RuntimeError(f"gradient on {grad.device} for a parameter on {p.device}")
                if grad.shape != p.shape:
                    raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for a parameter of "
                                       f"shape {tuple(p.shape)}")
                if grad.dtype != p.dtype:  # checked here, before any bucket or state is created
                    raise RuntimeError(f"gradient of dtype {grad.dtype} for a parameter of dtype {p.dtype}: "
                                       "gradients must have the dtype of their parameters")
                members.setdefault((index, p.device, p.dtype), []).append(p)
        buckets = []
        use_copy = self.restore_strategy == "copy"
        for key, params in members.items():
            cache_key = key + (tuple(id(p) for p in params),)
            bucket = self._buckets.get(cache_key)
            if bucket is None:
                states = [self._init_state(p) for p in params]
                bucket = Bucket(params=[_local(p) for p in params], grads=[],
                                exp_avg=[_local(s["exp_avg"]) for s in states],
                                exp_avg_sq=[_local(s["exp_avg_sq"]) for s in states],
                                saved=None, device=key[1], dtype=key[2], group_index=key[0])
                # Another set of params with grads (one appeared or vanished): the old bucket of
                # this (group, device, dtype) goes, so the cache stays one bucket per key.
                for stale in [k for k in self._buckets if k[:3] == key]:
                    del self._buckets[stale]
                self._buckets[cache_key] = bucket
            bucket.grads = [_local(p.grad) for p in params]
            if use_copy and bucket.saved is None and bucket.params:
                bucket.saved = [self._saved_buffer(p) for p in params]
            buckets.append(bucket)
        return buckets

    def _saved_buffer(self, p: torch.Tensor) -> torch.Tensor:
        buffer, local = self._saved.get(p), _local(p)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (local.shape, local.dtype,
                                                                             local.device):
            buffer = torch.empty_like(local)  # new, or the param was cast or moved since
            self._saved[p] = buffer
        return buffer

    def _loss_tensor(self, value, what: str, need_grad: bool) -> torch.Tensor:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not need_grad:
            return torch.tensor(float(value), dtype=torch.float32, device=self._device)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what} must return the loss as a scalar tensor, got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(f"{what} must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{what} must return a real floating-point loss, got {value.dtype}")
        if need_grad and not value.requires_grad:
            raise RuntimeError(f"{what} returned a loss with no grad path (requires_grad=False): "
                               "call step() outside torch.no_grad() and make the loss depend on "
                               "the parameters")
        return value

    def _device_counts(self) -> "_DeviceCounts":
        if self._counts is None:
            self._counts = _DeviceCounts.zeros(self._device)
        return self._counts

    def mark_forward(self) -> None:
        """Two-phase form with randomness (dropout): call right before the step's first forward
        (the first micro-batch under accumulation). The next step's trial forwards then replay
        the random state from this point, so a closure that draws as the caller's forwards did
        sees their masks; without the mark they replay the state found at the ``step()`` call.
        Either way the generators end where the caller's forwards left them."""
        devices = [self._device] if self._device is not None else []
        self._forward_rng = RNGSnapshot.capture(devices)

    def bind_closure(self, closure: LossClosure, *, loss=None) -> None:
        """Hand the next ``step()`` called without arguments its ``closure`` (and, with
        ``loss=``, the loss whose backward already ran: the two-phase form).

        For loops that call ``optimizer.step()`` themselves (Hugging Face ``Trainer``,
        accelerate's ``AcceleratedOptimizer``): bind after the backward. One step uses the
        binding and clears it; a new binding replaces one not yet used.
        """
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._bound_step = (closure, loss)

    def step(self, closure: Optional[LossClosure] = None, *, loss=None):
        """One SaLSa step; returns the loss at the weights before the step.

        ``closure()`` must run the forward pass and return the scalar loss (no backward);
        with ``loss=`` the caller has already run forward and backward for this step.

        If the closure raises (or returns a bad value) during the trials, the exception
        propagates with the weights put back (bitwise with ``restore="copy"``, to rounding
        with ``"inplace"``), the search state unchanged and the generators where one forward
        leaves them; the moments keep this step's gradient (restoring them exactly would need
        a copy of m and v, 8 bytes per parameter).
        """
        try:
            return self._step(closure, loss)
        except BaseException:
            # GradScaler sets grad_scale/found_inf before step() and deletes them only after a
            # step that returns: drop them here so a later step cannot read a stale scale.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _step(self, closure: Optional[LossClosure], loss):
        if closure is None and loss is None and self._bound_step is not None:
            (closure, loss), self._bound_step = self._bound_step, None
        if closure is None:
            if loss is None and not any(p.grad is not None for g in self.param_groups for p in g["params"]):
                return None  # nothing to do, as torch.optim does for a step without gradients
            raise TypeError("FusedSaLSa.step() needs closure: a function that runs the forward pass "
                            "and returns the loss (SaLSa evaluates it at trial weights)")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        for group in self.param_groups:  # schedulers and users write here: check before any write
            self._validate_group_hyper(group)
        if loss is None and getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("under torch.amp.GradScaler use the two-phase form: "
                               "scaler.scale(loss).backward(); scaler.step(opt, closure, loss=loss) "
                               "(step() would run an unscaled backward itself)")
        plan = plan_step(self._search, self.search_config)
        scale = 1.0
        if self.schedule is not None:
            scale = float(self.schedule.scale(plan.state.step))
            if plan.is_search and not self.schedule.searches(plan.state.step):
                plan = replace(plan, is_search=False)
        devices = [self._device] if self._device is not None else []
        marked, self._forward_rng = self._forward_rng, None  # mark_forward(), used by this step only
        one_phase = loss is None
        if one_phase:
            rng_before = RNGSnapshot.capture(devices) if plan.is_search else None
            with torch.enable_grad():
                value = closure()
            loss_tensor = self._loss_tensor(value, "closure()", need_grad=True)
            rng_after = RNGSnapshot.capture(devices) if plan.is_search else None
            loss_tensor.backward()
        else:
            loss_tensor = self._loss_tensor(loss, "loss", need_grad=False)
            rng_after = RNGSnapshot.capture(devices) if plan.is_search else None
            rng_before = (marked or rng_after) if plan.is_search else None
        buckets = self._collect_buckets()
        if not buckets:
            raise RuntimeError("no parameter of this optimizer has a gradient after the backward: the "
                               "loss does not depend on the optimized parameters")
        backend = self.backend
        step_state = plan.state
        step_state.num_forward_evals += 1
        step_state.num_backward_evals += int(one_phase)
        f0 = loss_tensor.detach().reshape(()).to(device=self._device, dtype=torch.float32)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        eta = self.step_size
        hypers = {b.group_index: Hyper.for_step(self.param_groups[b.group_index], plan.state.step)
                  for b in buckets}
        groups = {b.group_index: GroupStep(self.param_groups[b.group_index]["lr"], scale, eta)
                  for b in buckets}
        if not plan.is_search:
            if found_inf is not None:
                # GradScaler saw inf/nan: the pass below changes nothing (the backend reads
                # found_inf on the device). Counted on the device, no host read: the next
                # search takes such steps back out of k and t.
                self._device_counts().scaler_skips.add_((found_inf.reshape(()) != 0).to(torch.int64))
            if self.reduction.loss_group is not None:
                # Every rank must take the same skip decision: judge the loss averaged over
                # the data-parallel group (one 4-byte all-reduce, no host read).
                f0 = self.reduction.average_loss(f0.reshape(1)).reshape(())
            counts = self._device_counts()
            # A non-finite loss makes the plain pass change nothing; count it on the device
            # (no host read) and report it at the next search.
            counts.nonfinite_losses.add_(torch.isfinite(f0).logical_not())
            with torch.no_grad():
                for b in buckets:
                    args = PassArgs(hypers[b.group_index], groups[b.group_index].plain(plan.trial_step_size),
                                    grad_scale=grad_scale)
                    backend.plain_step(b, args, f0, found_inf=found_inf, nonfinite_count=counts.nonfinite_elements)
            self._commit(step_state)
            return loss_tensor if one_phase else loss
        try:
            self._search_step(plan, step_state, buckets, hypers, groups, backend, f0, closure,
                         grad_scale, found_inf, rng_before)
        finally:
            rng_after.set()  # the generators end where the step's one forward left them
        return loss_tensor if one_phase else loss

    def _search_step(self, plan, step_state, buckets, hypers, groups, backend, f0, closure,
                grad_scale, found_inf, rng_before) -> None:
        direction = self.search_rule.direction(self.search_direction)
        counts = self._device_counts()
        q = torch.zeros((), dtype=torch.float32, device=self._device)
        with torch.no_grad():
            for b in buckets:
                lr = hypers[b.group_index].lr
                partial = backend.slope(b, PassArgs(hypers[b.group_index], direction=direction,
                                                    grad_scale=grad_scale))
                q = q + (partial if lr == 1.0 else partial * lr)
        flags = [found_inf.to(q.device, torch.float32).reshape(1) if found_inf is not None
                 else q.new_zeros(1), counts.nonfinite_elements.to(torch.float32).reshape(1),
                 counts.nonfinite_losses.to(torch.float32).reshape(1)]
        # q and the flags are per shard under FSDP2: one sum over the shard group for all three.
        shard_sums = self.reduction.sum_over_shards(torch.cat([q.reshape(1), *flags]))
        loss_avg = self.reduction.average_loss(f0.reshape(1))
        f0_value, q_value, inf_flag, earlier_nonfinite, earlier_bad_losses, scaler_skips = torch.cat(
            [loss_avg, shard_sums, counts.scaler_skips.to(torch.float32).reshape(1)]
        ).tolist()  # the one host read before any write
        if scaler_skips:
            skipped = int(scaler_skips)
            counts.scaler_skips.zero_()
            step_state.step -= skipped  # step_state is plan.state: the rule below sees this
            step_state.steps_since_search = max(0, step_state.steps_since_search - skipped)
            hypers = {index: Hyper.for_step(self.param_groups[index], step_state.step) for index in hypers}
            # kept even if this step is skipped or rejected below
            self._search.step -= skipped
            self._search.steps_since_search = max(0, self._search.steps_since_search - skipped)
        if inf_flag:
            return  # GradScaler found inf/nan: skip the step like AdamW, state unchanged
        if earlier_nonfinite or earlier_bad_losses:
            counts.nonfinite_elements.zero_()
            counts.nonfinite_losses.zero_()
            if self.nonfinite == "raise":
                problems = []
                if earlier_nonfinite:
                    problems.append(f"{int(earlier_nonfinite)} gradient elements were NaN/inf on plain "
                                    "steps since the last search (those elements kept their weights "
                                    "and moments)")
                if earlier_bad_losses:
                    problems.append(f"the loss was NaN/inf on {int(earlier_bad_losses)} plain step(s) "
                                    "since the last search (those steps changed nothing)")
                raise NonFiniteError("; ".join(problems) + f"; step {plan.state.step} was not applied")
            step_state.num_nonfinite_elements += int(earlier_nonfinite)
            step_state.num_skipped_steps += int(earlier_bad_losses)
        if not (math.isfinite(f0_value) and math.isfinite(q_value)):
            what = "loss" if not math.isfinite(f0_value) else "gradient (slope q)"
            value = f0_value if not math.isfinite(f0_value) else q_value
            self._reject(f"non-finite {what} {value} at step {plan.state.step}; "
                         "weights and optimizer state are unchanged",
                         int(earlier_nonfinite), int(earlier_bad_losses))
            return
        search = self.search_rule(plan, self.search_config, f0_value, q_value)

        @torch.no_grad()
        def move_all(pass_name: str, moves: Callable, along: str = direction) -> None:
            run = getattr(backend, pass_name)
            for b in buckets:
                run(b, PassArgs(hypers[b.group_index], moves(groups[b.group_index]), along, grad_scale))

        if not search.active:
            final = search.final()
            move_all("first_trial", lambda g: g.guard_failed(final.step), final.direction or direction)
            self._commit(search.finish())
            return
        move_all("first_trial", lambda g: g.trial(search.step_size))
        current = search.step_size  # the trial the weights are at
        try:
            while True:
                rng_before.set()
                with torch.no_grad():
                    value = closure()
                trial = self._loss_tensor(value, "closure()", need_grad=False)
                trial = trial.detach().reshape(1).to(device=self._device, dtype=torch.float32)
                (f1_value,) = self.reduction.average_loss(trial).tolist()
                if search.observe(f1_value) is not Verdict.RETRY:
                    break
                move_all("retrial", lambda g: g.trial(search.step_size, current))
                current = search.step_size
        except BaseException:
            move_all("restore", lambda g: g.restore(current))
            raise
        final = search.final()
        along = final.direction or direction
        if along != direction and not self.restore_strategy == "copy":
            move_all("retrial", lambda g: g.trial(0.0, current))  # back to decay(w0), in place
            current = 0.0
        if along != direction or final.step != current or any(g.scale != 1.0 for g in groups.values()):
            move_all("retrial", lambda g: g.apply(final.step, current), along)
        self._commit(search.finish())

    def _reject(self, message: str, earlier_elements: int = 0, earlier_skips: int = 0) -> None:
        """Raise, or count a skipped step, as ``nonfinite`` says. Nothing has been written.
        ``earlier_*``: the plain steps' counts read with this step (their device counters are
        already zeroed), kept in the skip counters."""
        if self.nonfinite == "raise":
            raise NonFiniteError(message)
        self._search.num_skipped_steps += 1 + earlier_skips
        self._search.num_nonfinite_elements += earlier_elements
