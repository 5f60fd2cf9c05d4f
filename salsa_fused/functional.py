"""One step of FusedSaLSa as functions of its buckets and scalars: the functional core.

As ``torch.optim`` keeps ``adam()`` apart from the ``Adam`` class, :class:`~salsa_fused.FusedSaLSa`
validates arguments, owns the per-parameter and search state, runs the closure, keeps the random
state and the model's running statistics, and hands each step to one of two functions here:

- :func:`plain_step`: one backend pass per bucket along ``m_hat``, no host read;
- :func:`search_step`: the slope ``q`` (one pass per bucket), the one host read of ``f(w0)``, ``q``
  and the device counters, then the search rule's trials (one forward each, through the caller's
  ``trial_loss``) and the final move; returns the search state after the step.

:class:`Passes` runs one backend pass over every bucket with its group's scalars, each move
formed by :class:`~salsa_fused.applied.GroupStep`. Nothing here reads ``param_groups`` but
:meth:`Passes.of` and the re-formed Adam scalars after GradScaler's skipped steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _compat as C
from .applied import GroupStep
from .backends.base import DIRECTIONS, GRADIENT, RAW, Backend, Bucket, Hyper, Move, PassArgs, corrections_are_one
from .distributed import SearchReduction
from .errors import NonFiniteError, caller_stacklevel
from .line_search import FLOAT32_MAX, SearchConfig, SearchState, StepPlan, fits_float32, is_step_size
from .rules import FinalMove, SearchRule, Verdict, checked_direction, moment_step


@dataclass
class DeviceCounts:
    """int64 device counters of plain steps (no host read), read and zeroed by the next search."""

    nonfinite_elements: torch.Tensor  # 0-dim: gradient elements left unchanged
    step_counts: torch.Tensor  # [steps whose loss was NaN/inf, steps GradScaler skipped]: the backend's

    @classmethod
    def zeros(cls, device: Optional[torch.device]) -> "DeviceCounts":
        return cls(torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros(2, dtype=torch.int64, device=device))

    @property
    def nonfinite_losses(self) -> torch.Tensor:
        return self.step_counts[0]

    @property
    def scaler_skips(self) -> torch.Tensor:
        return self.step_counts[1]


@dataclass
class CountsInFlight:
    """A snapshot of the plain steps' counters on its way to the host (no wait where it is taken):
    ``local`` what it takes out of this rank's counters once read, ``host`` where the copy lands
    (``[gradient elements summed over the shard group, NaN/inf losses]``), ``done`` its CUDA event."""

    local: torch.Tensor
    host: torch.Tensor
    done: Optional[object]

    @classmethod
    def take(cls, counts: DeviceCounts, reduction: SearchReduction) -> "CountsInFlight":
        with torch.no_grad():
            local = torch.stack([counts.nonfinite_elements, counts.nonfinite_losses])  # a new tensor
            elements = reduction.sum_over_shards(local[:1].to(torch.float64))  # every rank alike (FSDP2)
            values = torch.cat([elements, local[1:].to(torch.float64)])  # losses: averaged, alike already
            if values.device.type != "cuda":
                return cls(local, values, None)
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            with torch.cuda.device(values.device):  # the parameters' device, current or not
                host.copy_(values, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(values.device))
        return cls(local, host, done)

    def ready(self) -> bool:
        """Has the copy landed (no wait)?"""
        return self.done is None or bool(self.done.query())

    def read(self, counts: DeviceCounts) -> Tuple[int, int]:
        """(gradient elements, losses) of the snapshot; they leave the counters (a device op)."""
        if self.done is not None and not self.done.query():
            self.done.synchronize()  # under DDP/FSDP2, a point later: landed long ago in practice
        elements, losses = (int(v) for v in self.host.tolist())
        with torch.no_grad():
            counts.nonfinite_elements.sub_(self.local[0])
            counts.step_counts[0].sub_(self.local[1])
        return elements, losses


@dataclass(frozen=True)
class Passes:
    """The backend's passes over every bucket of one step, each bucket with its group's scalars."""

    backend: Backend
    buckets: List[Bucket]
    hypers: Dict[Tuple[int, int], Hyper]  # (group index, steps sat out) -> Adam's scalars at this step
    groups: Dict[int, GroupStep]  # group index -> lr_g, the schedule's scale, the level
    grad_scale: Optional[torch.Tensor] = None  # GradScaler's scale, or None

    @classmethod
    def of(cls, backend: Backend, buckets: List[Bucket], param_groups: Sequence[dict], moment_k: int,
           scale: float, level: float, grad_scale: Optional[torch.Tensor] = None,
           decay_level: Optional[float] = None) -> "Passes":
        """The passes of a step whose moments are corrected at ``moment_k`` (:func:`moment_step`),
        with schedule scale ``scale`` and level ``eta = level``; the weight decay multiplies
        ``decay_level`` (``level`` when ``None``)."""
        decay_level = level if decay_level is None else decay_level
        hypers: Dict[Tuple[int, int], Hyper] = {}
        groups: Dict[int, GroupStep] = {}
        merged = ()
        for b in buckets:  # once per group and count, not per bucket (a group's dtypes each have one)
            merged = b.merged_sat_out or merged
            key = (b.group_index, b.steps_sat_out)
            if key not in hypers:
                group = param_groups[b.group_index]
                hypers[key] = Hyper.for_step(group, moment_k, b.steps_sat_out)
                if b.group_index not in groups:
                    groups[b.group_index] = GroupStep.of(group, scale, decay_level)
        if merged:
            buckets = apart_where_corrections_differ(buckets, param_groups, moment_k)
            for b in buckets:
                if (b.group_index, b.steps_sat_out) not in hypers:
                    hypers[b.group_index, b.steps_sat_out] = Hyper.for_step(param_groups[b.group_index], moment_k,
                                                                            b.steps_sat_out)
        return cls(backend, buckets, hypers, groups, grad_scale)

    def at_moment_step(self, param_groups: Sequence[dict], moment_k: int) -> "Passes":
        """The same passes with Adam's scalars re-formed at ``moment_k``."""
        buckets = apart_where_corrections_differ(self.buckets, param_groups, moment_k)
        keys = set(self.hypers).union((b.group_index, b.steps_sat_out) for b in buckets)
        return replace(self, buckets=buckets, hypers={(i, sat_out): Hyper.for_step(param_groups[i], moment_k, sat_out)
                                                      for i, sat_out in keys})

    def hyper(self, bucket: Bucket) -> Hyper:
        """Adam's scalars of ``bucket`` at this step."""
        return self.hypers[bucket.group_index, bucket.steps_sat_out]

    @torch.no_grad()
    def run(self, pass_name: str, direction: str, move: Callable[..., Move], *trials: float) -> None:
        """Backend pass ``pass_name`` on every bucket, moving by ``move(group, *trials)`` (a
        :class:`GroupStep` method: ``GroupStep.trial``, ``.apply``, ``.restore``, ...)."""
        run = getattr(self.backend, pass_name)
        for b in self.buckets:
            i = b.group_index
            run(b, PassArgs(self.hyper(b), move(self.groups[i], *trials), direction, self.grad_scale))


