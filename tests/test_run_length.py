"""Run length (issue 14): what a schedule planned for ``total_steps`` applies past it, the
one-time warning, checkpoints that resume or extend a run, and the recommended configuration
without a run length.

Past the end, ``WarmupStableDecay`` holds the last positive scale of its run (the cooldown's last
step) with the level frozen; the applied step is checked against the float64 formula of
``salsa_fused.applied`` (``tests/test_applied_step.py``'s helpers) and against
``effective_step_sizes``.
"""

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa, presets
from salsa_fused.line_search import ArmijoSearch, SearchState
from salsa_fused.step_size import (COLLAPSE_FRACTION, Cooldown, ScaledSchedule, WarmupStableDecay, freeze_if_collapsed,
                                   schedule_searches, warn_collapsed_level, warn_past_end)

from test_applied_step import GROWTH, LRS, backward, close, directions, expected, make

PAST_END = "past the schedule's total_steps"


def run_scripted(opt, weights, slopes, steps):
    """``steps`` steps of the linear loss in the two-phase form; every trial is accepted."""
    for _ in range(steps):
        loss = backward(weights, slopes)
        opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
        with warnings.catch_warnings():  # scripted: each trial reads the same value, a stale closure by design
            warnings.filterwarnings("ignore", message=".*does not seem to run the forward again")
            opt.step(lambda: loss.detach().clone(), loss=loss)


def past_end_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and PAST_END in str(w.message)]


def plain_step_applies(opt, weights, slopes, k, scale, level):
    """Step ``k`` is a plain step (no search: the closure fails the test) whose applied step is
    ``lr * scale * level * growth`` per group, as reported before it and as moved, in float64."""
    reported = opt.effective_step_sizes
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes)
    opt.mark_forward()
    opt.step(lambda: pytest.fail(f"step {k} must not search: the level is frozen"), loss=loss)
    for w, start, lr, step_size in zip(weights, w0, LRS, reported):
        _, u = directions(opt, w, k)
        assert step_size == pytest.approx(lr * scale * level * GROWTH, rel=1e-12, abs=0.0)
        close(w, expected(start, lr, scale, level, lr * scale * level * GROWTH, u))


# ---------------------------------------------------------------------------- the schedule itself
@pytest.mark.parametrize("total, warmup, decay, final, peak", [
    (100, 0.1, 0.2, 0.0, 1.0), (100, 0.2, 0.8, 0.0, 2.0), (10, 0.0, 0.5, 0.2, 1.0), (10, 0.3, 0.0, 0.0, 2.0),
    (7, 0.0, 1.0, 0.0, 1.5), (3, 0.5, 0.5, 0.0, 2.0), (1, 0.0, 1.0, 0.0, 2.0), (2, 0.0, 0.5, 0.0, 1.0),
    (3, 0.2, 0.8, 0.0, 2.0), (1000, 0.2, 0.8, 0.0, 2.0)])
def test_past_the_end_the_scale_holds_the_last_positive_scale_of_the_run(total, warmup, decay, final, peak):
    schedule = WarmupStableDecay(total, warmup=warmup, decay=decay, final=final, peak=peak)
    in_run = [schedule.scale(k) for k in range(1, total + 1)]
    positive = [s for s in in_run if s > 0]
    held = schedule.past_end_scale
    assert math.isfinite(held) and held > 0
    # the last positive scale of the run (a one-step run that decays to 0 has none: it holds peak)
    assert held == (positive[-1] if positive else peak)
    for k in (total + 1, total + 2, 10 * total + 7):
        assert schedule.scale(k) == held
        assert not schedule.searches(k)  # the level stays frozen
    # inside the run nothing changed: the cooldown still ends at final
    assert schedule.scale(total) == (peak * final if decay > 0 and round(decay * total) > 0 else in_run[-1])


def test_recommended_schedule_past_the_end_is_the_cooldowns_last_step():
    schedule = presets.recommended([torch.nn.Parameter(torch.ones(2))], total_steps=1000).schedule
    assert schedule.scale(1000) == 0.0  # the planned run ends on zero, as before
    assert schedule.scale(999) == schedule.scale(1001) == schedule.scale(5000) == 2.0 / 800


