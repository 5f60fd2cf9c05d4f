"""The host-side search logic (plan_step, ArmijoSearch) on scalars, against SPEC section 1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from salsa_fused.line_search import ArmijoSearch, SearchConfig, SearchState, plan_step


def _search_step(state, config, accept=True, loss=1.0, grad_norm=1.0):
    """Plan one step; when it searches, accept the first trial (or fail every trial)."""
    plan = plan_step(state, config)
    if not plan.is_search:
        return plan.state, False
    search = ArmijoSearch(plan, config, loss, grad_norm)
    while True:
        if search.observe(loss - 1e6 if accept else loss + 1.0) or search.exhausted:
            break
    return search.finish(), True


def test_interval_with_a_steady_step_size_reaches_2_near_step_150_and_10_near_880():
    """growth = 1: every search accepts eta unchanged, so only the 1e-8 start of the two
    averages moves the interval L = min(10, 1 / (eta_fast/eta_slow - 1 + 1e-8)) (which is 10
    on step 1, both averages being 1e-8, and falls below 1 after the first search)."""
    config = SearchConfig(growth=1.0)
    state = SearchState(step_size=0.01)
    first_at_least_2 = first_10 = None
    searches = []
    for _ in range(1200):
        state, searched = _search_step(state, config)
        searches.append(searched)
        if first_at_least_2 is None and state.step > 20 and state.search_interval >= 2:
            first_at_least_2 = state.step
        if first_10 is None and state.step > 20 and state.search_interval >= 10:
            first_10 = state.step
    assert 140 <= first_at_least_2 <= 160, first_at_least_2
    assert 850 <= first_10 <= 910, first_10
    first_above_1 = next(k for k in range(21, 1200) if searches[k - 1] is False)
    assert 60 <= first_above_1 <= 80  # L <= 1 before: a search every step
    assert all(searches[:first_above_1 - 1])
    tail = searches[-200:]
    assert sum(tail) == 20  # L = 10: one step in ten searches


def test_interval_formula_matches_an_independent_recomputation():
    config = SearchConfig(growth=1.0)
    state = SearchState(step_size=0.5)
    fast = slow = 1e-8
    for _ in range(400):
        ratio = fast / slow
        ratio = 1 / ratio if ratio < 1 else ratio
        expected = min(10.0, 1.0 / (ratio - 1.0 + 1e-8))
        state, searched = _search_step(state, config)
        assert state.search_interval == expected
        if searched:
            slow = slow * 0.99 + 0.5 * (1 - 0.99)
            fast = fast * 0.9 + 0.5 * (1 - 0.9)
        assert (state.step_size_fast, state.step_size_slow) == (fast, slow)


def test_always_search_steps_and_switching_the_interval_off():
    # eta_fast = eta_slow = eta and growth 1: the ratio stays 1, so L = 10 throughout.
    settled = SearchState(step_size=1.0, step_size_fast=1.0, step_size_slow=1.0, steps_since_search=0)
    config = SearchConfig(growth=1.0)
    state, kinds = settled, []
    for _ in range(12):
        state, searched = _search_step(state, config)
        kinds.append(searched)
    assert kinds == [True] * 9 + [False] * 3  # k < 10 after the increment searches
    state, kinds = settled, []
    for _ in range(12):
        state, searched = _search_step(state, SearchConfig(growth=1.0, adaptive_interval=False))
        kinds.append(searched)
    assert all(kinds)
    state, kinds = SearchState(step=20, step_size=1.0, step_size_fast=1.0, step_size_slow=1.0,
                               steps_since_search=0), []
    for _ in range(20):
        state, searched = _search_step(state, config)
        kinds.append(searched)
    assert kinds == ([False] * 9 + [True]) * 2  # t >= L = 10


def test_plan_advances_a_copy():
    state = SearchState(step=3, steps_since_search=2, step_size=0.25)
    plan = plan_step(state, SearchConfig())
    assert (state.step, state.steps_since_search) == (3, 2)
    assert (plan.state.step, plan.state.steps_since_search) == (4, 3)
    assert plan.trial_step_size == 0.25 * 1.1


def _plan(**state):
    return plan_step(SearchState(**state), SearchConfig())


def test_backtrack_count_semantics():
    """Trials are 1-based; backtracks add the 0-based index of the last trial (0.1.0's n_backtr)."""
    plan = _plan(step_size=1.0, num_backtracks=5, num_forward_evals=10)
    search = ArmijoSearch(plan, SearchConfig(), 2.0, 1.0)
    assert search.active and search.step_size == pytest.approx(1.1)
    assert not search.observe(2.5)
    assert not search.observe(2.0 - 1e-3)  # a small decrease is not sufficient
    assert search.observe(0.5)
    state = search.finish()
    assert state.last_trials == 3 and state.num_backtracks == 5 + 2 and state.num_forward_evals == 10 + 3
    assert state.step_size == 1.1 * 0.8 * 0.8
    assert state.num_searches == 1 and state.steps_since_search == 0


def test_first_trial_accepted_adds_no_backtrack():
    search = ArmijoSearch(_plan(step_size=0.1), SearchConfig(), 2.0, 1.0)
    assert search.observe(0.0)
    state = search.finish()
    assert state.num_backtracks == 0 and state.last_trials == 1 and state.step_size == 0.1 * 1.1


def test_exhaustion_after_100_trials():
    eta = 0.3
    search = ArmijoSearch(_plan(step_size=eta), SearchConfig(), 1.0, 1.0)
    trials = 0
    while True:
        trials += 1
        if search.observe(5.0) or search.exhausted:
            break
    state = search.finish()
    expected = eta * 1.1
    for _ in range(100):
        expected *= 0.8
    assert trials == 100 and state.last_trials == 100 and state.num_backtracks == 99
    assert state.step_size == expected
    assert state.step_size == pytest.approx(eta * 1.1 * 0.8 ** 100, rel=1e-12)
    assert state.loss_decrease_avg == 0.0  # h is only updated on acceptance


def test_armijo_smoothing_in_fp32():
    """s = beta3*s + (1-beta3)*q and the test h_try >= c*eta*s, in fp32 as 0.1.0 makes it."""
    f32 = np.float32
    plan = _plan(step_size=0.5, slope_avg=2.0, loss_decrease_avg=0.25)
    search = ArmijoSearch(plan, SearchConfig(), 3.0, 4.0)
    s = f32(2.0) * f32(0.9) + f32(4.0) * f32(1 - 0.9)
    assert search.state.slope_avg == float(s)
    eta = 0.5 * 1.1
    # the decrease that just passes: h_try = 0.9*0.25 + 0.1*(3 - f1) >= c*eta*s
    needed = float((f32(0.5 * eta) * s - f32(0.25) * f32(0.9)) / f32(0.1))
    assert not search.observe(3.0 - needed * 0.999)
    eta *= 0.8
    needed = float((f32(0.5 * eta) * s - f32(0.25) * f32(0.9)) / f32(0.1))
    assert search.observe(3.0 - needed * 1.001)
    h = f32(0.25) * f32(0.9) + (f32(3.0) - f32(3.0 - needed * 1.001)) * f32(1 - 0.9)
    assert search.finish().loss_decrease_avg == float(h)


def test_the_host_float32_arithmetic_is_numpys_bit_for_bit_without_numpy():
    """``line_search._f32`` (no numpy at run time) against numpy.float32 on every operation the
    search uses, over random magnitudes, signed zeros, subnormals, overflow and NaN."""
    from salsa_fused.line_search import FLOAT32_MAX, _f32

    rng = np.random.default_rng(0)
    values = [float(v) for v in rng.standard_normal(400) * 10.0 ** rng.integers(-44, 39, 400)]
    values += [0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1e39, float("nan"), 1.0, 1 - 0.9]
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: b - a]
    with np.errstate(all="ignore"):
        for a, b in zip(values, values[::-1]):
            assert np.float32(a).tobytes() == np.float32(float(_f32(a))).tobytes()
            for op in ops:
                expected = op(np.float32(a), np.float32(b))
                got = op(_f32(a), _f32(b))
                assert type(got) is _f32
                same = np.isnan(expected) and math.isnan(got) or expected.tobytes() == np.float32(got).tobytes()
                assert same, (a, b, float(expected), float(got))  # bytes: the sign of a zero counts
                mixed = op(_f32(a), b)  # a Python float operand is rounded to float32 first, as _f32(b)
                assert math.isnan(mixed) and math.isnan(got) or np.float32(mixed).tobytes() == np.float32(got).tobytes()
    assert FLOAT32_MAX == float(np.finfo(np.float32).max)