def apart_where_corrections_differ(buckets: List[Bucket], param_groups: Sequence[dict],
                                   moment_k: int) -> List[Bucket]:
    """``buckets`` with each bucket of merged counts of steps sat out (``Bucket.merged_sat_out``, built by
    :func:`salsa_fused.buckets.merged_counts`) whose members' bias corrections at ``moment_k`` are not all
    exactly 1 split into one bucket per count, each corrected at its own ``k`` (``k`` fell: a step taken back;
    or the betas changed since the buckets were built). The others stay as they are."""
    kept: List[Bucket] = []
    for b in buckets:
        if not b.merged_sat_out or corrections_are_one(
                Hyper.for_step(param_groups[b.group_index], moment_k, max(b.merged_sat_out)), b.dtype):
            kept.append(b)
            continue
        by_count: Dict[int, List[int]] = {}
        for i, count in enumerate(b.merged_sat_out):
            by_count.setdefault(count, []).append(i)
        for count, members in by_count.items():
            kept.append(replace(b, params=[b.params[i] for i in members], grads=[b.grads[i] for i in members],
                                exp_avg=[b.exp_avg[i] for i in members], exp_avg_sq=[b.exp_avg_sq[i] for i in members],
                                saved=None if b.saved is None else [b.saved[i] for i in members], cache={},
                                grad_pointers=None if b.grad_pointers is None else tuple(b.grad_pointers[i] for i in members),
                                steps_sat_out=count, merged_sat_out=()))
    return kept


def plain_step(passes: Passes, trial: float, loss: torch.Tensor, found_inf: Optional[torch.Tensor],
               counts: DeviceCounts, reduction: SearchReduction, direction: str = GRADIENT) -> None:
    """A step without search: every bucket moves ``lr_g * s * trial`` (``trial``: the rule's first
    trial, ``eta * growth`` for SaLSa) along ``m_hat`` after Adam's moment update, or along the raw
    gradient with the moments untouched when ``direction`` is the backends' ``RAW`` (a rule whose
    direction is ``g``, e.g. LABPAL's SGD updates), unless ``loss`` is non-finite or ``found_inf``
    is set. No host read."""
    if reduction.loss_group is not None:
        # Every rank must take the same skip decision: judge the loss averaged over
        # the data-parallel group (one 4-byte all-reduce, no host read).
        loss = reduction.average_loss(loss.reshape(1)).reshape(())
    # A non-finite loss or GradScaler's found_inf makes the plain pass change nothing. The
    # first bucket's pass counts such a step on the device (no host read, no extra op on
    # the kernel backends); the next search reports the losses and takes the scaler's
    # skips back out of k and t. A step the scaler skips counts as its skip only, not as a
    # NaN loss too (its NaN loss gave the gradients the scaler found), as on a search step.
    # As torch.no_grad(), without its context manager's Python calls (about ten a step).
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled:
        torch.set_grad_enabled(False)
    try:
        for i, b in enumerate(passes.buckets):
            # Passes.hyper(b), inlined: a plain step's host path pays a Python call per bucket for it
            args = PassArgs(passes.hypers[b.group_index, b.steps_sat_out], passes.groups[b.group_index].plain(trial),
                            direction, passes.grad_scale)
            passes.backend.plain_step(b, args, loss, found_inf=found_inf, nonfinite_count=counts.nonfinite_elements,
                                      step_counts=counts.step_counts if i == 0 else None)
    finally:
        if grad_enabled:
            torch.set_grad_enabled(True)


