"""``WarmupStableDecay(hedge_cooldown_on_loss_rise=True)`` (quality NOTES section 33): once the range test
has backed off (``b < 1``), the cooldown is log-linear to a tenth of the peak instead of linear to 0."""

import copy
from dataclasses import replace

import pytest
import torch

from salsa_fused.line_search import SearchState
from salsa_fused.step_size import (HEDGED_COOLDOWN_FLOOR, LOSS_RISE_BACKOFF, ScaledSchedule, WarmupStableDecay,
                                   applied_scale)

from test_loss_rise_backoff import build, model_and_closure, train
from test_scale_hold import turned

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOTAL = 100  # warm-up to 2x over steps 1-20, searches through step 20, then the cooldown over 80 steps
HEDGE = WarmupStableDecay(TOTAL, warmup=0.2, decay=0.8, peak=2.0, backoff_on_loss_rise=True,
                          hedge_cooldown_on_loss_rise=True)


def test_the_hedged_scale_is_the_schedules_until_the_cooldown_then_halves_in_equal_steps():
    assert [HEDGE.hedged_scale(k) for k in range(1, 21)] == [HEDGE.scale(k) for k in range(1, 21)]
    assert HEDGE.hedged_scale(60) == pytest.approx(2.0 * HEDGED_COOLDOWN_FLOOR ** 0.5, rel=1e-15)
    assert HEDGE.hedged_scale(100) == pytest.approx(2.0 * HEDGED_COOLDOWN_FLOOR, rel=1e-15)
    assert HEDGE.hedged_scale(500) == pytest.approx(2.0 * HEDGED_COOLDOWN_FLOOR, rel=1e-15)
    assert HEDGE.hedged_scale(40) / HEDGE.hedged_scale(30) == pytest.approx(HEDGE.hedged_scale(90) / HEDGE.hedged_scale(80))
    flat = replace(HEDGE, warmup=0.2, decay=0.0)  # no cooldown: nothing to hedge
    assert [flat.hedged_scale(k) for k in (5, 50, 100, 200)] == [flat.scale(k) for k in (5, 50, 100, 200)]


def test_the_applied_scale_is_hedged_only_after_a_back_off():
    calm = replace(SearchState(), step=30)
    for step in (10, 20, 21, 60, 100, 130):
        assert applied_scale(HEDGE, calm, step) == HEDGE.scale(step)  # b = 1: the linear cooldown, bitwise
    state = turned(HEDGE, 8)
    assert state.applied_backoff == LOSS_RISE_BACKOFF and state.scale_hold == 0.0
    for step in (10, 20, 21, 60, 100, 130):
        assert applied_scale(HEDGE, state, step) == HEDGE.hedged_scale(step) * LOSS_RISE_BACKOFF


def test_with_the_hold_the_hedged_cooldown_is_capped_at_the_held_scale():
    both = replace(HEDGE, hold_scale_on_loss_rise=True)
    state = turned(both, 8)
    assert state.scale_hold == both.scale(8) == 0.8
    for step in (8, 20, 30, 60, 90, 100):
        want = min(both.hedged_scale(step), 0.8) * LOSS_RISE_BACKOFF
        assert applied_scale(both, state, step) == pytest.approx(want, rel=1e-15)
    assert applied_scale(both, state, 100) == pytest.approx(0.2 * LOSS_RISE_BACKOFF, rel=1e-15)  # not 0


def test_under_a_beams_wrapper_the_hedge_is_on_the_wrapped_schedule():
    class Owner:
        multiplier = 3.0
    wrapped = ScaledSchedule(HEDGE, Owner(), "multiplier")
    assert wrapped.hedge_cooldown_on_loss_rise is True
    state = turned(wrapped, 8)
    assert applied_scale(wrapped, state, 60) == pytest.approx(HEDGE.hedged_scale(60) * 3.0 * LOSS_RISE_BACKOFF,
                                                              rel=1e-15)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_option_one_without_the_back_off_or_with_a_final_scale_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="hedge_cooldown_on_loss_rise must be True or False"):
        WarmupStableDecay(10, backoff_on_loss_rise=True, hedge_cooldown_on_loss_rise=bad)
    with pytest.raises(ValueError, match="hedge_cooldown_on_loss_rise=True acts after backoff_on_loss_rise"):
        WarmupStableDecay(10, hedge_cooldown_on_loss_rise=True)
    with pytest.raises(ValueError, match="use it with final=0"):
        WarmupStableDecay(10, final=0.1, backoff_on_loss_rise=True, hedge_cooldown_on_loss_rise=True)


def test_a_run_whose_loss_never_turns_is_bitwise_the_run_without_the_hedge():
    runs = []
    for schedule in (HEDGE, replace(HEDGE, hedge_cooldown_on_loss_rise=False)):
        model, closure, _ = model_and_closure()
        opt = build(model, schedule)
        train(opt, closure, TOTAL)
        runs.append((opt.search_state, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][0].applied_backoff == 1.0
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_after_a_back_off_the_cooldown_applies_the_hedged_scale_and_a_checkpoint_resumes_it():
    model, closure, inflation = model_and_closure()
    opt = build(model, HEDGE)
    train(opt, closure, 5)
    inflation[0] = 50.0  # the loss jumps during the warm-up (scripted)
    while opt.search_state.applied_backoff == 1.0:
        train(opt, closure, 1)
        assert opt.search_state.step < HEDGE.warmup_steps, "the loss turned and no back-off followed"
    inflation[0] = 1.0
    train(opt, closure, 50 - opt.search_state.step)  # into the cooldown: the level is frozen
    state = opt.search_state
    want = [group["lr"] * HEDGE.hedged_scale(51) * state.applied_backoff * state.step_size
            * opt.search_config.growth for group in opt.param_groups]
    assert opt.applied_steps == pytest.approx(want, rel=1e-12)
    linear = [group["lr"] * HEDGE.scale(51) * state.applied_backoff * state.step_size * opt.search_config.growth
              for group in opt.param_groups]
    assert opt.applied_steps[0] != pytest.approx(linear[0], rel=1e-3)  # a different step than the linear one
    saved = copy.deepcopy(opt.state_dict())
    resumed_model, resumed_closure, _ = model_and_closure()
    resumed_model.load_state_dict(model.state_dict())
    resumed = build(resumed_model, HEDGE)
    resumed.load_state_dict(saved)
    assert resumed.applied_steps == opt.applied_steps
    train(opt, closure, 10)
    train(resumed, resumed_closure, 10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
