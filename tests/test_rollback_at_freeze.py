"""``WarmupStableDecay(rollback_at_freeze=True)`` (quality NOTES section 27): at the schedule's freeze, if
the range test's smoothed loss is above its lowest value, the level freezes at ``min(eta, level_at_low)``
and the scale is held at ``scale_at_low``, where that lowest value was set."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.line_search import SearchState
from salsa_fused.step_size import (LOSS_RISE_BACKOFF, LOSS_RISE_SMOOTHING, ScaledSchedule, WarmupStableDecay,
                                   applied_scale, observe_search_loss, roll_back_at_freeze, start_state)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOTAL = 100  # warm-up to 2x over steps 1-20, searches through step 20, then a linear decay to 0
ROLLBACK = WarmupStableDecay(TOTAL, warmup=0.2, decay=0.8, peak=2.0, backoff_on_loss_rise=True,
                             hold_scale_on_loss_rise=True, rollback_at_freeze=True)


def observe(schedule, state, step, loss, level):
    """The state after a search at ``step`` that read ``loss`` and left the level at ``level``."""
    return observe_search_loss(schedule, replace(state, step=step, step_size=level, last_search_loss=loss))


def test_a_new_low_keeps_its_level_and_scale_and_a_back_offs_reset_does_not():
    state = observe(ROLLBACK, SearchState(), 4, 1.0, 0.1)  # the first reading is a low
    assert (state.level_at_low, state.scale_at_low) == (0.1, ROLLBACK.scale(4))
    state = observe(ROLLBACK, state, 6, 0.5, 0.2)  # lower: a new low
    assert (state.level_at_low, state.scale_at_low) == (0.2, ROLLBACK.scale(6))
    state = observe(ROLLBACK, state, 8, 2.0, 0.3)  # l rises (0.95 -> 1.055): kept where it was
    assert (state.level_at_low, state.scale_at_low) == (0.2, ROLLBACK.scale(6))
    rising = state
    step = 8
    while rising.applied_backoff == 1.0:  # the average doubles: a back-off resets l_low to l
        step += 1
        rising = observe(ROLLBACK, rising, step, 100.0, 0.4)
    assert rising.search_loss_avg_low == rising.search_loss_avg
    assert (rising.level_at_low, rising.scale_at_low) == (0.2, ROLLBACK.scale(6))  # not the turn
    after = observe(ROLLBACK, rising, step + 1, 1.0, 0.05)  # below the reset l_low: a low since the back-off
    assert (after.level_at_low, after.scale_at_low) == (0.05, ROLLBACK.scale(step + 1))
    off = observe(replace(ROLLBACK, rollback_at_freeze=False), SearchState(), 4, 1.0, 0.1)
    assert (off.level_at_low, off.scale_at_low) == (0.0, 0.0)


def above_its_low(level=0.3):
    state = observe(ROLLBACK, SearchState(), 10, 0.5, 0.2)  # the low: level 0.2 at scale(10) = 1
    state = observe(ROLLBACK, state, 20, 0.8, level)  # the freeze comes with l above it (no back-off)
    assert state.search_loss_avg > state.search_loss_avg_low and state.applied_backoff == 1.0
    return state


def test_at_the_freeze_a_loss_above_its_low_rolls_back_once_and_only_there():
    state = above_its_low()
    for step in (20, 22, 50):  # not the freeze: unchanged
        assert roll_back_at_freeze(ROLLBACK, state, step) is state
    rolled = roll_back_at_freeze(ROLLBACK, state, 21)
    assert (rolled.step_size, rolled.scale_hold, rolled.rolled_back_at) == (0.2, ROLLBACK.scale(10), 21)
    assert roll_back_at_freeze(ROLLBACK, replace(rolled, step=21), 21) == replace(rolled, step=21)  # once
    assert applied_scale(ROLLBACK, rolled, 40) == ROLLBACK.scale(10) == 1.0
    assert applied_scale(ROLLBACK, rolled, 95) == ROLLBACK.scale(95)  # the decay, once below the hold
    lower = roll_back_at_freeze(ROLLBACK, above_its_low(level=0.1), 21)
    assert lower.step_size == 0.1  # min(eta, level_at_low): never raised
    held = roll_back_at_freeze(ROLLBACK, replace(state, scale_hold=0.5, applied_backoff=0.5), 21)
    assert held.scale_hold == 0.5  # the lower of the two holds
    at_low = observe(ROLLBACK, SearchState(), 20, 0.5, 0.2)
    assert roll_back_at_freeze(ROLLBACK, at_low, 21) is at_low  # the loss at its lowest: nothing
    frozen = replace(state, frozen_at=15)
    assert roll_back_at_freeze(ROLLBACK, frozen, 21) is frozen  # an early freeze stays as it froze
    off = replace(ROLLBACK, rollback_at_freeze=False)
    assert roll_back_at_freeze(off, state, 21) is state


def test_under_a_beams_wrapper_the_rollback_reads_the_wrapped_schedule():
    class Owner:
        multiplier = 3.0
    wrapped = ScaledSchedule(ROLLBACK, Owner(), "multiplier")
    assert wrapped.rollback_at_freeze is True
    state = observe(wrapped, SearchState(), 10, 0.5, 0.2)
    assert state.scale_at_low == ROLLBACK.scale(10)  # the wrapped scale, not times the beam's 3
    state = observe(wrapped, state, 20, 0.8, 0.3)
    rolled = roll_back_at_freeze(wrapped, state, 21)
    assert applied_scale(wrapped, rolled, 40) == pytest.approx(ROLLBACK.scale(10) * 3.0, rel=1e-15)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_option_or_one_without_the_back_off_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="rollback_at_freeze"):
        WarmupStableDecay(10, backoff_on_loss_rise=True, rollback_at_freeze=bad)
    with pytest.raises(ValueError, match="rollback_at_freeze=True reads backoff_on_loss_rise"):
        WarmupStableDecay(10, rollback_at_freeze=True)


def fit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(48, 5)
    y = torch.sin(x.sum(1, keepdim=True))
    inflation = [1.0]  # the loss the closure reports, times this (a loss that turns, scripted)
    return model, (lambda: torch.nn.functional.mse_loss(model(x), y) * inflation[0]), inflation


def build(model, schedule):
    return FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", beta3=0.95,
                      schedule=schedule)


def train(opt, closure, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_run_whose_loss_is_at_its_lowest_at_the_freeze_is_bitwise_the_run_without_the_option():
    finals = []
    for on in (False, True):
        model, closure, _ = fit()
        opt = build(model, replace(ROLLBACK, rollback_at_freeze=on))
        train(opt, closure, TOTAL)
        finals.append((weights(model), opt.search_state))
    (w_off, s_off), (w_on, s_on) = finals
    assert all(torch.equal(a, b) for a, b in zip(w_off, w_on))
    assert s_on.rolled_back_at == 0 and s_on.level_at_low > 0  # lows kept, no rollback needed
    assert replace(s_on, level_at_low=0.0, scale_at_low=0.0) == s_off


def test_a_loss_that_turns_before_the_freeze_rolls_the_run_back_and_the_weights_move_by_it():
    model, closure, inflation = fit()
    opt = build(model, ROLLBACK)
    train(opt, closure, 12)
    inflation[0] = 1.9  # the loss jumps for the last searches: l rises, never to 2x its low
    train(opt, closure, 8)
    state = opt.search_state
    assert state.applied_backoff == 1.0 and state.search_loss_avg > state.search_loss_avg_low
    level_at_low, scale_at_low = state.level_at_low, state.scale_at_low
    assert 0 < scale_at_low < ROLLBACK.scale(20)
    applied = opt.applied_steps[0]  # step 21, the freeze: the property shows the rollback
    want = scale_at_low * min(state.step_size, level_at_low) * opt.search_config.growth
    assert applied == pytest.approx(want, rel=1e-12)
    before = weights(model)
    train(opt, closure, 1)
    after = opt.search_state
    assert (after.rolled_back_at, after.scale_hold) == (21, scale_at_low)
    assert after.step_size == min(state.step_size, level_at_low)
    assert not torch.equal(before[0], weights(model)[0])


def test_a_checkpoint_across_the_rollback_resumes_bitwise_and_bad_values_are_refused():
    model, closure, inflation = fit()
    opt = build(model, ROLLBACK)
    train(opt, closure, 12)
    inflation[0] = 1.9
    train(opt, closure, 7)  # step 19: the low is kept, the rollback is two steps away
    saved, model_saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(opt, closure, 10)
    resumed_model, resumed_closure, resumed_inflation = fit()
    resumed_model.load_state_dict(model_saved)
    resumed_inflation[0] = 1.9
    resumed = build(resumed_model, ROLLBACK)
    resumed.load_state_dict(saved)
    train(resumed, resumed_closure, 10)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed_model)))
    assert resumed.search_state == opt.search_state and opt.search_state.rolled_back_at == 21
    good = copy.deepcopy(opt.state_dict())
    for field, value in (("level_at_low", -1.0), ("scale_at_low", math.inf), ("rolled_back_at", 10_000),
                         ("rolled_back_at", 0)):
        bad = copy.deepcopy(good)
        bad["param_groups"][0]["search"][field] = value  # rolled_back_at 0 leaves a hold with b = 1
        state_before, w_before = opt.search_state, weights(model)
        with pytest.raises(ValueError, match="rolled_back_at" if field == "rolled_back_at" else field):
            opt.load_state_dict(bad)
        assert opt.search_state == state_before
        assert all(torch.equal(a, b) for a, b in zip(w_before, weights(model)))


def test_start_state_freezes_a_collapse_before_it_would_roll_back():
    schedule = replace(ROLLBACK, freeze_below=1 / 16)
    state = replace(above_its_low(level=1e-4), step_size_fast_peak=1.0)
    started = start_state(schedule, state, 21)  # the collapse check comes first and freezes at 1/16
    assert started.frozen_at == 21 and started.rolled_back_at == 0 and started.step_size == 1 / 16
    assert LOSS_RISE_BACKOFF < 1 and 0 < LOSS_RISE_SMOOTHING < 1