#: Where a GradScaler's per-device ``found_inf`` records are, if found: ``scaler.update()`` reads them.
ScalerRecords = Callable[[], Optional[List[torch.Tensor]]]


def agree_scaler_found_inf(records: ScalerRecords, own: bool, agreed: bool) -> None:
    """Where this rank's GradScaler ``found_inf`` is not the skip its ranks agreed on (the optimizer skips on
    every rank alike), write the agreed flag into the scaler's per-device records, ``records()``, in place
    (a fill on the device, no host read): ``scaler.update()`` reads them, so the ranks' scales stay alike.
    Where they are not found (a scaler other than torch's, another torch), warn that the scales part (and the
    gradients the ranks reduce next mix scales)."""
    if own == agreed:
        return
    found = records()
    if found is not None:
        for record in found:
            record.fill_(float(agreed))
        return
    warnings.warn(
        "GradScaler's found_inf differs between the ranks (this rank's: "
        f"{'inf' if own else 'none'}; another rank's: {'none' if own else 'inf'}): FusedSaLSa skipped this "
        "step on every rank, but this rank's scaler keeps its found_inf where FusedSaLSa cannot write the "
        "agreed one (only torch.amp.GradScaler.step's records are found), so the ranks' loss scales part. Use "
        "torch.amp.GradScaler, or a scaler whose found_inf is all-reduced over the ranks that hold the "
        "gradient shards (docs/training.md)",
        RuntimeWarning, stacklevel=caller_stacklevel())


def slope(passes: Passes, direction: str, device: Optional[torch.device]) -> torch.Tensor:
    """``q = sum over groups of lr_g * g.d`` with this step's moments (nothing written); 0-dim fp32."""
    q = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        for b in passes.buckets:
            lr = passes.hyper(b).lr
            partial = passes.backend.slope(b, PassArgs(passes.hyper(b), direction=direction,
                                                       grad_scale=passes.grad_scale))
            q = q + (partial if lr == 1.0 else partial * lr)
    return q


