"""Search rules by name and the rule protocol's final move (salsa_fused.rules)."""

from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused import rules
from salsa_fused.line_search import ArmijoSearch
from salsa_fused.rules import FinalMove, Search, SearchRule, Verdict
from tests.scripted import scripted_losses


def test_salsa_is_the_default_rule_and_selected_by_name():
    w = torch.zeros(3, requires_grad=True)
    assert FusedSaLSa([w]).search_rule is ArmijoSearch
    assert FusedSaLSa([w], search_rule="salsa").search_rule is ArmijoSearch
    assert isinstance(ArmijoSearch, SearchRule)
    with pytest.raises(ValueError, match="search_rule must be one of \\[.*'salsa'"):
        FusedSaLSa([w], search_rule="nope")
    with pytest.raises(TypeError, match="direction\\(configured\\)"):
        FusedSaLSa([w], search_rule=lambda plan, config, loss, slope: None)


class MomentumHalf:
    """Searches along the gradient as SaLSa does, then applies half the accepted trial along m_hat
    (a final move that differs from the last trial in size and direction)."""

    @staticmethod
    def direction(configured):
        return "gradient"

    def __call__(self, plan, config, loss, slope):
        return _MomentumHalfSearch(plan, config, loss, slope)


class _MomentumHalfSearch(ArmijoSearch):
    def final(self):
        return FinalMove(0.5 * self.last_trial, direction="momentum")


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_a_registered_rule_whose_final_move_differs_from_the_last_trial(monkeypatch, restore):
    monkeypatch.setitem(rules.RULES, "momentum_half", MomentumHalf())
    torch.manual_seed(0)
    w = torch.randn(6, requires_grad=True)
    a = torch.randn(6)
    w0 = w.detach().double().clone()
    opt = FusedSaLSa([{"params": [w], "lr": 0.5}], search_rule="momentum_half", weight_decay=0.1,
                     restore=restore, backend="torch", init_step_size=1.0)  # given: its level decays
    eta = opt.step_size
    loss = (w * a).sum()
    loss.backward()
    seen = []
    scripted_losses(opt).mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(lambda: seen.append(1) or loss.detach() + (1e3 if len(seen) == 1 else 0.0), loss=loss)
    assert len(seen) == 2 and isinstance(opt.search_rule, SearchRule)
    accepted = eta * 1.1 * 0.8
    state = opt.state[w]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    u = m / (1 - 0.9 ** 2) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8)
    expected = w0 * (1 - 0.1 * 0.5 * eta) - 0.5 * (0.5 * accepted) * u
    torch.testing.assert_close(w.detach().double(), expected, rtol=2e-6, atol=1e-7)
    assert opt.step_size == pytest.approx(accepted)


def test_armijo_search_gives_up_after_max_trials_and_keeps_the_last_trial():
    from salsa_fused.line_search import SearchConfig, SearchState, plan_step
    config = SearchConfig(max_trials=3)
    search = ArmijoSearch(plan_step(SearchState(step_size=1.0), config), config, 2.0, 1.0)
    assert isinstance(search, Search)
    assert [search.observe(9.0) for _ in range(3)] == [Verdict.RETRY, Verdict.RETRY, Verdict.GIVE_UP]
    assert search.final() == FinalMove(1.1 * 0.8 * 0.8)
    assert search.finish().step_size == 1.1 * 0.8 ** 3  # stored one backtrack further, as 0.1.0


class GrowthOnly(MomentumHalf):
    """A rule that declares it reads one of FusedSaLSa's search arguments."""

    reads = frozenset({"growth"})


