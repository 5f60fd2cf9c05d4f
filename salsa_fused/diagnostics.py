"""The watchers of :class:`salsa_fused.FusedSaLSa`: habits that leave a run silently wrong, each named by a
warning: an AdamW learning rate given as ``lr`` (at the first steps, and for each group added later), every
``lr`` held at 0 for ``LR_ZERO_STEPS_WARNED`` steps (a warm-up from 0 nobody steps; again after each such run), a
torch scheduler on top of the optimizer's own schedule, ``nonfinite="skip"`` skipping every step where no search
comes, a closure whose trials tie the step's loss search after search, FSDP2 trials that may read stale unsharded
weights, and (their rules in :mod:`salsa_fused.step_size`) a run past its schedule's end and a level that collapsed
before the schedule froze it. Each warns once per optimizer unless said otherwise; none changes a step.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from . import functional as F
from .distributed import _is_dtensor
from .errors import caller_stacklevel
from .line_search import SearchState
from .step_size import is_number
from .validation import as_the_step_sees, starts_probing


#: Where no search comes (a frozen level), every plain step of a window of counts had a NaN/inf loss and was skipped.
SKIPPED_EVERY_STEP = (
    "nonfinite='skip' skipped every one of the last {interval} steps (the loss was NaN/inf at each), and no search "
    "comes to move the level: the weights have not moved since, and a run whose weights left the loss's domain (a "
    "log or sqrt of a negative, an overflow) stays there, since no skipped step moves them. "
    "opt.search_state.num_skipped_steps counts them; nonfinite='raise' stops at the first; a checkpoint from before "
    "the skips, with a shorter total_steps or a lower lr, goes on from there")

#: Searches in a row whose accepted trial's loss was the step's own bitwise, where the slope says it should have
#: moved by ``TIED_TRIAL_RELATIVE_CHANGE`` of the loss or more and most weights moved, after which a warning names
#: a closure that does not run the forward again (:meth:`FusedSaLSa._count_tied_search`).
TIED_SEARCHES_WARNED = 5

#: The first-order change ``t * s`` over ``|f0|`` from which a bitwise tie of a float32 loss (resolution 2^-24)
#: is not its rounding.
TIED_TRIAL_RELATIVE_CHANGE = 2.0 ** -7

TIED_SEARCHES = (
    "the closure's loss at the accepted trial was the step's own loss bitwise at each of the last {count} searches, "
    "where the slope said a move of step size {step:.4g} changes it by about {predicted:.3g} ({relative:.1%} of "
    "it): the closure does not seem to run the forward again at each call (a loss built from outputs computed "
    "before step(), step(lambda: loss_fn(out, y)), or from a cache). Every such trial passes the Armijo test, and "
    "the level grows by growth at each search without bound. The closure must call the model: "
    "step(lambda: loss_fn(model(x), y)); docs/api.md, 'The two-phase form'")

#: Steps in a row with every group's lr at 0 after which a warning says that nothing moves.
LR_ZERO_STEPS_WARNED = 100

LR_ZERO_STEPS = (
    "every param group's lr has been 0 for the last {steps} steps: nothing moved, and no search ran. A warm-up "
    "from 0 needs its scheduler stepped (under Lightning's manual optimization, which does not step it, call "
    "self.lr_schedulers().step() after opt.step(), as examples/lightning_salsa.py does); lr here is a multiplier "
    "on the searched level (docs/api.md)")


def most_weights_moved(passes: F.Passes) -> bool:
    """Do at least half the weights' elements differ from their saved copy of ``w0`` (after a search step)? False
    without copies (``restore="inplace"``). One device read."""
    if not passes.buckets or any(bucket.saved is None for bucket in passes.buckets):
        return False
    with torch.no_grad():
        pairs = [(w, w0) for bucket in passes.buckets for w, w0 in zip(bucket.params, bucket.saved)]
        total = sum(w.numel() for w, _ in pairs)
        moved = torch.stack([(w != w0).sum() for w, w0 in pairs]).sum()
        return total > 0 and 2 * int(moved) >= total


class Diagnostics:
    """The watchers, mixed into :class:`salsa_fused.FusedSaLSa`: they read its ``param_groups``, ``_search`` and
    ``schedule`` and keep their own counters and once-flags on it (:data:`WATCHER_DEFAULTS`)."""

    #: The watchers' counters and once-flags, as a new optimizer (or one unpickled without them) starts them; the
    #: step sets the last two where it calls step_size's warnings.
    WATCHER_DEFAULTS = (("_lr_checked", False), ("_lr_rising", dict), ("_steps_at_lr_zero", 0),
                        ("_stacked_scheduler_warned", False), ("_skips_warned", False), ("_tied_searches", 0),
                        ("_ties_warned", False), ("_deferred_warnings", list), ("_fsdp_checked", False),
                        ("_past_end_warned", False), ("_collapse_checked", False))

    def _start_watchers(self, keep: bool = False) -> None:
        """Set each of :data:`WATCHER_DEFAULTS` (``keep``: only those not set yet)."""
        for name, default in self.WATCHER_DEFAULTS:
            value = default() if callable(default) else default
            if keep:
                self.__dict__.setdefault(name, value)
            else:
                setattr(self, name, value)

    def _count_steps_at_lr_zero(self, moves: bool) -> None:
        """At a step that would search, ``moves`` saying whether a group with a positive ``lr`` holds a parameter that
        requires grad: count the steps in a row at which every group's ``lr`` is 0, and warn once at
        ``LR_ZERO_STEPS_WARNED``: a warm-up from 0 that nobody steps (Lightning does not step a scheduler under
        manual optimization) left every step a no-op, silently (an integration audit's find: lr 0.0, no search,
        the weights unmoved)."""
        if moves or any(group["lr"] != 0 for group in self.param_groups):  # frozen parameters at a positive lr
            self._steps_at_lr_zero = 0
            return
        self._steps_at_lr_zero += 1
        if self._steps_at_lr_zero == LR_ZERO_STEPS_WARNED:
            warnings.warn(LR_ZERO_STEPS.format(steps=LR_ZERO_STEPS_WARNED), RuntimeWarning,
                          stacklevel=caller_stacklevel())

    def _warn_if_every_step_was_skipped(self, skipped: int, interval: int) -> None:
        """Warn once where ``skipped``, the plain steps skipped for a NaN/inf loss among the last ``interval``
        (read where no search came to report them), is every one of them: the weights have not moved since."""
        if skipped >= interval and not self._skips_warned:  # "skip" ("raise" raised): each step of a window
            self._skips_warned = True
            warnings.warn(SKIPPED_EVERY_STEP.format(interval=interval), RuntimeWarning, stacklevel=caller_stacklevel())

    def _warn_if_lr_looks_like_a_step_size(self) -> None:
        """At the first step: an lr (or a scheduler's initial_lr/max_lr) below 0.1 is most likely AdamW's
        habit; here it multiplies every step the search finds. A torch scheduler's lr still rising below 0.1
        is looked at again at the next steps. A resumed run (its step counter past 0) was looked at when it
        started: its lr now may be a scheduler's (ReduceLROnPlateau)."""
        if self._search.step > 0 and not self._lr_rising:
            self._lr_checked = True
            return
        looked, self._lr_rising = self._lr_rising or dict.fromkeys(range(len(self.param_groups))), {}
        for index, last in looked.items():
            warned = self._warn_if_group_lr_looks_like_a_step_size(index, self.param_groups[index], last)
            if warned:
                self._lr_rising = {}
                break
            if warned is None:
                self._lr_rising[index] = self.param_groups[index]["lr"]
        self._lr_checked = not self._lr_rising

    @staticmethod
    def _warn_if_group_lr_looks_like_a_step_size(index: int, group: dict, last: Optional[float] = None
                                                 ) -> Optional[bool]:
        """Warns (and returns True) when group ``index``'s lr stays below 0.1, AdamW's habit: its lr, or a torch
        scheduler's max_lr (OneCycleLR) or initial_lr. A scheduler may raise lr past its initial_lr (CyclicLR
        writes its base_lr there, never its max_lr): an lr below 0.1 that may still rise (``last``, its lr at
        the previous look, is None or below it) is not judged yet (None); one that stopped, by its peak. A scheduler's
        lr below 0.1 on an initial_lr of 0.1 or more is not judged: a warm-up of the multiplier stepped per epoch
        (LinearLR from 0.01) holds a low lr as long as one returning AdamW's rates (LambdaLR(lambda k: 3e-4)),
        and only its future tells them apart."""
        base = group.get("max_lr", group.get("initial_lr", group["lr"]))
        if not (is_number(base) and base < 0.1):
            return False
        where = f"peaks at lr={base:g} (its scheduler's max_lr)" if "max_lr" in group else f"starts at lr={base:g}"
        if "initial_lr" in group and "max_lr" not in group:
            lr = group["lr"]
            if not (is_number(lr) and lr < 0.1):
                return False
            if last is None or lr > last:
                return None
            base = max(base, last)
            where = f"peaks at lr={base:g} under its scheduler"
        if base <= 0:
            return False
        search_lr = as_the_step_sees(group)["search_lr"] or 1.0  # built at 0: it probes at 1 from its first lr
        if base / search_lr < 0.1:
            built = (f"the lr the group was built with being {search_lr:g}" if group.get("search_lr")
                     else "the group was built at lr=0, so it probes at 1")
            effect = f"which scales every step the search finds by {base / search_lr:g} (lr / search_lr, {built})"
        else:  # the lr it was built with: the units of the level, which grows to make up for them
            effect = (f"the lr it was built with (its search_lr): trials probe search_lr * eta, so the first ones "
                      f"are {1 / search_lr:.4g}x smaller than at lr=1.0 and the level spends its first searches "
                      "growing to make up for it, a slow start (it scales the step found only by lr / search_lr, "
                      f"{base / search_lr:g})")
        warnings.warn(
            f"FusedSaLSa's lr is a multiplier on the level its line search finds (1.0: "
            f"none), not a step size: param_groups[{index}] {where}, {effect}; leave lr=1.0 unless you mean "
            "to (a warmup of the multiplier from 0 to 1 is fine)", UserWarning, stacklevel=caller_stacklevel())
        return True

    def _warn_if_a_scheduler_shapes_the_schedule(self) -> bool:
        """At a search step: a torch scheduler that has moved a group's ``lr`` off its ``initial_lr`` (or,
        for one that writes none, ReduceLROnPlateau, off the ``search_lr`` it was built at) multiplies this
        optimizer's own ``schedule`` (a preset's warm-up and cooldown), shaping the applied step twice. Warns
        once and returns True; a constant scheduler never moves ``lr``, so it never warns."""
        for index, group in enumerate(self.param_groups):
            if starts_probing(group):
                continue  # a group built at 0 (api.md's way to hold a layer still) raised by hand: not a scheduler
            start = group.get("initial_lr", group.get("search_lr"))
            if start is not None and group["lr"] != start:
                was, now = f"{start:g}", f"{group['lr']:g}"
                if was == now:  # a move below 6 digits (OneCycleLR's first lr) would read "from 0.04 to 0.04"
                    was, now = repr(float(start)), repr(float(group["lr"]))
                warnings.warn(
                    f"a learning-rate scheduler (or a hand edit) moved param_groups[{index}]'s lr from {was} to "
                    f"{now}, and this optimizer has a schedule of its own "
                    f"({type(self.schedule).__name__}): the applied step is "
                    "the product of the two, shaped twice. Drop the scheduler (or keep it constant) to apply the "
                    "optimizer's schedule alone", UserWarning, stacklevel=caller_stacklevel())
                return True
        return False

    def _count_tied_search(self, state: SearchState, passes: F.Passes, loss_dtype: Optional[torch.dtype]) -> None:
        """Count a search that accepted a trial whose loss was ``f0`` bitwise while the first-order change
        ``t * s`` there was ``TIED_TRIAL_RELATIVE_CHANGE`` of ``|f0|`` or more (``t`` the accepted step size, ``s``
        the smoothed slope), and warn once when ``TIED_SEARCHES_WARNED`` come in a row: a closure that returns a
        fresh tensor of a stale value (outputs computed before ``step()``) ties at every trial, which a search
        accepts (0.1.0's rule), and the level grows by ``growth`` at each search. A loss tensor of the step's own
        memory is refused at the trial (:func:`is_stale_loss`); a new one of the same value cannot be told from
        a real tie at one search. A real closure ties so where the move rounds to nothing in most of the weights
        (16-bit weights of a converged fit: a few small elements still move) or the loss's rounding hides it (a
        16-bit loss): a tie counts only for a float32 or float64 loss, where at least half the weights' elements
        differ from their saved ``w0`` (read then, one device read; under ``restore="inplace"``, with no copy,
        none counts)."""
        predicted = state.step_size * state.slope_avg
        tied = (loss_dtype in (torch.float32, torch.float64)
                and state.last_trials > 0 and state.untested_searches == 0 and state.last_loss_decrease == 0.0
                and math.isfinite(predicted) and predicted > 0.0
                and predicted >= TIED_TRIAL_RELATIVE_CHANGE * abs(state.last_search_loss)
                and most_weights_moved(passes))
        self._tied_searches = self._tied_searches + 1 if tied else 0
        if self._tied_searches >= TIED_SEARCHES_WARNED and not self._ties_warned:
            self._ties_warned = True
            relative = predicted / abs(state.last_search_loss) if state.last_search_loss else math.inf
            # warned by step() once the step has returned: an error there (-W error) would undo half of it
            self._deferred_warnings.append(TIED_SEARCHES.format(count=self._tied_searches, step=state.step_size,
                                                                predicted=predicted, relative=relative))

    def _warn_if_trials_may_read_stale_fsdp_weights(self, closure) -> None:
        """Once, at the first search: sharded (FSDP2) parameters, no ``model=`` with FSDP2 modules to
        reshard, and a closure not made by :func:`fsdp_closure`: every trial after the first would
        read the root's stale unsharded weights unless the root reshards after its forward."""
        self._fsdp_checked = True
        if self.model is not None or getattr(closure, "reshards_fsdp", False):
            return  # model= given: its FSDP2 modules (if any) are resharded; none: tensor parallel, say
        if any(_is_dtensor(p) for group in self.param_groups for p in group["params"]):
            warnings.warn(
                "FusedSaLSa's parameters are DTensors, but the optimizer was built without model= and "
                "the closure is not wrapped by salsa_fused.distributed.fsdp_closure: if they are FSDP2's, it keeps the root "
                "module's parameters unsharded after a forward, so every trial after the first reads "
                "stale weights (the level collapses) unless the root was fully_shard-ed with "
                "reshard_after_forward=True. Pass model=your_model (the optimizer then reshards before "
                "each trial) or wrap the closure with fsdp_closure(model, closure)", UserWarning,
                stacklevel=caller_stacklevel())