def search_step(passes: Passes, plan: StepPlan, state: SearchState, loss: torch.Tensor,
                trial_loss: Callable[[], float], *, rule: SearchRule, config: SearchConfig,
                search_direction: str, param_groups: Sequence[dict], counts: DeviceCounts,
                found_inf: Optional[torch.Tensor], reduction: SearchReduction, nonfinite: str,
                has_saved_copy: bool, device: Optional[torch.device], two_phase: bool = False,
                failure: Optional[Exception] = None, scaler_records: ScalerRecords = lambda: None) -> SearchState:
    """One search step from ``w0``; returns the search state after it.

    ``plan.state`` is the state with this step's counters advanced; ``state`` the live one, which
    keeps GradScaler's skipped steps taken back out of ``k`` and ``t`` and, under
    ``nonfinite="skip"``, the skip counters, even when this step is skipped or raises.
    ``trial_loss()`` evaluates the loss at the weights as they are (the caller resets the random
    state before each trial forward). If it raises, the weights go back to ``w0`` (bitwise with a
    saved copy) and the moments to their values before the step, and the exception propagates.
    ``two_phase``: the step's form, and ``failure``: what this rank's forward of ``loss`` raised (then
    ``loss`` is NaN), both carried in the loss's all-reduce and checked on every rank before any write
    (:meth:`SearchReduction.check`). ``scaler_records``: the GradScaler's records of this rank's ``found_inf``,
    given the ranks' agreed skip (:func:`agree_scaler_found_inf`).
    """
    direction = checked_direction(rule, search_direction)
    q = slope(passes, direction, device)
    own_inf = found_inf.to(q.device, torch.float32).reshape(1) if found_inf is not None else q.new_zeros(1)
    flags = [own_inf, counts.nonfinite_elements.to(torch.float32).reshape(1)]
    # The loss group's all-reduce comes first, with the ranks' status: in the two-phase form it pairs with
    # the opening exchange of a rank in the other form (SearchReduction.check), here its first collective.
    head = reduction.exchange(loss.reshape(1), two_phase, failure)
    if reduction.shard_group is not None and head.numel() > 1:
        # Read before the shard group's sum (one more host read under FSDP2): a rank that refuses the step
        # here runs no more collectives, and its peers must not wait for it in another group.
        reduction.check(head[1:].tolist(), two_phase, failure, plan.state.step)
    # q and the flags are per shard under FSDP2: one sum over the shard group for the three. The
    # plain steps' NaN/inf losses are not: their losses were averaged, so every rank counted alike.
    shard_sums = reduction.sum_over_shards(torch.cat([q.reshape(1), *flags]))
    values = torch.cat([head, shard_sums, counts.nonfinite_losses.to(torch.float32).reshape(1),
                        counts.scaler_skips.to(torch.float32).reshape(1),
                        own_inf]).tolist()  # the one read before any write
    f0_value, status = values[0], values[1:head.numel()]
    q_value, inf_flag, earlier_nonfinite, earlier_bad_losses, scaler_skips, own_inf_value = values[head.numel():]
    reduction.check(status, two_phase, failure, plan.state.step)
    if reduction.loss_group is not None and reduction.shard_group is None:  # replicated weights (DDP)
        reduction.refuse_gradients_that_differ(q_value, plan.state.step, q.device,
                                               lambda: [p for group in param_groups for p in group["params"]])
    if found_inf is not None:
        agree_scaler_found_inf(scaler_records, own_inf_value != 0, inf_flag != 0)
    step_state = plan.state
    if scaler_skips:
        skipped = int(scaler_skips)
        counts.scaler_skips.zero_()
        step_state.step -= skipped  # the rule below sees this
        step_state.steps_since_search = max(0, step_state.steps_since_search - skipped)
        passes = passes.at_moment_step(param_groups, moment_step(rule, step_state.step))
        # kept even if this step is skipped or rejected below
        state.step -= skipped
        state.steps_since_search = max(0, state.steps_since_search - skipped)
    if inf_flag:  # GradScaler found inf/nan: skip the step like AdamW, state unchanged but for what ran
        return replace(state, num_forward_evals=step_state.num_forward_evals,
                       num_backward_evals=step_state.num_backward_evals)
    if earlier_nonfinite or earlier_bad_losses:
        counts.nonfinite_elements.zero_()
        counts.nonfinite_losses.zero_()
        report_plain_steps(step_state, nonfinite, int(earlier_nonfinite), int(earlier_bad_losses), step_state.step)
    if not (math.isfinite(f0_value) and math.isfinite(q_value)):
        if not math.isfinite(f0_value):
            what, value, why = "loss", f0_value, ""
            if math.isinf(f0_value):
                why = " (or a float64 loss above float32's 3.4e38: the search reads losses in float32)"
            if reduction.loss_ranks > 1:
                what = (f"loss (averaged over the {reduction.loss_ranks} data-parallel ranks: NaN/inf on any "
                        "rank's batch)")
        else:
            what, value = "gradient (slope q)", q_value
            why = ("; q = g.d is not finite where a gradient element is NaN/inf or its square overflows float32 "
                   "(|g| above about 1.8e19), or where a moment in opt.state was written non-finite by hand")
            largest_probe = max((group.lr for group in passes.groups.values()), default=1.0)
            if math.isinf(q_value) and largest_probe > 1.0:
                why = (f"; q sums search_lr * g.d over the groups, and a group's search_lr (its lr at "
                       f"construction) is {largest_probe:.4g}: the sum may have overflowed float32")
        return reject(state, nonfinite, f"non-finite {what} {value} at step {step_state.step}{why}; "
                      "weights and optimizer state are unchanged", int(earlier_nonfinite), int(earlier_bad_losses))
    step_state.last_search_loss = f0_value
    search = rule(plan, config, f0_value, q_value)
    lacking = [name for name in ("active", "step_size", "observe", "final", "finish") if not hasattr(search, name)]
    if lacking:
        raise TypeError(f"search rule {type(rule).__name__}(plan, config, loss, slope) must return a search (a Search: "
                        f"active, step_size, observe(), final(), finish()), got {type(search).__name__}, which has no "
                        f"{', '.join(lacking)}; the weights and moments are as before the step")
    try:
        return run_search(passes, search, direction, trial_loss, has_saved_copy, reduction, two_phase)
    except GaveUpAtNonFiniteTrial as error:  # the weights and moments are back at w0
        return reject(state, nonfinite, f"{error} (step {step_state.step})", int(earlier_nonfinite),
                      int(earlier_bad_losses))