def test_warn_past_end_needs_a_planned_length():
    schedule = WarmupStableDecay(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_past_end(schedule, 10, SearchState())
        assert not warn_past_end(ScaledSchedule(None, object(), "x"), 11, SearchState())  # no inner: no length

        class Constant:
            def scale(self, step):
                return 1.0

            def searches(self, step):
                return True

        assert not warn_past_end(Constant(), 10 ** 6, SearchState())
    with pytest.warns(UserWarning, match="step 11 is past the schedule's total_steps=10"):
        assert warn_past_end(schedule, 11, SearchState())
    assert ScaledSchedule(schedule, object(), "x").total_steps == 10


# ---------------------------------------------------------------------------- the optimizer
def test_past_the_end_the_applied_step_is_the_held_scale_and_it_warns_once():
    total = 6
    schedule = WarmupStableDecay(total, warmup=0.0, decay=0.5)  # decay over steps 4-6, 0 at 6
    opt, weights, slopes = make(schedule)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scripted(opt, weights, slopes, total)
        assert not past_end_warnings(record)
        level, searches = opt.step_size, opt.num_searches
        held = schedule.past_end_scale
        assert held == schedule.scale(total - 1) == pytest.approx(1 / 3)
        for k in range(total + 1, total + 4):
            plain_step_applies(opt, weights, slopes, k, held, level)
            assert all(step > 0 and math.isfinite(step) for step in opt.effective_step_sizes)
            assert opt.step_size == level and opt.num_searches == searches
    found = past_end_warnings(record)
    assert len(found) == 1
    assert f"step {total + 1} is past the schedule's total_steps={total}" in str(found[0].message)
    assert found[0].filename == __file__  # points at the caller's step()


def model_run(total_steps=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(48, 5)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = presets.recommended(model.parameters(), total_steps=total_steps, backend="torch")
    return model, opt, lambda: torch.nn.functional.mse_loss(model(x), y)


def train(opt, closure, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)


def weights_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_checkpoint_past_the_end_resumes_step_for_step_and_warns_once_more():
    model, opt, closure = model_run()
    with pytest.warns(UserWarning, match=PAST_END):
        train(opt, closure, 14)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same optimizer: already warned
        train(opt, closure, 3)
    reference = weights_of(model)

    resumed_model, resumed, resumed_closure = model_run()
    resumed_model.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    assert resumed.effective_step_sizes == [pytest.approx(2.0 / round(0.8 * 12) * resumed.step_size * 1.1)] * len(
        resumed.param_groups)
    with pytest.warns(UserWarning, match="step 15 is past"):  # a new optimizer warns on its first step
        train(resumed, resumed_closure, 3)
    for a, b in zip(weights_of(resumed_model), reference):
        assert torch.equal(a, b)
    assert resumed.search_state.to_dict() == opt.search_state.to_dict()


def test_a_longer_total_steps_extends_a_checkpoint_of_the_search_phase():
    model, opt, closure = model_run(total_steps=12)
    train(opt, closure, 2)  # inside the 20% search phase of 12 steps
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    longer_model, longer, longer_closure = model_run(total_steps=40)
    longer_model.load_state_dict(saved_model)
    longer.load_state_dict(saved_opt)
    schedule = longer.schedule
    assert longer.effective_step_sizes == [
        pytest.approx(schedule.scale(3) * longer.step_size * 1.1, rel=1e-12)] * len(longer.param_groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 40 planned steps: no warning up to 40
        train(longer, longer_closure, 38)
    assert longer.search_state.step == 40
    with pytest.warns(UserWarning, match="step 41 is past the schedule's total_steps=40"):
        train(longer, longer_closure, 1)
    assert all(torch.isfinite(p).all() for p in longer_model.parameters())


# ---------------------------------------------------------------------------- no run length
@pytest.mark.parametrize("build", [
    lambda p: presets.recommended(p, None),
    lambda p: presets.recommended(p, total_steps=None),
    lambda p: presets.from_preset(p, "pretrain", total_steps=None),
], ids=["recommended", "total_steps=None", "from_preset"])
def test_without_a_run_length_the_recommended_search_runs_without_a_schedule(build):
    w = torch.nn.Parameter(torch.ones(2, 2))  # a matrix: the preset decays it
    opt, known = build([w]), presets.recommended([w], total_steps=100)
    assert opt.schedule is None
    assert opt.search_config == known.search_config and opt.search_rule is known.search_rule
    assert opt.search_direction == known.search_direction == "momentum"
    assert opt.param_groups[0]["weight_decay"] == known.param_groups[0]["weight_decay"] == 0.1
    assert "schedule" not in presets.preset_kwargs("pretrain", None)


@pytest.mark.parametrize("call", [
    lambda p: presets.recommended(p), lambda p: presets.from_preset(p, "pretrain"),
    lambda p: presets.preset_kwargs("pretrain"), lambda p: presets.recommended(p, backend="torch")])
def test_omitting_the_run_length_raises_and_names_both_choices(call):
    """Forgetting total_steps must not select the no-length mode silently (it ends worse)."""
    with pytest.raises(TypeError, match=r"needs total_steps: the run length .* or total_steps=None"):
        call([torch.nn.Parameter(torch.ones(2))])
    assert presets.preset_kwargs("faithful") == {}  # presets that take no length do not ask for it


def test_without_a_run_length_every_step_applies_the_searched_level_and_never_warns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(48, 5)
    y = torch.sin(x.sum(1, keepdim=True))
    closure = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt = presets.recommended(model.parameters(), total_steps=None, backend="torch")
    first = float(closure().detach())
    searched_late = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(1, 301):
            eta = opt.step_size
            assert opt.effective_step_sizes == [pytest.approx(eta * 1.1, rel=1e-12)] * 2  # matrices, vectors
            searches = opt.num_searches
            opt.zero_grad()
            opt.step(closure)
            searched_late |= k > 250 and opt.num_searches > searches
    assert searched_late  # the search keeps running: nothing freezes it
    assert float(closure().detach()) < 0.2 * first
    assert math.isfinite(opt.step_size) and opt.step_size > 0


def test_cooldown_values_and_bad_arguments():
    cooldown = Cooldown(10, 4)
    assert [cooldown.scale(k) for k in range(9, 17)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.25, 0.25]
    assert cooldown.searches(10) and not cooldown.searches(11) and not cooldown.searches(99)
    assert cooldown.total_steps == 14 and Cooldown(0, 5, final=0.1).scale(9) == 0.1
    for kwargs, match in ((dict(start=-1, steps=3), "start"), (dict(start=2, steps=0), "steps"),
                          (dict(start=2.0, steps=3), "start"), (dict(start=2, steps=3, final=1.5), "final")):
        with pytest.raises(ValueError, match=match):
            Cooldown(**kwargs)
    with pytest.raises(ValueError, match="step"):
        cooldown.scale(0)


def test_a_cooldown_installed_during_a_run_of_unknown_length_freezes_and_decays_the_applied_step():
    opt, weights, slopes = make(None)
    run_scripted(opt, weights, slopes, 3)
    opt.schedule = Cooldown(opt.search_state.step, 3)  # from step 4: 2/3, 1/3, 0, then 1/3 held
    level, searches = opt.step_size, opt.num_searches
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k, scale in zip(range(4, 9), (2 / 3, 1 / 3, 0.0, 1 / 3, 1 / 3)):
            plain_step_applies(opt, weights, slopes, k, scale, level)
    assert opt.step_size == level and opt.num_searches == searches
    assert len(past_end_warnings(record)) == 1


def test_a_second_cooldown_installed_after_the_first_ended_warns_past_its_own_end():
    """The past-end warning comes once per plan: a schedule of another length installed later warns at its end too
    (an audit's find: the one-time flag outlived the plan, and the second end passed in silence)."""
    opt, weights, slopes = make(None)
    run_scripted(opt, weights, slopes, 3)
    ends = []
    for _ in range(2):
        opt.schedule = Cooldown(opt.search_state.step, 2)
        ends.append(opt.search_state.step + 2)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            run_scripted(opt, weights, slopes, 4)
        found = past_end_warnings(record)
        assert len(found) == 1 and f"step {ends[-1] + 1} is past the schedule's total_steps={ends[-1]}" in str(
            found[0].message)
    opt.schedule = opt.schedule  # the same plan again: its end has been warned
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scripted(opt, weights, slopes, 2)
    assert not past_end_warnings(record)


def test_bad_run_lengths_still_raise():
    w = torch.nn.Parameter(torch.ones(2))
    for total in (0, -3, 2.5, True, "100"):
        with pytest.raises(ValueError, match="total_steps"):
            presets.recommended([w], total_steps=total)


# ---------------------------------------------------------------------------- a search that collapsed before the freeze
COLLAPSED = "the search collapsed before the schedule froze its level"


def collapse_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and COLLAPSED in str(w.message)]


def test_warn_collapsed_level_only_at_a_freeze_and_below_a_sixteenth_of_the_peak():
    schedule = WarmupStableDecay(10, warmup=0.2, decay=0.8, peak=2.0)  # searches steps 1-2
    peak = 0.4
    collapsed = SearchState(step=2, step_size=1e-9, step_size_fast_peak=peak)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert not warn_collapsed_level(schedule, collapsed, 2)  # still searching
        assert not warn_collapsed_level(None, collapsed, 3)  # no schedule: nothing is frozen
        healthy = replace(collapsed, step_size=COLLAPSE_FRACTION * peak)  # at the threshold: not a collapse
        assert not warn_collapsed_level(schedule, healthy, 3)
        assert not collapse_warnings(record)
        assert warn_collapsed_level(schedule, collapsed, 3)
        assert warn_collapsed_level(Cooldown(2, 5), collapsed, 3)
        assert warn_collapsed_level(ScaledSchedule(schedule, object(), "x"), collapsed, 3)
    found = collapse_warnings(record)
    assert len(found) == 3
    assert "step 3 freezes the level at 1e-09" in str(found[0].message) and "(0.4)" in str(found[0].message)


def test_the_optimizer_warns_once_at_the_first_frozen_step_when_the_level_collapsed():
    total = 8
    schedule = WarmupStableDecay(total, warmup=0.0, decay=0.5)  # frozen from step 5
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 4)
    peak = opt.search_state.step_size_fast_peak
    assert peak > 0
    level = opt.step_size
    healthy = copy.deepcopy(opt.state_dict())
    opt._commit(replace(opt.search_state, step_size=1e-9))  # as a search that collapsed before the freeze
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scripted(opt, weights, slopes, 3)
    found = collapse_warnings(record)
    assert len(found) == 1 and "step 5 freezes" in str(found[0].message)
    assert found[0].filename == __file__  # points at the caller's step()
    assert opt.step_size == 1e-9  # it only warns: the frozen level is what the search left
    fresh, w2, s2 = make(schedule)
    fresh.load_state_dict(healthy)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scripted(fresh, w2, s2, 3)
    assert not collapse_warnings(record) and fresh.step_size == level


def test_the_search_keeps_the_peak_of_its_fast_average_and_old_checkpoints_load():
    from salsa_fused.line_search import ArmijoSearch, SearchConfig, plan_step
    config = SearchConfig()
    state = SearchState(step_size=1.0, step_size_fast=0.5, step_size_slow=0.5, step_size_fast_peak=0.7)
    search = ArmijoSearch(plan_step(state, config), config, loss=1.0, slope=1.0)
    search.observe(0.0)  # accepted at eta * growth
    after = search.finish()
    assert after.step_size_fast == pytest.approx(0.9 * 0.5 + 0.1 * 1.1)
    assert after.step_size_fast_peak == 0.7  # the average is below its earlier peak: kept
    search = ArmijoSearch(plan_step(replace(state, step_size_fast_peak=0.1), config), config, 1.0, 1.0)
    search.observe(0.0)
    assert search.finish().step_size_fast_peak == pytest.approx(0.9 * 0.5 + 0.1 * 1.1)
    saved = state.to_dict()
    del saved["step_size_fast_peak"]  # a checkpoint from before the peak was kept
    assert SearchState.from_dict(saved).step_size_fast_peak == 0.0
    for bad in (-1.0, math.nan, math.inf, True, 1e300):  # 1e300 froze the level far above float32, every step refused
        with pytest.raises(ValueError, match="step_size_fast_peak"):
            replace(state, step_size_fast_peak=bad).validate()


def test_a_beam_branch_that_runs_past_the_freeze_does_not_warn_for_the_run():
    from salsa_fused import StepSizeBeam
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(40)]
    # the preset's schedule without its early freeze, which would raise the level to the peak set below
    schedule = replace(presets.preset_kwargs("pretrain", len(batches))["schedule"], freeze_below=0.0)
    opt = presets.recommended(model.parameters(), total_steps=len(batches), backend="torch", schedule=schedule)
    beam = StepSizeBeam(opt, total_steps=len(batches), points=(0.15,), horizon=0.1)  # branches past the freeze
    opt._commit(replace(opt.search_state, step_size_fast_peak=1e6))  # every frozen level reads as collapsed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(len(batches)):
            def closure(i, step=step):
                x, y = batches[min(step + i, len(batches) - 1)]
                return torch.nn.functional.mse_loss(model(x), y)
            beam.step(closure)
    found = collapse_warnings(record)
    assert len(found) == 1 and "step 9 freezes" in str(found[0].message)  # the run's own freeze, once


