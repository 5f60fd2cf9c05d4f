"""The rules the quality ablations rejected (benchmarks/quality/rules.py): scalars in, decisions
out, and their wiring into FusedSaLSa (a rule object passed as ``search_rule``)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.quality.rules import EdgeRule, NonMonotoneArmijo, curvature_estimate, sharpness_ratio
from salsa_fused import FusedSaLSa
from salsa_fused.line_search import ArmijoSearch, SearchConfig, SearchState, plan_step
from salsa_fused.rules import Verdict
from salsa_fused.step_size import WarmupStableDecay


def quadratic(f0, q, kappa):
    """Loss along the direction: f(eta) = f0 - eta*q + eta^2*kappa/2."""
    return lambda eta: f0 - eta * q + 0.5 * kappa * eta * eta


def test_curvature_estimate_recovers_a_quadratic():
    f = quadratic(3.0, 2.0, 40.0)
    for eta in (1e-3, 0.05, 0.2):
        assert curvature_estimate(3.0, f(eta), 2.0, eta) == pytest.approx(40.0, rel=1e-9)
    assert sharpness_ratio(3.0, f(2.0 / 40.0), 2.0, 2.0 / 40.0) == pytest.approx(1.0)
    assert sharpness_ratio(3.0, f(4.0 / 40.0), 2.0, 4.0 / 40.0) == pytest.approx(2.0)
    assert math.isnan(sharpness_ratio(3.0, 2.0, -1.0, 0.1))
    with pytest.raises(ValueError, match="step_size"):
        curvature_estimate(1.0, 1.0, 1.0, 0.0)


def run_searches(rule, f0, q, kappa, eta0, searches, config=SearchConfig()):
    """Repeated searches on the same quadratic; returns the applied levels and the last state."""
    state = SearchState(step_size=eta0)
    levels = []
    f = quadratic(f0, q, kappa)
    for _ in range(searches):
        plan = plan_step(state, config)
        search = rule(plan, config, f0, q)
        assert search.active
        while not search.observe(f(search.step_size)):
            assert not search.exhausted
        levels.append(search.step_size)
        state = search.finish()
    return levels, state


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_edge_rule_settles_at_sigma_times_the_greedy_step(sigma):
    q, kappa = 2.0, 40.0
    levels, state = run_searches(EdgeRule(sigma=sigma), 5.0, q, kappa, eta0=1e-3, searches=40)
    assert levels[-1] == pytest.approx(sigma * q / kappa, rel=1e-6)
    # the stored eta times the growth factor is the level the next step applies
    assert state.step_size * SearchConfig().growth == pytest.approx(sigma * q / kappa, rel=1e-6)
    # the level moves by at most max_change per search
    ratios = [b / a for a, b in zip(levels, levels[1:])]
    assert max(ratios) <= 1.5 + 1e-9 and min(ratios) >= 1 / 1.5 - 1e-9


def test_edge_rule_keeps_the_peak_of_its_fast_average_for_the_early_freeze():
    # a level that rises and then falls: the peak stays at the highest fast average (freeze_below reads it)
    levels, state = run_searches(EdgeRule(sigma=1.0), 5.0, 2.0, 40.0, eta0=1e-3, searches=40)
    assert state.step_size_fast_peak > 0.0
    assert state.step_size_fast_peak >= state.step_size_fast
    peak = state.step_size_fast_peak
    plan = plan_step(state, SearchConfig())
    search = EdgeRule(sigma=1.0)(plan, SearchConfig(), 5.0, 2.0)
    search.observe(quadratic(5.0, 2.0, 4000.0)(search.step_size))  # 100x the curvature: the level falls
    after = search.finish()
    assert after.step_size_fast < state.step_size_fast and after.step_size_fast_peak == peak


def test_edge_rule_backtracks_only_on_a_blow_up():
    """A rise larger than h (the smoothed decrease of kept trials) is a blow-up; a smaller one is kept."""
    config = SearchConfig()
    plan = plan_step(SearchState(step_size=1.0, loss_decrease_avg=0.2), config)
    search = EdgeRule(backtrack=0.5)(plan, config, 2.0, 1.0)
    eta = search.step_size
    assert search.observe(2.0 + 0.3) is Verdict.RETRY  # rose by more than h = 0.2
    assert search.step_size == pytest.approx(0.5 * eta)
    assert search.observe(float("nan")) is Verdict.RETRY
    assert search.step_size == pytest.approx(0.25 * eta)
    assert search.observe(2.0 + 0.1) is Verdict.ACCEPT  # beyond the edge, but within h
    state = search.finish()
    assert state.last_trials == 3 and state.num_backtracks == 2
    # before any kept trial (h = 0) every rise is a blow-up: from init_step_size = 1 it comes down
    plan = plan_step(SearchState(step_size=1.0), config)
    search = EdgeRule()(plan, config, 2.0, 1.0)
    assert search.observe(2.0 + 1e-6) is Verdict.RETRY


def test_edge_rule_grows_on_non_positive_curvature_and_holds_on_negative_slope():
    config = SearchConfig()
    plan = plan_step(SearchState(step_size=0.01), config)
    search = EdgeRule(max_change=1.5)(plan, config, 2.0, 1.0)
    eta = search.step_size
    assert search.observe(2.0 - 2 * eta * 1.0)  # decrease beyond linear: kappa_hat < 0
    state = search.finish()
    assert state.step_size * config.growth == pytest.approx(1.5 * eta)
    # along the momentum direction q can be <= 0: the trial is kept and so is the level
    plan = plan_step(state, config)
    search = EdgeRule()(plan, config, 2.0, -0.5)
    eta = search.step_size
    assert search.observe(2.0 + 0.1 * eta * 0.5)
    assert search.finish().step_size * config.growth == pytest.approx(eta)


def test_edge_rule_keeps_its_averages_in_the_state_without_touching_the_input():
    config = SearchConfig()
    before = SearchState(step_size=0.01, rule_state={"slope_avg": 1.0, "curvature_avg": 10.0, "count": 3})
    plan = plan_step(before, config)
    search = EdgeRule(smoothing=0.5)(plan, config, 2.0, 3.0)
    eta = search.step_size
    search.observe(quadratic(2.0, 3.0, 50.0)(eta))
    state = search.finish()
    assert before.rule_state == {"slope_avg": 1.0, "curvature_avg": 10.0, "count": 3}
    assert state.rule_state["slope_avg"] == pytest.approx(0.5 * 1.0 + 0.5 * 3.0)
    assert state.rule_state["curvature_avg"] == pytest.approx(0.5 * 10.0 + 0.5 * 50.0)
    assert state.rule_state["count"] == 4
    assert SearchState.from_dict(state.to_dict()) == state


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"), (dict(smoothing=1.0), "smoothing"), (dict(max_change=1.0), "max_change"),
    (dict(blowup=-1.0), "blowup"), (dict(backtrack=1.0), "backtrack")])
def test_edge_rule_rejects_bad_constants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EdgeRule(**kwargs)


def test_first_step_with_a_schedule_matches_a_hand_computed_adam_move():
    """Step 1 searches: the update is ``scale * eta_try * g / (sqrt(v_hat) + eps)`` (numpy reference)."""
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    target = torch.randn(5, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    schedule = WarmupStableDecay(40, warmup=0.1, decay=0.2)  # step 1: scale 1/4
    opt = FusedSaLSa([w], backend="torch", init_step_size=0.01, search_rule=EdgeRule(), schedule=schedule)
    opt.step(lambda: ((w - target) ** 2).sum())
    g = 2 * (w0.numpy() - target.numpy())
    beta2, k = 0.999, 1  # at step 1, m_hat = g whatever beta1
    v_hat = (1 - beta2) * g * g / (1 - beta2 ** (k + 1))
    eta_try = 0.01 * 1.1
    expected = w0.numpy() - 0.25 * eta_try * g / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-6)  # fp32 moments
    assert opt.last_search_trials == 1  # a small step on a convex quadratic: no blow-up


def test_schedule_freezes_the_search_and_past_the_end_holds_the_last_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    target = torch.randn(8)
    opt = FusedSaLSa([w], backend="torch", search_rule=EdgeRule(),
                     schedule=WarmupStableDecay(20, warmup=0.0, decay=0.5, final=0.0))
    closure = lambda: ((w - target) ** 2).sum()  # noqa: E731
    for _ in range(10):
        opt.step(closure)
        opt.zero_grad()
    searches, level = opt.num_searches, opt.step_size
    for _ in range(10):
        opt.step(closure)
        opt.zero_grad()
    assert opt.num_searches == searches and opt.step_size == level  # frozen during the cooldown
    before = w.detach().clone()
    with pytest.warns(UserWarning, match="past the schedule's total_steps=20"):
        opt.step(closure)  # step 21: past the end, the scale of step 19 (the level still frozen)
    assert not torch.equal(w.detach(), before) and torch.isfinite(w).all()
    assert opt.num_searches == searches and opt.step_size == level


@pytest.mark.parametrize("make_rule, rule_state_ok", [
    (EdgeRule, lambda rule_state: rule_state["count"] >= 10),
    (lambda: NonMonotoneArmijo("max", window=4), lambda rule_state: len(rule_state["recent_losses"]) == 4),
], ids=["edge", "non_monotone"])
def test_search_rule_trains_and_survives_state_dict_round_trip(make_rule, rule_state_ok):
    """A non-default rule trains, keeps its scalars in ``rule_state``, and a checkpoint resumes it
    bitwise (weights and search state in lockstep with the run that never stopped)."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # noqa: E731
    model = make()
    x = torch.randn(64, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    closure = lambda m: (lambda: torch.nn.functional.mse_loss(m(x), y))  # noqa: E731
    opt = FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", search_rule=make_rule())
    first = float(closure(model)().detach())
    for _ in range(30):
        opt.zero_grad()
        opt.step(closure(model))
    assert float(closure(model)().detach()) < 0.5 * first
    assert rule_state_ok(opt.search_state.rule_state)
    clone = make()
    clone.load_state_dict(model.state_dict())
    opt2 = FusedSaLSa(clone.parameters(), backend="torch", search_direction="momentum", search_rule=make_rule())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.search_state == opt.search_state
    for _ in range(12):
        opt.zero_grad()
        opt2.zero_grad()
        opt.step(closure(model))
        opt2.step(closure(clone))
    assert opt2.search_state == opt.search_state
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def drive(rule, state, config, f0, q, trial_losses):
    """One search fed the given trial losses in turn; returns (accepted trial index, state)."""
    search = rule(plan_step(state, config), config, f0, q)
    for index, f1 in enumerate(trial_losses):
        if search.observe(f1):
            return index, search.finish()
    raise AssertionError("no trial accepted")


@pytest.mark.parametrize("reference", ["ema", "max"])
def test_non_monotone_rule_without_history_is_the_armijo_search(reference):
    # with no earlier search the reference is f0 itself: the same decisions and state as ArmijoSearch
    config = SearchConfig(beta3=0.99)
    state = SearchState(step_size=0.01, loss_decrease_avg=0.02, slope_avg=3.0)
    trials = [2.5, 2.2, 1.99, 1.9]
    expected = drive(ArmijoSearch, state, config, 2.0, 4.0, trials)
    got = drive(NonMonotoneArmijo(reference), state, config, 2.0, 4.0, trials)
    assert got[0] == expected[0] == 1  # one backtrack
    got_state = got[1]
    assert got_state.rule_state != {}  # f0 remembered
    got_state.rule_state = {}
    assert got_state == expected[1]


def test_non_monotone_rule_measures_the_decrease_from_the_reference():
    config = SearchConfig(c=0.5, beta3=0.9)
    eta, s_avg, h = 0.1 / 1.1, 1.0, 0.05
    # earlier searches saw f0 = 3.0 then 2.0: EMA (0.5) = (0.5*3 + 2) * 0.5 / (1 - 0.25) = 2.333...
    rule = NonMonotoneArmijo("ema", smoothing=0.5)
    rule_state = {}
    rule.remember(rule_state, 3.0)
    rule.remember(rule_state, 2.0)
    assert rule.reference_loss(rule_state, 1.5) == pytest.approx(7.0 / 3.0)
    assert rule.reference_loss(rule_state, 2.5) == 2.5  # never below f0
    state = SearchState(step_size=eta, loss_decrease_avg=h, slope_avg=s_avg, rule_state=rule_state)
    q = s_avg  # s stays 1
    # trial at eta*1.1 = 0.1, f1 = 1.55 (a rise from f0 = 1.5): sufficient = 0.5*0.1*1 = 0.05
    # Armijo: 0.9*0.05 + 0.1*(1.5 - 1.55) = 0.04 < 0.05 rejects; non-monotone:
    # 0.9*0.05 + 0.1*(7/3 - 1.55) = 0.1233 accepts
    assert drive(ArmijoSearch, state, config, 1.5, q, [1.55, 1.0])[0] == 1
    index, after = drive(rule, state, config, 1.5, q, [1.55, 1.0])
    assert index == 0 and after.step_size == pytest.approx(0.1)
    assert after.loss_decrease_avg == pytest.approx(0.9 * 0.05 + 0.1 * (7.0 / 3.0 - 1.55), rel=1e-6)
    assert after.last_loss_decrease == pytest.approx(-0.05, rel=1e-5)
    assert after.rule_state["count"] == 3 and state.rule_state["count"] == 2  # input untouched
    # h kept the plain smoothed decrease: the reference only in the current term
    plain = NonMonotoneArmijo("ema", smoothing=0.5, reference_in_average=False)
    index, after = drive(plain, state, config, 1.5, q, [1.55, 1.0])
    assert index == 0 and after.loss_decrease_avg == pytest.approx(0.9 * 0.05 + 0.1 * (1.5 - 1.55), rel=1e-6)


def test_non_monotone_max_reference_keeps_the_last_window():
    rule = NonMonotoneArmijo("max", window=3)
    rule_state = {}
    for loss in (5.0, 1.0, 2.0, 1.5, float("nan")):
        rule.remember(rule_state, loss)
    assert rule_state["recent_losses"] == [1.0, 2.0, 1.5]
    assert rule.reference_loss(rule_state, 0.5) == 2.0 and rule.reference_loss(rule_state, 3.0) == 3.0


@pytest.mark.parametrize("kwargs, match", [(dict(reference="min"), "reference"), (dict(smoothing=1.0), "smoothing"),
                                           (dict(window=0), "window"), (dict(window=2.0), "window")])
def test_non_monotone_rule_rejects_bad_constants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonMonotoneArmijo(**kwargs)


def test_log_linear_cooldown_halves_in_equal_steps_and_keeps_the_presets_warm_up():
    from dataclasses import fields

    from benchmarks.quality import optimizers as O
    from benchmarks.quality.zoo import tasks

    linear = WarmupStableDecay(100, warmup=0.2, decay=0.8, peak=2.0)
    log = O.LogLinearCooldown(100, warmup=0.2, decay=0.8, peak=2.0, floor=0.01)
    assert [log.scale(k) for k in range(1, 21)] == [linear.scale(k) for k in range(1, 21)]
    assert log.scale(60) == pytest.approx(2.0 * 0.1) and log.scale(100) == pytest.approx(2.0 * 0.01)
    assert log.scale(40) / log.scale(30) == pytest.approx(log.scale(90) / log.scale(80))
    assert log.scale(250) == log.past_end_scale == pytest.approx(0.02) and not log.searches(21)
    for floor in (0.0, 1.0, 1, "0.1"):
        with pytest.raises(ValueError, match="floor must be a float"):
            O.LogLinearCooldown(100, floor=floor)
    # the registry's name is the preset (pretrain_hold) with only the cooldown changed
    task = tasks.make("mlp_relu_teacher", 0, steps=50)
    built, control = (O.build(name, task, task.model(0), 50) for name in ("pretrain_logcool0.1", "pretrain_hold"))
    assert isinstance(built.schedule, O.LogLinearCooldown) and built.schedule.floor == 0.1
    assert all(getattr(built.schedule, f.name) == getattr(control.schedule, f.name) for f in fields(control.schedule))
    assert built.optimizer.schedule is built.schedule


def test_pretrain_every_is_the_preset_searching_on_every_step_of_its_search_phase():
    """Section 35's candidate: pretrain_hold with max_search_interval=1 and nothing else changed; a
    step of the search phase searches, none after the freeze."""
    from benchmarks.quality import optimizers as O
    from benchmarks.quality.zoo import tasks

    task = tasks.make("mlp_relu_teacher", 0, steps=60)
    built, control = (O.build(name, task, task.model(0), 60) for name in ("pretrain_every", "pretrain_hold"))
    assert built.optimizer.search_config.max_search_interval == 1
    assert control.optimizer.search_config.max_search_interval == 10
    assert built.schedule == control.schedule
    rest = lambda config: {k: v for k, v in vars(config).items() if k != "max_search_interval"}  # noqa: E731
    assert rest(built.optimizer.search_config) == rest(control.optimizer.search_config)
    # 600 steps: early on the adaptive interval searches every step anyway (SPEC: it stays near 1 for
    # about 150 steps), so a shorter run could not tell the two apart
    long_task = tasks.make("mlp_relu_teacher", 0, steps=600)
    searches = {}
    for name in ("pretrain_every", "pretrain_hold"):
        model = long_task.model(0)
        opt = O.build(name, long_task, model, 600).optimizer
        counts = []
        for batch in long_task.batches:
            opt.zero_grad()
            opt.step(lambda: long_task.loss(model, batch))
            counts.append(opt.num_searches)
        searches[name] = counts
    assert searches["pretrain_every"][119] == 120  # the search phase (120 of 600 steps): a search at every step
    assert searches["pretrain_every"][-1] == 120  # frozen after it
    assert searches["pretrain_hold"][119] < 120  # the adaptive interval skips some
    for cap in (2, 3):  # section 36's names: only the cap differs
        capped = O.build(f"pretrain_every{cap}", task, task.model(0), 60)
        assert capped.optimizer.search_config.max_search_interval == cap and capped.schedule == control.schedule
        assert rest(capped.optimizer.search_config) == rest(control.optimizer.search_config)
    beam, beam_control = (O.build(name, task, task.model(0), 60) for name in ("beam_every", "beam_cool_margin_hold"))
    assert beam.family == "beam" and beam.optimizer.search_config.max_search_interval == 1
    assert beam.schedule == beam_control.schedule and rest(beam.optimizer.search_config) == rest(
        beam_control.optimizer.search_config)


def test_ratio_armijo_smooths_the_ratio_and_keeps_it_only_on_acceptance():
    from benchmarks.quality.rules import RatioArmijo
    from salsa_fused.line_search import SearchConfig, SearchState, plan_step
    from salsa_fused.rules import Verdict

    config = SearchConfig(c=0.5, beta3=0.9, growth=1.0)
    state = SearchState(step_size=0.1, rule_state={"ratio_avg": 0.6})
    search = RatioArmijo()(plan_step(state, config), config, 1.0, 2.0)  # f0 = 1, q = 2, eta = 0.1
    # ratio (1 - 0.95) / (0.1 * 2) = 0.25: 0.9 * 0.6 + 0.1 * 0.25 = 0.565 >= 0.5, accepted
    assert search.observe(0.95) is Verdict.ACCEPT
    assert search.finish().rule_state["ratio_avg"] == pytest.approx(0.565)
    search = RatioArmijo()(plan_step(state, config), config, 1.0, 2.0)
    # a rise: ratio -0.5 -> 0.9 * 0.6 - 0.05 = 0.49 < 0.5, backtrack; R unchanged
    assert search.observe(1.1) is Verdict.RETRY
    assert search.state.rule_state["ratio_avg"] == 0.6 and search.step_size == pytest.approx(0.08)
    assert search.observe(float("nan")) is Verdict.RETRY  # a non-finite trial is a failed trial


def test_climbing_armijo_doubles_its_first_trial_while_the_batch_passes_and_resets_on_a_failure():
    from benchmarks.quality.rules import ClimbingArmijo
    from salsa_fused.rules import plan_step as rule_plan_step

    # beta3 = 0: the smoothed test is the batch's, so the trials' fate is the quadratic's alone
    rule, config = ClimbingArmijo(), SearchConfig(c=0.5, beta3=0.0, growth=1.1, adaptive_interval=False)
    state = SearchState(step_size=0.1, slope_avg=1.0)
    f = quadratic(1.0, 1.0, 1.0)  # greedy step 1: both tests pass up to eta = 1
    factors = []
    for _ in range(5):
        plan = rule_plan_step(rule, state, config)
        factors.append(plan.trial_step_size / state.step_size)
        search = rule(plan, config, 1.0, 1.0)
        assert search.observe(f(search.step_size)) is Verdict.ACCEPT
        state = search.finish()
    assert factors == pytest.approx([1.1, 1.21, 1.4641, 2.0, 2.0])  # G <- min(G^2, 2) while both tests pass
    assert state.step_size == pytest.approx(0.1 * 1.1 * 1.21 * 1.4641 * 2 * 2)  # 0.78: still below 1
    # the next climb (1.56) fails the batch's test: one counted forward, then SaLSa's eta * 1.1, G reset
    plan = rule_plan_step(rule, state, config)
    search = rule(plan, config, 1.0, 1.0)
    eta = state.step_size
    assert search.observe(f(2 * eta)) is Verdict.RETRY
    assert search.step_size == pytest.approx(eta * 1.1) and search.state.rule_state["climb"] == 1.1
    assert search.observe(f(search.step_size)) is Verdict.ACCEPT  # the smoothed test alone, as published
    after = search.finish()
    assert after.step_size == pytest.approx(eta * 1.1) and after.num_forward_evals - state.num_forward_evals == 2
    assert after.rule_state["climb"] == 1.1  # a search that needed a second trial does not climb


def test_climbing_armijo_plain_steps_and_frozen_steps_apply_the_published_growth():
    from benchmarks.quality.rules import ClimbingArmijo
    from salsa_fused.rules import plan_step as rule_plan_step, plan_without_search

    rule, config = ClimbingArmijo(), SearchConfig(growth=1.1)
    state = SearchState(step=50, step_size=0.2, steps_since_search=0, step_size_fast=1.0, step_size_slow=1.0,
                        rule_state={"climb": 2.0})
    plain = rule_plan_step(rule, state, config)
    assert not plain.is_search and plain.trial_step_size == pytest.approx(0.22)
    searching = rule_plan_step(rule, replace(state, steps_since_search=20), config)
    assert searching.is_search and searching.trial_step_size == pytest.approx(0.4)
    frozen = plan_without_search(rule, state, config, searching)
    assert not frozen.is_search and frozen.trial_step_size == pytest.approx(0.22)
    with pytest.raises(ValueError, match="climb"):
        rule.check_state({"climb": float("nan")})
    with pytest.raises(ValueError, match="max_climb"):
        ClimbingArmijo(max_climb=0.5)


def test_climbing_armijo_never_climbs_on_a_non_positive_slope_or_a_non_finite_trial():
    from benchmarks.quality.rules import ClimbingArmijo

    rule, config = ClimbingArmijo(), SearchConfig(c=0.5, beta3=0.9, growth=1.1, adaptive_interval=False)
    state = SearchState(step_size=0.1, loss_decrease_avg=0.1, slope_avg=1.0, rule_state={"climb": 1.21})
    search = rule(plan_step(state, config), config, 1.0, -0.5)  # q < 0: the batch's test cannot pass
    assert search.observe(0.9) is Verdict.ACCEPT
    assert search.finish().rule_state["climb"] == 1.1
    from salsa_fused.rules import plan_step as rule_plan_step
    search = rule(rule_plan_step(rule, state, config), config, 1.0, 1.0)
    assert search.observe(float("nan")) is Verdict.RETRY  # the climb's trial failed: SaLSa's first trial next
    assert search.step_size == pytest.approx(0.11) and math.isfinite(search.state.loss_decrease_avg)


def test_climbing_armijo_backtracks_as_published_when_only_the_smoothed_test_fails():
    from benchmarks.quality.rules import ClimbingArmijo
    from salsa_fused.rules import plan_step as rule_plan_step

    rule, config = ClimbingArmijo(), SearchConfig(c=0.5, beta3=0.9, growth=1.1, adaptive_interval=False)
    state = SearchState(step_size=0.1, loss_decrease_avg=0.0, slope_avg=1.0, rule_state={"climb": 2.0})
    search = rule(rule_plan_step(rule, state, config), config, 1.0, 1.0)
    assert search.step_size == pytest.approx(0.2)
    # the batch's test passes (0.15 >= 0.5 * 0.2 * 1), the smoothed one fails (0.1 * 0.15 < 0.1): eta *= 0.8
    assert search.observe(0.85) is Verdict.RETRY
    assert search.step_size == pytest.approx(0.16) and search.state.rule_state["climb"] == 2.0
    search.observe(0.0)  # a large decrease: accepted at 0.16, a second trial, so G resets
    assert search.finish().rule_state["climb"] == 1.1


def test_warmup_from_floor_starts_above_zero_and_matches_the_preset_after_its_warmup():
    """NOTES section 52: the warm-up starts at ``start`` of the peak and reaches it at W; the stable
    phase, the cooldown and past the end are the preset's."""
    from dataclasses import fields

    from benchmarks.quality import optimizers as O
    from benchmarks.quality.zoo import tasks

    linear = WarmupStableDecay(100, warmup=0.2, decay=0.8, peak=2.0)
    floor = O.WarmupFromFloor(100, warmup=0.2, decay=0.8, peak=2.0, start=0.5)
    assert floor.scale(1) == pytest.approx(2.0 * (0.5 + 0.5 / 20)) and floor.scale(10) == pytest.approx(1.5)
    assert floor.scale(20) == linear.scale(20) == 2.0
    assert [floor.scale(k) for k in range(21, 130)] == [linear.scale(k) for k in range(21, 130)]
    assert all(floor.scale(k) < floor.scale(k + 1) for k in range(1, 20))
    for start in (0.0, 1.0, 1, "0.5"):
        with pytest.raises(ValueError, match="start must be a float"):
            O.WarmupFromFloor(100, start=start)
    task = tasks.make("mlp_relu_teacher", 0, steps=50)
    built, control = (O.build(name, task, task.model(0), 50) for name in ("pretrain_wstart0.25", "pretrain_hold"))
    assert isinstance(built.schedule, O.WarmupFromFloor) and built.schedule.start == 0.25
    assert all(getattr(built.schedule, f.name) == getattr(control.schedule, f.name) for f in fields(control.schedule))
    assert built.optimizer.schedule is built.schedule


@pytest.mark.parametrize("curvature, direction", [(3.0, "down"), (0.1, "up")])
def test_hypergradient_multiplier_shrinks_an_overshooting_step_and_grows_a_short_one(curvature, direction):
    """On f = a w^2 / 2 with SGD at rate 1 each step moves w to (1 - a m) w: past the minimum when
    a m > 2 (the next gradient opposes the last move: cos +1, m shrinks by exp(-beta) per step), short of
    it when a m < 1 (cos -1, m grows)."""
    from benchmarks.quality.hypergradient import HypergradientMultiplier

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    hyper = HypergradientMultiplier(opt, beta=0.1)
    multipliers = []
    for _ in range(6):
        opt.zero_grad()
        (0.5 * curvature * w.pow(2).sum()).backward()
        hyper.before_step()
        opt.step()
        hyper.after_step()
        multipliers.append(opt.param_groups[0]["lr"])
    assert multipliers[0] == 1.0  # no update before a first move exists
    ratio = math.exp(-0.1) if direction == "down" else math.exp(0.1)
    assert multipliers[1:] == pytest.approx([ratio ** k for k in range(1, 6)])
    assert hyper.cosines == pytest.approx([1.0 if direction == "down" else -1.0] * 5)


def test_hypergradient_multiplier_waits_for_its_start_step_and_refuses_groups_not_at_lr_one():
    from benchmarks.quality.hypergradient import HypergradientMultiplier

    w = torch.nn.Parameter(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="lr=0.5"):
        HypergradientMultiplier(torch.optim.SGD([w], lr=0.5), beta=0.1)
    opt = torch.optim.SGD([w], lr=1.0)
    hyper = HypergradientMultiplier(opt, beta=0.1, start_step=4)
    for _ in range(5):
        opt.zero_grad()
        (1.5 * w.pow(2).sum()).backward()
        hyper.before_step()
        opt.step()
        hyper.after_step()
    assert len(hyper.cosines) == 2 and hyper.multiplier == pytest.approx(math.exp(-0.2))