def test_a_rule_refuses_the_search_arguments_it_does_not_declare(monkeypatch):
    w = torch.zeros(3, requires_grad=True)
    assert ArmijoSearch.reads == frozenset(rules.SEARCH_ARGUMENTS)
    FusedSaLSa([w], backend="torch", c=0.4, beta3=0.5, growth=1.5, backtrack=0.5, max_trials=3,
               max_search_interval=4, always_search_steps=2, adaptive_interval=False,
               search_direction="momentum")
    FusedSaLSa([w], backend="torch", search_rule=MomentumHalf(), c=0.4, beta3=0.5)  # no reads: all of them
    FusedSaLSa([w], backend="torch", search_rule=GrowthOnly(), growth=1.5)
    with pytest.raises(ValueError, match=r"search_rule=GrowthOnly does not read c, adaptive_interval "
                                         r"\(of FusedSaLSa's search arguments it reads growth\)$"):
        FusedSaLSa([w], backend="torch", search_rule=GrowthOnly(), growth=1.5, adaptive_interval=True, c=0.5)
    class ArmijoWithoutBeta3(ArmijoSearch):  # a class as the rule, as ArmijoSearch is
        reads = frozenset(rules.SEARCH_ARGUMENTS) - {"beta3"}

    with pytest.raises(ValueError, match=r"search_rule=ArmijoWithoutBeta3 does not read beta3 "):
        FusedSaLSa([w], backend="torch", search_rule=ArmijoWithoutBeta3, beta3=0.5, c=0.4)
    monkeypatch.setitem(rules.RULES, "growth_only", GrowthOnly())
    with pytest.raises(ValueError, match="search_rule='growth_only' does not read beta3"):
        FusedSaLSa([w], backend="torch", search_rule="growth_only", beta3=0.9)


class RawPlainOnly:
    """A one-batch rule along the raw gradient that never searches: every step is a plain step
    of ``eta`` (the level), which must move along ``g`` and leave Adam's moments alone."""

    reads = frozenset()

    @staticmethod
    def direction(configured):
        return "raw"

    @staticmethod
    def plan(state, config):
        from dataclasses import replace

        from salsa_fused.line_search import StepPlan
        return StepPlan(replace(state, step=state.step + 1), False, state.step_size)

    def __call__(self, plan, config, loss, slope):
        raise AssertionError("this rule never searches")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_one_batch_rule_along_the_raw_gradient_makes_raw_plain_steps(backend):
    from salsa_fused.backends import cpp_backend
    if backend == "cpp" and not cpp_backend.is_available():
        pytest.fail("the C++ extension is not built: pip install --no-build-isolation -e .")
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = FusedSaLSa([w], search_rule=RawPlainOnly(), init_step_size=0.25, backend=backend)
    a = torch.tensor([0.5, 1.0, -2.0])
    opt.step(lambda: (w * a).sum())
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0, 3.0]) - 0.25 * a, rtol=0, atol=0)
    assert not opt.state[w]["exp_avg"].any() and not opt.state[w]["exp_avg_sq"].any()


def test_register_rule_refuses_a_packaged_name_and_replaces_ones_own(monkeypatch):
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    for name in sorted(rules.BUILT_IN):
        with pytest.raises(ValueError, match=f"'{name}' names a packaged search rule"):
            rules.register_rule(name, MomentumHalf())
    assert rules.resolve_rule("salsa") is ArmijoSearch
    first, second = MomentumHalf(), MomentumHalf()
    rules.register_rule("mine", first)
    rules.register_rule("mine", second)  # a notebook cell run again
    assert rules.resolve_rule("mine") is second


def test_a_rule_class_whose_methods_take_an_instance_is_refused_naming_the_call():
    from salsa_fused.adam_sls import AdamSLSRule
    from salsa_fused.labpal import LABPALRule
    w = torch.zeros(3, requires_grad=True)
    for kind in (AdamSLSRule, LABPALRule, MomentumHalf):
        with pytest.raises(TypeError, match=f"search_rule={kind.__name__} is the rule's class.*{kind.__name__}\\(\\)"):
            FusedSaLSa([w], search_rule=kind)
        with pytest.raises(TypeError, match=f"rule 'x'={kind.__name__} is the rule's class"):
            rules.register_rule("x", kind)
    assert FusedSaLSa([w], search_rule=ArmijoSearch).search_rule is ArmijoSearch  # its direction is static
    assert isinstance(FusedSaLSa([w], search_rule=AdamSLSRule()).search_rule, AdamSLSRule)