# ---------------------------------------------------------------------------- freezing a collapsing level early
def test_freeze_if_collapsed_raises_the_level_to_the_floor_once_while_searching():
    schedule = WarmupStableDecay(10, warmup=0.2, decay=0.5, peak=2.0, freeze_below=1 / 16)  # searches steps 1-5
    peak = 0.4
    collapsed = SearchState(step=2, step_size=1e-9, step_size_fast_peak=peak)
    frozen = freeze_if_collapsed(schedule, collapsed, 3, ArmijoSearch)
    assert frozen.step_size == peak / 16 and frozen.frozen_at == 3
    assert collapsed.step_size == 1e-9 and collapsed.frozen_at == 0  # a copy: the caller commits it
    assert schedule_searches(schedule, collapsed, 3) and not schedule_searches(schedule, frozen, 3)
    assert not schedule_searches(schedule, frozen, 4)  # for the rest of the run
    at_floor = replace(collapsed, step_size=peak / 16)
    assert freeze_if_collapsed(schedule, at_floor, 3, ArmijoSearch) is at_floor  # not below the floor: nothing to do
    # the first frozen step checks the last search
    at_freeze = freeze_if_collapsed(schedule, collapsed, 6, ArmijoSearch)
    assert at_freeze.step_size == peak / 16 and at_freeze.frozen_at == 6
    # past it: the schedule's freeze holds
    assert freeze_if_collapsed(schedule, collapsed, 7, ArmijoSearch) is collapsed
    assert freeze_if_collapsed(schedule, replace(frozen, step_size=1e-12), 4, ArmijoSearch).step_size == 1e-12  # once
    assert freeze_if_collapsed(replace(schedule, freeze_below=0.0), collapsed, 3, ArmijoSearch) is collapsed  # off
    assert freeze_if_collapsed(None, collapsed, 3, ArmijoSearch) is collapsed and schedule_searches(None, frozen, 3)
    never = replace(collapsed, step_size_fast_peak=0.0)  # a rule that keeps no fast average
    assert freeze_if_collapsed(schedule, never, 3, ArmijoSearch) is never
    assert ScaledSchedule(schedule, object(), "x").freeze_below == 1 / 16
    assert ScaledSchedule(None, object(), "x").freeze_below == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, math.nan, math.inf, True, "0.1", None])
