"""``WarmupStableDecay(hold_scale_on_loss_rise=True)`` (quality NOTES section 25): at the range test's
first back-off the schedule's scale ``h`` is kept, and the applied multiplier is ``min(scale, h) * b``."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from salsa_fused.line_search import SearchState
from salsa_fused.step_size import LOSS_RISE_BACKOFF, ScaledSchedule, WarmupStableDecay, applied_scale

from test_loss_rise_backoff import build, model_and_closure, observe, train


TOTAL = 100  # warm-up to 2x over steps 1-20, searches through step 50, then a linear decay
HOLD = WarmupStableDecay(TOTAL, warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=True,
                         hold_scale_on_loss_rise=True)


def turned(schedule, step, losses=(1.0, 100.0)):
    """A state whose loss turned at ``step``: one low loss, then one that doubles the average."""
    state = replace(SearchState(), step=step)
    for loss in losses:
        state = observe(schedule, state, loss)
    return state


def test_the_first_back_off_keeps_the_scale_and_a_later_one_does_not_move_it():
    state = turned(HOLD, 8)
    assert state.applied_backoff == LOSS_RISE_BACKOFF and state.scale_hold == HOLD.scale(8) == 0.8
    later = observe(HOLD, replace(state, step=15), 1e6)  # a second halving at step 15
    assert later.applied_backoff == LOSS_RISE_BACKOFF ** 2 and later.scale_hold == 0.8
    without = turned(replace(HOLD, hold_scale_on_loss_rise=False), 8)
    assert without.applied_backoff == LOSS_RISE_BACKOFF and without.scale_hold == 0.0


def test_the_applied_scale_is_the_held_scale_until_the_cooldown_falls_below_it():
    state = turned(HOLD, 8)
    for step in (8, 12, 20, 50, 70, 90, 100):
        want = min(HOLD.scale(step), 0.8) * LOSS_RISE_BACKOFF
        assert applied_scale(HOLD, state, step) == pytest.approx(want, rel=1e-15)
    assert applied_scale(HOLD, state, 30) == 0.8 * LOSS_RISE_BACKOFF  # the warm-up's rise ended at 0.8
    assert applied_scale(HOLD, state, 95) == HOLD.scale(95) * LOSS_RISE_BACKOFF  # 0.2 < 0.8: the decay


def test_under_a_beams_wrapper_the_hold_is_on_the_wrapped_schedule_not_the_beams_multiplier():
    class Owner:
        multiplier = 1.0
    owner = Owner()
    wrapped = ScaledSchedule(HOLD, owner, "multiplier")
    assert wrapped.hold_scale_on_loss_rise is True
    state = turned(wrapped, 8)
    assert state.scale_hold == 0.8
    owner.multiplier = 4.0  # the beam moves its multiplier later: the hold does not cap it
    assert applied_scale(wrapped, state, 30) == pytest.approx(0.8 * 4.0 * LOSS_RISE_BACKOFF, rel=1e-15)
    # late in the cooldown the wrapped scale is below the hold: the wrapper's scale, unchanged
    assert applied_scale(wrapped, state, 95) == wrapped.scale(95) * LOSS_RISE_BACKOFF


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_option_or_one_without_the_back_off_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="hold_scale_on_loss_rise"):
        WarmupStableDecay(10, backoff_on_loss_rise=True, hold_scale_on_loss_rise=bad)
    with pytest.raises(ValueError, match="hold_scale_on_loss_rise=True acts at backoff_on_loss_rise"):
        WarmupStableDecay(10, hold_scale_on_loss_rise=True)


def run(schedule, steps, inflate_at=None):
    model, closure, inflation = model_and_closure()
    opt = build(model, schedule)
    for step in range(1, steps + 1):
        if step == inflate_at:
            inflation[0] = 50.0  # the loss jumps during the warm-up (scripted)
        train(opt, closure, 1)
    return model, opt


def test_a_run_whose_loss_never_turns_is_bitwise_the_run_without_the_hold():
    (m_on, o_on), (m_off, o_off) = run(HOLD, 60), run(replace(HOLD, hold_scale_on_loss_rise=False), 60)
    assert o_on.search_state == o_off.search_state and o_on.search_state.scale_hold == 0.0
    assert all(torch.equal(a, b) for a, b in zip(m_on.parameters(), m_off.parameters()))


def test_a_loss_that_turns_in_the_warm_up_holds_the_applied_step_and_a_checkpoint_keeps_it():
    model, closure, inflation = model_and_closure()
    opt = build(model, HOLD)
    train(opt, closure, 5)
    inflation[0] = 50.0  # the loss jumps during the warm-up (scripted)
    while opt.search_state.applied_backoff == 1.0:
        train(opt, closure, 1)
        assert opt.search_state.step < HOLD.warmup_steps, "the loss turned and no back-off followed"
    state = opt.search_state
    assert state.applied_backoff == LOSS_RISE_BACKOFF and state.scale_hold == HOLD.scale(state.step)
    want = [group["lr"] * state.scale_hold * LOSS_RISE_BACKOFF * state.step_size * opt.search_config.growth
            for group in opt.param_groups]
    assert opt.applied_steps == pytest.approx(want, rel=1e-12)  # the next step applies the held scale
    saved = copy.deepcopy(opt.state_dict())
    resumed_model, _, _ = model_and_closure()
    resumed = build(resumed_model, HOLD)
    resumed.load_state_dict(saved)
    assert resumed.search_state.scale_hold == state.scale_hold


@pytest.mark.parametrize("bad", [-0.5, math.inf, math.nan, True])
def test_a_checkpoint_with_an_impossible_hold_is_refused_and_an_old_one_loads_without(bad):
    model, opt = run(HOLD, 3)
    saved, before = copy.deepcopy(opt.state_dict()), opt.search_state
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["search"]["scale_hold"] = bad
    with pytest.raises(ValueError, match="scale_hold"):
        opt.load_state_dict(broken)
    assert opt.search_state == before
    del saved["param_groups"][0]["search"]["scale_hold"]  # a checkpoint from before the option
    opt.load_state_dict(saved)
    assert opt.search_state.scale_hold == 0.0


def test_a_checkpoint_with_a_hold_but_no_back_off_is_refused():
    model, opt = run(HOLD, 3)
    saved, before = copy.deepcopy(opt.state_dict()), opt.search_state
    saved["param_groups"][0]["search"]["scale_hold"] = 1.5  # applied_backoff is still 1: no run reaches this
    with pytest.raises(ValueError, match="scale_hold=1.5 is kept at a back-off"):
        opt.load_state_dict(saved)
    assert opt.search_state == before


DECAY = replace(HOLD, decay_from_hold=True)  # quality NOTES section 73


def test_with_decay_from_hold_the_hold_is_the_peak_past_the_warm_up():
    state = turned(DECAY, 8)
    assert state.scale_hold == 0.8
    for step in (8, 12, 20):  # the warm-up: capped at the hold, as without the option
        assert applied_scale(DECAY, state, step) == applied_scale(HOLD, state, step)
    for step in (21, 50, 51, 70, 90, 99, 100, 130):  # past it: the schedule scaled by h / peak
        assert applied_scale(DECAY, state, step) == pytest.approx(
            DECAY.scale(step) * 0.8 / 2.0 * LOSS_RISE_BACKOFF, rel=1e-15)
    assert applied_scale(DECAY, state, 70) < applied_scale(HOLD, state, 70)  # the decay starts from h at once
    assert applied_scale(DECAY, state, 100) == 0.0
    # no hold set (the loss never turned): the schedule's own scale, as without the option
    assert all(applied_scale(DECAY, SearchState(), k) == DECAY.scale(k) for k in (5, 20, 60, 100))


def test_decay_from_hold_under_a_beams_wrapper_scales_the_wrapped_schedule_only():
    class Owner:
        multiplier = 3.0
    wrapped = ScaledSchedule(DECAY, Owner(), "multiplier")
    state = turned(wrapped, 8)
    want = DECAY.scale(70) * 0.8 / 2.0 * 3.0 * LOSS_RISE_BACKOFF
    assert applied_scale(wrapped, state, 70) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_decay_from_hold_is_refused_by_name_when_not_a_bool_or_without_the_hold(bad):
    with pytest.raises(ValueError, match="decay_from_hold"):
        replace(DECAY, decay_from_hold=bad)
    with pytest.raises(ValueError, match="decay_from_hold=True decays the cooldown from hold_scale_on_loss_rise"):
        WarmupStableDecay(10, backoff_on_loss_rise=True, decay_from_hold=True)


def test_a_run_whose_loss_turns_applies_the_held_scale_times_the_decay_and_is_unchanged_before():
    def run_to(schedule, steps):
        model, closure, inflation = model_and_closure()
        opt = build(model, schedule)
        train(opt, closure, 5)
        inflation[0] = 50.0  # the loss jumps during the warm-up (scripted)
        train(opt, closure, steps - 5)
        return model, opt
    (m_hold, o_hold), (m_decay, o_decay) = run_to(HOLD, DECAY.warmup_steps), run_to(DECAY, DECAY.warmup_steps)
    assert o_decay.search_state == o_hold.search_state and o_decay.search_state.scale_hold > 0
    assert all(torch.equal(a, b) for a, b in zip(m_hold.parameters(), m_decay.parameters()))
    state = o_decay.search_state
    step = state.step + 1
    want = [group["lr"] * DECAY.scale(step) * state.scale_hold / DECAY.peak * state.applied_backoff
            * state.step_size * o_decay.search_config.growth for group in o_decay.param_groups]
    assert o_decay.applied_steps == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("peak", [0.5, 3.0])
def test_decay_from_hold_at_another_peak_scales_by_the_hold_over_that_peak(peak):
    schedule = replace(DECAY, peak=peak)
    state = turned(schedule, 8)
    h = schedule.scale(8)
    assert state.scale_hold == h == pytest.approx(peak * 8 / 20, rel=1e-15)
    assert applied_scale(schedule, state, 15) == min(schedule.scale(15), h) * LOSS_RISE_BACKOFF
    for step in (21, 60, 99):
        assert applied_scale(schedule, state, step) == pytest.approx(
            schedule.scale(step) * h / peak * LOSS_RISE_BACKOFF, rel=1e-15)


def test_without_a_warm_up_the_hold_is_the_peak_and_decay_from_hold_changes_nothing():
    schedule = replace(DECAY, warmup=0.0)
    state = turned(schedule, 8)
    assert state.scale_hold == schedule.peak
    for step in (8, 30, 60, 90, 120):
        assert applied_scale(schedule, state, step) == applied_scale(replace(schedule, decay_from_hold=False),
                                                                      state, step)


def test_a_kept_hold_above_a_lower_peak_loaded_later_caps_nothing_and_raises_nothing():
    """A checkpoint of a peak-2 run, its hold 1.6, loaded into a peak-1 schedule: never above that schedule's
    own scale, as the ``min`` of the hold alone is not (a review's case)."""
    lower = WarmupStableDecay(TOTAL, warmup=0.2, decay=0.5, peak=1.0, backoff_on_loss_rise=True,
                              hold_scale_on_loss_rise=True, decay_from_hold=True)
    state = replace(SearchState(), applied_backoff=LOSS_RISE_BACKOFF, scale_hold=1.6)
    for step in (10, 30, 70, 100, 130):
        assert applied_scale(lower, state, step) == lower.scale(step) * LOSS_RISE_BACKOFF


def test_decay_from_hold_is_seen_through_a_beams_wrapper_and_kept_by_a_checkpoint():
    class Owner:
        multiplier = 1.0
    assert ScaledSchedule(DECAY, Owner(), "multiplier").decay_from_hold is True
    assert ScaledSchedule(HOLD, Owner(), "multiplier").decay_from_hold is False
    model, closure, inflation = model_and_closure()
    opt = build(model, DECAY)
    train(opt, closure, 5)
    inflation[0] = 50.0  # the loss turns in the warm-up (scripted)
    train(opt, closure, 20)  # past the warm-up: the cooldown from the hold applies
    assert opt.search_state.scale_hold > 0
    saved = copy.deepcopy(opt.state_dict())
    resumed = build(model_and_closure()[0], DECAY)
    resumed.load_state_dict(saved)
    assert resumed.search_state == opt.search_state and resumed.applied_steps == opt.applied_steps
    without = build(model_and_closure()[0], HOLD)
    without.load_state_dict(saved)  # the same checkpoint without the option: the hold caps, as section 25's
    state, step = without.search_state, without.search_state.step + 1
    assert applied_scale(HOLD, state, step) == min(HOLD.scale(step), state.scale_hold) * state.applied_backoff
