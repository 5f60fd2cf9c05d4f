"""Checkpoints: what :meth:`FusedSaLSa.state_dict <salsa_fused.FusedSaLSa.state_dict>` writes and what
``load_state_dict`` reads (the methods of :class:`Checkpointing`, a base class of the optimizer).

torch.optim's layout (``state``: each parameter's moments by id; ``param_groups``), with
``param_groups[0]["search"]`` the search state (:class:`salsa_fused.line_search.SearchState`, the checkpoint's
format and the configuration it was saved with), every group's ``moments_start_step`` and every parameter's two
counts of the steps it sat out. A load checks all of it before anything changes: every refusal ends "nothing was
loaded". It also reads another optimizer's (AdamW's) checkpoint, whose ``step`` counts carry into the bias
corrections, and the layouts earlier versions wrote.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from copy import deepcopy
from typing import Dict, List, Mapping, Tuple

import torch
from torch.optim import Optimizer

from .backends import BACKEND_FLAGS
from .backends.base import (GROUP_HYPER_KEYS, MOMENTS_START, NOT_SITTING_OUT, RAW, SAT_OUT_SINCE, STEPS_SAT_OUT,
                            zero_moments)
from .buckets import local_shard
from .distributed import _is_dtensor
from .line_search import FLOAT32_MAX, RENAMED_KEYS, SearchState
from .rules import check_rule_state, checked_direction
from .step_size import ScaledSchedule
from .validation import validate_group_hyper

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
_SAT_OUT_KEYS = (STEPS_SAT_OUT, SAT_OUT_SINCE)
#: A group's keys that hold a rate or a multiplier of one: another optimizer's (its checkpoint's) are not ours.
#: ``initial_lr``, ``max_lr``, ``min_lr``: torch's schedulers' records of the group's rate.
_RATE_KEYS = ("lr", "search_lr", "initial_lr", "max_lr", "min_lr")
SEARCH_KEY = "search"  # where state_dict() carries the search state (param_groups[0])
#: The search state's key of the checkpoint format, and the format this version writes. A checkpoint without it was
#: written before 2026-12-07 (format 0); one of a later format than this is refused.
CHECKPOINT_FORMAT_KEY, CHECKPOINT_FORMAT = "format", 1
#: The search state's key of the configuration the checkpoint was saved with (:func:`_configuration_of`).
CONFIGURATION_KEY = "configuration"


def valid_step_count(count, steps: int) -> bool:
    """``count`` can count some of ``steps`` steps: a group's ``moments_start_step`` (:data:`MOMENTS_START`), a
    parameter's ``steps_sat_out`` or ``sat_out_since`` (:data:`STEPS_SAT_OUT`, :data:`SAT_OUT_SINCE`)."""
    return type(count) is int and 0 <= count <= steps


def valid_moments_start(start, steps: int) -> bool:
    """``start`` can be a group's ``moments_start_step`` (:data:`MOMENTS_START`) after ``steps`` steps: the step
    at which it was added (0 to ``steps``), or ``-s`` for moments that came with ``s`` steps of another
    optimizer's (an AdamW checkpoint's ``step``, :func:`_carried_adam_steps`)."""
    return type(start) is int and start <= steps


def _adam_step_count(key, value) -> int:
    """Another optimizer's ``step`` of parameter ``key`` (AdamW's: a float tensor, or a number) as an int,
    or ValueError naming it: Adam's count of the steps that parameter's moments took."""
    count, shown = value, repr(value)
    if isinstance(value, torch.Tensor):
        readable = value.numel() == 1 and not value.is_complex() and not value.is_meta
        count = value.item() if readable else None
        shown = repr(count) if readable else f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count) or (
            count < 0 or count != int(count)):
        raise ValueError(f"the checkpoint's state of parameter {key} has 'step'={shown}: Adam's "
                         "count of the steps its moments took, a whole number >= 0; the checkpoint is corrupt; "
                         "nothing was loaded")
    return int(count)