def test_a_bad_freeze_below_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="freeze_below"):
        WarmupStableDecay(10, freeze_below=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True, 9])
def test_a_checkpoint_with_an_impossible_frozen_at_is_refused_and_changes_nothing(bad):
    schedule = WarmupStableDecay(8, warmup=0.0, decay=0.5, freeze_below=1 / 16)
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 3)
    saved = copy.deepcopy(opt.state_dict())
    before = opt.search_state
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["search"]["frozen_at"] = bad  # step is 3
    with pytest.raises(ValueError, match="frozen_at"):
        opt.load_state_dict(broken)
    assert opt.search_state == before
    old = copy.deepcopy(saved)
    del old["param_groups"][0]["search"]["frozen_at"]  # a checkpoint from before the option
    opt.load_state_dict(old)
    assert opt.search_state.frozen_at == 0


def test_the_optimizer_freezes_a_collapsing_level_at_the_floor_and_stops_searching():
    total = 12
    schedule = WarmupStableDecay(total, warmup=0.0, decay=0.5, freeze_below=1 / 16)  # searches steps 1-6
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 3)
    peak = opt.search_state.step_size_fast_peak
    searches = opt.num_searches
    assert peak > 0 and opt.search_state.frozen_at == 0 and searches >= 1
    opt._commit(replace(opt.search_state, step_size=1e-9))  # as a search that collapsed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(4, total + 1):  # every step a plain one at the floor, decay included
            plain_step_applies(opt, weights, slopes, k, schedule.scale(k), peak / 16)
    assert opt.search_state.frozen_at == 4 and opt.step_size == peak / 16 and opt.num_searches == searches
    assert opt.search_state.step_size_fast_peak == peak
    assert not collapse_warnings(record)  # the schedule's freeze finds the floor, not a collapse
    resumed, w2, s2 = make(schedule)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.search_state.frozen_at == 4


