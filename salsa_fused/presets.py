"""Named FusedSaLSa configurations.

``FusedSaLSa(params)`` is the published SaLSa (0.1.0) step for step; it stays the default.
The presets here are other fixed configurations, with nothing to tune per task:

- ``"faithful"``: the published defaults (the same as ``FusedSaLSa(params)``).
- ``"author_gpt"``: the author's GPT-2 pretraining settings: ``beta3=0.99``, momentum in the
  trial direction, weight decay 0.1.
- ``"pretrain"``: the configuration for training from scratch from the quality suite
  (``benchmarks/quality``, docs/quality.md; not recommended yet, its targets are unmet): momentum in
  the trial direction, weight decay 0.1 (on tensors of 2+ dimensions when handed plain
  tensors), ``beta3=0.95`` (the smoothing of the Armijo test), and a schedule on the applied
  step (:class:`~salsa_fused.step_size.WarmupStableDecay` with ``warmup=0.2, decay=0.8,
  peak=2``): the search runs during the first 20% of the steps while the applied step warms up
  linearly to twice the searched level; the level is then frozen and the applied step decays
  linearly from 2x it to zero over the remaining 80%. It takes the run
  length ``total_steps``, no learning rate. If the searched level falls below 1/16 of the peak
  of its fast average during the search phase (a search that collapses, on small full-batch fits
  over long runs), it is frozen there at once, at that floor (``freeze_below``, quality NOTES
  section 22). If the loss turns during the search phase (its smoothed value, over the losses
  the searches read, doubles from its lowest: the warm-up overshot), the applied step halves,
  once per doubling (``backoff_on_loss_rise``, a range test on the search's own losses, quality
  NOTES section 23), and that scale ``h`` becomes the schedule's peak: the warm-up stops rising at
  ``h`` (``hold_scale_on_loss_rise``, section 25) and the cooldown decays from ``h`` instead of from
  2x (``decay_from_hold``, section 73), all times the back-off ``b``.
  The weight decay is decoupled and takes the level and the schedule's scale (``w -= wd * lr * s * eta * w``: the
  applied step without the growth factor, none before the first search), so where the level
  overshoots the best AdamW rate the decay does too: on the zoo's overshooting validation tasks that decay is
  much of the loss (not on its hold-out tasks, which fail by the level's path), but without it, or with a decay
  set by the run length instead, another task needs it (quality NOTES sections 78-79), so it stays.
  History (quality NOTES sections 6-7, 22-23, 25, 73): until section 7 it was the author's
  ``beta3=0.99`` with a 5% warmup and a 50% cooldown at 1x the level; the early freeze since
  section 22; the back-off since section 23; the hold since section 25; the cooldown from the
  hold since section 73.

Run length, for ``"pretrain"``:

- **Past ``total_steps``** (whose own step applies 0: the cooldown ends there) the schedule holds
  the cooldown's last positive step
  (:attr:`~salsa_fused.step_size.WarmupStableDecay.past_end_scale`: ``2 / (T - D)`` with
  ``D = T - round(0.8 * T)``, about ``2 / (0.8 * total_steps)``
  of the frozen level; times the back-off ``b``, and ``h b / (T - D)`` where the loss turned and a hold ``h`` was
  kept), never 0, and the optimizer warns once that the run is past its plan.
  To train longer, build the optimizer with the new ``total_steps`` and ``load_state_dict`` the
  checkpoint (the step count is in it; the schedule is the loading optimizer's, and the load warns once that
  ``total_steps`` changed): the run continues at
  its step of the longer schedule. From a checkpoint of the search phase (the first 20%) that
  is a clean extension (a level that froze early stays frozen: ``search_state.frozen_at``);
  from one inside the cooldown, the run goes on at that step of the longer schedule: where the
  step lies inside the longer schedule's search phase the search resumes there (a clean
  extension), past it the applied step jumps to the longer schedule's value with the level
  frozen at the old run's 20%.
- **``total_steps=None``** (the length unknown; omitting it raises): the same search (momentum
  direction, ``beta3=0.95``, weight decay 0.1) with no schedule: the search runs for the whole
  run and the applied step is the searched level (1x), with no warm-up to 2x and no cooldown.
  Nothing needs the run length; the price is the missing cooldown (quality NOTES section 13).
  Once the end is known, ``optimizer.schedule = step_size.Cooldown(optimizer.search_state.step,
  steps)`` freezes the level and decays the applied step to zero over ``steps`` steps (after the
  first step: a schedule that stops the search before any search ran is refused at the step).

Usage::

    from salsa_fused import presets
    opt = presets.from_preset(model.parameters(), "pretrain", total_steps=10_000)
    # or
    opt = presets.recommended(model.parameters(), total_steps=10_000)
    # the run length unknown: no warm-up, no cooldown (ends worse; docs/quality.md)
    opt = presets.recommended(model.parameters(), total_steps=None)

Param groups passed in keep their own keys (``weight_decay`` per group, e.g. no decay on
biases and norms), as with any torch optimizer; keyword ``overrides`` replace the preset's
arguments (``backend=``, ``restore=``, ...). Handed a plain iterable of tensors
(``model.parameters()``), ``"pretrain"`` splits it into the groups every quality measurement
used (``benchmarks/quality``): tensors with 2 or more dimensions decay, the others (biases,
norms' scales) do not (:func:`decay_matrices_only`). Pass ``[{"params": list(model.parameters())}]``
to decay every tensor, as the preset did before 2026-12-01 (and to load its checkpoints).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .errors import checked_int
from .optimizer import FusedSaLSa
from .step_size import COLLAPSE_FRACTION, WarmupStableDecay


def _faithful(total_steps: Optional[int]) -> dict:
    return {}


def _author_gpt(total_steps: Optional[int]) -> dict:
    return dict(beta3=0.99, search_direction="momentum", weight_decay=0.1)


def _pretrain(total_steps: Optional[int]) -> dict:
    search = dict(beta3=0.95, search_direction="momentum", weight_decay=0.1)
    if total_steps is None:  # the run length unknown: the searched level throughout, no schedule
        return search
    return dict(search, schedule=WarmupStableDecay(total_steps, warmup=0.2, decay=0.8, peak=2.0,
                                                   freeze_below=COLLAPSE_FRACTION, backoff_on_loss_rise=True,
                                                   hold_scale_on_loss_rise=True, decay_from_hold=True))


PRESETS: Dict[str, Callable[[Optional[int]], dict]] = {
    "faithful": _faithful,
    "author_gpt": _author_gpt,
    "pretrain": _pretrain,
}
RECOMMENDED = "pretrain"
#: Presets whose schedule follows the run length: ``total_steps`` must be given (``None`` included).
TAKE_LENGTH = frozenset({"pretrain"})


class _Omitted:
    def __repr__(self) -> str:
        return "<total_steps not given>"


_OMITTED = _Omitted()


def preset_kwargs(name: str, total_steps=_OMITTED) -> dict:
    """The keyword arguments of ``FusedSaLSa`` that preset ``name`` sets. A preset of
    ``TAKE_LENGTH`` needs ``total_steps``: the run length, or ``None`` when it is unknown. The others
    ("faithful", "author_gpt") have no schedule: a ``total_steps`` given to them is checked alike (a
    script may pass its run length to any preset) and not read; ``schedule=`` plans their run."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    if total_steps is _OMITTED:
        if name in TAKE_LENGTH:
            raise TypeError(f"the {name!r} preset needs total_steps: the run length (its warm-up and "
                            "cooldown are fractions of it), or total_steps=None for a run of unknown "
                            "length (no schedule: the searched level throughout, no cooldown; it ends "
                            "worse, docs/quality.md)")
        total_steps = None
    kwargs = PRESETS[name](None if total_steps is None else checked_int("total_steps", total_steps, 1))
    schedule = kwargs.get("schedule")
    if schedule is not None:  # refused here, before the caller's parameters (a generator, say) are read
        try:
            schedule.check_searches()
        except ValueError:
            shortest = schedule.shortest_total_steps()
            raise ValueError(f"total_steps={total_steps} is too short for the {name!r} preset: its cooldown "
                             f"takes the last {schedule.decay:.0%} of the run, so no step would search; use "
                             f"total_steps >= {shortest}") from None
    return kwargs


