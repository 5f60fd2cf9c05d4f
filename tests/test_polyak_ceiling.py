"""``WarmupStableDecay(polyak_ceiling=True)`` (quality NOTES section 26): after the search phase, every
10th step reads ``f`` and ``q = g.d``; from the next such step the multiplier on the level is capped at
``f / (c q eta growth)``, the largest step the Armijo test could accept at that loss."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.line_search import SearchState
from salsa_fused.step_size import (CEILING_INTERVAL, WarmupStableDecay, applied_scale, polyak_ceiling,
                                   reads_ceiling_at, take_ceiling_reading)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOTAL = 60  # the search phase is steps 1-12; steps 20, 30, ... read


def schedule(peak=2.0, on=True):
    return WarmupStableDecay(TOTAL, warmup=0.2, decay=0.8, peak=peak, polyak_ceiling=on)


def data():
    torch.manual_seed(0)
    x = torch.randn(48, 5)
    return x, torch.sin(x.sum(1, keepdim=True))


def loss_of(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def fit(seed=0):
    x, y = data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, loss_of(model, x, y)


def build(model, sched):
    return FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", beta3=0.95,
                      schedule=sched)


def train(opt, closure, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_the_ceiling_is_the_armijo_bound_and_a_reading_without_one_sets_none():
    assert polyak_ceiling(2.0, 8.0, 0.5) == 0.5  # f(w - t d) >= 0 > f - c t q once t > f / (c q)
    for loss, slope in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (math.nan, 1.0), (1.0, math.inf)):
        assert polyak_ceiling(loss, slope, 0.5) == 0.0
    state = replace(SearchState(), ceiling_loss=2.0, ceiling_slope=8.0)
    taken = take_ceiling_reading(state, trial=0.25, c=0.5)
    assert (taken.scale_ceiling, taken.ceiling_loss, taken.ceiling_slope) == (2.0, 0.0, 0.0)
    assert take_ceiling_reading(SearchState(), 0.25, 0.5) == SearchState()  # no reading: unchanged
    # a reading that sets no cap lifts the one before it
    lifted = take_ceiling_reading(replace(taken, ceiling_loss=1.0, ceiling_slope=-1.0), 0.25, 0.5)
    assert lifted.scale_ceiling == 0.0


def test_the_cap_acts_only_on_steps_that_do_not_search_and_reads_every_tenth_step_after_the_search_phase():
    sched = schedule()
    state = replace(SearchState(), scale_ceiling=0.1)
    assert applied_scale(sched, state, 5) == sched.scale(5)  # the search phase: the search bounds it
    assert applied_scale(sched, state, 30) == 0.1
    assert applied_scale(sched, state, 59) == sched.scale(59) < 0.1  # below the cap: the schedule's
    assert [k for k in range(1, TOTAL + 1) if reads_ceiling_at(sched, state, k)] == [20, 30, 40, 50, 60]
    assert not any(reads_ceiling_at(schedule(on=False), state, k) for k in range(1, TOTAL + 1))
    assert CEILING_INTERVAL == 10


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_bad_option_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="polyak_ceiling"):
        WarmupStableDecay(10, polyak_ceiling=bad)


def test_the_reading_is_the_slope_along_the_move_the_step_applied_and_the_cap_follows_from_it():
    model, closure = fit()
    opt = build(model, schedule())
    train(opt, closure, 19)
    before = weights(model)
    scale = applied_scale(opt.schedule, opt.search_state, 20)
    trial = opt.applied_steps[0] / scale  # lr = 1: eta * growth
    opt.zero_grad()
    loss = float(opt.step(closure))  # step 20 reads
    grads = [p.grad.detach().clone() for p in model.parameters()]
    moved = [w0 - p.detach() for w0, p in zip(before, model.parameters())]  # = s * trial * d (no decay)
    slope = sum(float((g * m).sum()) for g, m in zip(grads, moved)) / (scale * trial)
    state = opt.search_state  # the reading, on the host now
    assert state.ceiling_loss == pytest.approx(loss, rel=1e-6)
    assert state.ceiling_slope == pytest.approx(slope, rel=1e-4)
    assert state.scale_ceiling == 0.0  # taken at step 30, not before
    train(opt, closure, 9)
    want = state.ceiling_loss / (0.5 * state.ceiling_slope * trial)
    assert opt.search_state.scale_ceiling == 0.0  # still pending until step 30 starts
    scale_30 = applied_scale(opt.schedule, replace(opt.search_state, scale_ceiling=want), 30)
    assert opt.applied_steps[0] == pytest.approx(trial * scale_30, rel=1e-12)  # the property takes it
    train(opt, closure, 1)
    assert opt.search_state.scale_ceiling == pytest.approx(want, rel=1e-12)


def test_a_peak_above_the_ceiling_is_capped_and_the_weights_move_by_the_cap():
    model, closure = fit()
    opt = build(model, schedule(peak=1e4))  # the schedule asks for far more than the search accepts
    train(opt, closure, 29)
    state = opt.search_state
    trial = opt.step_size * opt.search_config.growth
    cap = state.ceiling_loss / (0.5 * state.ceiling_slope * trial)  # step 30 takes step 20's reading
    assert 0 < cap < opt.schedule.scale(30)
    assert opt.applied_steps[0] == pytest.approx(trial * cap, rel=1e-12)
    free = copy.deepcopy(model)
    uncapped = build(free, schedule(peak=1e4))
    uncapped.load_state_dict(opt.state_dict())
    uncapped.schedule = replace(uncapped.schedule, polyak_ceiling=False)
    before = weights(model)
    train(opt, closure, 1)
    train(uncapped, loss_of(free, *data()), 1)
    # the same step without the cap moves along the same direction, scale(30) / cap times as far
    ratio = opt.schedule.scale(30) / cap
    for w0, capped, full in zip(before, model.parameters(), free.parameters()):
        assert torch.allclose((w0 - full.detach()), ratio * (w0 - capped.detach()), rtol=1e-4, atol=1e-6)


def test_a_run_whose_cap_never_binds_is_bitwise_the_run_without_the_option():
    finals = []
    for on in (False, True):
        model, closure = fit()
        opt = build(model, schedule(peak=0.05, on=on))  # a small applied step, far below any ceiling
        train(opt, closure, TOTAL)
        finals.append(weights(model))
        if on:
            assert opt.search_state.scale_ceiling > 0.05 * 0.5  # read, and above the step
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_a_checkpoint_with_a_reading_on_its_way_resumes_bitwise():
    model, closure = fit()
    opt = build(model, schedule(peak=1e4))
    train(opt, closure, 25)  # step 20 read; its reading is pending
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["search"]["ceiling_slope"] != 0.0
    model_copy = copy.deepcopy(model)
    train(opt, closure, 20)
    resumed_model, resumed_closure = fit()
    resumed_model.load_state_dict(model_copy.state_dict())
    resumed = build(resumed_model, schedule(peak=1e4))
    resumed.load_state_dict(saved)
    train(resumed, resumed_closure, 20)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed_model)))
    assert resumed.search_state == opt.search_state


@pytest.mark.parametrize("field,value", [("scale_ceiling", -1.0), ("scale_ceiling", math.inf),
                                         ("ceiling_loss", math.nan), ("ceiling_slope", math.inf)])
def test_a_checkpoint_with_a_bad_ceiling_value_is_refused_and_nothing_changes(field, value):
    model, closure = fit()
    opt = build(model, schedule())
    train(opt, closure, 21)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["search"][field] = value
    state_before, w_before = opt.search_state, weights(model)
    with pytest.raises(ValueError, match=field):
        opt.load_state_dict(bad)
    assert opt.search_state == state_before
    assert all(torch.equal(a, b) for a, b in zip(w_before, weights(model)))
