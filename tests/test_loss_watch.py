"""``WarmupStableDecay(backoff_after_search=True)`` (quality NOTES section 24): the range test of
``backoff_on_loss_rise`` kept on after the search phase, fed the loss of every 10th step there."""

import copy
from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.line_search import SearchState
from salsa_fused.step_size import (LOSS_RISE_BACKOFF, LOSS_WATCH_INTERVAL, ScaledSchedule, WarmupStableDecay,
                                   observe_loss, watches_loss_at)

from test_applied_step import FixedSchedule
from test_loss_rise_backoff import build, model_and_closure, train

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOTAL = 60  # searches steps 1-30 (decay 0.5), the watch reads steps 40, 50, 60, ...


def schedule(watch=True, rise=True):
    return WarmupStableDecay(TOTAL, warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=rise,
                             backoff_after_search=watch)


def test_the_watched_steps_are_every_tenth_after_the_search_phase():
    on, state = schedule(), SearchState()
    assert [k for k in range(1, 2 * TOTAL + 1) if watches_loss_at(on, state, k)] == list(range(40, 121, 10))
    frozen = replace(state, frozen_at=12)  # a state frozen early: no step searches, every 10th is watched
    assert [k for k in range(1, 41) if watches_loss_at(on, frozen, k)] == [10, 20, 30, 40]
    assert not any(watches_loss_at(schedule(watch=False), state, k) for k in range(1, 2 * TOTAL))
    assert not any(watches_loss_at(None, state, k) for k in range(1, 2 * TOTAL))
    assert not any(watches_loss_at(FixedSchedule(1.0), state, k) for k in range(1, 50))
    assert ScaledSchedule(on, object(), "x").backoff_after_search is True
    assert ScaledSchedule(None, object(), "x").backoff_after_search is False
    assert watches_loss_at(ScaledSchedule(on, object(), "x"), state, 40)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_option_or_one_without_the_range_test_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="backoff_after_search"):
        WarmupStableDecay(10, backoff_on_loss_rise=True, backoff_after_search=bad)
    with pytest.raises(ValueError, match="backoff_after_search=True extends backoff_on_loss_rise"):
        WarmupStableDecay(10, backoff_after_search=True)


def test_a_schedule_of_ones_own_without_the_range_test_is_refused_at_the_step_and_changes_nothing():
    class Mine(FixedSchedule):
        backoff_on_loss_rise = False
        backoff_after_search = True

    model, closure, _ = model_and_closure()
    with pytest.raises(ValueError, match="backoff_after_search"):
        build(model, Mine(1.0))
    opt = build(model, FixedSchedule(1.0))
    train(opt, closure, 2)
    opt.schedule = Mine(1.0)
    before_w, before = [p.detach().clone() for p in model.parameters()], opt.search_state
    with pytest.raises(ValueError, match="backoff_after_search"):
        train(opt, closure, 1)
    assert opt.search_state == before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before_w))


def run(watch, steps, inflate_from=None, factor=50.0):
    model, closure, inflation = model_and_closure()
    opt = build(model, schedule(watch=watch))
    backoffs = []
    for step in range(1, steps + 1):
        if inflate_from is not None and step >= inflate_from:
            inflation[0] = factor  # the loss the closure reports jumps (a run that blows up, scripted)
        train(opt, closure, 1)
        backoffs.append(opt.search_state.applied_backoff)
    return model, opt, backoffs


def test_a_run_whose_loss_never_turns_after_the_search_is_bitwise_the_run_without_the_watch():
    model_off, opt_off, b_off = run(False, TOTAL)
    model_on, opt_on, b_on = run(True, TOTAL)
    assert b_off == b_on == [1.0] * TOTAL
    on, off = opt_on.search_state, opt_off.search_state
    assert on.search_loss_avg != off.search_loss_avg  # the watch did read the cooldown's losses
    assert replace(on, search_loss_avg=0.0, search_loss_avg_low=0.0) == replace(
        off, search_loss_avg=0.0, search_loss_avg_low=0.0)
    assert all(torch.equal(a, b) for a, b in zip(model_on.parameters(), model_off.parameters()))


def test_a_loss_that_turns_in_the_cooldown_halves_the_step_at_the_next_watched_step():
    _, _, b_off = run(False, 45, inflate_from=33)
    assert b_off == [1.0] * 45  # nothing reads the loss after the search phase without the watch
    model, opt, b_on = run(True, 45, inflate_from=33)
    # the first watched step after the jump (40) reads 50x the loss: 0.9 l + 0.1 * 50 l > 2 l
    assert b_on[:39] == [1.0] * 39 and b_on[39:] == [LOSS_RISE_BACKOFF] * 6
    state = opt.search_state
    want = [group["lr"] * schedule().scale(state.step + 1) * LOSS_RISE_BACKOFF * state.step_size
            * opt.search_config.growth for group in opt.param_groups]
    assert opt.applied_steps == pytest.approx(want, rel=1e-12)


def test_only_the_watched_steps_read_the_loss(monkeypatch):
    import salsa_fused.optimizer as optimizer_module
    read_at = []

    def recording(schedule, state, loss):
        read_at.append(state.step)
        return observe_loss(schedule, state, loss)
    monkeypatch.setattr(optimizer_module, "observe_loss", recording)
    with pytest.warns(UserWarning, match="past the schedule's total_steps"):
        run(True, TOTAL + 25)  # past the end too
    assert read_at == list(range(40, TOTAL + 25, LOSS_WATCH_INTERVAL))


def test_a_checkpoint_in_the_cooldown_resumes_step_for_step():
    model, closure, inflation = model_and_closure()
    opt = build(model, schedule())
    train(opt, closure, 35)
    inflation[0] = 50.0
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(opt, closure, 10)
    assert opt.search_state.applied_backoff == LOSS_RISE_BACKOFF
    reference = [p.detach().clone() for p in model.parameters()]

    resumed_model, resumed_closure, resumed_inflation = model_and_closure()
    resumed_inflation[0] = 50.0
    resumed_model.load_state_dict(saved_model)
    resumed = build(resumed_model, schedule())
    resumed.load_state_dict(saved)
    train(resumed, resumed_closure, 10)
    assert resumed.search_state == opt.search_state
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), reference))