def run_search(passes: Passes, search, direction: str, trial_loss: Callable[[], float],
               has_saved_copy: bool, reduction: Optional[SearchReduction] = None,
               two_phase: bool = False) -> SearchState:
    """Drive ``search`` (:class:`salsa_fused.rules.Search`): the weights go to each trial it names
    until it stops, then to its final move; or, when it is not active, straight to the final move.
    Returns ``search.finish()``. The search's final move and state are read and checked before the
    final move is written: a rule that raises there, or names a non-finite move or a state no run
    can reach, leaves the weights and moments as before the step. ``reduction``: over which shards
    a finiteness read of the weights is summed (FSDP2); ``two_phase``, the step's form, for the warning when
    every trial fails."""
    if not search.active:
        final, state = _decisions(search, direction)
        _check_final_fits_float32(passes, search, final)
        along = final.direction or direction
        half = _float16_before(passes)
        moments = ([t for b in passes.buckets for t in (*b.exp_avg, *b.exp_avg_sq)]
                   if half is not None and has_saved_copy else [])  # put back only where the weights can be
        moments_before = C.foreach_mul(moments, 1.0) if moments else []
        passes.run("first_trial", along, GroupStep.guard_failed, final.step)
        if half is not None and half.gained(_weights(passes, torch.float16), reduction):
            # no trial tested it (0.1.0's guard: a loss of exactly 0, or a vanishing slope), the level grown so
            untested = (f"the untested move of a search whose guard failed (step size {final.step:g} along m_hat; "
                        "a loss of exactly 0 or a smoothed slope under 1e-8 grows the level without a trial) "
                        "overflowed float16 weights")
            if not has_saved_copy:
                raise NonFiniteError(f"{untested}, and restore='inplace' cannot undo it: the weights hold NaN/inf "
                                     "(restore='copy', the default, puts them back)")
            passes.run("restore", along, GroupStep.restore, final.step)
            with torch.no_grad():
                C.foreach_copy_(moments, moments_before)
            raise GaveUpAtNonFiniteTrial(f"{untested}: the weights and the optimizer's state are as before the step")
        return state
    # Pass A writes this step's moments; a trial forward that raises (out of memory, caught and
    # retried by the caller) must find them as they were: copies, 8 bytes per parameter while
    # the search runs, put back on an exception. One multi-tensor op (x * 1 is exact, -0 and
    # NaN included), not a clone per tensor: 296 launches per search for GPT-2 small.
    # Along the raw gradient no pass writes the moments: nothing to copy.
    moments = [] if direction == RAW else [t for b in passes.buckets for t in (*b.exp_avg, *b.exp_avg_sq)]
    moments_before = C.foreach_mul(moments, 1.0) if moments else []
    undecayed = getattr(search, "undecayed_trials", False) is True
    if undecayed and direction != RAW:
        raise TypeError(f"search {type(search).__name__} asks for trials without the weight decay (undecayed_trials), "
                        f"which only a search along 'raw' can take (its final move, in place, passes the weights "
                        f"again without writing Adam's moments), not along {direction!r}; the weights and moments "
                        "are as before the step")
    restore_move = _undecayed(GroupStep.restore) if undecayed else GroupStep.restore

    def put_back(at: float) -> None:
        passes.run("restore", direction, restore_move, at)
        if moments:
            with torch.no_grad():
                C.foreach_copy_(moments, moments_before)

    half = _float16_before(passes)  # a trial overflowed only elements it made non-finite (a mask's -inf was)
    passes.run("first_trial", direction, _checked_trial(passes, search, "its first trial", undecayed),
               search.step_size)
    current = search.step_size  # the trial the weights are at
    trials = finite_trials = 0
    try:
        while True:
            tried = search.step_size
            loss = trial_loss()
            if half is not None and math.isfinite(loss) and half.gained(_weights(passes, torch.float16), reduction):
                # a forward that saturates (tanh, clamp) reads a finite loss at float16 weights that
                # overflowed: a failed trial, never one to keep
                if not has_saved_copy:
                    raise NonFiniteError(
                        f"the trial at step size {tried:g} overflowed float16 weights (its loss, {loss:g}, was "
                        "finite: a forward that saturates); restore='inplace' cannot undo such a trial: the "
                        "weights hold NaN/inf (restore='copy', the default, backtracks from w0)")
                loss = math.inf
            trials += 1
            finite_trials += math.isfinite(loss)
            verdict = search.observe(loss)
            if not isinstance(verdict, Verdict):  # a bool's False would keep a failed trial
                raise TypeError(f"search {type(search).__name__}.observe() must return a Verdict (ACCEPT, RETRY or "
                                f"GIVE_UP), got {verdict!r}; the weights and moments are as before the step")
            if (verdict is Verdict.GIVE_UP and not math.isfinite(loss)
                    and (_NonFiniteBefore(_weights(passes, saved=True), passes.buckets[0].device).gained(
                        _weights(passes), reduction) if has_saved_copy
                         else not _weights_finite(passes, reduction=reduction))):
                # 0.1.0 keeps the last trial when every trial failed; one whose weights overflowed
                # their dtype is not kept (read only on this path: nothing non-finite is kept)
                failed = (f"every trial of the search failed, the last (step size {tried:g}) at a non-finite "
                          f"loss {loss}, its weights overflowed their dtype")
                if not has_saved_copy:
                    raise NonFiniteError(
                        f"{failed}; restore='inplace' cannot undo such a trial: the weights hold NaN/inf "
                        "(restore='copy', the default, keeps w0; a smaller init_step_size lets the search "
                        "backtrack further)")
                raise GaveUpAtNonFiniteTrial(
                    f"{failed}: the weights and the optimizer's state are as before the step (a smaller "
                    "init_step_size, or more max_trials, lets the search backtrack further)")
            if verdict is Verdict.GIVE_UP and not finite_trials:
                # the closure is NaN/inf wherever it was tried, down to the smallest trial, and finite at
                # w0: kept, the run would go on at a level shrunk to next to nothing
                raise GaveUpAtNonFiniteTrial(
                    f"no trial of the search returned a finite loss ({trials} trials, the last at step size "
                    f"{tried:g}: {loss}), while the loss at the current weights was finite: the closure returns "
                    "NaN/inf at weights next to them (a forward that breaks under torch.no_grad(), or state the "
                    "first call changed). The weights and the optimizer's state are as before the step")
            if verdict is not Verdict.RETRY:
                break
            passes.run("retrial", direction, _checked_trial(passes, search, "a retrial", undecayed), search.step_size,
                       current)
            current = search.step_size
        final, state = _decisions(search, direction)
        _check_final_fits_float32(passes, search, final)
        if verdict is Verdict.GIVE_UP and getattr(search, "exhausted", False):
            rule = getattr(search, "config", None) or getattr(search, "rule", None)
            shrink = max((passes.hypers[key].shrink(passes.groups[key[0]].decay) for key in passes.hypers),
                         default=0.0)
            _warn_every_trial_failed(search.trials, getattr(rule, "backtrack", 0.0) ** (search.trials - 1), shrink,
                                     two_phase, getattr(search, "grows_untested", False))
    except BaseException:
        put_back(current)
        raise
    along = final.direction or direction
    if undecayed and along != RAW:
        put_back(current)
        raise TypeError(f"search {type(search).__name__} took its trials without the weight decay (undecayed_trials) "
                        f"and named a final move along {along!r}: such a search moves along 'raw' only; the weights "
                        "and moments are as before the step")
    if undecayed and not has_saved_copy:  # in place: back to w0, then the decay and the move in one pass
        passes.run("restore", direction, restore_move, current)
        passes.run("first_trial", along, GroupStep.apply, final.step, 0.0)
        moved = True
    else:
        if along != direction and not has_saved_copy:
            passes.run("retrial", direction, GroupStep.trial, 0.0, current)  # back to decay(w0), in place
            current = 0.0
        moved = (undecayed or along != direction or final.step != current
                 or any(g.scale != 1.0 for g in passes.groups.values()))
        if moved:
            passes.run("retrial", along, GroupStep.apply, final.step, current)
    if moved:  # the weights at the last trial were checked in the loop
        if half is not None and half.gained(_weights(passes, torch.float16), reduction):
            if not has_saved_copy:
                raise NonFiniteError(
                    f"the applied step (step size {final.step:g} times each group's lr / search_lr and schedule "
                    "scale) overflowed float16 weights, and restore='inplace' cannot undo it: the weights hold "
                    "NaN/inf (restore='copy', the default, puts them back; lower lr, or train float16 weights under "
                    "an fp32 master copy)")
            put_back(current)  # from the saved copy: exact whatever the move was
            raise GaveUpAtNonFiniteTrial(
                f"the applied step (step size {final.step:g} times each group's lr / search_lr and "
                "schedule scale) overflowed float16 weights: the weights and the optimizer's state are "
                "as before the step (lower lr, or train float16 weights under an fp32 master copy)")
    return state