def _carried_adam_steps(groups: List[dict], saved_state: Mapping) -> Tuple[Dict[int, int], Dict[object, int]]:
    """Of a checkpoint without a search state (another optimizer's), each Adam ``step`` carried into this
    optimizer's counts: per group whose parameters with moments all have one, ``moments_start_step = -s``
    with ``s`` the largest, and per parameter ``steps_sat_out = s - step``. Its bias corrections then go on
    from ``step`` (``k - moments_start_step - steps_sat_out = k + step``), as AdamW's would have.
    Returns (group index -> start, saved parameter id -> steps sat out); ValueError for a bad ``step``."""
    starts: Dict[int, int] = {}
    sat_out: Dict[object, int] = {}
    for index, group in enumerate(groups):
        entries = {key: saved_state[key] for key in group["params"]
                   if isinstance(saved_state.get(key), Mapping) and all(k in saved_state[key] for k in MOMENT_KEYS)}
        if not entries or not all("step" in entry for entry in entries.values()):
            continue
        steps = {key: _adam_step_count(key, entry["step"]) for key, entry in entries.items()}
        largest = max(steps.values())
        if largest == 0:
            continue
        starts[index] = -largest
        sat_out.update({key: largest - count for key, count in steps.items()})
    return starts, sat_out


def _check_loaded_counts(key, entry: Mapping, has_moments: bool, group_steps: int) -> None:
    """Refuse (ValueError) a checkpoint's counts of steps sat out (:data:`STEPS_SAT_OUT`, :data:`SAT_OUT_SINCE`)
    of parameter ``key`` that its group's ``group_steps`` steps cannot hold: each an int from 0 to them, the
    earlier stretches no longer than the steps before the current one, and none without moments."""
    counts = {name: entry[name] for name in _SAT_OUT_KEYS if name in entry}
    if not counts:
        return
    where = f"the checkpoint's state of parameter {key} has"
    if not has_moments:
        raise ValueError(f"{where} {', '.join(counts)} but no moments: a count of the steps a parameter sat out "
                         "goes with its moments; the checkpoint is corrupt; nothing was loaded")
    for name, count in counts.items():
        if not valid_step_count(count, group_steps):
            raise ValueError(f"{where} {name}={count!r}: a count of its group's steps, an int from 0 to the "
                             f"{group_steps} steps its group took; the checkpoint is corrupt; nothing was loaded")
    if len(counts) == 2 and counts[STEPS_SAT_OUT] > counts[SAT_OUT_SINCE]:
        raise ValueError(f"{where} {STEPS_SAT_OUT}={counts[STEPS_SAT_OUT]} steps sat out before a stretch that began "
                         f"after {counts[SAT_OUT_SINCE]} ({SAT_OUT_SINCE}); the checkpoint is corrupt; nothing "
                         "was loaded")


def _refuse_reordered_names(saved_groups: List[dict], groups: List[dict]) -> None:
    """Refuse (ValueError) a checkpoint whose ``param_names`` are this optimizer's in another order: torch loads
    by position, so each tensor would take another's moments (of its shape: a shape check cannot see it).
    Names that differ otherwise (a wrapper's prefix, ``module.`` or ``_orig_mod.``) cannot be matched and
    load by position, as in torch. A checkpoint whose ``params`` are fully qualified names is not checked:
    torch.distributed.checkpoint lays those out in this optimizer's order and leaves the saved ``param_names``."""
    if not all("param_names" in group for group in [*saved_groups, *groups]):
        return
    if not all(type(index) is int for group in saved_groups for index in group["params"]):
        return
    saved = [name for group in saved_groups for name in group["param_names"]]
    names = [name for group in groups for name in group["param_names"]]
    if saved != names and sorted(saved) == sorted(names):
        at = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
        raise ValueError(f"the checkpoint's parameters are this optimizer's in another order: its parameter {at} is "
                         f"{saved[at]!r}, and this optimizer's {names[at]!r}; loaded by position, each would take "
                         "another's moments. Build the optimizer with the parameters in the checkpoint's order, or "
                         "lay the checkpoint out by param_names in a load_state_dict pre hook (docs/training.md); "
                         "nothing was loaded")


def _configuration_value(value) -> str:
    """A configuration value as a checkpoint keeps it: the repr of a number, a string or None; a dataclass (a
    preset's schedule, a rule's settings) as its repr, each field made so in turn (a field holding a function or
    another object reads as its type's name, not its address); a class's name (ArmijoSearch); an object of another
    kind, its type's name. A StepSizeBeam's or LRFactorSearch's wrapper is the schedule it wraps: its multiplier is
    its owner's state."""
    if isinstance(value, ScaledSchedule):
        return _configuration_value(value.inner)
    if value is None or isinstance(value, (bool, numbers.Number, str)):
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        shown = ", ".join(f"{f.name}={_configuration_value(getattr(value, f.name))}"
                          for f in dataclasses.fields(value) if f.repr)
        return f"{type(value).__qualname__}({shown})"
    if type(value) in (tuple, list):
        items = [_configuration_value(item) for item in value]
        return (f"({', '.join(items)}{',' if len(items) == 1 else ''})" if type(value) is tuple
                else f"[{', '.join(items)}]")
    return value.__qualname__ if isinstance(value, type) else type(value).__qualname__


