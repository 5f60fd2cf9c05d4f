"""Seed 001's rules on FusedSaLSa (salsa_fused.adam_sls) against the readable references
(tests/reference/sls.py, alsals.py): the same trials and accepted step sizes, step for step,
on the torch backend, the Triton kernels (interpreter on the CPU) and the C++ CPU kernels;
bit-exact resume; DDP."""

import copy
import dataclasses
import inspect
import math
import os
import tempfile

import numpy as np
import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.adam_sls import ADAM_SLS, ALSALS, ALSALSRule, AdamSLSRule
from salsa_fused.rules import SEARCH_ARGUMENTS, resolve_rule
from tests.gloo_group import spawn_in_gloo_group
from tests.models import tanh_mlp
from tests.reference.alsals import ALSALS as ReferenceALSALS
from tests.reference.sls import AdamSLS as ReferenceAdamSLS


STEPS = 12
INIT = 0.2  # a first level a few backtracks above the accepted ones


class Recorder:
    """Wraps a rule: records every trial step size the searches evaluate."""

    def __init__(self, rule):
        self.rule = rule
        self.trials = []  # per step: [step sizes at which a loss was observed]

    def __getattr__(self, name):  # plan, adam_bias_correction, constants
        return getattr(self.rule, name)

    def direction(self, configured):
        return self.rule.direction(configured)

    def __call__(self, plan, config, loss, slope):
        search = self.rule(plan, config, loss, slope)
        seen = []
        self.trials.append(seen)
        observe = search.observe

        def recording(trial_loss):
            seen.append(search.step_size)
            return observe(trial_loss)

        search.observe = recording
        return search


def _model(dtype=torch.float32):
    return tanh_mlp(5, 12, 1, dtype=dtype)


def _batch(step, dtype=torch.float32, rank=0, size=16):
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(size, 5, generator=generator, dtype=torch.float64)
    return x.to(dtype), torch.sin(x.sum(1, keepdim=True) * 2).to(dtype)


def _closure(model, step, dtype=torch.float32):
    x, y = _batch(step, dtype)
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def _reference(name, params, **kwargs):
    if name == "sls":
        return ReferenceAdamSLS(params, init_step_size=INIT, **kwargs)
    return ReferenceALSALS(params, init_step_size=INIT, **kwargs)