def _warn_every_trial_failed(trials: int, fell_to: float, shrink: float = 0.0, two_phase: bool = False,
                             grows_untested: bool = False) -> None:
    """Every trial of a backtracking search failed: the level fell to at most ``fell_to`` (``backtrack``
    to the ``trials - 1``) times the first trial (``0.8^99`` with the defaults), so the run nearly stops
    while each search spends ``max_trials`` forwards. 0.1.0 does the same, silently. The text depends on
    the configuration and the step's form only, so Python's filter shows it once per calling line. It names
    the causes in the order they are met: in the two-phase form, a ``loss=`` that is not the closure's; a
    closure that returns a much larger loss at trial weights (or NaN at some: a search with no finite trial
    is refused before this warning); for a rule that ``grows_untested`` (SaLSa's), a level grown untested
    (0.1.0's rule grows it by ``growth`` at every search that cannot test: loss exactly 0, or a smoothed
    slope under 1e-8, as on a batch already fitted). When ``shrink``, the largest
    ``weight_decay * lr * s * eta`` of the step, is 1e-3 or more, the text says so (not its value, which moves
    with the level): every trial shrinks the weights by it whatever the trial (the decay multiplies the level
    before the search), which can fail them all on a trained model."""
    decay = ("Every trial also shrank the weights by 1e-3 or more (weight_decay * lr * schedule scale * "
             "the level before the search, whatever the trial): on a trained model that alone can fail them "
             "all; give a smaller init_step_size, or a longer schedule. " if shrink >= 1e-3 else "")
    loss_given = ("a loss= that is not the closure's loss at the current weights (the last micro-batch's loss, "
                  "or a sum where the closure returns the mean: pass the mean over all micro-batches, unscaled, "
                  "as the closure returns it); " if two_phase else "")
    untested = ("; or a level grown untested: at a search whose loss is exactly 0 or whose gradient has vanished "
                "(smoothed slope under 1e-8), SaLSa's rule (0.1.0's) grows the level by growth without a trial, so "
                "batches already fitted leave a level far too large for the next batch with a loss (docs/api.md, "
                "'A loss of exactly zero')" if grows_untested else "")
    warnings.warn(
        f"every trial of a line search failed ({trials} trials): the level fell to at most {fell_to:.3g} "
        f"times the first trial (with the defaults, to next to nothing). Causes: {loss_given}a closure that "
        f"returns a much larger loss at trial weights, or NaN at the larger ones{untested}. "
        f"{decay}opt.search_state.last_trials and opt.step_size show it",
        RuntimeWarning, stacklevel=caller_stacklevel())