def test_equal_losses_accept_with_h_unchanged():
    search = ArmijoSearch(_plan(step_size=1.0, loss_decrease_avg=0.125), SearchConfig(), 2.0, 1.0)
    assert search.observe(2.0)
    state = search.finish()
    assert state.loss_decrease_avg == 0.125 and state.last_trials == 1


@pytest.mark.parametrize("loss, grad_norm, prior_s, active", [
    (0.0, 1.0, 0.0, False),  # zero loss: 0.1.0's guard
    (-0.5, 1.0, 0.0, True),  # a negative loss still searches (0.1.0 compares f0 != 0)
    (1.0, 1e-8, 0.0, False),  # s = 1e-9 < 1e-8
    (1.0, 1e-7, 0.0, True),  # s = 1e-8 (fp32) passes
    (1.0, 0.0, 1.0, True),  # the smoothed s carries earlier norms
])
def test_guard(loss, grad_norm, prior_s, active):
    search = ArmijoSearch(_plan(slope_avg=prior_s), SearchConfig(), loss, grad_norm)
    assert search.active is active


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_trial_loss_is_a_failed_trial(bad):
    search = ArmijoSearch(_plan(step_size=1.0, loss_decrease_avg=0.5), SearchConfig(), 2.0, 1.0)
    assert not search.observe(bad)
    assert search.step_size == 1.1 * 0.8
    assert search.observe(0.0)
    state = search.finish()
    assert all(math.isfinite(v) for v in (state.loss_decrease_avg, state.last_loss_decrease, state.step_size))
    assert state.num_backtracks == 1