def test_without_a_collapse_the_early_freeze_changes_nothing():
    runs = []
    for fraction in (0.0, 1 / 16):
        model, _, closure = model_run()
        schedule = WarmupStableDecay(30, warmup=0.2, decay=0.5, peak=2.0, freeze_below=fraction)
        opt = FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", beta3=0.95,
                         weight_decay=0.1, schedule=schedule)
        train(opt, closure, 30)
        assert opt.search_state.frozen_at == 0
        runs.append((weights_of(model), opt.search_state))
    (w_off, s_off), (w_on, s_on) = runs
    assert s_off == s_on and all(torch.equal(a, b) for a, b in zip(w_off, w_on))


def test_the_early_freeze_reaches_through_a_step_size_beam():
    from salsa_fused import StepSizeBeam
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(40)]
    schedule = WarmupStableDecay(len(batches), warmup=0.2, decay=0.5, peak=2.0, freeze_below=1 / 16)
    opt = FusedSaLSa(model.parameters(), backend="torch", schedule=schedule)
    beam = StepSizeBeam(opt, total_steps=len(batches), points=(0.25,), horizon=0.1)
    for step in range(len(batches)):
        if step == 5:
            opt._commit(replace(opt.search_state, step_size=1e-12))  # as a search that collapsed
        def closure(i, step=step):
            x, y = batches[min(step + i, len(batches) - 1)]
            return torch.nn.functional.mse_loss(model(x), y)
        beam.step(closure)
    state = opt.search_state
    assert state.frozen_at == 6 and state.step_size == state.step_size_fast_peak / 16
    assert beam.last_decision["step"] == 10  # the beam ran after the freeze, its branches restored