def _undecayed(move: Callable[..., Move]) -> Callable[..., Move]:
    """``move`` (a :class:`GroupStep` method) without the weight decay: the trials, and the restores from them, of a
    search whose trials lie on the line from the undecayed ``w0`` (``undecayed_trials``, LABPAL's fit)."""
    def without_decay(group: GroupStep, *trials: float) -> Move:
        return replace(move(group, *trials), decay=0.0)
    return without_decay


def _checked_trial(passes: Passes, search, which: str, undecayed: bool = False):
    """``GroupStep.trial`` (without the decay where ``undecayed``), once ``search.step_size`` is a trial a pass can
    take: a finite number >= 0 that float32 holds times each group's ``lr`` (a rule's own trials are its own; the
    plan's first was checked before the step)."""
    size = search.step_size
    if not is_step_size(size):
        raise ValueError(f"search {type(search).__name__} named {which} of step size {size!r}; a trial is a finite "
                         "number >= 0. The weights and moments are as before the step")
    for index, group in passes.groups.items():
        if not fits_float32(group.trial(size).step):
            raise ValueError(f"search {type(search).__name__} named {which} of step size {size:.4g}, which is "
                             f"{group.trial(size).step:.4g} times the direction in param_groups[{index}]: more than "
                             f"float32 holds ({FLOAT32_MAX:.4g}). The weights and moments are as before the step")
    return _undecayed(GroupStep.trial) if undecayed else GroupStep.trial


def _decisions(search, direction: str) -> Tuple[FinalMove, SearchState]:
    """``search.final()`` and ``search.finish()``, checked: a finite move ``>= 0`` along the trials'
    direction or one of the backends', and a state :meth:`SearchState.validate` accepts (``load_state_dict``
    would refuse any other)."""
    final = search.final()
    name = type(search).__name__
    if not isinstance(final, FinalMove):
        raise TypeError(f"search {name}.final() must return a FinalMove, got {type(final).__name__}; "
                        "the weights and moments are as before the step")
    step = final.step
    if not is_step_size(step):
        raise ValueError(f"search {name}.final() named a move of step size {step!r}; a final move is a finite "
                         "number >= 0. The weights and moments are as before the step")
    if final.direction not in (None, *DIRECTIONS):
        raise ValueError(f"search {name}.final() named direction {final.direction!r}; a final move is along "
                         f"the trials' direction (None) or one of {', '.join(map(repr, DIRECTIONS))}. The "
                         "weights and moments are as before the step")
    state = search.finish()
    if not isinstance(state, SearchState):
        raise TypeError(f"search {name}.finish() must return a SearchState, got {type(state).__name__}; "
                        "the weights and moments are as before the step")
    try:
        state.validate()
    except ValueError as error:
        raise ValueError(f"search {name}.finish() returned a state no run can reach ({error}); the weights "
                         "and moments are as before the step") from None
    return final, state


def _check_final_fits_float32(passes: Passes, search, final: FinalMove) -> None:
    """Refuse a final move that float32, where the passes take their step sizes, cannot hold: it would
    write inf weights. The trials were checked before the step (``_check_moves_fit_float32``); a rule's
    final move is its own (LABPAL's ``update_step / ||g||``)."""
    for index, group in passes.groups.items():
        size = group.apply(final.step, 0.0).step
        if not fits_float32(size):
            raise ValueError(
                f"search {type(search).__name__}.final() named a move of step size {final.step:.4g}, which is "
                f"{size:.4g} times the direction in param_groups[{index}] (lr, schedule scale): more than float32 "
                f"holds ({FLOAT32_MAX:.4g}). The rule's state sets it (LABPAL's update_step over the gradient's "
                "norm); the weights and moments are as before the step")


class GaveUpAtNonFiniteTrial(NonFiniteError):
    """A search whose kept move would write NaN/inf weights, or none of whose trials returned a finite loss;
    nothing was written (``reject``)."""