def _configuration_of(opt: "FusedSaLSa") -> Dict[str, str]:
    """What decides a run's next steps and is not in its state: the trial direction, the rule, the schedule and the
    search's constants (not the backend, nor restore or nonfinite: a resume may pick others and take the same steps)."""
    config = {"search_direction": opt.search_direction, "search_rule": opt.search_rule, "schedule": opt.schedule,
              **{f.name: getattr(opt.search_config, f.name) for f in dataclasses.fields(opt.search_config)}}
    return {name: _configuration_value(value) for name, value in config.items()}


def _package_version() -> str:
    """The package's ``__version__`` (its one home, salsa_fused/__init__.py), for a refusal's words."""
    from . import __version__  # the package is imported by the time a checkpoint loads

    return __version__


def _differing_fields(saved: str, live: str) -> str:
    """``'total_steps=100 there, 200 here'`` for two reprs of one dataclass of plain fields (a schedule's, a
    rule's) that differ in some; ``''`` where they are not such (then the whole reprs are shown)."""
    def fields(text: str):
        match = re.fullmatch(r"(\w+)\((.*)\)", text)
        pairs = [pair.partition("=") for pair in match.group(2).split(", ")] if match else []
        if not pairs or not all(eq and key.isidentifier() and not any(c in value for c in "()[]{}")
                                for key, eq, value in pairs):
            return None
        return match.group(1), {key: value for key, _, value in pairs}

    before, after = fields(saved), fields(live)
    if before is None or after is None or before[0] != after[0] or before[1].keys() != after[1].keys():
        return ""
    return ", ".join(f"{key}={before[1][key]} there, {after[1][key]} here" for key in after[1]
                     if before[1][key] != after[1][key])


def _warn_of_another_configuration(saved: Mapping, live: Dict[str, str]) -> None:
    """Warn once per load where the checkpoint's configuration (:func:`_configuration_of`) and this optimizer's
    differ: the run goes on as configured here. Keys the checkpoint lacks (a later version's) are not compared."""
    differ = []
    for name, value in live.items():
        if name in saved and str(saved[name]) != value:
            fields = _differing_fields(str(saved[name]), value)
            differ.append(f"{name} {fields or f'{saved[name]} there, {value} here'}")
    if differ:
        warnings.warn(
            "the checkpoint was saved by an optimizer configured otherwise, and the run goes on as this one is: "
            + "; ".join(differ) + ". A run extended on purpose (a longer total_steps) reads so; otherwise build the "
            "optimizer as the saved run was built (its preset and total_steps, its search_direction, schedule and "
            "constants), or note that a preset may have changed between salsa_fused versions", UserWarning,
            stacklevel=3)


def _described(value) -> str:
    """A shape, with the local shard's for a DTensor: ``(16, 6)``, ``(16, 6) sharded, (8, 6) here``."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    if _is_dtensor(value):
        return f"{tuple(value.shape)} sharded, {tuple(local_shard(value).shape)} on this rank"
    return f"{tuple(value.shape)}"


def _all_finite_value(value) -> bool:
    """False for a float or a floating-point tensor holding NaN/inf (one device read); True otherwise."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta and (
            value.is_floating_point() or value.is_complex()):
        return bool(torch.isfinite(value).all())
    return True