#: Presets that, handed plain tensors, keep vectors (biases, norms' scales) out of the weight decay.
SPLIT_DECAY = frozenset({"pretrain"})


def decay_matrices_only(params):
    """``params`` as the parameter groups of the quality measurements: a plain iterable of tensors
    becomes ``[{"params": tensors with dim >= 2}, {"params": the rest, "weight_decay": 0.0}]`` (empty
    groups left out, order kept within each), and ``model.named_parameters()`` (``(name, tensor)``
    pairs, as torch.optim takes them) is split the same way by its tensors, names kept; groups (dicts)
    are returned as they are, and a bare tensor too (the optimizer refuses it as torch.optim does)."""
    if isinstance(params, torch.Tensor):
        return params
    params = list(params)
    if not params or any(isinstance(p, dict) for p in params):
        return params

    def tensor_of(item):
        named = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
        return item[1] if named else item

    def is_matrix(item):
        tensor = tensor_of(item)
        return isinstance(tensor, torch.Tensor) and tensor.dim() >= 2

    matrices = [p for p in params if is_matrix(p)]
    vectors = [p for p in params if not is_matrix(p)]
    groups = [{"params": matrices}] if matrices else []
    return groups + ([{"params": vectors, "weight_decay": 0.0}] if vectors else [])


def from_preset(params, name: str, total_steps=_OMITTED, **overrides) -> FusedSaLSa:
    """``FusedSaLSa(params, **preset, **overrides)`` for the named preset; for a preset of
    ``SPLIT_DECAY`` handed plain tensors, ``params`` split by :func:`decay_matrices_only`."""
    if isinstance(params, str):
        raise TypeError(f"from_preset(params, name, total_steps=...) takes the parameters first, got the string "
                        f"{params!r}: from_preset(model.parameters(), {params!r}, total_steps=...)")
    preset = preset_kwargs(name, total_steps)
    kwargs = {**preset, **overrides}
    if name in SPLIT_DECAY:
        params = decay_matrices_only(params)
    try:
        return FusedSaLSa(params, **kwargs)
    except ValueError as error:
        if "search_rule" in overrides and "does not read" in str(error):
            raise ValueError(f"{error}: the {name!r} preset sets them, for the default search; build "
                             "FusedSaLSa(params, search_rule=...) for another rule") from error
        raise


def recommended(params, total_steps=_OMITTED, **overrides) -> FusedSaLSa:
    """The ``pretrain`` preset (``RECOMMENDED``; the names are kept, but it is not recommended yet: its quality
    targets are unmet, docs/quality.md) for a run of ``total_steps`` steps;
    ``total_steps=None``: a run of unknown length (no schedule: the searched level throughout).
    Omitting ``total_steps`` raises TypeError: the choice is the caller's."""
    if isinstance(params, str):
        raise TypeError(f"recommended(params, total_steps=...) takes the parameters, got the string {params!r}: "
                        "recommended(model.parameters(), total_steps=N) (a preset by name: "
                        f"from_preset(model.parameters(), {params!r}, total_steps=N))")
    return from_preset(params, RECOMMENDED, total_steps=total_steps, **overrides)