def test_the_recommended_preset_freezes_a_collapsing_level_early_and_so_never_warns():
    schedule = presets.preset_kwargs("pretrain", 100)["schedule"]
    assert schedule.freeze_below == COLLAPSE_FRACTION  # quality NOTES section 22
    assert "schedule" not in presets.preset_kwargs("pretrain", None)  # no schedule, no freeze: the search runs on
    model, opt, closure = model_run(total_steps=40)
    train(opt, closure, 3)
    peak = opt.search_state.step_size_fast_peak
    opt._commit(replace(opt.search_state, step_size=peak * 1e-6))  # as a search that collapsed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(opt, closure, 37)
    state = opt.search_state
    assert state.frozen_at == 4 and state.step_size == peak * COLLAPSE_FRACTION
    assert not collapse_warnings(record)


def test_a_drop_at_the_last_search_of_the_phase_is_frozen_at_the_floor_and_does_not_warn():
    total = 12
    schedule = WarmupStableDecay(total, warmup=0.0, decay=0.5, freeze_below=1 / 16)  # searches steps 1-6
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 6)  # the search phase, every step a search
    peak = opt.search_state.step_size_fast_peak
    opt._commit(replace(opt.search_state, step_size=1e-9))  # as the phase's last search left it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain_step_applies(opt, weights, slopes, 7, schedule.scale(7), peak / 16)
    assert opt.search_state.frozen_at == 7 and not collapse_warnings(record)


def test_a_level_frozen_early_at_a_lower_fraction_does_not_warn_at_the_schedules_freeze():
    schedule = WarmupStableDecay(12, warmup=0.0, decay=0.5, freeze_below=1 / 64)  # below COLLAPSE_FRACTION
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 3)
    opt._commit(replace(opt.search_state, step_size=1e-9))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_scripted(opt, weights, slopes, 9)  # freezes at step 4 at peak/64, then past the schedule's freeze
    assert opt.search_state.frozen_at == 4 and not collapse_warnings(record)
    unfrozen = replace(opt.search_state, frozen_at=0)  # the same level without the early freeze: it warns
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert warn_collapsed_level(schedule, unfrozen, 7)