def _float16_before(passes: Passes) -> Optional[_NonFiniteBefore]:
    """What of the float16 weights was non-finite before a move, None without float16 weights (alike on every rank:
    the buckets' dtypes are); float16 is the one dtype a realistic step overflows (65504)."""
    buckets = [b for b in passes.buckets if b.dtype == torch.float16]
    return _NonFiniteBefore(_weights(passes, torch.float16), buckets[0].device) if buckets else None


def _weights(passes: Passes, dtype: Optional[torch.dtype] = None, saved: bool = False) -> List[torch.Tensor]:
    """The non-empty weights (or their saved copies, ``w0``) of ``dtype``, or of every dtype; a shard may be empty."""
    return [t for b in passes.buckets if dtype is None or b.dtype == dtype
            for t in (b.saved if saved else b.params) if t.numel()]


class _NonFiniteBefore:
    """Which of ``weights`` (one list, in bucket order) were non-finite before a move: a flag per tensor on the
    device and, for the rare tensors that were (an additive mask's -inf), their count of non-finite elements.
    The flags are read once, here: one host read per search step with float16 weights, after the step's read
    of its loss and slope. :meth:`gained` says whether the move made any element non-finite that was not."""

    def __init__(self, weights: List[torch.Tensor], device: torch.device):
        self.device = device
        with torch.no_grad():
            self.finite = _finite_flags(weights, device)
            self.masked = [i for i, finite in enumerate(self.finite.tolist()) if not finite]
            self.counts = _nonfinite_counts(weights, self.masked)

    def gained(self, weights: List[torch.Tensor], reduction: Optional[SearchReduction] = None) -> bool:
        """Whether ``weights`` (the same tensors, moved) hold a non-finite element they did not: one device read,
        the count summed over the shard group (FSDP2: every rank decides alike, a shard with none included)."""
        with torch.no_grad():
            made = (self.finite & _finite_flags(weights, self.device).logical_not()).sum()
            if self.masked:
                made = made + (_nonfinite_counts(weights, self.masked) > self.counts).sum()
            made = made.to(torch.float32).reshape(1)
            if reduction is not None:
                made = reduction.sum_over_shards(made)
        return bool(made.item())


def _finite_flags(weights: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One flag per tensor, whether all its elements are finite: one multi-tensor op, not read."""
    if not weights:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.stack(torch._foreach_norm(weights, float("inf"))).isfinite()


def _nonfinite_counts(weights: List[torch.Tensor], indices: List[int]) -> Optional[torch.Tensor]:
    """The count of non-finite elements of each of ``weights[i]`` for ``i`` in ``indices``, on the device."""
    if not indices:
        return None
    return torch.stack([torch.isfinite(weights[i]).logical_not().sum() for i in indices])


def _weights_finite(passes: Passes, reduction: Optional[SearchReduction] = None) -> bool:
    """Are the weights finite? One device read, the count of non-finite tensors summed over the shard group
    (FSDP2: every rank decides alike); asked where every trial failed at a non-finite loss."""
    buckets = passes.buckets  # alike on every rank
    if not buckets:
        return True
    with torch.no_grad():
        bad = _finite_flags(_weights(passes), buckets[0].device).logical_not().sum().to(torch.float32).reshape(1)
        if reduction is not None:
            bad = reduction.sum_over_shards(bad)
    return not bool(bad.item())


def report_plain_steps(state: SearchState, nonfinite: str, elements: int, losses: int, step: Optional[int],
                       where: str = "") -> None:
    """The plain steps' NaN/inf counts, read at step ``step`` (by a search, or ``where`` no search
    comes; ``None``: between steps): ``"raise"`` a :class:`NonFiniteError` naming them (that step
    is not applied), or add them to ``state``'s counters. Nothing when both are 0."""
    if not (elements or losses):
        return
    if nonfinite == "raise":
        problems = []
        if elements:
            problems.append(f"{elements} gradient elements were NaN/inf on plain steps since the last "
                            "search, or their new 16-bit weights overflowed (those elements kept their "
                            "weights, and their moments where the gradient was NaN/inf; a finite gradient "
                            "above about 1.8e19 counts too: its square overflows float32)")
        if losses:
            problems.append(f"the loss was NaN/inf on {losses} plain step(s) since the last search "
                            "(those steps changed nothing)")
        refused = f"; step {step} was not applied" if step is not None else ""
        raise NonFiniteError(f"{where}{'; '.join(problems)}{refused}")
    state.num_nonfinite_elements += elements
    state.num_skipped_steps += losses


def reject(state: SearchState, nonfinite: str, message: str, earlier_elements: int = 0,
           earlier_skips: int = 0) -> SearchState:
    """Raise :class:`NonFiniteError`, or count a skipped step into ``state``, as ``nonfinite`` says.
    Nothing has been written. ``earlier_*``: the plain steps' counts read with this step (their
    device counters are already zeroed), kept in the skip counters."""
    if nonfinite == "raise":
        raise NonFiniteError(message)
    state.num_skipped_steps += 1 + earlier_skips
    state.num_nonfinite_elements += earlier_elements
    return state