def _check_checkpoint_layout(state_dict) -> None:
    """Raise ValueError naming what is amiss where ``state_dict`` is not laid out as ``state_dict()``
    lays it out: a dict with ``state`` (a dict of dicts) and ``param_groups`` (a list of dicts, each
    with its ``params`` ids, no id in two places)."""
    corrupt = "the checkpoint is corrupt; nothing was loaded"
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"load_state_dict() takes the dict state_dict() returns, got {type(state_dict).__name__}")
    lacking = [key for key in ("state", "param_groups") if key not in state_dict]
    if lacking:
        raise ValueError(f"the checkpoint has no {' or '.join(map(repr, lacking))}: it is not an optimizer's "
                         "state_dict() (a model's?); nothing was loaded")
    state, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's 'state' is a {type(state).__name__}, not a dict of each "
                         f"parameter's state by id: {corrupt}")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(group, Mapping) for group in groups):
        raise ValueError(f"the checkpoint's 'param_groups' is not a list of dicts: {corrupt}")
    seen = {}
    for index, group in enumerate(groups):
        ids = group.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"the checkpoint's parameter group {index} has no list of parameter ids "
                             f"('params'): {corrupt}")
        for saved_id in ids:
            if not isinstance(saved_id, (int, str)):
                raise ValueError(f"the checkpoint's parameter group {index} lists {type(saved_id).__name__} "
                                 f"{saved_id!r} among its parameter ids: {corrupt}")
            if saved_id in seen:
                where = (f"in parameter group {index}" if seen[saved_id] == index
                         else f"in parameter groups {seen[saved_id]} and {index}")
                raise ValueError(f"the checkpoint lists parameter id {saved_id!r} twice ({where}): {corrupt}")
            seen[saved_id] = index
    for saved_id, value in state.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"the checkpoint's state of parameter {saved_id!r} is a {type(value).__name__}, not a "
                             f"dict: {corrupt}")


class torch_hooks_suspended:
    """Empties the named hook dicts of ``opt`` for the block and puts them back after it: torch's
    ``state_dict``/``load_state_dict`` would run them on the partial dict this class hands to them,
    so it runs them itself on the whole one."""

    def __init__(self, opt: Optimizer, *names: str):
        self.opt, self.names, self.saved = opt, names, {}

    def __enter__(self):
        for name in self.names:
            self.saved[name] = getattr(self.opt, name)
            setattr(self.opt, name, type(self.saved[name])())

    def __exit__(self, *exc):
        for name, hooks in self.saved.items():
            setattr(self.opt, name, hooks)