def test_a_level_frozen_early_stays_frozen_under_a_schedule_loaded_later():
    schedule = WarmupStableDecay(12, warmup=0.0, decay=0.5, freeze_below=1 / 16)
    opt, weights, slopes = make(schedule)
    run_scripted(opt, weights, slopes, 3)
    opt._commit(replace(opt.search_state, step_size=1e-9))
    run_scripted(opt, weights, slopes, 1)
    saved = copy.deepcopy(opt.state_dict())
    searches = opt.num_searches
    longer, w2, s2 = make(WarmupStableDecay(100, warmup=0.0, decay=0.5))  # longer, and without freeze_below
    longer.load_state_dict(saved)
    assert longer.search_state.frozen_at == 4
    assert not schedule_searches(longer.schedule, longer.search_state, 5)
    free, w3, s3 = make(None)  # no schedule: the search runs as always
    free.load_state_dict(saved)
    assert schedule_searches(None, free.search_state, 5)
    run_scripted(free, w3, s3, 2)
    assert free.num_searches > searches


@pytest.mark.parametrize("bad", [-0.5, 1.0, math.nan, "0.1", True])
def test_a_schedule_of_ones_own_with_a_bad_freeze_below_is_refused_and_changes_nothing(bad):
    """Refused where it is assigned (as at construction), and at the step when it turned bad after."""
    from test_applied_step import FixedSchedule

    class Frozen(FixedSchedule):
        freeze_below = bad

    opt, weights, slopes = make(FixedSchedule(1.0))
    run_scripted(opt, weights, slopes, 2)
    kept = opt.schedule
    with pytest.raises(ValueError, match="freeze_below"):
        opt.schedule = Frozen(1.0)  # installed mid-run, as schedules are
    assert opt.schedule is kept
    kept.freeze_below = bad  # changed after it was assigned: refused at the step
    before_w = [w.detach().clone() for w in weights]
    before_state, before_search = copy.deepcopy(opt.state_dict()["state"]), opt.search_state
    loss = backward(weights, slopes)
    opt.mark_forward()
    with pytest.raises(ValueError, match="freeze_below"):
        opt.step(lambda: loss.detach().clone(), loss=loss)  # scripted: each trial reads the same value
    assert opt.search_state == before_search
    assert all(torch.equal(a, b) for a, b in zip(weights, before_w))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k][n], v) for k, d in before_state.items() for n, v in d.items()
               if isinstance(v, torch.Tensor))
    with pytest.raises(ValueError, match="freeze_below"):  # through a beam's wrapper too
        freeze_if_collapsed(ScaledSchedule(Frozen(1.0), object(), "x"), opt.search_state, 3, ArmijoSearch)


@pytest.mark.parametrize("total", [1, 2])
def test_a_run_too_short_for_one_search_step_is_refused_by_name(total):
    """The preset's shape (cooldown 80%) on 1 or 2 steps: no step before the cooldown, so the
    search would never run and the run would apply init_step_size."""
    from salsa_fused import presets

    schedule = presets.preset_kwargs("pretrain", 3)["schedule"]
    with pytest.raises(ValueError, match=f"total_steps={total} with decay=0.8 leaves no step before the cooldown.*>= 3"):
        FusedSaLSa([torch.nn.Parameter(torch.randn(3))], schedule=replace(schedule, total_steps=total))
    with pytest.raises(ValueError, match=f"total_steps={total} is too short for the 'pretrain' preset.*>= 3"):
        presets.recommended([torch.nn.Parameter(torch.randn(3))], total_steps=total)
    WarmupStableDecay(total, warmup=0.0, decay=1.0)  # decay=1 means no search, as asked
    WarmupStableDecay(total, warmup=0.2, decay=0.8).scale(1)  # a scale for AdamW's shape: no search to miss
    with pytest.raises(ValueError, match=r"use total_steps >= 5000001 "):
        WarmupStableDecay(2, warmup=0.0, decay=0.9999999).check_searches()  # found at once, not by a scan