class Sideways(MomentumHalf):
    def __init__(self, name="sideways"):
        self.name = name

    def direction(self, configured):
        return self.name

    def plan(self, state, config):  # searches on odd steps only: plain steps come at once
        from salsa_fused.line_search import plan_step
        plan = plan_step(state, config)
        return replace(plan, is_search=plan.state.step % 2 == 1)


def test_a_rule_naming_an_unknown_direction_is_refused_before_anything_is_written():
    w = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="Sideways.direction\\('gradient'\\) returned 'sideways'"):
        FusedSaLSa([w], search_rule=Sideways())
    rule = Sideways("gradient")
    opt = FusedSaLSa([w], search_rule=rule, backend="torch")
    rule.name = "sideways"  # a rule whose answer changes after construction: refused at the step
    target = torch.linspace(-3, 3, 4)
    closure = lambda: ((w - target) ** 2).sum()  # noqa: E731
    plain_steps = 0
    for _ in range(4):  # search steps and plain steps
        opt.zero_grad()
        loss = closure()
        loss.backward()
        plain_steps += not rules.plan_step(rule, opt.search_state, opt.search_config).is_search
        before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()},
                  opt.state_dict()["param_groups"][0]["search"])
        with pytest.raises(ValueError, match="returned 'sideways'.*Nothing was written"):
            opt.step(closure, loss=loss.detach())
        assert torch.equal(w, before[0]) and opt.state_dict()["param_groups"][0]["search"] == before[2]
        assert all(torch.equal(v, before[1][k]) for k, v in opt.state[w].items())
        rule.name = "gradient"
        opt.step(closure, loss=loss.detach())
        rule.name = "sideways"
    assert plain_steps > 0 and opt.search_state.num_searches > 0


class _FaultySearch(ArmijoSearch):
    fault = None

    def observe(self, trial_loss):
        verdict = super().observe(trial_loss)
        if self.fault == "observe says False":
            return False  # "not accepted": ended the search at a failed trial, kept
        if self.fault in ("nan retrial", "retrial beyond float32") and self.trials == 1:
            self.step_size = float("nan") if self.fault == "nan retrial" else 1e39
            return Verdict.RETRY
        return verdict

    def final(self):
        if self.fault == "final raises":
            raise RuntimeError("final failed")
        if self.fault in ("nan move", "negative move", "unknown direction", "not a FinalMove"):
            return {"nan move": FinalMove(float("nan")), "negative move": FinalMove(-1.0),
                    "unknown direction": FinalMove(1.0, direction="sideways"),
                    "not a FinalMove": 0.5}[self.fault]
        return super().final()

    def finish(self):
        if self.fault == "finish raises":
            raise RuntimeError("finish failed")
        state = super().finish()
        if self.fault == "zero level":
            state.step_size = 0.0
        return None if self.fault == "no state" else state


class Faulty(MomentumHalf):
    def __init__(self, fault):
        self.fault = fault

    def __call__(self, plan, config, loss, slope):
        if self.fault == "no search":
            return FinalMove(1.0)
        search = _FaultySearch(plan, config, loss, slope)
        search.fault = self.fault
        if self.fault == "nan first trial":
            search.step_size = float("nan")
        return search


