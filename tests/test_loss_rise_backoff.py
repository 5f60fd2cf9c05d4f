"""``WarmupStableDecay(backoff_on_loss_rise=True)`` (quality NOTES section 23): a range test on the
search phase's own losses. At each search, ``l <- 0.9 l + 0.1 f0`` and its lowest value ``l_low``;
when ``l > 2 l_low`` the multiplier ``b`` on the applied step halves and ``l_low <- l``."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa, StepSizeBeam
from salsa_fused.line_search import SearchState
from salsa_fused.step_size import (LOSS_RISE_BACKOFF, LOSS_RISE_RATIO, LOSS_RISE_SMOOTHING, ScaledSchedule,
                                   WarmupStableDecay, applied_scale, observe_search_loss, warn_past_end)

from test_applied_step import FixedSchedule


ON = WarmupStableDecay(100, warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=True)


def observe(schedule, state, loss):
    return observe_search_loss(schedule, replace(state, last_search_loss=loss))


def test_the_smoothed_loss_its_lowest_value_and_one_halving_per_doubling():
    state = observe(ON, SearchState(), 4.0)  # the first loss sets both
    assert (state.search_loss_avg, state.search_loss_avg_low, state.applied_backoff) == (4.0, 4.0, 1.0)
    state = observe(ON, state, 2.0)
    average = LOSS_RISE_SMOOTHING * 4.0 + (1 - LOSS_RISE_SMOOTHING) * 2.0
    assert state.search_loss_avg == average and state.search_loss_avg_low == average
    low = average
    rises = 0
    while state.applied_backoff == 1.0:  # a loss of 100: the average climbs past 2x its lowest
        previous = state.search_loss_avg
        state = observe(ON, state, 100.0)
        rises += 1
        expect = LOSS_RISE_SMOOTHING * previous + (1 - LOSS_RISE_SMOOTHING) * 100.0
        assert state.search_loss_avg == pytest.approx(expect, rel=1e-15)
        if state.applied_backoff == 1.0:
            assert state.search_loss_avg <= LOSS_RISE_RATIO * low and state.search_loss_avg_low == low
    assert state.applied_backoff == LOSS_RISE_BACKOFF and state.search_loss_avg > LOSS_RISE_RATIO * low
    assert state.search_loss_avg_low == state.search_loss_avg  # the next halving needs another doubling
    assert rises == 1  # 0.9 * 3.8 + 0.1 * 100 = 13.4 > 2 * 3.8
    state = observe(ON, state, 100.0)
    assert state.applied_backoff == LOSS_RISE_BACKOFF  # 0.9 * 13.42 + 10 = 22.078 < 2 * 13.42
    # losses of 1000 from l = 22.078, l_low = 13.42, by hand: l = 119.870 > 26.84 (halve, l_low 119.870);
    # 207.883 < 239.740; 287.095 > 239.740 (halve, l_low 287.095); 358.385, 422.547, 480.292, 532.263
    # < 574.190; 579.037 > 574.190 (halve, l_low 579.037); then l < 1000 < 2 * 579.037 for good:
    # halvings at the 1st, 3rd and 8th search
    halved_at = []
    for search in range(1, 41):
        before = state.applied_backoff
        state = observe(ON, state, 1000.0)
        if state.applied_backoff != before:
            halved_at.append(search)
    assert halved_at == [1, 3, 8] and state.applied_backoff == LOSS_RISE_BACKOFF ** 4
    assert state.search_loss_avg_low == pytest.approx(579.037, abs=1e-3)


@pytest.mark.parametrize("loss", [0.0, -3.0, math.inf, math.nan])
def test_a_loss_that_is_not_positive_and_finite_changes_nothing(loss):
    state = observe(ON, SearchState(), 1.0)
    assert observe(ON, state, loss) == replace(state, last_search_loss=loss)


def test_off_without_the_option_or_a_schedule_and_through_a_beams_wrapper():
    state = replace(SearchState(), last_search_loss=5.0)
    assert observe_search_loss(None, state) is state
    assert observe_search_loss(replace(ON, backoff_on_loss_rise=False), state) is state
    assert observe_search_loss(FixedSchedule(1.0), state) is state  # a schedule without the option
    assert ScaledSchedule(ON, object(), "x").backoff_on_loss_rise is True
    assert ScaledSchedule(None, object(), "x").backoff_on_loss_rise is False
    assert observe_search_loss(ScaledSchedule(ON, object(), "x"), state).search_loss_avg == 5.0
    assert applied_scale(None, replace(state, applied_backoff=0.5), 3) == 1.0
    assert applied_scale(ON, replace(state, applied_backoff=0.25), 30) == ON.scale(30) * 0.25


@pytest.mark.parametrize("bad", [1, "yes", None, 0.5])
def test_a_bad_option_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="backoff_on_loss_rise"):
        WarmupStableDecay(10, backoff_on_loss_rise=bad)


def model_and_closure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(48, 5)
    y = torch.sin(x.sum(1, keepdim=True))
    inflation = [1.0]  # the loss the closure reports, times this (a loss that turns, scripted)
    closure = lambda: torch.nn.functional.mse_loss(model(x), y) * inflation[0]  # noqa: E731
    return model, closure, inflation


def build(model, schedule):
    return FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", beta3=0.95,
                      weight_decay=0.1, schedule=schedule)


def train(opt, closure, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure)


def test_a_run_whose_loss_never_turns_is_bitwise_the_run_without_the_option():
    runs = []
    for on in (False, True):
        model, closure, _ = model_and_closure()
        opt = build(model, WarmupStableDecay(40, warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=on))
        train(opt, closure, 40)
        state = opt.search_state
        assert state.applied_backoff == 1.0
        runs.append(([p.detach().clone() for p in model.parameters()], state))
    (w_off, s_off), (w_on, s_on) = runs
    assert s_on.search_loss_avg > 0 and s_off.search_loss_avg == 0.0  # only the option smooths the loss
    assert replace(s_on, search_loss_avg=0.0, search_loss_avg_low=0.0) == s_off
    assert all(torch.equal(a, b) for a, b in zip(w_off, w_on))


def test_when_the_loss_turns_the_applied_step_halves_and_a_checkpoint_keeps_it():
    total = 40
    schedule = WarmupStableDecay(total, warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=True)
    model, closure, inflation = model_and_closure()
    opt = build(model, schedule)
    train(opt, closure, 6)
    assert opt.search_state.applied_backoff == 1.0
    inflation[0] = 50.0  # the loss jumps 50x: the smoothed loss doubles within the next searches
    steps = 6
    while opt.search_state.applied_backoff == 1.0:
        train(opt, closure, 1)
        steps += 1
        assert steps <= schedule.decay_start, "the loss turned and no back-off followed"
    assert opt.search_state.applied_backoff == LOSS_RISE_BACKOFF
    state = opt.search_state
    want = [group["lr"] * schedule.scale(state.step + 1) * LOSS_RISE_BACKOFF * state.step_size
            * opt.search_config.growth for group in opt.param_groups]
    assert opt.applied_steps == pytest.approx(want, rel=1e-12)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(opt, closure, 5)
    reference = [p.detach().clone() for p in model.parameters()]

    resumed_model, resumed_closure, resumed_inflation = model_and_closure()
    resumed_inflation[0] = 50.0
    resumed_model.load_state_dict(saved_model)
    resumed = build(resumed_model, schedule)
    resumed.load_state_dict(saved)
    assert resumed.search_state.applied_backoff == LOSS_RISE_BACKOFF
    train(resumed, resumed_closure, 5)
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), reference))


def test_the_back_off_moves_the_weights_by_the_halved_step_on_a_plain_step():
    schedule = WarmupStableDecay(20, warmup=0.0, decay=0.5, backoff_on_loss_rise=True)  # searches steps 1-10
    model, closure, _ = model_and_closure()
    opt = build(model, schedule)
    train(opt, closure, 10)
    opt._commit(replace(opt.search_state, applied_backoff=0.25))  # as after two halvings
    plain = FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", beta3=0.95,
                       weight_decay=0.1, schedule=schedule)  # the same step without the back-off
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    plain._commit(replace(plain.search_state, applied_backoff=1.0))
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        train(plain, closure, 1)
    moved_full = [p.detach() - s for p, s in zip(model.parameters(), start)]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    train(opt, closure, 1)
    moved = [p.detach() - s for p, s in zip(model.parameters(), start)]
    for a, b in zip(moved, moved_full):  # step 11 is plain: the move (decay included) is a quarter
        torch.testing.assert_close(a, 0.25 * b, rtol=1e-5, atol=1e-7)  # fp32 differences of weights


@pytest.mark.parametrize("name, bad", [("applied_backoff", 0.0), ("applied_backoff", 1.5),
                                       ("applied_backoff", math.nan), ("applied_backoff", True),
                                       ("search_loss_avg", -1.0), ("search_loss_avg_low", math.inf),
                                       ("last_search_loss", math.nan)])
def test_a_checkpoint_with_an_impossible_back_off_is_refused_and_changes_nothing(name, bad):
    model, closure, _ = model_and_closure()
    opt = build(model, ON)
    train(opt, closure, 3)
    saved, before = copy.deepcopy(opt.state_dict()), opt.search_state
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["search"][name] = bad
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(broken)
    assert opt.search_state == before
    old = copy.deepcopy(saved)
    for key in ("applied_backoff", "search_loss_avg", "search_loss_avg_low", "last_search_loss"):
        del old["param_groups"][0]["search"][key]  # a checkpoint from before the option
    opt.load_state_dict(old)
    assert opt.search_state.applied_backoff == 1.0 and opt.search_state.search_loss_avg == 0.0


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_schedule_of_ones_own_with_a_bad_option_is_refused_and_changes_nothing(bad):
    class Mine(FixedSchedule):
        backoff_on_loss_rise = bad

    model, closure, _ = model_and_closure()
    with pytest.raises(ValueError, match="backoff_on_loss_rise"):  # given at construction: refused there
        build(model, Mine(1.0))
    opt = build(model, FixedSchedule(1.0))
    train(opt, closure, 2)
    kept = opt.schedule
    with pytest.raises(ValueError, match="backoff_on_loss_rise"):
        opt.schedule = Mine(1.0)  # installed mid-run, as schedules are: refused where it is assigned
    assert opt.schedule is kept
    kept.backoff_on_loss_rise = bad  # turned bad after it was assigned: refused at the step
    before_w = [p.detach().clone() for p in model.parameters()]
    before = opt.search_state
    with pytest.raises(ValueError, match="backoff_on_loss_rise"):
        train(opt, closure, 1)
    assert opt.search_state == before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before_w))


def test_a_beam_branch_restores_the_back_off(monkeypatch):
    import salsa_fused.optimizer as optimizer_module
    seen = []  # every back-off a search left, branches' included

    def recording(schedule, state):
        state = observe_search_loss(schedule, state)
        seen.append(state.applied_backoff)
        return state
    monkeypatch.setattr(optimizer_module, "observe_search_loss", recording)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(40)]
    schedule = WarmupStableDecay(len(batches), warmup=0.2, decay=0.5, peak=2.0, backoff_on_loss_rise=True)
    opt = FusedSaLSa(model.parameters(), backend="torch", schedule=schedule)
    beam = StepSizeBeam(opt, total_steps=len(batches), points=(0.25,), horizon=0.1)
    for step in range(len(batches)):
        if step == 10:  # the beam point: its branches' losses must not leave a back-off behind
            before = opt.search_state
            inflate = 1000.0
        else:
            inflate = 1.0

        def closure(i, step=step, inflate=inflate):
            x, y = batches[min(step + i, len(batches) - 1)]
            return torch.nn.functional.mse_loss(model(x), y) * (inflate if i > 0 else 1.0)
        beam.step(closure)
        if step == 10:
            after = opt.search_state
            assert beam.last_decision["step"] == 10
            assert min(seen) < 1.0  # a branch's inflated losses did back off ...
            assert after.applied_backoff == before.applied_backoff == 1.0  # ... and the branch was thrown away


def test_the_past_end_warning_quotes_the_applied_scale_with_the_back_off():
    schedule = WarmupStableDecay(10, warmup=0.0, decay=0.5, peak=2.0, backoff_on_loss_rise=True)
    with pytest.warns(UserWarning, match=r"holds at 0\.2x the searched level"):  # 2 * 1/5, halved
        warn_past_end(schedule, 11, state=replace(SearchState(), applied_backoff=0.5))
    with pytest.warns(UserWarning, match=r"holds at 0\.4x the searched level"):
        warn_past_end(schedule, 11, SearchState())


def test_a_loss_at_exactly_twice_its_lowest_has_not_turned():
    """``l > 2 l_low`` backs off, ``l = 2 l_low`` does not (exact: the first loss sets l, both are dyadic)."""
    state = replace(SearchState(), search_loss_avg_low=1.0)
    assert observe(ON, state, 2.0).applied_backoff == 1.0
    assert observe(ON, state, math.nextafter(2.0, 3.0)).applied_backoff == LOSS_RISE_BACKOFF