def test_state_dict_round_trip_and_unknown_keys():
    state = SearchState(step=7, step_size=0.125, num_searches=3)
    assert SearchState.from_dict(state.to_dict()) == state
    with pytest.raises(ValueError, match="unknown search state keys"):
        SearchState.from_dict({**state.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="step_size"):
        SearchState(step_size=0.0).validate()
    with pytest.raises(ValueError, match="step must be an integer"):
        SearchState(step=-1).validate()


@pytest.mark.parametrize("kwargs, message", [
    (dict(c=0.0), "c must lie"), (dict(c=1.0), "c must lie"), (dict(beta3=1.0), "beta3"),
    (dict(growth=0.9), "growth"), (dict(backtrack=0.0), "backtrack"), (dict(max_trials=0), "max_trials"),
    (dict(max_trials=2.5), "max_trials"), (dict(max_search_interval=0), "max_search_interval"),
    (dict(always_search_steps=-1), "always_search_steps")])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs).validate()


@pytest.mark.parametrize("name, value", [("loss_decrease_avg", 1e300), ("slope_avg", -1e39)])
def test_a_checkpoint_whose_h_or_s_float32_cannot_hold_is_refused_at_load(name, value):
    """h and s are kept in float32: a checkpoint holding one beyond its range loaded, and then every step
    raised "ArmijoSearch.finish() returned a state no run can reach", blaming the search, not the checkpoint."""
    import torch

    from salsa_fused import FusedSaLSa
    from tests.refusals import assert_load_refused

    weight = torch.nn.Parameter(torch.ones(3))
    opt = FusedSaLSa([weight], backend="torch")
    opt.step(lambda: (weight * weight).sum())
    saved = opt.state_dict()
    saved["param_groups"][0]["search"][name] = value
    assert_load_refused(opt, saved, f"search state {name} must be a finite number that float32 holds")


def test_a_trial_exactly_at_the_smoothed_armijo_bound_passes_and_one_float32_ulp_worse_fails():
    """``beta3 h + (1 - beta3)(f0 - f1) >= c eta s`` takes the bound itself (0.1.0's ``>=``): with beta3 = 0,
    c = 0.5, eta = 0.25 and s = 2 the bound is a decrease of 0.25 from f0 = 1, exact in float32."""
    from salsa_fused.line_search import StepPlan
    from salsa_fused.rules import Verdict

    plan = StepPlan(state=SearchState(), is_search=True, trial_step_size=0.25)
    config = SearchConfig(c=0.5, beta3=0.0)
    assert ArmijoSearch(plan, config, 1.0, 2.0).observe(0.75) is Verdict.ACCEPT
    worse = float(np.nextafter(np.float32(0.75), np.float32(1.0)))
    assert ArmijoSearch(plan, config, 1.0, 2.0).observe(worse) is Verdict.RETRY