def test_numpy_integers_are_run_lengths():
    import numpy as np
    from salsa_fused import StepSizeBeam, presets

    opt = presets.recommended([torch.nn.Parameter(torch.randn(3))], total_steps=np.int64(100))
    assert opt.schedule.total_steps == 100 and type(opt.schedule.total_steps) is int
    assert StepSizeBeam(opt, total_steps=np.int32(100)).total_steps == 100
    from salsa_fused.step_size import Cooldown
    cooldown = Cooldown(np.int64(10), np.int32(5))
    assert (cooldown.start, cooldown.steps) == (10, 5) and type(cooldown.start) is int


@pytest.mark.parametrize("rule", ["sls", "alsals", "labpal", "labpal_sgd"])
def test_freeze_below_under_a_rule_that_does_not_track_the_levels_peak_is_refused(rule):
    """Only SaLSa's search keeps the fast average's peak that freeze_below reads: under another rule
    the freeze never happened, silently."""
    schedule = WarmupStableDecay(100, warmup=0.1, decay=0.2, freeze_below=1 / 16)
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="freeze_below=0.0625 .* only SaLSa's search .* does not"):
        FusedSaLSa([w], search_rule=rule, schedule=schedule)
    opt = FusedSaLSa([w], search_rule=rule, schedule=replace(schedule, freeze_below=0.0), backend="torch")
    with pytest.raises(ValueError, match="freeze_below=0.0625 .* only SaLSa's search .* does not"):
        opt.schedule = schedule  # assigned after construction: refused alike
    assert opt.schedule.freeze_below == 0.0
    FusedSaLSa([w], schedule=schedule)  # SaLSa's own rule tracks it


def test_a_schedule_that_stops_the_search_before_any_search_ran_is_refused():
    """presets' recipe for a run whose end became known, Cooldown(search_state.step, n), used at step 0:
    no search ever ran, the level stayed at init_step_size and the run diverged, silently (a new user's
    trial: losses 0.5, 192, 738). Refused at the first step, before any write, unless init_step_size was
    given (a level of the caller's own, as the plain-step benchmarks use); after one search it runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    for build in (lambda: FusedSaLSa(model.parameters(), schedule=Cooldown(0, 20)),
                  lambda: presets.recommended(model.parameters(), total_steps=None)):
        opt = build()
        if opt.schedule is None:
            opt.schedule = Cooldown(opt.search_state.step, 20)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with pytest.raises(ValueError, match="stops the search at step 1, before any search has run"):
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert opt.search_state.step == 0 and opt.num_searches == 0
    opt = FusedSaLSa(model.parameters(), schedule=Cooldown(0, 20), init_step_size=1e-3)
    opt.zero_grad()
    opt.step(closure)  # a level of the caller's own: no search needed
    assert opt.num_searches == 0 and opt.step_size == 1e-3
    opt = presets.recommended(model.parameters(), total_steps=None)
    opt.zero_grad()
    opt.step(closure)  # one search
    opt.schedule = Cooldown(opt.search_state.step, 20)
    opt.zero_grad()
    opt.step(closure)
    assert opt.num_searches == 1 and opt.search_state.step == 2


def test_a_scheduler_holding_lr_at_zero_through_the_search_phase_is_named_as_the_cause():
    """The preset at total_steps=20 searches at steps 1-4; a LambdaLR holding lr at 0 for 5 steps let no search
    run, and every later step was refused naming Cooldown, which the user never built (an audit's check)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = presets.recommended(model.parameters(), total_steps=20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k < 5 else 1.0)
    for _ in range(4):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        scheduler.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"stops the search at step 5, before any search has run: none of steps "
                                         r"1-4, its search phase, searched, since no group could move there: every "
                                         r"param group's lr was 0 \(a learning-rate scheduler holding lr at 0"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.search_state.step == 4


def test_a_schedule_assigned_after_construction_is_checked_as_one_given_to_it():
    opt = FusedSaLSa([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(TypeError, match="schedule must have scale.* got int"):
        opt.schedule = 3
    with pytest.raises(ValueError, match="the search would never run"):
        opt.schedule = WarmupStableDecay(2, decay=0.9)
    assert opt.schedule is None