def _fused_run(model, rule, backend, steps=range(STEPS), dtype=torch.float32, opt=None):
    recorder = Recorder(rule)
    if opt is None:
        opt = FusedSaLSa(model.parameters(), init_step_size=INIT, backend=backend, search_rule=recorder)
    else:
        opt.search_rule = recorder
    levels = []
    for k in steps:
        opt.zero_grad()
        opt.step(_closure(model, k, dtype))
        levels.append(opt.step_size)
    return opt, recorder.trials, levels


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("name", ["sls", "alsals"])
def test_the_trials_and_accepted_steps_are_the_references(name, backend):
    reference_model, fused_model = _model(), _model()
    reference = _reference(name, list(reference_model.parameters()))
    for k in range(STEPS):
        reference.step(_closure(reference_model, k))
    _, trials, levels = _fused_run(fused_model, resolve_rule(name), backend)
    assert trials == [h["trial_step_sizes"] for h in reference.history]
    assert levels == [h["step_size"] for h in reference.history]
    assert sum(len(t) for t in trials) > STEPS, "no backtrack: the test would not see the decisions"
    for p, q in zip(fused_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sls", "alsals"])
def test_every_step_searches_and_the_counters_say_so(name):
    model = _model()
    opt, trials, _ = _fused_run(model, resolve_rule(name), "torch", steps=range(5))
    state = opt.search_state
    assert state.num_searches == 5 and state.step == 5
    assert state.num_forward_evals == 5 + sum(len(t) for t in trials)
    assert state.num_backtracks == sum(len(t) - 1 for t in trials)
    assert opt.effective_step_sizes == [state.step_size * 2 ** (1 / 500)]  # the next first trial


@pytest.mark.parametrize("name", ["sls", "alsals"])
def test_resume_from_state_dict_is_bit_exact(name):
    model = _model()
    opt, _, _ = _fused_run(model, resolve_rule(name), "torch", steps=range(4))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _, trials_a, _ = _fused_run(model, resolve_rule(name), "torch", steps=range(4, 9), opt=opt)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt_b = FusedSaLSa(resumed.parameters(), backend="torch", search_rule=name)
    opt_b.load_state_dict(saved_opt)
    _, trials_b, _ = _fused_run(resumed, resolve_rule(name), "torch", steps=range(4, 9), opt=opt_b)
    assert trials_a == trials_b
    assert opt.search_state == opt_b.search_state
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_rules_by_name_carry_the_papers_constants_and_refuse_bad_ones():
    assert resolve_rule("sls") is ADAM_SLS and resolve_rule("alsals") is ALSALS
    assert (ADAM_SLS.c, ADAM_SLS.b, ADAM_SLS.backtrack) == (0.1, 500.0, 0.9)
    assert (ALSALS.c, ALSALS.b, ALSALS.backtrack) == (0.6, 500.0, 0.9)
    for bad, match in ((dict(c=1.5), "c must lie"), (dict(b=0.0), "b must be"),
                       (dict(backtrack=1.0), "backtrack must lie"), (dict(max_trials=0), "max_trials")):
        with pytest.raises(ValueError, match=match):
            AdamSLSRule(**bad)
    with pytest.raises(ValueError, match="c must lie"):
        ALSALSRule(c=0.0)
    # not numbers: a bare TypeError from a comparison, or (b=True) taken, where LABPALRule names them
    for rule, bad, match in ((AdamSLSRule, dict(c="0.1"), r"c must lie in \(0, 1\), got '0.1' \(a str, not a number\)"),
                             (ALSALSRule, dict(backtrack="0.9"), r"backtrack must lie in \(0, 1\), got '0.9' \(a str"),
                             (ALSALSRule, dict(c=None), r"c must lie in \(0, 1\), got None \(a NoneType"),
                             (AdamSLSRule, dict(b=True), r"b must be a finite number > 0, got True \(a bool")):
        with pytest.raises(ValueError, match=match):
            rule(**bad)
    assert type(AdamSLSRule(c=np.float32(0.25)).c) is float  # a numpy scalar, kept as the float it is


SEARCH_DEFAULTS = {name: inspect.signature(FusedSaLSa).parameters[name].default for name in SEARCH_ARGUMENTS}


@pytest.mark.parametrize("argument", SEARCH_ARGUMENTS)
@pytest.mark.parametrize("name", ["sls", "alsals"])
def test_a_search_argument_the_rule_ignores_raises_naming_it_and_the_rule(name, argument):
    """Given by name, even at FusedSaLSa's default value, it raises; left out, nothing does."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match=f"search_rule='{name}' does not read {argument} "):
        FusedSaLSa([w], search_rule=name, backend="torch", **{argument: SEARCH_DEFAULTS[argument]})
    rule = resolve_rule(name)
    with pytest.raises(ValueError, match=f"search_rule={type(rule).__name__} does not read {argument} "):
        FusedSaLSa([w], search_rule=rule, backend="torch", **{argument: SEARCH_DEFAULTS[argument]})
    opt = FusedSaLSa([w], search_rule=name, backend="torch", init_step_size=0.5, lr=0.5,
                     betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, restore="inplace", nonfinite="skip")
    assert opt.search_rule is rule and not opt.state[w]["exp_avg"].any()


def test_the_refusal_names_every_ignored_argument_and_where_a_constant_goes():
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"does not read c, beta3, growth \(of FusedSaLSa's search arguments it "
                                         r"reads none\); set c on the rule instead: "
                                         r"search_rule=AdamSLSRule\(c=\.\.\.\)"):
        FusedSaLSa([w], search_rule="sls", growth=2.0, c=0.3, beta3=0.5)
    with pytest.raises(ValueError, match=r"set backtrack, max_trials on the rule instead: "
                                         r"search_rule=ALSALSRule\(backtrack=\.\.\., max_trials=\.\.\.\)"):
        FusedSaLSa([w], search_rule="alsals", backtrack=0.5, max_trials=3)
    opt = FusedSaLSa([w], search_rule=ALSALSRule(backtrack=0.5, max_trials=3), backend="torch")
    assert opt.search_rule.max_trials == 3


def test_the_two_rules_share_one_dataclass_and_keep_their_positional_order():
    assert [f.name for f in dataclasses.fields(AdamSLSRule)] == ["c", "b", "backtrack", "max_trials"]
    assert [f.name for f in dataclasses.fields(ALSALSRule)] == ["c", "b", "backtrack", "max_trials"]
    assert AdamSLSRule(0.2, 100.0, 0.5, 7) == AdamSLSRule(c=0.2, b=100.0, backtrack=0.5, max_trials=7)
    assert AdamSLSRule(c=0.6) != ALSALSRule() and ADAM_SLS.reads == ALSALS.reads == frozenset()
    assert (ADAM_SLS.direction("momentum"), ALSALS.direction("gradient")) == ("gradient", "momentum")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ADAM_SLS.c = 0.2


def test_alsals_searches_when_the_momentum_points_uphill():
    """q = g.d < 0: c_h = 1/c makes the test lenient instead of skipping the search (0.1.0's
    guard would skip it)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = FusedSaLSa([w], search_rule="alsals", init_step_size=0.1, backend="torch")
    state = opt.state[w]
    state["exp_avg"].copy_(torch.tensor([-5.0, 5.0]))  # momentum opposite to the gradient below
    state["exp_avg_sq"].fill_(1.0)
    opt.step(lambda: (w ** 2).sum())
    assert opt.num_searches == 1 and opt.last_search_trials == 1  # accepted at once: f rises, c_h*eta*f_a < 0


# ---------------------------------------------------------------------------- DDP (2 gloo ranks)
WORLD = 2


def _ddp_worker(rank, out_dir):
    results = {}
    for name in ("sls", "alsals"):
        model = torch.nn.parallel.DistributedDataParallel(_model())
        recorder = Recorder(resolve_rule(name))
        opt = FusedSaLSa(model.parameters(), init_step_size=INIT, backend="torch", search_rule=recorder)
        for k in range(6):
            x, y = _batch(k, rank=rank, size=8)  # a different batch on every rank
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        results[name] = dict(trials=recorder.trials, weights=[p.detach().clone() for p in model.parameters()])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_ranks_take_the_same_decisions():
    with tempfile.TemporaryDirectory() as out_dir:
        spawn_in_gloo_group(_ddp_worker, out_dir, WORLD)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    for name in ("sls", "alsals"):
        assert ranks[0][name]["trials"] == ranks[1][name]["trials"]
        assert sum(len(t) for t in ranks[0][name]["trials"]) > 6  # some backtracks happened
        for p, q in zip(ranks[0][name]["weights"], ranks[1][name]["weights"]):
            assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["sls", "alsals"])