class Checkpointing:
    """``state_dict()`` and ``load_state_dict()`` of :class:`salsa_fused.FusedSaLSa` (a base class of it, before
    ``torch.optim.Optimizer``, whose methods these call for torch's own packing)."""

    def _zero_moments_of_parameters_unfrozen_since(self, state_dict: dict) -> None:
        """Into ``state_dict`` (torch's packing, not ``self.state``): zero moments for the parameters that require
        gradients but have none, frozen when their group was built and unfrozen since, with no gradient yet,
        counted as sitting out since their group began, as their first gradient would count them. So a state dict
        names every parameter that requires gradients, as torch.distributed.checkpoint's set_optimizer_state_dict
        asks of a checkpoint (it refused a resume into an optimizer built so: 'Missing optimizer state for
        parameter'); loaded, they are as that gradient would make them."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            start = group.get(MOMENTS_START, 0)
            if type(start) is not int:  # set by hand: the next step refuses it
                continue
            for index, p in zip(saved["params"], group["params"]):
                if not p.requires_grad or index in state_dict["state"] or (
                        p in self.state and "exp_avg" in self.state[p]):
                    continue
                with torch.inference_mode(False):
                    exp_avg, exp_avg_sq = zero_moments(p)
                state_dict["state"][index] = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, STEPS_SAT_OUT: 0,
                                              SAT_OUT_SINCE: 0 if self._search.step > start else NOT_SITTING_OUT}

    def state_dict(self) -> dict:
        """As ``torch.optim``, with the search state in ``param_groups[0]["search"]``; the state-dict
        hooks see the whole of it (a post hook may return a replacement, as in torch)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with torch_hooks_suspended(self, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"):
            state_dict = super().state_dict()
        self._zero_moments_of_parameters_unfrozen_since(state_dict)
        search = self._search.to_dict()  # a deep copy
        initial = getattr(self.search_rule, "initial_rule_state", None)
        if not search["rule_state"] and initial is not None:
            # every key the rule will keep, before its first step too: torch.distributed.checkpoint
            # loads into the state dict of a fresh optimizer and fills only the keys it finds there
            search["rule_state"] = initial()
        # every group's moments_start_step, 0 included: torch.distributed.checkpoint fills only the keys a fresh
        # optimizer's state dict has, and a resume adds a group added mid-run again at step 0, without the key
        state_dict["param_groups"] = [{**group, MOMENTS_START: group.get(MOMENTS_START, 0)}
                                      for group in state_dict["param_groups"]]
        search[CHECKPOINT_FORMAT_KEY] = CHECKPOINT_FORMAT
        search[CONFIGURATION_KEY] = _configuration_of(self)
        state_dict["param_groups"][0][SEARCH_KEY] = search
        # both counts in every entry with moments: a resume through torch.distributed.checkpoint fills only
        # the keys a fresh optimizer's state dict has, and its flattened form takes ints, not None
        state_dict["state"] = {key: {**entry, STEPS_SAT_OUT: entry.get(STEPS_SAT_OUT, 0),
                                     SAT_OUT_SINCE: entry.get(SAT_OUT_SINCE, NOT_SITTING_OUT)}
                               if isinstance(entry, Mapping) and "exp_avg" in entry else entry
                               for key, entry in state_dict["state"].items()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as ``torch.optim`` does, but keep the moments fp32 (torch would cast them to
        the parameter dtype) and validate everything before anything changes. The load hooks see
        the whole state dict, moments and search state included (a pre hook may return a
        replacement), and post hooks run once it is all loaded."""
        self._refuse_inside_step("load_state_dict()", "nothing was loaded")
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"load_state_dict() takes the dict state_dict() returns, got {type(state_dict).__name__}; "
                             "nothing was loaded")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        _check_checkpoint_layout(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups)} parameter group(s) and this optimizer {len(self.param_groups)}: "
                "build it with the groups the checkpoint was saved with (groups added with add_param_group during "
                "the run: add them again before loading; the 'pretrain' preset splits a plain "
                "list of tensors into decaying matrices and non-decaying vectors since 2026-12-01, and "
                "model.named_parameters() since 2026-12-02; pass [{'params': list(model.parameters())}] to "
                "load a checkpoint it saved before); nothing was loaded")
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"the checkpoint's parameter group {index} has {len(saved['params'])} parameters "
                                 f"and this optimizer's {len(group['params'])}: nothing was loaded")
        _refuse_reordered_names(groups, self.param_groups)
        search, saved_configuration = None, None
        # saved in group 0, but a checkpoint laid out again in this optimizer's group order (a pre hook
        # matching param_names, torch.distributed.checkpoint) carries it in the group it came with
        carriers = [index for index, group in enumerate(groups) if SEARCH_KEY in group]
        if len(carriers) > 1:
            where = " and ".join(f"param_groups[{i}]" for i in carriers)
            raise ValueError(f"the checkpoint has a search state in {where}: one optimizer saves one; the "
                             "checkpoint is corrupt or merged; nothing was loaded")
        if carriers:
            saved_search = groups[carriers[0]][SEARCH_KEY]
            if not isinstance(saved_search, dict):
                raise ValueError(f"the checkpoint's search state (param_groups[{carriers[0]}]['search']) is a "
                                 f"{type(saved_search).__name__}, not a dict: the checkpoint is corrupt; nothing was "
                                 "loaded")
            saved_search = dict(saved_search)  # the caller's stays as it was
            saved_format = saved_search.pop(CHECKPOINT_FORMAT_KEY, 0)
            if isinstance(saved_format, bool) or not isinstance(saved_format, numbers.Integral) or saved_format < 0:
                raise ValueError(f"the checkpoint's format ({SEARCH_KEY}[{CHECKPOINT_FORMAT_KEY!r}]) is "
                                 f"{saved_format!r}, not a count: the checkpoint is corrupt; nothing was loaded")
            if saved_format > CHECKPOINT_FORMAT:
                raise ValueError(f"the checkpoint was written by a newer salsa_fused, in checkpoint format "
                                 f"{saved_format}; this version (salsa_fused {_package_version()}) reads formats up to "
                                 f"{CHECKPOINT_FORMAT}: upgrade salsa_fused to load it; nothing was loaded")
            saved_configuration = saved_search.pop(CONFIGURATION_KEY, None)
            if saved_configuration is not None and not isinstance(saved_configuration, Mapping):
                raise ValueError(f"the checkpoint's configuration ({SEARCH_KEY}[{CONFIGURATION_KEY!r}]) is a "
                                 f"{type(saved_configuration).__name__}, not a dict: the checkpoint is corrupt; "
                                 "nothing was loaded")
            missing = [k for k in ("step", "step_size") if k not in saved_search]
            if missing:
                raise ValueError(f"the checkpoint's search state has no {' or '.join(missing)}: the checkpoint is "
                                 "corrupt (the level would start over silently); nothing was loaded")
            # rule_state is not named: torch.distributed.checkpoint's full state dicts drop an empty dict, and
            # check_rule_state (below) refuses a checkpoint that lost the scalars a rule keeps
            defaulted = sorted({f.name for f in dataclasses.fields(SearchState)}
                               - {RENAMED_KEYS.get(k, k) for k in saved_search} - {"rule_state"}
                               - {"untested_searches"})  # a count for a warning: from 0, it only warns later
            try:
                search = SearchState.from_dict(deepcopy(saved_search))
                search.validate()  # unknown keys, bad values
                check_rule_state(self.search_rule, search.rule_state, search.step)
            except ValueError as error:
                raise ValueError(f"the checkpoint cannot be loaded: {error}; nothing was loaded") from error
            if defaulted:
                warnings.warn(f"the checkpoint's search state has no {', '.join(defaulted)}: they start from their "
                              "defaults (a checkpoint saved by an earlier salsa_fused has fewer; one edited by hand "
                              "may have lost them)", UserWarning, stacklevel=2)
        carried_starts, carried_sat_out = _carried_adam_steps(groups, state_dict["state"]) if not carriers else ({}, {})
        if not carriers and state_dict["state"]:
            counts = ("Adam's bias corrections go on from each parameter's 'step' (AdamW's count), as they would "
                      "have there" if carried_starts else
                      "with no parameter's 'step' to go on from (and no parameter's count of steps sat out), Adam's "
                      "bias corrections start over on moments that "
                      "are already averaged (the first step's direction is sqrt(1 - beta2) / (1 - beta1) of the "
                      "uncorrected one, 0.32 at (0.9, 0.999), back to 1 as the count grows)")
            own = any("search_lr" in group for group in groups)  # a key of this optimizer's groups alone
            warnings.warn(
                "the checkpoint has moments but no search state (no param group has 'search'): it was saved "
                + ("by this optimizer, and then its param_groups[0], where state_dict() keeps the search state, was "
                   "removed (move that group's 'search' entry to the new first group to keep it), or it went "
                   "through " if own else "by another optimizer, or through ")
                + "torch.distributed.checkpoint with "
                "flatten_optimizer_state_dict=True, which drops it; the search starts over from "
                f"init_step_size, with the step counter at 0; {counts}; each group keeps its own lr and search_lr "
                "(another optimizer's lr is its rate, not a multiplier on the searched level)", UserWarning,
                stacklevel=2)
        # another optimizer's foreach/fused (AdamW keeps them in every group) chose its own kernels, not ours
        dropped = () if carriers else BACKEND_FLAGS
        groups = [{k: v for k, v in group.items() if k != SEARCH_KEY and k not in dropped} for group in groups]
        if not carriers:  # AdamW's rate taken as the probe multiplier (1e-3): a search tested 1000x less than it applied
            for group, live in zip(groups, self.param_groups):
                for key in _RATE_KEYS:  # and a scheduler's record of that rate, which it would set back
                    if key in live:
                        group[key] = live[key]
                    else:
                        group.pop(key, None)
                group.setdefault("search_lr", live["lr"])
        for group, live in zip(groups, self.param_groups):
            if "param_names" in live:  # they name this optimizer's tensors (torch keeps the checkpoint's)
                group["param_names"] = list(live["param_names"])
        saved_step = search.step if search is not None else 0
        for index, start in carried_starts.items():
            groups[index][MOMENTS_START] = start
        for index, (group, live) in enumerate(zip(groups, self.param_groups)):
            if "search_lr" not in group:  # saved before it existed (8aa04d4): the lr the group was built with
                # a scheduler's record of it where one ran (its lr then is mid-schedule); OneCycleLR's
                # initial_lr is max_lr / div_factor, not it: the group built here says it, as a fresh run's would
                group["search_lr"] = (live["search_lr"] if "max_lr" in group else
                                      group.get("initial_lr", group.get("lr", self.defaults["lr"])))
            start = group.get(MOMENTS_START, 0)
            if not valid_moments_start(start, saved_step):
                lost = ("; no param group has 'search', the search state and its step count, which state_dict() "
                        "keeps in param_groups[0]: was that group removed from the checkpoint? move its 'search' entry "
                        "to the new first group" if search is None else "")
                raise ValueError(f"the checkpoint's parameter group {index} has {MOMENTS_START}={start!r}: the step "
                                 f"count at which the group was added (an int up to the checkpoint's {saved_step} "
                                 "steps; below 0 for moments that came with another optimizer's steps)"
                                 f"{lost}; nothing was loaded")
            lacking = [key for key in GROUP_HYPER_KEYS if key not in group]
            if lacking:
                cause = ("the checkpoint is corrupt" if carriers else "it was saved by another optimizer, whose "
                         "state this one cannot take (SGD's momentum buffer is not Adam's moments), or it is corrupt")
                raise ValueError(f"the checkpoint's parameter group {index} has no {', '.join(map(repr, lacking))}: "
                                 f"every step reads it; {cause}; nothing was loaded")
            validate_group_hyper(group)
            self._refuse_another_backend(group, f"the checkpoint's parameter group {index}", "nothing was loaded")
        for group in groups:  # state_dict() writes every group's; a group that began with the run keeps none
            if type(group.get(MOMENTS_START)) is int and group[MOMENTS_START] == 0:
                del group[MOMENTS_START]
        param_of = {saved_id: param for saved, group in zip(groups, self.param_groups)
                    for saved_id, param in zip(saved["params"], group["params"])}
        group_steps = {saved_id: saved_step - saved.get(MOMENTS_START, 0) for saved in groups
                       for saved_id in saved["params"]}
        stripped_state, moments, undated = {}, {}, []
        # a rule along the raw gradient (LABPAL) never writes the moments: their zeros say nothing of a gradient
        moments_written = checked_direction(self.search_rule, self.search_direction) != RAW
        for key, value in state_dict["state"].items():
            if key not in param_of:  # state of no parameter here: kept as it is, as torch.optim keeps it
                stripped_state[key] = value
                continue
            moments[key] = {k: v for k, v in value.items() if k in MOMENT_KEYS}
            # state_dict() writes both counts; a parameter taking part keeps neither, none sat out keeps no count
            stripped_state[key] = {k: v for k, v in value.items() if k not in MOMENT_KEYS
                                   and not (k == SAT_OUT_SINCE and type(v) is int and v == NOT_SITTING_OUT)
                                   and not (k == STEPS_SAT_OUT and type(v) is int and v == 0)
                                   and not (k in _SAT_OUT_KEYS and search is None)  # counts of a step count lost
                                   and not (k == "step" and key in carried_sat_out)}  # carried into the counts
            if carried_sat_out.get(key):
                stripped_state[key][STEPS_SAT_OUT] = carried_sat_out[key]
            if (search is not None and group_steps[key] > 0 and not any(k in value for k in _SAT_OUT_KEYS)
                    and len(moments[key]) == len(MOMENT_KEYS) and moments_written):
                undated.append(key)  # saved before the counts existed: state_dict() writes both now
            for name, extra in stripped_state[key].items():  # another optimizer's ('step' of AdamW's), kept
                if not _all_finite_value(extra):
                    raise ValueError(f"the checkpoint's state of parameter {key} has {name!r} holding NaN/inf: the "
                                     "checkpoint is corrupt; nothing was loaded")
            _check_loaded_counts(key, stripped_state[key], bool(moments[key]), group_steps[key])
            if moments[key] and len(moments[key]) != len(MOMENT_KEYS):
                (have,), (lack,) = moments[key], set(MOMENT_KEYS) - set(moments[key])
                raise ValueError(f"the checkpoint's state of parameter {key} has {have} but no {lack}: the "
                                 "checkpoint is corrupt; nothing was loaded")
            for name, moment in moments[key].items():
                param = param_of[key]
                if isinstance(moment, torch.Tensor) and (not moment.is_floating_point() or moment.is_complex()):
                    raise ValueError(f"the checkpoint's {name} of parameter {key} is a {moment.dtype} tensor: the "
                                     "moments are real floating-point values (kept float32); the checkpoint is "
                                     "corrupt; nothing was loaded")
                if isinstance(moment, torch.Tensor) and (moment.layout != torch.strided or moment.is_meta):
                    raise ValueError(f"the checkpoint's {name} of parameter {key} is a "
                                     f"{'meta' if moment.is_meta else str(moment.layout)} tensor, which holds no "
                                     "values to load: the checkpoint is corrupt; nothing was loaded")
                if (not isinstance(moment, torch.Tensor) or moment.shape != param.shape
                        or _is_dtensor(moment) != _is_dtensor(param) or local_shard(moment).shape != local_shard(param).shape):
                    raise ValueError(
                        f"the checkpoint's {name} of parameter {key} is {_described(moment)}, but that "
                        f"parameter here is {_described(param)}: the checkpoint is of another model, another "
                        "grouping or another sharding (load a sharded run through torch.distributed.checkpoint); "
                        "nothing was loaded")
        self._check_loaded_moments(moments, param_of)
        if undated:  # one device read; under FSDP2 the shards' counts summed, so every rank decides alike
            with torch.no_grad():
                nonzero = torch.stack([torch.count_nonzero(local_shard(moments[key][name])).to(
                    device=self._device or torch.device("cpu"), dtype=torch.float32)
                    for key in undated for name in MOMENT_KEYS])
                nonzero = self.reduction.sum_over_shards(nonzero).reshape(len(undated), len(MOMENT_KEYS))
            never_stepped = [key for key, counts in zip(undated, nonzero.sum(1).tolist()) if counts == 0]
            for key in never_stepped:  # it had no gradient yet: it sat out since its group began, as counted now
                stripped_state[key][SAT_OUT_SINCE] = 0
            if never_stepped:
                warnings.warn(
                    f"the checkpoint was saved before the counts of steps sat out, and parameter(s) "
                    f"{', '.join(map(str, never_stepped[:4]))}{' and more' if len(never_stepped) > 4 else ''} have "
                    "moments of zeros after steps of their group: taken as having had no gradient yet, so they "
                    "sat out since their group began (Adam's bias corrections start at their first gradient, "
                    "as this version counts such a parameter); a parameter whose gradients were all exactly "
                    "zero reads the same, and is then counted so too", UserWarning, stacklevel=2)
        if saved_configuration:  # past every check: a refused load says only why
            _warn_of_another_configuration(saved_configuration, _configuration_of(self))
        with torch_hooks_suspended(self, "_optimizer_load_state_dict_pre_hooks",
                                    "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict({**state_dict, "param_groups": groups, "state": stripped_state})
        for saved_id, values in moments.items():
            param = param_of[saved_id]
            state = self.state[param]
            for k, v in values.items():
                with torch.inference_mode(False):  # loaded under it: the steps write the moments in place
                    state[k] = v.to(device=param.device, dtype=torch.float32, copy=True)
        self._search = search if search is not None else SearchState(step_size=self.init_step_size)
        self._buckets.clear(checked_state=self.state)  # its moments checked above (_check_loaded_moments)
        self._counts = None  # counts of the replaced run
        self._counts_in_flight = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loaded_moments(self, moments: dict, param_of: dict) -> None:
        """Refuse a checkpoint whose moments hold NaN/inf or a negative ``exp_avg_sq``: every later
        step would read them (and blame the gradient). One device read per load; under FSDP2 the
        shards' counts are summed, so every rank decides alike."""
        names = [(key, name) for key, values in moments.items() for name in values]
        if not names:
            return
        device = self._device or torch.device("cpu")

        def flaws(name: str, tensor: torch.Tensor) -> torch.Tensor:
            """Two flags: the tensor holds NaN/inf (or, for exp_avg_sq, a negative value); its values are
            finite but beyond float32's range, where the moments are kept (a float64 AdamW's). From its min
            and max, so no mask the size of the tensor is kept."""
            local = local_shard(tensor)
            if not local.numel():
                return torch.zeros(2, dtype=torch.float32, device=device)
            low, high = torch.aminmax(local)
            corrupt = ~(torch.isfinite(low) & torch.isfinite(high))
            if name == "exp_avg_sq":
                corrupt = corrupt | (low < 0)
            beyond = ~corrupt & ~torch.isfinite(torch.maximum(low.abs(), high.abs()).float())
            return torch.stack([corrupt, beyond]).to(device=device, dtype=torch.float32)

        with torch.no_grad():
            counts = torch.stack([flaws(name, moments[key][name]) for key, name in names])
            counts = self.reduction.sum_over_shards(counts)
        corrupt, beyond = ([f"{name} of parameter {key}" for (key, name), count in zip(names, counts[:, kind].tolist())
                            if count] for kind in (0, 1))

        def listed(bad: List[str]) -> str:
            return f"{', '.join(bad[:4])}{' and more' if len(bad) > 4 else ''}"

        if corrupt:
            raise ValueError(f"the checkpoint's {listed(corrupt)} hold NaN/inf (or a negative exp_avg_sq): the "
                             "checkpoint is corrupt; nothing was loaded")
        if beyond:
            raise ValueError(f"the checkpoint's {listed(beyond)} hold finite values beyond float32's range "
                             f"({FLOAT32_MAX:.4g}), where FusedSaLSa keeps its moments (a float64 optimizer's "
                             "checkpoint?): they would load as inf; nothing was loaded")