@pytest.mark.parametrize("restore", ["copy", "inplace"])
@pytest.mark.parametrize("fault, error, message", [
    ("final raises", RuntimeError, "final failed"),
    ("finish raises", RuntimeError, "finish failed"),
    ("nan move", ValueError, "named a move of step size nan"),
    ("negative move", ValueError, "named a move of step size -1.0"),
    ("unknown direction", ValueError, "named direction 'sideways'"),
    ("not a FinalMove", TypeError, "must return a FinalMove"),
    ("zero level", ValueError, "returned a state no run can reach.*step_size must be a finite number > 0"),
    ("no state", TypeError, "must return a SearchState"),
    # the rest, an audit's: a failed trial kept, trials nobody checked, an AttributeError naming nothing
    ("observe says False", TypeError, r"_FaultySearch.observe\(\) must return a Verdict .*, got False"),
    ("nan first trial", ValueError, "_FaultySearch named its first trial of step size nan"),
    ("nan retrial", ValueError, "_FaultySearch named a retrial of step size nan"),
    ("retrial beyond float32", ValueError, "named a retrial of step size 1e\\+39.*more than float32 holds"),
    ("no search", TypeError, r"search rule Faulty\(plan, config, loss, slope\) must return a search .* got FinalMove"),
])
def test_a_rule_failing_at_its_final_move_or_state_leaves_the_step_unapplied(restore, fault, error, message):
    """The final move and the state after the search are read and checked before the final move is
    written: weights (bitwise with restore='copy'), moments and search state as before the step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    a = torch.randn(6)
    rule = Faulty(None)
    opt = FusedSaLSa([w], search_rule=rule, restore=restore, backend="torch")
    closure = lambda: ((w - a) ** 2).sum()  # noqa: E731
    opt.zero_grad()
    opt.step(closure)
    rule.fault = fault
    opt.zero_grad()
    closure().backward()
    weights, moments = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
    search = opt.state_dict()["param_groups"][0]["search"]
    with pytest.raises(error, match=message):
        opt.step(closure, loss=closure().detach())
    if restore == "copy":
        assert torch.equal(w, weights)
    else:
        torch.testing.assert_close(w.detach(), weights, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, moments[k]) for k, v in opt.state[w].items())
    assert opt.state_dict()["param_groups"][0]["search"] == search
    opt.load_state_dict(opt.state_dict())  # the state is one a checkpoint can hold
    rule.fault = None
    opt.step(closure, loss=closure().detach())  # the step can be retried
    assert opt.search_state.step == search["step"] + 1


class _Planned(MomentumHalf):
    """A rule of its own plan(): SaLSa's plan, then ``fault`` applied to it."""

    def __init__(self, fault):
        self.fault = fault

    def plan(self, state, config):
        from salsa_fused.line_search import plan_step
        plan = plan_step(state, config)
        return {None: plan, "None": None, "not advanced": replace(plan, state=state),
                "is_search 'no'": replace(plan, is_search="no"),
                "nan trial": replace(plan, trial_step_size=float("nan")),
                "negative trial": replace(plan, trial_step_size=-1.0)}[self.fault]


@pytest.mark.parametrize("fault, error, message", [
    ("None", TypeError, r"_Planned.plan\(\) must return a StepPlan, got NoneType"),
    ("not advanced", ValueError, r"must return the state of the step ahead, step 2, got 1"),
    ("is_search 'no'", TypeError, "must say whether the step searches with a bool, got 'no'"),
    ("nan trial", ValueError, "named a first trial of step size nan"),
    ("negative trial", ValueError, r"named a first trial of step size -1.0"),
])
def test_a_rules_plan_is_checked_before_anything_is_written(fault, error, message):
    """A rule's plan() returning None gave an AttributeError naming nothing; a negative first trial stepped uphill;
    a state that did not advance, or an is_search of 'no', was taken (an audit's checks)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    a = torch.randn(6)
    rule = _Planned(None)
    opt = FusedSaLSa([w], search_rule=rule, backend="torch")
    closure = lambda: ((w - a) ** 2).sum()  # noqa: E731
    opt.zero_grad()
    opt.step(closure)
    rule.fault = fault
    weights, search = w.detach().clone(), opt.state_dict()["param_groups"][0]["search"]
    opt.zero_grad()
    with pytest.raises(error, match=message):
        opt.step(closure)
    assert torch.equal(w, weights) and opt.state_dict()["param_groups"][0]["search"] == search


def test_step_called_from_inside_its_own_closure_is_refused_and_the_outer_step_undone():
    """The inner step was applied and counted, and the outer one then said the weights were as they were."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = FusedSaLSa([w], backend="torch")
    inner = lambda: (w ** 2).sum()  # noqa: E731

    def closure():
        if torch.is_grad_enabled():
            opt.step(inner)
        return inner()

    weights = w.detach().clone()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"step\(\) was called again from inside this FusedSaLSa's own step"):
        opt.step(closure)
    assert torch.equal(w, weights) and opt.search_state.step == 0
    opt.zero_grad()
    opt.step(inner)  # the flag went down with the refusal
    assert opt.search_state.step == 1