def test_a_trial_exactly_at_the_armijo_bound_passes_and_one_ulp_worse_fails(name):
    """Eq. 5 ``f1 <= f0 - c eta q`` and Eq. 9 ``f0 - f1 >= c_h eta f_a`` take the bound itself: at c = 0.5,
    eta = 0.25 and a slope of 2 the bound is f1 = 0.75 from f0 = 1, every number exact in binary."""
    from salsa_fused.adam_sls import _ALSALSSearch, _SLSSearch
    from salsa_fused.line_search import SearchState, StepPlan
    from salsa_fused.rules import Verdict

    rule, search = (AdamSLSRule(c=0.5), _SLSSearch) if name == "sls" else (ALSALSRule(c=0.5), _ALSALSSearch)
    plan = StepPlan(state=SearchState(), is_search=True, trial_step_size=0.25)
    assert search(rule, plan, 1.0, 2.0).observe(0.75) is Verdict.ACCEPT
    assert search(rule, plan, 1.0, 2.0).observe(math.nextafter(0.75, 1.0)) is Verdict.RETRY


@pytest.mark.parametrize("rule", [AdamSLSRule, ALSALSRule])
def test_a_b_whose_growth_float32_cannot_hold_is_refused_when_the_rule_is_built(rule):
    """b > 0 is not enough: each step's first trial is eta * 2^(1/b), an OverflowError at the first step for
    b = 1e-4 (and a float32 refusal at the step for b near 1e-3); refused by name where the rule is built."""
    for b in (1e-4, 1e-3, 1 / 128):
        with pytest.raises(ValueError, match=r"b=.*2\^\(1/b\), which float32 holds only for b > 1/128"):
            rule(c=0.5, b=b)
    assert rule(c=0.5, b=0.01).b == 0.01
