"""Bad input: each gets a clear error (matched by message) and leaves weights and state as they were.

"Unchanged" is :func:`tests.refusals.assert_unchanged`'s: bitwise, every weight, both moments of every
parameter, the search dict (k, eta, h, s, eta_fast, eta_slow, t and the counters) and the param groups.
Non-finite values: nothing non-finite is ever written into weights or state.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings
from copy import deepcopy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from salsa_fused import LABPAL, FusedSaLSa, NonFiniteError, presets
from salsa_fused.line_search import plan_step
from tests.models import StaticLoss
from tests.refusals import assert_load_refused, assert_unchanged, give_gradient_of_another_dtype, snapshot


# ---------------------------------------------------------------------------- helpers
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


_X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
_Y = _X[:, :1].cos()


def _closure(model):
    return lambda: F.mse_loss(model(_X), _Y)


def _all_finite(opt) -> bool:
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for p in tensors for v in opt.state[p].values()]
    scalars = [v for v in opt.state_dict()["param_groups"][0]["search"].values() if isinstance(v, float)]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and all(math.isfinite(s) for s in scalars)


def _trained(steps=3, **kwargs):
    model = _model()
    opt = FusedSaLSa(model.parameters(), **{"backend": "torch", **kwargs})
    for _ in range(steps):
        opt.zero_grad()
        opt.step(_closure(model))
    return model, opt


def _until_plain_step_next(model, opt, limit=400):
    """Train until the next step is a plain step (the adaptive interval has passed 1)."""
    for _ in range(limit):
        if not plan_step(opt.search_state, opt.search_config).is_search:
            return
        opt.zero_grad()
        opt.step(_closure(model))
    raise AssertionError("no plain step came up")


def _until_search_next(model, opt, limit=20):
    for _ in range(limit):
        if plan_step(opt.search_state, opt.search_config).is_search:
            return
        opt.zero_grad()
        opt.step(_closure(model))
    raise AssertionError("no search step came up")


# ---------------------------------------------------------------------------- closures
def test_missing_closure():
    model, opt = _trained()
    opt.zero_grad()
    F.mse_loss(model(_X), _Y).backward()
    before = snapshot(opt)
    with pytest.raises(TypeError, match="needs closure"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("closure", [5, "loss", torch.tensor(1.0)])
def test_non_callable_closure(closure):
    model, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(closure)
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("value, error, message", [
    (lambda m: F.mse_loss(m(_X), _Y, reduction="none"), ValueError, "loss of one element"),
    (lambda m: "0.5", TypeError, "scalar tensor"),
    (lambda m: None, TypeError, "scalar tensor"),
    (lambda m: 0.5, TypeError, "scalar tensor"),  # a float has no grad path for the backward
    (lambda m: torch.tensor(0.5), RuntimeError, "no grad path"),
    (lambda m: (m(_X) > 0).sum(), TypeError, "floating-point loss"),
    (lambda m: F.mse_loss(m(_X), _Y).detach(), RuntimeError, "no grad path"),
], ids=["non-scalar", "string", "none", "float", "constant", "integer", "detached"])
@pytest.mark.parametrize("search_next", [True, False], ids=["search-step", "plain-step"])
def test_closure_returning_a_bad_value(value, error, message, search_next):
    model, opt = _trained()
    if not search_next:
        _until_plain_step_next(model, opt)
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(error, match=message):
        opt.step(lambda: value(model))
    assert_unchanged(before, snapshot(opt))


def test_a_step_under_inference_mode_names_inference_mode():
    """step() enables grad under no_grad, but nothing can under inference_mode: the error says which."""
    model, opt = _trained()
    before = snapshot(opt)
    opt.zero_grad()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="computed under torch.inference_mode()"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))


def test_a_slope_that_overflows_at_a_huge_lr_names_search_lr():
    model = _model()
    opt = FusedSaLSa(model.parameters(), lr=3e38, backend="torch")
    before = snapshot(opt)
    with pytest.raises(NonFiniteError, match=r"slope q\) inf .*search_lr \(its lr at construction\) is 3e\+38"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))


def test_loss_not_depending_on_the_parameters():
    model, opt = _trained()
    other = torch.nn.Parameter(torch.ones(3))
    before = snapshot(opt)
    opt.zero_grad(set_to_none=True)
    loss = opt.step(lambda: (other * 2).sum())  # as torch.optim: a no-op (issue 16 item 9)
    assert float(loss) == 6.0
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("restore", ["copy", "inplace"])
@pytest.mark.parametrize("bad", [
    (lambda m: F.mse_loss(m(_X), _Y, reduction="none"), ValueError, "loss of one element"),
    (lambda m: "nope", TypeError, "scalar tensor"),
    (lambda m: torch.zeros(2, 2), ValueError, "loss of one element"),
], ids=["non-scalar", "string", "matrix"])
def test_closure_returning_a_bad_value_during_the_trials_two_phase(restore, bad):
    """Two-phase form: the caller's loss is fine, the closure's trial value is not. The weights
    are put back (exactly with restore='copy', to rounding with 'inplace'); the search state
    is unchanged."""
    model, opt = _trained(restore=restore)
    _until_search_next(model, opt)
    before = snapshot(opt)
    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    loss.backward()
    value, error, message = bad
    with pytest.raises(error, match=message):
        opt.step(lambda: value(model), loss=loss)
    after = snapshot(opt)
    assert after["search"] == before["search"]
    for a, b in zip(before["weights"], after["weights"]):
        if restore == "copy":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("restore", ["copy", "inplace"])
@pytest.mark.parametrize("fail_at_trial", [1, 3])
def test_exception_in_a_trial_forward_restores_the_weights(restore, fail_at_trial):
    """The closure raises in the middle of a search: the exception propagates, the weights
    are as before the step (bitwise with 'copy'; to one rounding per trial with 'inplace'),
    the search state is unchanged and the CPU generator is back where the step began (the step's
    own forward is undone too, so a retry draws the same)."""
    model, opt = _trained(restore=restore, init_step_size=1e3)  # a huge eta: several backtracks
    _until_search_next(model, opt)
    before = snapshot(opt)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        torch.rand(3)  # one draw per forward
        if len(calls) == 1 + fail_at_trial:
            raise _Boom("trial forward failed")
        return F.mse_loss(model(_X), _Y)

    torch.manual_seed(5)
    expected_rng = torch.get_rng_state()
    opt.zero_grad()
    with pytest.raises(_Boom):
        opt.step(closure)
    assert len(calls) == 1 + fail_at_trial and calls[0] and not any(calls[1:])
    assert torch.equal(torch.get_rng_state(), expected_rng)
    after = snapshot(opt)
    assert after["search"] == before["search"]
    for i, (a, b) in enumerate(zip(before["weights"], after["weights"])):
        if restore == "copy":
            assert torch.equal(a, b), f"weight {i} not restored exactly"
        else:  # in place: w0 - eta*d + eta*d, one rounding of |eta*d| per trial
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # The step can be retried: the optimizer works normally afterwards.
    opt.zero_grad()
    opt.step(_closure(model))
    assert opt.search_state.step == before["search"]["step"] + 1


class _DropoutBatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


def _twin_runs(search_rule=None):
    """Two identical models and optimizers (model= given: BatchNorm's buffers are restored)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = _DropoutBatchNormNet()
        kwargs = {} if search_rule is None else {"search_rule": search_rule}
        runs.append((net, FusedSaLSa(net.parameters(), backend="torch", model=net, **kwargs)))
    return runs


def _state_of(net, opt):
    return ([t.detach().clone() for t in net.state_dict().values()],
            deepcopy(opt.state_dict()["param_groups"][0]["search"]), torch.get_rng_state())


@pytest.mark.parametrize("zero_grad_first", [True, False], ids=["zero_grad-retry", "plain-retry"])
@pytest.mark.parametrize("search_rule", [None, "labpal"])
def test_a_step_retried_after_a_trial_forward_raised_is_exact(search_rule, zero_grad_first):
    """One-phase, with dropout and BatchNorm: a trial forward raises, the step is retried (with or
    without a zero_grad() first: the failed step takes its own backward's gradients back), and
    everything (weights, running statistics, search state, generator) ends bitwise where a twin
    run that never failed ends; the failed attempt leaves the generator and buffers as before it."""
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)
    (net, opt), (twin, twin_opt) = _twin_runs(search_rule)

    def closure_of(model, fail_at=None):
        calls = []

        def closure(*index):
            calls.append(1)
            if len(calls) == fail_at:
                raise _Boom("trial forward failed")
            rows = slice(None) if not index else slice(8 * (index[0] % 2), 8 * (index[0] % 2) + 8)
            return F.mse_loss(model(x[rows]), y[rows])
        return closure

    torch.manual_seed(3)
    failed = False
    for step in range(4):
        rng = torch.get_rng_state()
        batches = opt.next_batches()
        fail_at = None  # the first forward of the search's trials (LABPAL: of its point at w0)
        if not failed and (step >= 1 if batches is None else batches.points > batches.gradient):  # LABPAL: its first fit
            fail_at, failed = 2 if batches is None else batches.gradient + 1, True
        for model, optimizer, fail_at in ((net, opt, fail_at), (twin, twin_opt, None)):
            torch.set_rng_state(rng)
            if fail_at is not None:
                before = _state_of(model, optimizer)
                optimizer.zero_grad()
                with pytest.raises(_Boom):
                    optimizer.step(closure_of(model, fail_at))
                after = _state_of(model, optimizer)
                assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights or buffers moved"
                assert after[1] == before[1] and torch.equal(after[2], before[2])
                assert all(p.grad is None for p in model.parameters())
            torch.set_rng_state(rng)
            if zero_grad_first or fail_at is None:
                optimizer.zero_grad()
            optimizer.step(closure_of(model))
        mine, theirs = _state_of(net, opt), _state_of(twin, twin_opt)
        assert all(torch.equal(a, b) for a, b in zip(mine[0], theirs[0]))
        assert mine[1] == theirs[1] and torch.equal(mine[2], theirs[2])
    assert failed


def test_a_failed_step_leaves_gradients_zeroed_as_tensors_zeroed_in_place():
    """zero_grad(set_to_none=False) kept the gradients as zero tensors: the failed step's backward
    wrote into them, and they are zeros again, the same tensors; the retry runs."""
    model, opt = _trained()
    _until_search_next(model, opt)
    opt.zero_grad(set_to_none=False)
    kept = [p.grad for p in model.parameters()]
    before = snapshot(opt)
    calls = []

    def failing_at_the_first_trial():
        calls.append(1)
        if len(calls) == 2:
            raise _Boom("trial forward failed")
        return F.mse_loss(model(_X), _Y)

    with pytest.raises(_Boom):
        opt.step(failing_at_the_first_trial)
    assert_unchanged(before, snapshot(opt))
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), kept))
    opt.step(_closure(model))
    assert opt.search_state.step == before["search"]["step"] + 1


# ---------------------------------------------------------------------------- gradients
def test_sparse_gradients():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = FusedSaLSa(embedding.parameters(), backend="torch")
    before = snapshot(opt)
    named = r"sparse gradients \(a parameter of shape \(10, 3\) has a torch.sparse_coo gradient\): build nn.Embedding"
    with pytest.raises(RuntimeError, match=named):
        opt.step(lambda: embedding(torch.tensor([1, 2])).pow(2).sum())
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_sparse_gradients_zeroed_through_the_model_are_named_as_sparse(backend):
    """model.zero_grad(set_to_none=False) keeps a sparse gradient as a zeroed sparse tensor: the one-phase
    step refused it as gradients of an earlier backward ("call zero_grad()"), which the caller had called."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1))
    opt = FusedSaLSa(model.parameters(), backend=backend)
    tokens = torch.tensor([1, 2])
    model(tokens).sum().backward()
    model.zero_grad(set_to_none=False)
    assert model[0].weight.grad.layout == torch.sparse_coo
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(a parameter of shape \(10, 3\)"):
        opt.step(lambda: model(tokens).pow(2).sum())
    assert_unchanged(before, snapshot(opt))


def test_complex_parameters_are_rejected_at_construction_and_in_add_param_group():
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters"):
        FusedSaLSa([z])
    model, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [z]})
    assert_unchanged(before, snapshot(opt))
    assert z not in opt.state


def test_the_remedy_the_complex_parameter_error_names_trains():
    """The error said "view them as real with torch.view_as_real": FusedSaLSa([torch.view_as_real(z)])
    then failed with "can't optimize a non-leaf Tensor". It names a real parameter of its own now."""
    z = torch.nn.Parameter(torch.tensor([0.5 + 0.5j, -1.0 + 0.0j, 0.0 + 2.0j]))
    with pytest.raises(ValueError, match="complex parameters") as error:
        FusedSaLSa([z])
    assert "torch.nn.Parameter(torch.view_as_real(z.detach()).clone())" in str(error.value)
    assert "torch.view_as_complex(p)" in str(error.value)
    p = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())  # as the message writes it
    opt = FusedSaLSa([p], backend="torch")
    target = torch.tensor([1.0 + 2.0j, -1.0j, 0.5 + 0.0j])
    start = (torch.view_as_complex(p.detach()) - target).abs().max()
    for _ in range(40):
        opt.zero_grad()
        opt.step(lambda: (torch.view_as_complex(p) - target).abs().pow(2).sum())
    assert (torch.view_as_complex(p.detach()) - target).abs().max() < 0.1 * start


def test_complex_gradient_cannot_reach_a_real_parameter():
    """torch itself refuses a complex grad on a real parameter, so complex gradients only come
    with complex parameters, which the constructor rejects (above)."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError):
        p.grad = torch.zeros(3, dtype=torch.complex64)


def test_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="floating-point parameters"):
        FusedSaLSa([torch.zeros(3, dtype=torch.int64)])


def test_params_on_mixed_devices():
    cpu = torch.nn.Parameter(torch.zeros(3))
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device.*cpu, meta"):
        FusedSaLSa([cpu, meta])
    with pytest.raises(ValueError, match="one device"):
        FusedSaLSa([{"params": [cpu]}, {"params": [meta]}])
    model, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [meta]})
    assert_unchanged(before, snapshot(opt))


def test_gradient_of_another_dtype():
    """torch refuses a grad of another shape on assignment, and another dtype unless the
    parameter's ``grad_dtype`` allows it; then we refuse it."""
    model, opt = _trained()
    before = snapshot(opt)
    weight = model[0].weight
    give_gradient_of_another_dtype(weight, torch.zeros_like(weight, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype of their parameters"):
        opt.step(_closure(model), loss=torch.tensor(1.0))
    assert_unchanged(before, snapshot(opt))


def test_a_bad_gradient_creates_no_state_for_other_parameters():
    """The gradients are all checked before any state is created: a parameter that had no
    state (frozen at construction, then unfrozen) gets none when another gradient is bad."""
    late = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    other = torch.nn.Parameter(torch.ones(2))
    opt = FusedSaLSa([late, other], backend="torch")
    assert late not in opt.state
    late.requires_grad_(True)
    late.grad = torch.ones(3)
    give_gradient_of_another_dtype(other, torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="gradient of dtype torch.float64"):
        opt.step(lambda: (late * other.detach().sum()).sum(), loss=torch.tensor(1.0))
    assert len(opt.state.get(late, {})) == 0
    assert torch.equal(late, torch.ones(3)) and torch.equal(other, torch.ones(2))


# ---------------------------------------------------------------------------- hyperparameters
_BAD_CONSTRUCTION = [
    (dict(c=0.0), "c must lie in"), (dict(c=1.0), "c must lie in"), (dict(c=-0.5), "c must lie in"),
    (dict(c=float("nan")), "c must lie in"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\] must lie in"), (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must lie in"), (dict(betas=(0.9, float("nan"))), r"betas\[1\]"),
    (dict(betas=(0.9,)), "betas must be a pair"), (dict(beta3=1.0), "beta3 must lie in"),
    (dict(eps=0.0), "eps must be"), (dict(eps=-1e-8), "eps must be"), (dict(eps=float("inf")), "eps must be"),
    (dict(init_step_size=0.0), "init_step_size must be"), (dict(init_step_size=-1.0), "init_step_size"),
    (dict(init_step_size=float("nan")), "init_step_size"), (dict(init_step_size=float("inf")), "init_step_size"),
    (dict(weight_decay=-0.1), "weight_decay must be"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(lr=-1.0), "lr must be"), (dict(lr=float("nan")), "lr must be"), (dict(lr="fast"), "lr must be a number"),
    (dict(lr=torch.tensor(1.0)), "tensor lr is not supported"), (dict(eps=None), "eps must be a number"),
    (dict(growth=0.5), "growth must be"), (dict(backtrack=1.0), "backtrack must lie in"),
    (dict(max_trials=0), "max_trials must be"), (dict(max_search_interval=0), "max_search_interval"),
    (dict(restore="swap"), "restore must be one of"), (dict(backend="cudnn"), "backend must be one of"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"), (dict(search_direction="adam"), "search_direction"),
    (dict(max_trials=True), "max_trials must be an integer"),  # bools are ints to isinstance: refused by name
    (dict(max_search_interval=True), "max_search_interval must be an integer"),
    (dict(always_search_steps=False), "always_search_steps must be an integer"),
    (dict(init_step_size=True), "init_step_size must be"), (dict(init_step_size="1"), "init_step_size must be"),
    (dict(adaptive_interval="no"), "adaptive_interval must be True or False"),
    (dict(c="0.5"), "c must be a number"), (dict(growth=True), "growth must be a number"),
    # beyond float32, where the moments and the kernels' step sizes live: 1e-50 is 0 there, 1e45 inf
    (dict(eps=1e-50), "eps must be a finite number > 0 that float32 holds"), (dict(eps=1e39), "float32 holds"),
    (dict(lr=1e45), "lr must be a finite number >= 0 that float32 holds"),
    (dict(init_step_size=1e300), "init_step_size must be a finite number > 0 that float32 holds"),
]


@pytest.mark.parametrize("kwargs, message", _BAD_CONSTRUCTION, ids=[str(k) for k, _ in _BAD_CONSTRUCTION])
def test_out_of_range_hyperparameters_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FusedSaLSa(_model().parameters(), **kwargs)


_BAD_GROUP = [
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=(1.5, 0.9)), r"betas\[0\]"), (dict(eps=0.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(lr=-0.1), "lr must be"), (dict(lr=float("inf")), "lr must be"),
    (dict(maximize=True), "does not support maximize=True"), (dict(capturable=True), "capturable=True"),
    (dict(differentiable=True), "differentiable=True"), (dict(search_lr=1e40), "search_lr must be"),
]


@pytest.mark.parametrize("form", ["one-phase", "two-phase"])
@pytest.mark.parametrize("rule", ["salsa", "sls", "alsals"])
def test_a_closure_that_wants_a_batch_index_is_named_under_a_one_batch_rule(rule, form):
    """A user back from search_rule='labpal' keeps closure(i): the error was Python's "missing 1 required
    positional argument: 'i'"; it names the contract now, nothing written. A TypeError the closure's own body
    raises is its own."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), search_rule=rule, backend="torch")
    x, y = _X, _Y
    kwargs = {}
    if form == "two-phase":
        loss = F.mse_loss(model(x), y)
        loss.backward()
        kwargs["loss"] = loss
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"reads one batch per step, so its closure takes no argument: closure\(\) "
                                        r"runs the forward .* the closure given wants a batch index"):
        opt.step(lambda i: F.mse_loss(model(x), y), **kwargs)
    assert_unchanged(before, snapshot(opt))
    opt.zero_grad()

    def own_error():
        raise TypeError("the closure's own")

    with pytest.raises(TypeError, match="^the closure's own$"):
        opt.step(own_error)


@pytest.mark.parametrize("group, error, message", [
    (lambda extra: [extra], TypeError, r"param_group must be a dict, as torch.optim takes it .*got list"),
    (lambda extra: ({"params": [extra]},), TypeError, "got tuple"),
    (lambda extra: {"param": [extra]}, ValueError, r"param_group has no 'params' \(its keys: \['param'\]\)"),
])
def test_add_param_group_of_something_other_than_a_dict_with_params_is_named(group, error, message):
    """AdamW's habit: opt.add_param_group([extra]) said "list indices must be integers or slices, not str",
    torch's own check never reached; a dict without "params" said KeyError: 'params'."""
    model, opt = _trained()
    extra = torch.nn.Parameter(torch.ones(3))
    before = snapshot(opt)
    with pytest.raises(error, match=message):
        opt.add_param_group(group(extra))
    assert_unchanged(before, snapshot(opt))
    assert len(opt.param_groups) == 1 and extra not in opt.state


@pytest.mark.parametrize("group, message", _BAD_GROUP, ids=[str(k) for k, _ in _BAD_GROUP])
def test_out_of_range_hyperparameters_in_add_param_group(group, message):
    model, opt = _trained()
    extra = torch.nn.Parameter(torch.ones(3))
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [extra], **group})
    assert_unchanged(before, snapshot(opt))
    assert extra not in opt.state


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_closure_that_zeroes_the_gradients_in_place_is_refused(backend):
    """``model.zero_grad(set_to_none=False)`` inside the closure (a torch-style leftover without the
    backward): each trial read zeroed gradients and moved nowhere, the search accepted a no-move
    and training stalled silently. It is refused at the first trial, with nothing changed."""
    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built: pip install --no-build-isolation -e .")
    model, opt = _trained(backend=backend)
    _until_search_next(model, opt)
    before = snapshot(opt)

    def closure():
        model.zero_grad(set_to_none=False)
        return F.mse_loss(model(_X), _Y)

    opt.zero_grad()
    with pytest.raises(RuntimeError, match="changed the step's gradients in place during a trial forward"):
        opt.step(closure)
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_closure_that_zeroes_gradients_laid_out_otherwise_than_their_weights_is_refused(backend):
    """A gradient with a transpose's strides goes into the buckets as a copy in its weight's layout (channels_last
    conv weights' gradients can come so from autograd): the watch read the copy's version counter, so a closure
    that zeroed (or clipped) the user's ``.grad`` in place stepped on, as if nothing had been done (an audit's
    find). The parameter's own gradient is read too: refused, with nothing changed."""
    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built: pip install --no-build-isolation -e .")
    model, opt = _trained(backend=backend)
    _until_search_next(model, opt)
    before = snapshot(opt)
    weight = model[0].weight

    def closure():
        weight.grad.zero_()  # that gradient alone: the others' counters would tell on their own
        return F.mse_loss(model(_X), _Y)

    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    loss.backward()
    weight.grad = weight.grad.t().contiguous().t()  # the same values, a transpose's strides
    assert weight.grad.stride() != weight.stride()
    with pytest.raises(RuntimeError, match="changed the step's gradients in place during a trial forward"):
        opt.step(closure, loss=loss.detach())
    assert_unchanged(before, snapshot(opt))


def test_clipping_inside_the_closure_is_refused_with_where_to_clip():
    """``clip_grad_norm_`` inside the closure rewrites the step's gradients at every trial (even a clip that
    changes nothing writes them): refused, naming the clip and the two-phase form, with nothing changed."""
    model, opt = _trained()
    _until_search_next(model, opt)
    before = snapshot(opt)

    def closure():
        loss = F.mse_loss(model(_X), _Y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
        return loss

    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_.*clip between backward\(\) and step\(closure, loss=loss\)"):
        opt.step(closure, loss=loss)
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("form", ["one-phase", "two-phase"])
def test_a_closure_that_does_not_run_the_forward_again_is_warned_of_within_five_searches(backend, form):
    """``out = model(x); step(lambda: loss_fn(out, y))``: a new tensor at each call, holding the loss at ``w0``.
    Every trial tied the step's own loss, each search accepted its first trial and grew the level by growth: 200
    steps took it to 1.1^200 and the loss to 1e19 without a word (an audit's find). Five such searches in a row,
    where the slope said the loss moves and the weights did move, warn, naming the closure."""
    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built: pip install --no-build-isolation -e .")
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 8):
            opt.zero_grad()
            out = model(_X)
            if form == "one-phase":
                opt.step(lambda: F.mse_loss(out, _Y))
            else:
                loss = F.mse_loss(out, _Y)
                loss.backward()
                opt.step(lambda: F.mse_loss(out.detach(), _Y), loss=loss)
            ours = [w for w in caught if "does not seem to run the forward again" in str(w.message)]
            assert len(ours) == (1 if step >= 5 else 0), step  # at the fifth search, once
    assert ours[0].category is RuntimeWarning and "step(lambda: loss_fn(model(x), y))" in str(ours[0].message)


def test_the_stale_closure_warning_raised_as_an_error_leaves_the_step_whole():
    """Under ``-W error`` the warning is an exception: given inside the step, it ran the step's undo list on a
    committed step (a count of steps sat out taken back, the weights moved; a review's find). It is given once
    step() has returned: the step is the one a run that ignores it takes."""
    runs = []
    for as_error in (False, True):
        model = _model()
        opt = FusedSaLSa(model.parameters(), backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("error" if as_error else "ignore")
            for step in range(1, 6):
                model.zero_grad()  # not the optimizer's: each step leaves where the next one's trials replay from
                out = model(_X)
                if step == 5:
                    model[2].bias.grad = None  # a parameter sitting out at that step (made by the backward below)
                loss = F.mse_loss(out, _Y)
                loss.backward()
                if step == 5:
                    model[2].bias.grad = None
                if as_error and step == 5:
                    with pytest.raises(RuntimeWarning, match="does not seem to run the forward again"):
                        opt.step(lambda: F.mse_loss(out.detach(), _Y), loss=loss)
                else:
                    opt.step(lambda: F.mse_loss(out.detach(), _Y), loss=loss)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.state_dict(), opt._handoff.zero_grad_rng))
    (weights, ignored, rng), (weights_error, raised, rng_error) = runs
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_error))
    assert rng is not None and rng.same_as(rng_error)  # where the next step's trials replay from, kept too
    assert raised["param_groups"][0]["search"] == ignored["param_groups"][0]["search"]
    assert raised["state"].keys() == ignored["state"].keys()
    for i, entry in ignored["state"].items():
        assert entry.keys() == raised["state"][i].keys(), i
        for key, value in entry.items():  # the counts of steps sat out included
            other = raised["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, key)


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_ties_of_a_converged_bf16_fit_are_not_warned_of(restore):
    """A bf16 fit converged to a loss of 5e-8: the searched move rounds to nothing in most weights and the bf16 loss
    ties the step's at every trial, so the level grows as it does under a stale closure. It was warned of as one on
    3 of 8 seeds under "inplace" and 1 of 8 under "copy" (a review's find, steps 286-396), before ties counted only
    for float32/float64 losses where most weights moved from their saved w0."""
    x, y = _X.to(torch.bfloat16), _Y.to(torch.bfloat16)
    for seed in range(8):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(torch.bfloat16)
        opt = FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum", restore=restore)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not seem to run the forward again.*")
            for _ in range(400):
                opt.zero_grad()
                opt.step(lambda: F.mse_loss(model(x), y))


def test_a_tie_counts_only_where_most_weights_moved_from_their_saved_copy():
    """16-bit weights of a converged fit move in a few small elements while the loss ties: "moved" is at least half
    the elements, and without saved copies (restore="inplace") nothing counts."""
    from types import SimpleNamespace

    from salsa_fused.diagnostics import most_weights_moved
    w0 = [torch.zeros(6), torch.zeros(4)]
    passes = lambda weights, saved: SimpleNamespace(buckets=[SimpleNamespace(params=weights, saved=saved)])
    assert not most_weights_moved(passes([torch.tensor([1.0, 0, 0, 0, 0, 0]), torch.zeros(4)], w0))
    assert most_weights_moved(passes([torch.ones(6), torch.zeros(4)], w0))  # 6 of 10
    assert not most_weights_moved(passes([torch.ones(6), torch.zeros(4)], None))
    assert not most_weights_moved(SimpleNamespace(buckets=[]))


def test_a_two_phase_closure_that_runs_backward_is_refused_by_name():
    """torch.optim's closure (zero_grad, forward, backward) in the two-phase form: at a trial, under no_grad,
    its backward met no graph and torch's own "element 0 of tensors does not require grad" came out. The
    step names the convention instead, with nothing changed."""
    model, opt = _trained()
    _until_search_next(model, opt)
    before = snapshot(opt)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(_X), _Y)
        loss.backward()
        return loss

    loss = closure()
    with pytest.raises(RuntimeError, match=r"closure\(\) ran backward\(\) at a trial forward") as raised:
        opt.step(closure, loss=loss)
    assert "does not require grad" in str(raised.value.__cause__)
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("form", ["closure", "two-phase"])
def test_a_multi_batch_closure_that_zeroes_the_gradients_in_place_is_refused(form):
    """The same under LABPAL, whose search points average several batches ``closure(i)``: refused at
    the first point that changed the gradients, with nothing changed."""
    model = _model()
    opt = LABPAL(model.parameters(), backend="torch", approximation_batches=4, sgd_steps=2)
    batches = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)),) for i in range(64)]

    def closure(i):
        model.zero_grad(set_to_none=False)
        (x,) = batches[i]
        return F.mse_loss(model(x), x[:, :1].cos())

    def clean(i):
        (x,) = batches[i]
        return F.mse_loss(model(x), x[:, :1].cos())

    opt.zero_grad()
    opt.step(clean)  # a clean search first: refused on a later one too, not only on the first
    for _ in range(30):
        if opt.next_batches().points > 0:
            break
        opt.zero_grad()
        opt.step(clean)
    assert opt.next_batches().points > 0 and opt.search_state.step > 1
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="changed the step's gradients in place during a trial forward"):
        if form == "closure":
            opt.step(closure)
        else:
            loss = clean(0)
            loss.backward()
            opt.step(closure, loss=loss.detach())
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("form", ["one-phase", "two-phase", "two-phase-detached"])
def test_a_closure_returning_the_steps_own_loss_is_refused(form):
    """``step(lambda: loss)`` (torch.optim's habit): every trial would read the loss at w0, pass the
    Armijo test and grow the level without bound (1 -> 304 in 60 steps, no error, before this check)."""
    model, opt = _trained()
    _until_search_next(model, opt)
    before = snapshot(opt)
    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    with pytest.raises(RuntimeError, match=r"closure\(\) returned the step's own loss"):
        if form == "one-phase":
            opt.step(lambda: loss)
        else:
            loss.backward()
            stale = loss.detach() if form == "two-phase-detached" else loss
            opt.step(lambda: stale, loss=loss)
    assert_unchanged(before, snapshot(opt))


def test_a_trial_loss_written_into_the_steps_loss_memory_is_not_refused():
    """What CUDA graphs (torch.compile(mode="reduce-overhead")) do: a static output buffer that
    each replay rewrites, so a trial's loss can share the step's loss's memory. Holding the trial's
    own value, it is a new loss, not the step's: the search runs as with fresh tensors."""
    runs = []
    for static in (False, True):
        model, opt = _trained()
        _until_search_next(model, opt)
        buffer = torch.zeros(1)

        def closure():
            value = F.mse_loss(model(_X), _Y)
            if not static:
                return value
            buffer.copy_(value.detach())
            return buffer[0]

        opt.zero_grad()
        loss = F.mse_loss(model(_X), _Y)
        loss.backward()
        buffer.copy_(loss.detach())
        opt.step(closure, loss=buffer[0] if static else loss.detach())
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state))
    assert runs[0][1] == runs[1][1] and all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


@pytest.mark.parametrize("form", ["one-phase", "two-phase", "labpal", "labpal-two-phase"])
def test_a_loss_returned_in_the_same_static_tensor_at_every_forward_is_not_refused(form):
    """CUDA graph trees return a replay's loss in the same tensor object at every replay: a trial's
    loss was then the step's own loss tensor, refused as a stale closure at the first trial of the first
    search (one- and two-phase, LABPAL's points too), though it held the trial's loss. The same object
    is now told by its value as a view is: the search runs bitwise as with fresh tensors. step(lambda:
    loss) is still refused (test_a_closure_returning_the_steps_own_loss_is_refused)."""
    runs = []
    for static in (False, True):
        model = _model()
        loss_of = StaticLoss(model) if static else (lambda x, y: F.mse_loss(model(x), y))
        labpal = form.startswith("labpal")
        opt = LABPAL(model.parameters(), backend="torch", approximation_batches=2, sgd_steps=2) if labpal \
            else FusedSaLSa(model.parameters(), backend="torch")
        for step in range(5):
            batches = [(_X[i::2] + 0.1 * step, _Y[i::2]) for i in range(2)]

            def closure(*index):
                return loss_of(*batches[index[0]]) if index else loss_of(_X, _Y)
            opt.zero_grad()
            if not form.endswith("two-phase"):
                opt.step(closure)
                continue
            loss = closure(0) if labpal else closure()  # LABPAL: one gradient batch (k = 1)
            loss.backward()
            assert not static or (closure(0) if labpal else closure()) is loss  # the same object again
            opt.step(closure, loss=loss)
        assert opt.num_searches >= 2
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state))
    assert runs[0][1] == runs[1][1] and all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))

@pytest.mark.parametrize("form", ["one-phase", "two-phase"])
def test_a_static_output_whose_trial_loss_ties_the_steps_own_is_not_refused(form):
    """A loss returned in the same static tensor at every forward (as CUDA graph trees return it) whose trial
    loss equals the step's own bitwise (init_step_size=1e-12: the trials move no weight) was refused at the
    first trial as a stale closure: the same memory, the same value. That memory is now set to NaN and the
    closure run once more: its forward writes there again. The search runs bitwise as with fresh tensors."""
    runs = []
    for static in (False, True):
        model = _model()
        loss_of = StaticLoss(model) if static else (lambda x, y: F.mse_loss(model(x), y))
        opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=1e-12)
        decreases = []
        for step in range(3):
            def closure():
                return loss_of(_X + 0.1 * step, _Y)
            opt.zero_grad()
            if form == "two-phase":
                loss = closure()
                loss.backward()
                opt.step(closure, loss=loss)
            else:
                opt.step(closure)
            decreases.append(opt.last_loss_decrease)
        assert opt.num_searches == 3 and decreases == [0.0] * 3  # every trial tied
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state))
    (fresh_weights, fresh), (static_weights, static) = runs
    assert static.num_forward_evals == fresh.num_forward_evals + 3  # each step's one trial ran once more, counted
    assert dataclasses.replace(static, num_forward_evals=fresh.num_forward_evals) == fresh
    assert all(torch.equal(a, b) for a, b in zip(fresh_weights, static_weights))


def test_a_trial_loss_tying_several_of_the_steps_own_losses_runs_one_forward_more():
    """LABPAL with accumulation=2 keeps two losses of the step; a static output whose point forward ties both
    (every batch the same here) ran the closure once more per tied loss, twice in a row (40 calls over 3 steps
    where fresh tensors take 28); one forward tells the memory apart for both: one per tied forward (34)."""
    runs = []
    for static in (False, True):
        model = _model()
        loss_of = StaticLoss(model) if static else (lambda x, y: F.mse_loss(model(x), y))
        opt = LABPAL(model.parameters(), backend="torch", approximation_batches=4, sgd_steps=2, accumulation=2)
        calls = []  # True for a call that finds the output set to NaN: the tie's second call

        def closure(i):
            calls.append(static and bool(torch.isnan(loss_of.out)))
            return loss_of(_X, _Y)

        for _ in range(3):
            opt.zero_grad()
            opt.step(closure)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state, calls))
    (fresh_weights, fresh, fresh_calls), (static_weights, tied, calls) = runs
    reruns = sum(calls)
    assert reruns > 0 and not any(a and b for a, b in zip(calls, calls[1:]))  # never two in a row
    assert len(calls) == len(fresh_calls) + reruns and tied.num_forward_evals == len(calls)
    assert dataclasses.replace(tied, num_forward_evals=fresh.num_forward_evals) == fresh
    assert all(torch.equal(a, b) for a, b in zip(fresh_weights, static_weights))


@pytest.mark.parametrize("form", ["one-phase", "two-phase"])
def test_a_closure_returning_the_steps_own_loss_is_refused_where_a_forward_would_tie(form):
    """The other side of the tie: step(lambda: loss) where a forward would have returned the same value (the
    trials move no weight) is refused as before; the memory set to NaN for the closure's second call gets its
    value back, the loss tensor's version counter unmoved."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=1e-12)
    before = snapshot(opt)
    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    value, version = loss.detach().clone(), loss._version
    with pytest.raises(RuntimeError, match=r"closure\(\) returned the step's own loss"):
        if form == "one-phase":
            opt.step(lambda: loss)
        else:
            loss.backward()
            opt.step(lambda: loss, loss=loss)
    assert_unchanged(before, snapshot(opt))
    assert torch.equal(loss.detach(), value) and loss._version == version


@pytest.mark.parametrize("form", ["closure", "two-phase"])
def test_a_multi_batch_closure_returning_the_steps_own_losses_is_refused(form):
    model = _model()
    opt = LABPAL(model.parameters(), backend="torch", approximation_batches=4, sgd_steps=2)
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    losses = {}

    def stale(i):
        if i not in losses:
            losses[i] = F.mse_loss(model(batches[i]), batches[i][:, :1].cos())
        return losses[i]

    assert opt.next_batches().points > 0
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"closure\(\d\) returned the step's own loss"):
        if form == "closure":
            opt.step(stale)
        else:
            stale(0).backward()
            opt.step(stale, loss=stale(0))
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("reduction", ["mean", 1, object()])
def test_a_reduction_that_is_not_a_search_reduction_is_refused_by_name(reduction):
    """It failed at the first step, after the backward, on a missing method."""
    with pytest.raises(TypeError, match="reduction must be a salsa_fused.distributed.SearchReduction"):
        FusedSaLSa(_model().parameters(), reduction=reduction)


def test_an_inactive_reduction_given_by_hand_copies_and_pickles():
    import io

    from salsa_fused.distributed import SearchReduction
    opt = FusedSaLSa(_model().parameters(), reduction=SearchReduction())
    assert not deepcopy(opt).reduction.active
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert not torch.load(buffer, weights_only=False).reduction.active


def test_a_parameter_listed_twice_in_a_group_is_refused():
    """torch.optim only warns; the torch and cpp backends stepped it differently."""
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lists the same parameter more than once"):
        FusedSaLSa([w, w])
    opt = FusedSaLSa([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="lists the same parameter more than once"):
        opt.add_param_group({"params": [w, w]})
    assert len(opt.param_groups) == 1


def test_a_group_the_backend_refuses_is_not_added():
    """add_param_group of a float64 parameter under backend='cpp': refused by name, and the group is
    not left in param_groups (every later step failed in the kernel)."""
    pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built: pip install --no-build-isolation -e .")
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="cpp")
    extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"backend='cpp' cannot take param_groups\[1\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1 and len(opt.state_dict()["param_groups"]) == 1 and extra not in opt.state
    opt.zero_grad()
    opt.step(_closure(model))
    assert opt.search_state.step == 1


@pytest.mark.parametrize("flags", [{"foreach": False}, {"fused": True}])
def test_a_flag_that_asks_for_kernels_names_itself_when_they_cannot_take_a_parameter(flags):
    """float64 weights with foreach=False (or fused=True): the error names the flag the caller passed
    and says to drop it (the default picks the torch backend for float64), not fused=True or 'auto'."""
    pytest.importorskip("salsa_fused._C",
                        reason="the C++ extension is not built: pip install --no-build-isolation -e .")
    (flag, value), = flags.items()
    with pytest.raises(ValueError, match=rf"^{flag}={value} cannot take param_groups\[0\]\['params'\]\[0\]: .*"
                                         rf"drop {flag}={value}"):
        FusedSaLSa(torch.nn.Linear(2, 2).double().parameters(), **flags)
    assert FusedSaLSa(torch.nn.Linear(2, 2).double().parameters()).backend.name == "torch"


def test_numpy_scalars_from_a_scheduler_are_numbers():
    """A LambdaLR whose factor is a numpy float32 (AdamW takes it): the step runs, and in fp64, as
    with the same factor as a Python float."""
    steps = {}
    for factor in (np.float32(0.3), float(np.float32(0.3))):  # 0.3: float32 arithmetic would round differently
        torch.manual_seed(0)
        model = _model()
        opt = FusedSaLSa(model.parameters(), betas=(np.float32(0.9), np.float64(0.999)))
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k, f=factor: f)
        for _ in range(3):
            opt.zero_grad()
            opt.step(_closure(model))
        steps[type(factor)] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*steps.values()))


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, "lr must be"), ("betas", (0.9, 1.0), r"betas\[1\]"), ("eps", 0.0, "eps must be"),
    ("weight_decay", -0.5, "weight_decay must be"), ("lr", 1e45, "float32 holds"), ("eps", 1e-50, "float32 holds")])
def test_hyperparameters_changed_after_construction_are_checked_at_step(key, value, message):
    """A scheduler or the user may write into param_groups; step() checks before writing."""
    model, opt = _trained()
    opt.param_groups[0][key] = value
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=message):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("search_next", [True, False], ids=["search-step", "plain-step"])
@pytest.mark.parametrize("lr, weight_decay", [(1e30, 0.0), (1.0, 1e38)], ids=["step", "decay"])
def test_a_move_float32_cannot_hold_is_refused_before_any_write(backend, search_next, lr, weight_decay):
    """Each factor fits float32 but their product does not: the kernels take the step in float32, where
    it was inf, and wrote inf weights (cpp) or raised after writing the moments (torch)."""
    model, opt = _trained(backend=backend)
    (_until_search_next if search_next else _until_plain_step_next)(model, opt)
    opt.param_groups[0]["lr"] = lr
    opt.param_groups[0]["weight_decay"] = weight_decay
    opt._search = replace(opt._search, step_size=1e10)
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the .* more than float32 holds"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    assert _all_finite(opt)


def test_a_refused_move_leaves_a_group_built_at_lr_0_unprobed():
    """The step sets search_lr to 1 for a group built at lr=0 whose lr is positive now; a step refused
    for its move must not have set it."""
    model = _model()
    first, *rest = list(model.parameters())
    opt = FusedSaLSa([{"params": rest}, {"params": [first], "lr": 0.0}], backend="torch")
    opt.param_groups[1]["lr"] = 1e30
    opt._search = replace(opt._search, step_size=1e10)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: the applied step .* search_lr=1.0"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    assert opt.param_groups[1]["search_lr"] == 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("change, message", [
    (lambda group: group["betas"].__setitem__(0, 1.5), r"betas\[0\] must lie in \[0, 1\)"),
    (lambda group: group.__setitem__("lr", True), "lr must be a number")], ids=["betas-list-in-place", "lr-1-to-True"])
def test_a_group_checked_at_earlier_steps_is_checked_again_when_a_value_changes_in_place_or_in_type(
        backend, change, message):
    """The step skips the group's checks while every value it reads (and its type) is as at the last step
    that checked them: a betas list changed in place, lr 1 replaced by True (equal to it) are still
    refused before any write."""
    model, opt = _trained(backend=backend, lr=1, betas=[0.9, 0.999])  # a list, changeable in place
    change(opt.param_groups[0])
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises((ValueError, TypeError), match=message):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_move_that_overflows_at_an_unchanged_group_is_refused_when_the_scale_grows(backend):
    """The group's values are those of the steps before, which passed; a schedule's scale that grows
    past what float32 holds in the applied step is refused, nothing written."""
    class Scale:
        value = 1.0

        def scale(self, step):
            return self.value

        def searches(self, step):
            return False

    model, opt = _trained(backend=backend, schedule=Scale(), init_step_size=1e10)
    Scale.value = 1e30
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the applied step .* more than float32 holds"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_lr_written_by_the_schedule_inside_the_step_is_checked_for_its_move(backend):
    """A group read at the start of the step as at the steps before can be written by the schedule's
    own code later in the same step (here its scale()): the float32 fit of the move reads it again."""
    class WritesLr:
        opt = None

        def scale(self, step):
            if step == 4:
                self.opt.param_groups[0]["lr"] = 1e30
            return 1.0

        def searches(self, step):
            return False

    schedule = WritesLr()
    model, opt = _trained(backend=backend, schedule=schedule, init_step_size=1e10)
    schedule.opt = opt
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: the applied step .* more than float32 holds"):
        opt.step(_closure(model))
    assert _all_finite(opt)


def test_a_parameter_whose_elements_share_memory_is_refused():
    """An expanded parameter was taken; every step then raised torch's in-place error after moving the
    other parameters and writing the moments."""
    bias = torch.nn.Parameter(torch.zeros(3))
    expanded = torch.nn.Parameter(torch.randn(1, 3).expand(4, 3))
    with pytest.raises(ValueError, match=r"elements that share memory \(an expanded tensor"):
        FusedSaLSa([bias, expanded], backend="torch")
    model, opt = _trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [expanded]})
    assert_unchanged(before, snapshot(opt))


def test_a_parameter_whose_strides_overlap_its_own_elements_is_refused():
    """No stride is 0, yet [0, 1] and [1, 0] are one place in memory: the update pulled it two ways and kept
    whichever write landed last."""
    overlapping = torch.nn.Parameter(torch.zeros(10).as_strided((3, 3), (1, 1)))
    with pytest.raises(ValueError, match=r"shape \(3, 3\) has elements that share memory \(strides \(1, 1\)\)"):
        FusedSaLSa([overlapping], backend="torch")
    gapped = torch.nn.Parameter(torch.zeros(20).as_strided((3, 3), (5, 1)))  # strides that nest: no overlap
    assert FusedSaLSa([gapped], backend="torch").param_groups[0]["params"] == [gapped]

# ---------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_first_loss(bad):
    """The loss of the step's forward is NaN/inf on a search step: rejected before any write."""
    model, opt = _trained()
    _until_search_next(model, opt)
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        opt.step(lambda: F.mse_loss(model(_X), _Y) * bad)
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_first_loss_skipped_and_counted(bad):
    model, opt = _trained(nonfinite="skip")
    before = snapshot(opt)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(_X), _Y) + bad)
    after = snapshot(opt)
    assert after["search"].pop("num_skipped_steps") == before["search"].pop("num_skipped_steps") + 1
    assert_unchanged(before, after)


def test_non_finite_loss_on_a_plain_step_changes_nothing_and_is_reported_at_the_next_search():
    model, opt = _trained()
    _until_plain_step_next(model, opt)
    before = snapshot(opt)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(_X), _Y) * float("nan"))  # no host read on a plain step
    after = snapshot(opt)
    assert all(torch.equal(a, b) for a, b in zip(before["weights"], after["weights"]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before["moments"], after["moments"]) for k in a)
    assert _all_finite(opt)
    _until_search_next(model, opt)
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match="loss was NaN/inf on 1 plain step"):
        opt.step(_closure(model))


def _nan_gradient_step(model, opt):
    """A two-phase step whose gradient has NaN/inf in two elements of the first weight."""
    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    loss.backward()
    grad = model[0].weight.grad
    grad[0, 0] = float("nan")
    grad[1, 2] = float("inf")
    return loss


def test_non_finite_gradient_on_a_search_step():
    model, opt = _trained()
    _until_search_next(model, opt)
    before = snapshot(opt)
    loss = _nan_gradient_step(model, opt)
    with pytest.raises(NonFiniteError, match="non-finite gradient.*a gradient element is NaN/inf or its square "
                                             "overflows float32"):
        opt.step(_closure(model), loss=loss)
    assert_unchanged(before, snapshot(opt))


def test_non_finite_gradient_on_a_search_step_skipped():
    model, opt = _trained(nonfinite="skip")
    _until_search_next(model, opt)
    before = snapshot(opt)
    loss = _nan_gradient_step(model, opt)
    opt.step(_closure(model), loss=loss)
    after = snapshot(opt)
    assert after["search"].pop("num_skipped_steps") == before["search"].pop("num_skipped_steps") + 1
    assert_unchanged(before, after)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("direction", ["gradient", "momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("element", [3, 18])  # in the C++ kernels' 16-wide vector loop, and in its scalar tail
def test_a_finite_gradient_whose_square_overflows_is_refused_on_a_search_step(backend, direction, dtype, element):
    """|g| = 1e20 is finite in fp32 and bf16 and its square is not: along the momentum, q's term
    g * m_hat / (sqrt(v_hat) + eps) was 1e20 * 0, so the search ran and wrote exp_avg_sq = inf (found by a
    helper's audit). A plain step keeps such an element and counts it; a search step refuses it whatever the
    direction, everything as before."""
    torch.manual_seed(0)
    w = torch.randn(19).to(dtype).requires_grad_(True)
    opt = FusedSaLSa([w], backend=backend, search_direction=direction)
    closure = lambda: ((w.float() - 1) ** 2).sum()  # noqa: E731
    loss = closure()
    loss.backward()
    w.grad[element] = 1e20
    before = snapshot(opt)
    with pytest.raises(NonFiniteError, match="non-finite gradient.*its square overflows float32"):
        opt.step(closure, loss=loss.detach())
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_gradient_on_a_plain_step(policy):
    """Plain step: the two non-finite elements keep weight and moments, every other element
    is updated; the next search reports it (raise) or counts it (skip)."""
    model, opt = _trained(nonfinite=policy)
    _until_plain_step_next(model, opt)
    before = snapshot(opt)
    loss = _nan_gradient_step(model, opt)
    opt.step(_closure(model), loss=loss)
    after = snapshot(opt)
    assert _all_finite(opt)
    w_before, w_after = before["weights"][0], after["weights"][0]
    bad = torch.zeros_like(w_before, dtype=torch.bool)
    bad[0, 0] = bad[1, 2] = True
    assert torch.equal(w_after[bad], w_before[bad])
    assert bool((w_after[~bad] != w_before[~bad]).all())
    for key in ("exp_avg", "exp_avg_sq"):
        m_before, m_after = before["moments"][0][key], after["moments"][0][key]
        assert torch.equal(m_after[bad], m_before[bad])
        assert bool((m_after[~bad] != m_before[~bad]).all())
    for a, b in zip(before["weights"][1:], after["weights"][1:]):
        assert not torch.equal(a, b)  # the other parameters took the full step
    _until_search_next(model, opt)
    opt.zero_grad()
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="2 gradient elements were NaN/inf"):
            opt.step(_closure(model))
    else:
        opt.step(_closure(model))
        assert opt.search_state.num_nonfinite_elements == 2
    # Reported once: the following search runs normally.
    _until_search_next(model, opt)
    opt.zero_grad()
    opt.step(_closure(model))
    assert _all_finite(opt)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_report_nonfinite_reads_the_plain_steps_counts_before_any_search(policy):
    """At a run's end (or before a checkpoint) no search may come to read a plain step's counts:
    report_nonfinite() reads them then, as the search would have, and once only."""
    model, opt = _trained(nonfinite=policy)
    assert opt.report_nonfinite() == (0, 0)
    _until_plain_step_next(model, opt)
    loss = _nan_gradient_step(model, opt)
    opt.step(_closure(model), loss=loss)
    state = opt.search_state
    if policy == "raise":
        with pytest.raises(NonFiniteError, match=r"read by report_nonfinite\(\): 2 gradient elements were NaN/inf "
                                                 r"on plain steps since the last search, or their new "
                                                 r"16-bit weights overflowed \(those elements kept"):
            opt.report_nonfinite()
        assert opt.search_state == state
    else:
        assert opt.report_nonfinite() == (2, 0)
        assert opt.search_state.num_nonfinite_elements == state.num_nonfinite_elements + 2
        assert opt.search_state.step == state.step
    assert opt.report_nonfinite() == (0, 0)
    _until_search_next(model, opt)  # and the next search does not report them again
    opt.zero_grad()
    opt.step(_closure(model))
    assert opt.search_state.num_nonfinite_elements == (0 if policy == "raise" else 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_non_finite_trial_loss_backtracks(bad, restore):
    """The first trial's loss is NaN/inf (even -inf, which would pass the Armijo test): the
    search backtracks, accepts a later finite trial and writes nothing non-finite."""
    model, opt = _trained(restore=restore)
    _until_search_next(model, opt)
    before = opt.search_state
    calls = []

    def closure():
        calls.append(None)
        loss = F.mse_loss(model(_X), _Y)
        return loss + bad if len(calls) == 2 else loss

    opt.zero_grad()
    opt.step(closure)
    after = opt.search_state
    assert after.last_trials >= 2
    assert after.num_backtracks >= before.num_backtracks + 1
    assert _all_finite(opt)
    assert math.isfinite(after.loss_decrease_avg) and math.isfinite(after.last_loss_decrease)


def test_a_level_grown_on_zero_loss_batches_fails_the_next_batch_and_the_warning_names_it():
    """A hinge loss already met (loss 0, gradient 0) on every batch: SaLSa's rule (0.1.0's, SPEC step 6)
    grows the level by ``growth`` at each search that cannot test, so the first batch with a loss fails
    every trial from there. That is the published algorithm, kept step for step; the one-phase warning
    names that cause and not the two-phase form's ``loss=``. Nothing non-finite is written."""
    generator = torch.Generator().manual_seed(0)
    x, near = torch.randn(64, 4, generator=generator), torch.randn(64, 4, generator=generator)
    x[:, 0] = torch.sign(x[:, 0]) * (1 + x[:, 0].abs())  # |x0| > 1: margins 5 |x0| > 1
    y, near_y = torch.sign(x[:, :1]), torch.sign(near[:, :1])
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 0.0, 0.0, 0.0]]))  # every margin above 1: hinge loss 0
    opt = FusedSaLSa(model.parameters(), backend="torch")
    for _ in range(300):
        opt.zero_grad()
        assert opt.step(lambda: torch.relu(1 - y * model(x)).mean()).item() == 0.0
    assert opt.step_size > 1e4  # grown untested, 1.1x per search
    searches = opt.search_state.num_searches
    with pytest.warns(RuntimeWarning, match="every trial of a line search failed") as caught:
        while opt.search_state.num_searches == searches:  # points near the boundary: a small loss
            opt.zero_grad()
            opt.step(lambda: torch.relu(1 - near_y * model(near)).mean())
    text = str(caught[0].message)
    assert "a level grown untested" in text and "exactly 0" in text and "loss=" not in text
    assert _all_finite(opt) and torch.isfinite(model.weight).all()


def test_a_level_grown_untested_for_fifty_searches_in_a_row_warns_once_and_the_count_restarts_at_a_test():
    """A least-squares fit solved to a loss of exactly 0 grew its level untested for ~900 steps, and a tiny loss
    that came back with a slope under the guard applied it: weights of 1.5e28, without a word (a helper's check).
    0.1.0's rule is kept, step for step; after 50 such searches in a row a warning says what is happening."""
    model = torch.nn.Linear(4, 1, bias=False)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    opt = FusedSaLSa(model.parameters(), backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while opt.search_state.untested_searches < 60:
            opt.zero_grad()
            opt.step(lambda: (model(x) * 0).pow(2).mean())  # a loss of exactly 0, no gradient
            count = opt.search_state.untested_searches
            untested = [w for w in caught if "has not tested its level" in str(w.message)]
            assert len(untested) == (count >= 50), count
    text = str(untested[0].message)
    assert "for 50 searches in a row" in text and "117.4 times the last tested one" in text
    assert untested[0].filename == __file__
    opt.zero_grad()
    opt.step(lambda: (model(x) - 1).pow(2).mean())  # a loss and a slope again: a tested search
    assert opt.search_state.untested_searches == 0 and opt.search_state.last_trials > 0


@pytest.mark.parametrize("preset", [None, "pretrain"])
def test_a_move_refused_after_a_level_grown_untested_names_that_cause(preset):
    """A level that grew untested (loss exactly 0 for 950 searches with the defaults; a loss scaled to 1e-12 under
    the preset, its slope under the guard for 23) reached moves float32 cannot hold, or a decay over 1: the
    refusal named lr and the schedule, or said 'Lower weight_decay', neither the cause (an audit's check)."""
    model = torch.nn.Linear(4, 1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    if preset is None:  # near float32's top, so that two searches grown untested reach it
        opt = FusedSaLSa(model.parameters(), init_step_size=2.9e38, backend="torch")
        closure = lambda: (model(x) * 0).pow(2).mean()  # a loss of exactly 0
        cause, names = "the first trial would be", "lr="
    else:
        opt = presets.from_preset(model.parameters(), preset, total_steps=200, backend="torch")
        closure = lambda: 1e-12 * (model(x) - 1).pow(2).mean()  # its slope under the guard
        cause, names = "the weight decay would take", "The level is"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=cause) as refused:
            for _ in range(40):
                before = [p.detach().clone() for p in model.parameters()], opt.search_state
                opt.zero_grad()
                opt.step(closure)
    text = str(refused.value)
    assert names in text and "grew untested at the last" in text and "'A loss of exactly zero'" in text
    assert "Lower weight_decay" not in text
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters())) and opt.search_state == before[1]


def test_a_one_element_loss_of_any_shape_trains_as_the_scalar():
    """``loss.backward()`` takes a loss of one element whatever its shape; so does ``step``."""
    runs = []
    for shape in ((), (1,), (1, 1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = FusedSaLSa(model.parameters(), backend="torch")
        for _ in range(12):
            opt.zero_grad()
            returned = opt.step(lambda: F.mse_loss(model(_X[:, :4]), _Y).reshape(shape))
        assert returned.shape == torch.Size(shape)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_trial_losses_non_finite_then_far_larger_exhaust_the_search_with_finite_state():
    """NaN at the two largest trials, a finite but far larger loss at the others: every trial fails, and the
    search ends as 0.1.0's does (the last trial kept, the level backtracked once more, a warning). Where no
    trial is finite the step is refused instead (test_a_closure_that_is_non_finite_at_every_trial_...)."""
    model, opt = _trained(max_trials=5)
    _until_search_next(model, opt)
    before = opt.search_state
    calls = []

    def closure():
        calls.append(None)
        loss = F.mse_loss(model(_X), _Y)
        return loss if len(calls) == 1 else loss * (float("nan") if len(calls) <= 3 else 1e6)

    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"every trial of a line search failed \(5 trials\)"):
        opt.step(closure)
    after = opt.search_state
    assert len(calls) == 6 and after.last_trials == 5
    assert after.num_backtracks == before.num_backtracks + 4
    assert after.step_size == pytest.approx(before.step_size * 1.1 * 0.8 ** 5)
    assert after.loss_decrease_avg == before.loss_decrease_avg
    assert _all_finite(opt)


def test_skip_keeps_the_earlier_counts_when_the_reporting_step_is_itself_skipped():
    """A plain step leaves 2 non-finite gradient elements; the next search's own loss is NaN:
    with nonfinite='skip' both are counted (the plain step's count is not lost)."""
    model, opt = _trained(nonfinite="skip")
    _until_plain_step_next(model, opt)
    loss = _nan_gradient_step(model, opt)
    opt.step(_closure(model), loss=loss)
    _until_search_next(model, opt)
    skipped = opt.num_skipped_steps
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(_X), _Y) * float("nan"))
    assert opt.num_skipped_steps == skipped + 1
    assert opt.search_state.num_nonfinite_elements == 2
    assert _all_finite(opt)


def test_skip_counts_a_plain_step_whose_loss_was_nan_when_the_reporting_search_is_itself_skipped():
    """A plain step whose loss is NaN changes nothing (a skipped step, counted on the device); the next
    search's own loss is NaN too: with nonfinite='skip' both steps are counted as skipped."""
    model, opt = _trained(nonfinite="skip")
    _until_plain_step_next(model, opt)
    skipped = opt.num_skipped_steps
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(_X), _Y) * float("nan"))
    _until_search_next(model, opt)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(_X), _Y) * float("nan"))
    assert opt.num_skipped_steps == skipped + 2
    assert _all_finite(opt)


def test_a_set_of_parameters_is_refused_as_torch_refuses_it():
    """A set's order changes between runs: a checkpoint would put moments on the wrong tensors."""
    params = {torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))}
    with pytest.raises(TypeError, match="ordered collections"):
        FusedSaLSa(params)
    opt = FusedSaLSa([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": params})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("flag, reason", [("maximize", "negated objective"), ("capturable", "CUDA graph"),
                                          ("differentiable", "not differentiable"), ("amsgrad", "running maximum")])
def test_torch_optim_flags_it_cannot_honour_are_accepted_off_and_refused_on_with_the_reason(flag, reason):
    params = [torch.nn.Parameter(torch.randn(3))]
    for off in (False, None, 0):  # torch.optim reads a flag as off where it is falsy
        FusedSaLSa(params, **{flag: off})
        FusedSaLSa(params).add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], flag: off})
    for on in (True, 1):
        with pytest.raises(ValueError, match=f"does not support {flag}={on}: .*{reason}"):
            FusedSaLSa(params, **{flag: on})


@pytest.mark.parametrize("flag", ["maximize", "amsgrad", "capturable", "differentiable"])
def test_a_flag_set_on_a_group_by_hand_or_by_another_optimizers_checkpoint_is_refused_before_any_write(flag):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        return F.mse_loss(model(x), y)

    opt = FusedSaLSa(model.parameters())
    opt.zero_grad()
    opt.step(closure)
    adamw = torch.optim.AdamW(model.parameters(), **{flag: True})
    model(x).sum().backward()
    if flag in ("maximize", "amsgrad"):  # the others' steps need CUDA or a graph; their groups load all the same
        adamw.step()
    assert_load_refused(opt, adamw.state_dict(), f"a param group has {flag}=True, which FusedSaLSa does not support")
    opt.param_groups[0][flag] = True  # as an AdamW user flips it between steps
    opt.zero_grad()
    model(x).sum().backward()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"a param group has {flag}=True"):
        opt.step(closure, loss=closure())
    assert_unchanged(before, snapshot(opt))
    opt.param_groups[0][flag] = False
    opt.zero_grad()
    opt.step(closure)


def _needs_kernels(options: dict) -> None:
    if options.get("backend") == "cpp" or options.get("fused") or options.get("foreach") is False:
        pytest.importorskip("salsa_fused._C",
                            reason="the C++ extension is not built: pip install --no-build-isolation -e .")


def _two_groups(model, second: dict) -> list:
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]


#: (the optimizer's options, a group's foreach/fused that asks for another backend than theirs)
_ANOTHER_BACKEND = [
    ({}, {"fused": True}), ({}, {"foreach": True}), ({}, {"foreach": False}),  # "auto" chooses for every group
    ({"backend": "torch"}, {"fused": True}), ({"foreach": True}, {"foreach": False}),
    ({"backend": "cpp"}, {"foreach": True}), ({"fused": True}, {"fused": False}),
    ({"backend": "torch"}, {"foreach": True, "fused": True}), ({"backend": "torch"}, {"foreach": "yes"}),
]


@pytest.mark.parametrize("options, second", _ANOTHER_BACKEND)
def test_a_group_asking_for_another_backend_is_refused_at_construction_and_in_add_param_group(options, second):
    """FusedSaLSa runs one backend for every group, chosen by its constructor's backend/foreach/fused; a
    group's own foreach/fused (torch.optim's AdamW honours them per group) that asked for another was ignored
    silently. Refused by group and key, with the remedy; add_param_group adds nothing."""
    _needs_kernels(options)
    model = _model()
    groups = _two_groups(model, second)
    flag = next(iter(second))
    refusal = rf"param_groups\[1\] has {flag}=.*one backend for every group.*to None"
    with pytest.raises(ValueError, match=refusal):
        FusedSaLSa(groups, **options)
    opt = FusedSaLSa(groups[:1], **options)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=refusal + ".*the group was not added"):
        opt.add_param_group(groups[1])
    assert_unchanged(before, snapshot(opt))


@pytest.mark.parametrize("options, second", [
    ({}, {"foreach": None, "fused": None}),  # as a torch.optim checkpoint's groups carry them
    ({"backend": "torch"}, {"foreach": True}), ({"foreach": True}, {"fused": False, "foreach": None}),
    ({"backend": "cpp"}, {"fused": True}), ({"fused": True}, {"foreach": False}),
])
def test_a_group_whose_foreach_or_fused_agrees_with_the_backend_steps_as_one_without_them(options, second):
    _needs_kernels(options)
    runs = []
    for group_flags in (second, {}):
        model = _model()
        opt = FusedSaLSa(_two_groups(model, group_flags), **options)
        for _ in range(4):
            opt.zero_grad()
            opt.step(_closure(model))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_another_optimizers_checkpoint_loads_whatever_its_backend_flags_and_a_salsa_one_asking_for_another_is_refused():
    """AdamW keeps foreach/fused in every group: its own kernels, not a request to this optimizer. Its checkpoint
    loads into any FusedSaLSa whatever they are (with the warning that the search starts over), the flags left
    out; a FusedSaLSa checkpoint whose group asks for another backend (set by hand) is refused by group and
    key, nothing loaded."""
    model, chosen = _trained()  # backend="torch"
    _, auto = _trained(backend="auto")
    for flags in ({}, {"foreach": True}, {"fused": True}):
        adamw = torch.optim.AdamW(model.parameters(), **flags)
        model(_X).sum().backward()
        adamw.step()
        assert {k: adamw.state_dict()["param_groups"][0][k] for k in flags} == flags
        for opt in (auto, chosen):
            with pytest.warns(UserWarning, match="no search state"):
                opt.load_state_dict(adamw.state_dict())
            assert "foreach" not in opt.param_groups[0] and "fused" not in opt.param_groups[0]
            opt.zero_grad()
            opt.step(_closure(model))
    saved = auto.state_dict()
    saved["param_groups"][0]["foreach"] = True
    assert_load_refused(auto, saved, r"the checkpoint's parameter group 0 has foreach=True, which asks for the torch "
                        r"backend.*backend='auto'.*nothing was loaded")


@pytest.mark.parametrize("flag, other, agreeing", [("foreach", False, True), ("fused", True, False)])
def test_a_backend_flag_set_on_a_group_by_hand_is_refused_at_the_next_step_before_any_write(flag, other, agreeing):
    """As an AdamW user sets opt.param_groups[0]["foreach"] between steps: refused at the next step, the
    steps before having checked (and cached) the group; a value that agrees with the backend steps on."""
    model, opt = _trained()  # backend="torch"
    for value in (other, agreeing, other):
        opt.param_groups[0][flag] = value
        opt.zero_grad()
        if value is agreeing:
            opt.step(_closure(model))
            continue
        before = snapshot(opt)
        with pytest.raises(ValueError, match=rf"param_groups\[0\] has {flag}={value}, which asks for compiled "
                                             r"kernels.*'torch' backend.*nothing was written"):
            opt.step(_closure(model))
        assert_unchanged(before, snapshot(opt))


def test_a_bad_loss_argument_is_named_as_the_argument_not_as_a_closure():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = FusedSaLSa(params)
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"step\(\)'s loss= must be a loss of one element \(a scalar, as "
                                         r"loss.backward\(\) takes\), got a tensor of shape \(2,\)"):
        opt.step(lambda: params[0].sum(), loss=torch.ones(2))
    with pytest.raises(TypeError, match=r"closure\(\) must return the loss as a scalar tensor, got str"):
        opt.zero_grad()
        opt.step(lambda: "loss")


def _half_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).half()
    x, y = torch.randn(16, 8).half(), torch.randn(16, 1).half()
    return model, lambda: F.mse_loss(model(x).float(), y.float())


def _everything(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state],
            opt.search_state)


def _unchanged(before, after):
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert len(before[1]) == len(after[1]) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before[1], after[1]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_search_that_gives_up_at_weights_that_overflowed_keeps_nothing_non_finite(backend):
    """Every trial failed and the last overflowed float16 (0.1.0 would keep it): the step is
    refused, or skipped under nonfinite='skip', with the weights and moments as before."""
    for policy in ("raise", "skip"):
        model, closure = _half_regression()
        opt = FusedSaLSa(model.parameters(), init_step_size=1e5, max_trials=2, nonfinite=policy, backend=backend)
        before = _everything(model, opt)
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="every trial of the search failed.*non-finite loss"):
                opt.step(closure)
            assert opt.search_state == before[2]
        else:
            opt.step(closure)
            assert opt.num_skipped_steps == 1 and opt.step_size == 1e5
        after = _everything(model, opt)
        _unchanged(before, after)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend,restore", [("torch", "copy"), ("cpp", "copy"), ("torch", "inplace")])
def test_a_closure_that_is_non_finite_at_every_trial_is_refused_not_kept_at_a_vanished_level(backend, restore):
    """Finite at w0, NaN at every trial weight (a new user's check): the search backtracked through all
    max_trials and kept the last trial with the level at 0.8^99 of the first, a run stalled behind one warning,
    whatever ``nonfinite`` said. Now "raise" raises and "skip" skips the step, the weights (to rounding under
    restore='inplace'), moments and search state as before; the next steps train as if it had not been."""
    for policy in ("raise", "skip"):
        torch.manual_seed(0)  # trained first: the moments the refused step wrote must be put back
        model, opt = _trained(backend=backend, restore=restore, nonfinite=policy, max_trials=20)
        _until_search_next(model, opt)
        searches = opt.num_searches
        calls = []

        def closure():
            calls.append(torch.is_grad_enabled())
            loss = F.mse_loss(model(_X), _Y)
            return loss if calls[-1] else loss * float("nan")  # NaN at every trial forward

        before = _everything(model, opt)
        assert before[1] and all(v.abs().sum() > 0 for state in before[1] for k, v in state.items() if k != "step")
        opt.zero_grad()
        if policy == "raise":
            with pytest.raises(NonFiniteError, match=r"no trial of the search returned a finite loss \(20 trials"):
                opt.step(closure)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "every trial failed" warning: the step was not kept
                opt.step(closure)
            assert opt.num_skipped_steps == 1
        after = _everything(model, opt)
        if restore == "copy":
            _unchanged(before, after)
        else:
            assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(before[0], after[0]))
            _unchanged(([], before[1]), ([], after[1]))
        assert opt.search_state == dataclasses.replace(before[2], num_forward_evals=opt.search_state.num_forward_evals,
                                                       num_skipped_steps=opt.num_skipped_steps)
        assert len(calls) == 21 and opt.step_size == before[2].step_size
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(_X), _Y))  # a sound closure trains on at the level it had
        assert opt.num_searches == searches + 1 and opt.step_size > 1e-4


def test_an_applied_step_that_overflows_float16_weights_is_refused_with_everything_as_before():
    model, closure = _half_regression()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    opt.param_groups[0]["lr"] = 1e6  # a multiplier gone wrong: far beyond the trial the search tested
    while not plan_step(opt.search_state, opt.search_config).is_search:
        opt.zero_grad()
        opt.step(closure)
    before = _everything(model, opt)
    opt.zero_grad()
    with pytest.raises(NonFiniteError, match="overflowed float16 weights"):
        opt.step(closure)
    _unchanged(before, _everything(model, opt))
    assert opt.search_state == before[2]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_trial_that_overflows_float16_weights_under_a_saturating_forward_is_a_failed_trial(backend):
    """tanh reads a finite loss at an inf weight: the trial that overflowed was accepted and inf written (a
    user's check, step 164 of 300 on every backend). It is now a failed trial: the search backtracks below it."""
    weight = torch.nn.Parameter(torch.tensor([65000.0, 1.0], dtype=torch.float16))
    opt = FusedSaLSa([weight], init_step_size=1e3, max_search_interval=1, nonfinite="skip", backend=backend)
    closure = lambda: -torch.tanh(weight.float() / 1e5).sum()  # noqa: E731
    opt.zero_grad()
    opt.step(closure)
    assert torch.isfinite(weight).all() and weight[0] > 65000.0
    assert opt.last_search_trials > 1 and opt.num_searches == 1  # the first trial, 65000 + 1e3 ~ inf, failed
    inplace = FusedSaLSa([weight], init_step_size=1e3, restore="inplace", backend=backend)
    inplace.zero_grad()
    with pytest.raises(NonFiniteError, match=r"overflowed float16 weights \(its loss, -?[0-9.]+, was finite.*"
                                             "restore='inplace' cannot undo such a trial"):
        inplace.step(closure)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float16_weights_that_were_infinite_before_the_step_do_not_fail_its_trials(backend):
    """A learnable additive mask holds -inf where it masks; its loss is finite and its gradient there 0. The
    per-trial check read every trial as overflowed, and every search failed (a review of 5473f95): a trial
    overflows only the weights it made non-finite."""
    torch.manual_seed(0)
    logits = torch.randn(4, 8).half()
    mask = torch.zeros(8, dtype=torch.float16)
    mask[5:] = float("-inf")
    mask, weight = torch.nn.Parameter(mask), torch.nn.Parameter(torch.randn(8, dtype=torch.float16))
    opt = FusedSaLSa([weight, mask], backend=backend)
    closure = lambda: F.cross_entropy((logits * weight + mask).float(), torch.tensor([0, 1, 2, 3]))  # noqa: E731
    first = float(closure())
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    assert opt.num_searches == 3 and opt.num_skipped_steps == 0 and float(closure()) < first
    assert torch.isfinite(weight).all() and torch.equal(mask[5:], torch.full((3,), float("-inf")).half())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_tensor_holding_a_mask_s_inf_still_fails_a_trial_that_overflows_its_other_elements(backend):
    """One flag per tensor read a tensor with a -inf as non-finite before the step, and missed a trial that sent its
    other elements to inf (a review of db93946): such tensors' elements are counted."""
    for first in (0.0, float("-inf")):
        weight = torch.nn.Parameter(torch.tensor([first, 65000.0, 100.0, -3.0], dtype=torch.float16))
        opt = FusedSaLSa([weight], init_step_size=2000.0, backend=backend)
        opt.zero_grad()
        opt.step(lambda: -torch.tanh(weight.float() / 1e5).sum())  # saturating: finite at +-inf
        assert torch.isfinite(weight[1:]).all() and opt.last_search_trials > 1, first


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_the_untested_move_of_a_failed_guard_and_an_inplace_final_move_do_not_write_float16_overflow(restore):
    """Two moves no check read (a review): a search whose guard failed (a loss of exactly 0) moves eta * growth
    along m_hat untested, and wrote -inf; under restore='inplace' a final move beyond the last trial wrote inf.
    'copy' puts the weights and moments back and refuses the step; 'inplace' cannot, and says so."""
    weight = torch.nn.Parameter(torch.tensor([-65000.0, 1.0], dtype=torch.float16))
    opt = FusedSaLSa([weight], init_step_size=1000.0, restore=restore, backend="torch")
    before = weight.detach().clone()
    undo = "restore='inplace' cannot undo it" if restore == "inplace" else "as before the step"
    with pytest.raises(NonFiniteError, match=f"the untested move of a search whose guard failed .*{undo}"):
        opt.step(lambda: (weight.float() - weight.detach().float()).sum())  # a loss of exactly 0, gradient 1
    assert torch.equal(weight, before) == (restore == "copy") and opt.search_state.step == 0
    weight = torch.nn.Parameter(torch.tensor([60000.0, 1.0], dtype=torch.float16))
    opt = FusedSaLSa([weight], init_step_size=2000.0, restore=restore, backend="torch")
    opt.param_groups[0]["lr"] = 4.0  # a scheduler's lr above the lr the group was built with
    before = weight.detach().clone()
    with pytest.raises(NonFiniteError, match=f"the applied step .* overflowed float16 weights.*"
                                             f"{'cannot undo it' if restore == 'inplace' else 'as before the step'}"):
        opt.step(lambda: -torch.tanh(weight.float() / 1e5).sum())
    assert torch.equal(weight, before) == (restore == "copy")


def test_a_search_that_gives_up_at_a_nan_trial_keeps_it_beside_a_mask_that_held_inf_before():
    """Giving up at a NaN last trial read every weight's finiteness: a mask's -inf refused the step as 'its weights
    overflowed' where no trial overflowed anything, and 0.1.0 keeps the last trial (a review)."""
    kept = []
    for first in (0.0, float("-inf")):
        mask, weight = torch.nn.Parameter(torch.tensor([first, 0.0])), torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        opt = FusedSaLSa([weight, mask], max_trials=2, backend="torch")
        calls = []

        def closure():
            calls.append(1)
            loss = (weight ** 2).sum() + (mask.nan_to_num(0.0, neginf=0.0) ** 2).sum()  # the mask has a gradient
            return {2: loss * 0 + 1e6, 3: loss * float("nan")}.get(len(calls), loss)

        with pytest.warns(RuntimeWarning, match="every trial of a line search failed"):
            opt.step(closure)
        kept.append(weight.detach().clone())
    assert torch.equal(kept[0], kept[1])


def test_under_inplace_restore_a_trial_that_overflowed_is_reported_as_not_undone():
    """restore='inplace' cannot put back a weight that overflowed: the error says the weights hold
    NaN/inf instead of claiming they are as before (and 'skip' does not count it as skipped)."""
    for policy in ("raise", "skip"):
        model, closure = _half_regression()
        opt = FusedSaLSa(model.parameters(), init_step_size=1e6, max_trials=2, restore="inplace",
                         nonfinite=policy, backend="torch")
        with pytest.raises(NonFiniteError, match="restore='inplace' cannot undo such a trial"):
            opt.step(closure)
        assert opt.num_skipped_steps == 0


class _ScaleOf:
    """A schedule of one's own whose scale is whatever the test sets."""

    def __init__(self):
        self.value = 1.0

    def scale(self, step):
        return self.value

    def searches(self, step):
        return step <= 2  # then plain steps at the frozen level


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, "1.0", None])
def test_a_schedule_scale_that_is_not_a_finite_number_at_least_zero_is_refused(value):
    """On a search step and on a plain step alike: the error names the schedule and its value, and
    nothing is written (a NaN scale used to write NaN weights on a plain step)."""
    schedule = _ScaleOf()
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", schedule=schedule)
    for step in range(4):
        is_search = step <= 1
        schedule.value = value
        before = snapshot(opt)
        opt.zero_grad()
        with pytest.raises(ValueError, match=f"_ScaleOf.scale\\({step + 1}\\) returned .*finite number >= 0"):
            opt.step(_closure(model))
        assert_unchanged(before, snapshot(opt))
        schedule.value = 1.0
        opt.zero_grad()
        opt.step(_closure(model))
        assert opt.search_state.num_searches == min(step + 1, 2) and not opt.search_state.num_skipped_steps


_HAND_WRITTEN_MOMENTS = {
    "an int64 exp_avg": (lambda p, s: s.__setitem__("exp_avg", s["exp_avg"].long()), "as a torch.int64 tensor"),
    "a float64 exp_avg_sq": (lambda p, s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"].double()), "torch.float64"),
    "an exp_avg of another shape": (lambda p, s: s.__setitem__("exp_avg", torch.zeros(3)), "of shape \\(3,\\)"),
    "an exp_avg that is a float": (lambda p, s: s.__setitem__("exp_avg", 0.0), "as a float, not a tensor"),
    "exp_avg deleted": (lambda p, s: s.pop("exp_avg"), "has 'exp_avg_sq' but no 'exp_avg'"),
}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("plain", [False, True], ids=["search step", "plain step"])
@pytest.mark.parametrize("case", list(_HAND_WRITTEN_MOMENTS))
def test_a_moment_changed_by_hand_is_refused_by_name_with_nothing_written(backend, plain, case):
    """The torch backend wrote exp_avg_sq of every parameter before failing on an int64 exp_avg;
    the others failed with raw errors naming no parameter."""
    model, opt = _trained(backend=backend)
    if plain:
        _until_plain_step_next(model, opt)
    change, message = _HAND_WRITTEN_MOMENTS[case]
    target = list(model.parameters())[2]
    change(target, opt.state[target])
    weights = [p.detach().clone() for p in model.parameters()]
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
               for p in model.parameters()}
    search = opt.search_state
    opt.zero_grad()
    with pytest.raises(ValueError, match=f"opt.state\\[p\\] of a parameter of shape \\(1, 8\\) .*{message}"):
        opt.step(_closure(model))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for p in model.parameters():
        now = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert now.keys() == moments[id(p)].keys() and all(torch.equal(now[k], v) for k, v in moments[id(p)].items())
    assert opt.search_state == search


def test_both_moments_removed_by_hand_start_again_from_zero():
    model, opt = _trained()
    target = list(model.parameters())[0]
    opt.state[target] = {"step": torch.tensor(3.0)}  # another optimizer's entry, without moments
    opt.zero_grad()
    opt.step(_closure(model))
    assert opt.state[target]["exp_avg"].dtype == torch.float32 and opt.state[target]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_parameter_listed_twice_by_hand_is_refused_at_the_step(backend):
    """The constructor refuses a repeated parameter; appended afterwards it took two updates a step."""
    model, opt = _trained(backend=backend)
    first = next(iter(model.parameters()))
    opt.param_groups[0]["params"].append(first)
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"a parameter of shape \(8, 4\) is in param_groups more than once"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.param_groups[0]["params"].pop()
    opt.step(_closure(model))


@pytest.mark.parametrize("key", ["lr", "betas", "eps", "weight_decay", "search_lr"])
def test_a_group_key_deleted_by_hand_is_named_and_not_put_back(key):
    model, opt = _trained()
    del opt.param_groups[0][key]
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=f"a param group has no '{key}'"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    assert key not in opt.param_groups[0]


def test_a_model_none_of_whose_parameters_the_optimizer_steps_is_refused():
    """model= another module was taken: its BatchNorm statistics were put back after each search, and those of
    the model trained took every trial forward (18 batches counted after one search of 17 trials)."""
    net, other = _model(), _model()
    with pytest.raises(ValueError, match=r"none of the \d+ parameters of the Sequential given is one this optimizer "
                                         r"steps: pass the model whose parameters you gave"):
        FusedSaLSa(net.parameters(), backend="torch", model=other)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        FusedSaLSa(net.parameters(), backend="torch", model="net")
    FusedSaLSa(net[0].parameters(), backend="torch", model=net)  # a part of the model: its own
    FusedSaLSa(net.parameters(), backend="torch", model=torch.nn.ReLU())  # no parameters: nothing to compare


def test_a_model_whose_parameters_were_replaced_after_the_build_is_refused_at_the_step():
    """Parameters replaced after the build (FSDP2's fully_shard does it to every one): the optimizer's tensors got
    no gradient, and each step returned the loss having done nothing, silently (an FSDP2 audit's find). With
    model= the step finds that the model's parameters are no longer the optimizer's, and says so."""
    net = _model()
    opt = FusedSaLSa(net.parameters(), backend="torch", model=net)
    for layer in (net[0], net[2]):
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
        layer.bias = torch.nn.Parameter(layer.bias.detach().clone())
    with pytest.raises(ValueError, match=r"none of the 4 parameters of the Sequential given is one this optimizer "
                                         r"steps.*build the optimizer after it"):
        opt.step(_closure(net))
    assert opt.search_state.step == 0


def test_a_model_that_holds_only_some_of_the_parameters_is_named():
    """model=model[0] for an optimizer of the whole model was taken silently: the BatchNorm statistics of the
    modules outside it took every trial forward. Said at construction; the whole model, for an optimizer of all or
    part of its parameters, says nothing."""
    net = _model()
    with warnings.catch_warnings(record=True) as record:  # once: torch's __init__ adds the groups it was built with
        warnings.simplefilter("always")
        FusedSaLSa(net.parameters(), backend="torch", model=net[0])
    said = [str(w.message) for w in record if "model= is the module the closure runs" in str(w.message)]
    assert len(said) == 1 and re.search(r"but \d+ of the \d+ parameters this optimizer steps are not the Linear's",
                                        said[0]), said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedSaLSa(net.parameters(), backend="torch", model=net)
        opt = FusedSaLSa(net[0].parameters(), backend="torch", model=net)
        opt.add_param_group({"params": net[2].parameters()})  # the model's own
    head = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4))  # a head the closure runs, added
    with pytest.warns(UserWarning, match=r"but 4 of the 4 parameters of the group added are not the Sequential's"):
        opt.add_param_group({"params": head.parameters()})


@pytest.mark.parametrize("start", ["3", 2.5, 10 ** 6, None])
def test_a_moments_start_step_set_by_hand_is_refused_at_the_next_step(start):
    """Every other group key set by hand was refused at the next step; this one was read as it came: "3" raised
    a bare TypeError, 10**6 and 2.5 changed Adam's bias corrections silently and saved a checkpoint that no
    optimizer loads. Below 0 stays valid: moments carried from another optimizer's steps."""
    model, opt = _trained()
    opt.param_groups[0]["moments_start_step"] = start
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=rf"param_groups\[0\] has moments_start_step={re.escape(repr(start))} \(set "
                                         r"by hand\): the step count at which the group was added, an int up to the "
                                         r"optimizer's 3 steps"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.param_groups[0]["moments_start_step"] = -4
    opt.step(_closure(model))
    assert opt.search_state.step == 4


@pytest.mark.parametrize("case", ["a generator of params", "a list for the group"])
def test_a_group_or_its_params_replaced_by_hand_with_something_else_is_refused_by_name(case):
    """``param_groups[0]["params"] = model.parameters()``: the step's first pass used the generator up, and every
    later step ran the closure and moved nothing, silently; a group replaced by a list raised a bare AttributeError
    (an audit's finds). Both refused by name, with nothing written."""
    model, opt = _trained()
    group = opt.param_groups[0]
    if case == "a generator of params":
        group["params"] = model.parameters()
        message = r"param_groups\[0\]\['params'\] is a generator, not a list \(set by hand\?\)"
    else:
        opt.param_groups[0] = list(model.parameters())
        message = r"param_groups\[0\] is a list, not a dict \(replaced by hand\?\)"
    weights = [p.detach().clone() for p in model.parameters()]
    search = opt.search_state
    for _ in range(2):  # the next call too: nothing was used up
        model.zero_grad()
        with pytest.raises(ValueError, match=message):
            opt.step(_closure(model))
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters())) and opt.search_state == search
    opt.param_groups[0] = group
    group["params"] = list(model.parameters())
    opt.step(_closure(model))
    assert opt.search_state.step == 4


@pytest.mark.parametrize("argument", ["lr", "eps", "weight_decay", "c", "growth", "backtrack", "beta3",
                                      "init_step_size"])
def test_an_integer_too_large_for_a_float_is_refused_naming_the_argument(argument):
    """``lr=10**400`` raised a bare OverflowError from ``float()`` that named no argument (an audit's find)."""
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number, got an integer of 1329 bits \(about "
                                         r"401 digits\), too large for a float"):
        FusedSaLSa(_model().parameters(), **{argument: 10 ** 400})
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number, got an integer of 16610 bits"):
        FusedSaLSa(_model().parameters(), **{argument: 10 ** 5000})  # past str()'s 4300-digit limit (a review's find)


@pytest.mark.parametrize("name", ["steps_sat_out", "sat_out_since"])
@pytest.mark.parametrize("value", [-5, 2.5, True, "x", np.int64(2)])
def test_a_count_of_steps_sat_out_set_by_hand_is_refused_where_the_buckets_read_it(name, value):
    """``opt.state[w]["steps_sat_out"] = -5`` (or 2.5, True) was read as it came when the buckets were built again
    and kept, and the checkpoint it went into was refused by the optimizer's own load_state_dict; "x" raised a bare
    TypeError (an audit's find). Refused by name, with nothing written; a valid count steps on."""
    model, opt = _trained(steps=5)
    weight = model[0].weight
    opt.state[weight][name] = value
    model[2].bias.requires_grad_(False)  # which parameters have gradients changes: the buckets are built again
    opt.zero_grad()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=rf"opt.state\[p\]\['{name}'\] of a parameter of shape \(8, 4\) is "
                                         rf"{re.escape(repr(value))}: a count of its group's steps, a Python int of 0 "
                                         r"or more \(its group has taken 5; set by hand\?\)"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.state[weight][name] = 0 if name == "steps_sat_out" else 5
    opt.step(_closure(model))
    model[2].bias.requires_grad_(True)
    opt.zero_grad()
    opt.step(_closure(model))
    opt.load_state_dict(deepcopy(opt.state_dict()))  # its own checkpoint loads


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_group_appended_to_param_groups_by_hand_is_refused_naming_add_param_group(backend):
    """A group appended by hand, every AdamW key given, has no search_lr: the error said "deleted by
    hand?", which this group never was."""
    model, opt = _trained(backend=backend)
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.param_groups.append({"params": [extra], "lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match="a param group has no 'search_lr'.*appended to param_groups by hand.*"
                                         "add_param_group"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.param_groups.pop()
    opt.add_param_group({"params": [extra]})
    opt.step(_closure(model))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_checkpoint_moment_that_is_not_real_floating_point_is_refused(dtype):
    model, opt = _trained()
    saved = deepcopy(opt.state_dict())
    key = next(iter(saved["state"]))
    saved["state"][key]["exp_avg"] = saved["state"][key]["exp_avg"].to(dtype)
    assert_load_refused(opt, saved, f"exp_avg of parameter {key} is a {dtype}.*nothing was loaded")


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
def test_a_meta_parameter_is_refused_at_construction_by_what_it_is(backend):
    with pytest.raises(ValueError, match="on the meta device, which holds no values"):
        FusedSaLSa([torch.nn.Parameter(torch.empty(5, device="meta"))], backend=backend)
    opt = FusedSaLSa([torch.nn.Parameter(torch.zeros(3))], backend=backend)
    # added to an optimizer on the CPU: refused as a parameter on another device, with no word of what to do (an
    # audit's check)
    with pytest.raises(ValueError, match="shape \\(4,\\) is on the meta device, which holds no values"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(4, device="meta"))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype, message", [(torch.int64, "needs floating-point parameters, got torch.int64"),
                                            (torch.complex64, "does not support complex parameters")])
def test_a_tensor_without_gradient_appended_to_a_group_by_hand_is_refused_alike_by_every_backend(
        backend, dtype, message):
    """Only tensors with a gradient were checked at the step: the torch backend stepped past an integer or
    complex tensor appended by hand, while the kernels' backends refused it as a dtype they cannot take."""
    model, opt = _trained(backend=backend)
    opt.param_groups[0]["params"].append(torch.zeros(3, dtype=dtype))
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=message):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.param_groups[0]["params"].pop()
    opt.step(_closure(model))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("entry", [[1, 2], None, "exp_avg"], ids=["list", "None", "str"])
def test_a_parameter_state_replaced_by_something_not_a_dict_is_refused_by_name(backend, entry):
    """opt.state[p] = [...] raised 'list indices must be integers or slices, not str' from the check
    of whether the moments were still those the kernels hold."""
    model, opt = _trained(backend=backend)
    target = list(model.parameters())[2]
    opt.state[target] = entry
    others = [p for p in model.parameters() if p is not target]
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in others]
    search = opt.search_state
    opt.zero_grad()
    with pytest.raises(ValueError, match=rf"opt.state\[p\] of a parameter of shape \(1, 8\) is a "
                                         rf"{type(entry).__name__}, not a dict.*nothing was written"):
        opt.step(_closure(model))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for p, saved in zip(others, moments):
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items()) and opt.state[p].keys() == saved.keys()
    assert opt.state[target] is entry and opt.search_state == search


@pytest.mark.parametrize("how", ["loss=", "closure"])
def test_a_loss_on_the_meta_device_is_refused_by_what_it_is(how):
    """torch's 'Cannot copy out of meta tensor; no data!' named neither the loss nor the meta model."""
    model, opt = _trained()
    before = snapshot(opt)
    opt.zero_grad()
    meta = torch.tensor(1.0, device="meta")
    with pytest.raises(ValueError, match="a loss with a value, got a tensor on the meta device.*to_empty"):
        if how == "loss=":
            F.mse_loss(model(_X), _Y).backward()
            opt.step(_closure(model), loss=meta)
        else:
            opt.step(lambda: meta.requires_grad_())
    assert_unchanged(before, snapshot(opt))


def _laid_out_wrongly(case: str, saved: dict):
    key = saved["param_groups"][0]["params"][0]
    if case == "a model's state_dict":
        return {"0.weight": torch.zeros(8, 4)}
    if case == "state as a list":
        return {**saved, "state": list(saved["state"].values())}
    if case == "a parameter's state as a list":
        return {**saved, "state": {**saved["state"], key: list(saved["state"][key].values())}}
    if case == "param_groups as a dict":
        return {**saved, "param_groups": {0: saved["param_groups"][0]}}
    if case == "a group without params":
        return {**saved, "param_groups": [{k: v for k, v in saved["param_groups"][0].items() if k != "params"}]}
    if case == "an id twice in a group":
        ids = saved["param_groups"][0]["params"]
        return {**saved, "param_groups": [{**saved["param_groups"][0], "params": [ids[0], ids[0], *ids[2:]]}]}
    if case == "an id that is a tensor":
        ids = saved["param_groups"][0]["params"]
        return {**saved, "param_groups": [{**saved["param_groups"][0], "params": [torch.tensor(0), *ids[1:]]}]}
    raise AssertionError(case)


_WRONG_LAYOUTS = {
    "a model's state_dict": "no 'state' or 'param_groups': it is not an optimizer's state_dict",
    "state as a list": "'state' is a list, not a dict",
    "a parameter's state as a list": "state of parameter 0 is a list, not a dict",
    "param_groups as a dict": "'param_groups' is not a list of dicts",
    "a group without params": "parameter group 0 has no list of parameter ids",
    "an id twice in a group": "lists parameter id 0 twice \\(in parameter group 0\\)",
    "an id that is a tensor": "parameter group 0 lists Tensor",
}


@pytest.mark.parametrize("case", list(_WRONG_LAYOUTS))
def test_a_checkpoint_not_laid_out_as_state_dict_lays_it_out_is_refused_by_what_is_amiss(case):
    """A 'state' that was a list raised AttributeError ('list' object has no attribute 'items'); an id listed
    twice mapped both entries to the second parameter and named that one's shape as the mismatch."""
    model, opt = _trained()
    saved = deepcopy(opt.state_dict())
    assert_load_refused(opt, _laid_out_wrongly(case, saved), _WRONG_LAYOUTS[case])


def test_a_checkpoint_listing_an_id_in_two_groups_is_refused_naming_both():
    model = _model()
    opt = FusedSaLSa([{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias]}],
                     backend="torch")
    opt.zero_grad()
    opt.step(_closure(model))
    saved = deepcopy(opt.state_dict())
    saved["param_groups"][1]["params"][0] = saved["param_groups"][0]["params"][1]
    assert_load_refused(opt, saved, "lists parameter id 1 twice \\(in parameter groups 0 and 1\\)")


@pytest.mark.parametrize("at_search", [False, True], ids=["plain-step", "search-step"])
def test_a_closure_raising_after_the_steps_own_forward_leaves_weights_moments_and_search_state(at_search):
    """One-phase: the closure's first call is the step's own forward, not a trial. When it raises after
    its forward ran, weights, moments, search state and gradients are as before the step (what that
    forward moved, BatchNorm's statistics and the generators, stays moved, as with any optimizer:
    docs/api.md), and the step then runs."""
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)
    (net, opt), _ = _twin_runs()
    for _ in range(400):
        if plan_step(opt.search_state, opt.search_config).is_search == at_search:
            break
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(net(x), y))
    assert plan_step(opt.search_state, opt.search_config).is_search == at_search
    weights = [p.detach().clone() for p in net.parameters()]
    state = deepcopy(opt.state_dict())

    def raising():
        F.mse_loss(net(x), y)
        raise _Boom("after the forward")
    opt.zero_grad()
    with pytest.raises(_Boom):
        opt.step(raising)
    assert all(torch.equal(a, p) for a, p in zip(weights, net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    after = opt.state_dict()
    assert after["param_groups"][0]["search"] == state["param_groups"][0]["search"]
    assert all(torch.equal(after["state"][i][k], v) for i, s in state["state"].items() for k, v in s.items()
               if torch.is_tensor(v))
    steps = opt.search_state.step
    opt.step(lambda: F.mse_loss(net(x), y))
    assert opt.search_state.step == steps + 1


def test_integer_arguments_take_numpy_integers_and_a_refusal_names_the_type():
    """Arguments read from a config (numpy integers) are integers: max_trials=np.int64(10) was refused with
    'must be an integer >= 1, got 10' (a new user's review). A float or a string is refused naming its type."""
    from salsa_fused import LRFactorSearch
    from salsa_fused.adam_sls import AdamSLSRule
    from salsa_fused.labpal import LABPALRule

    opt = FusedSaLSa(_model().parameters(), max_trials=np.int64(10), max_search_interval=np.int32(10),
                     always_search_steps=np.int64(9), backend="torch")
    config = opt.search_config
    assert (config.max_trials, config.max_search_interval, config.always_search_steps) == (10, 10, 9)
    assert all(type(v) is int for v in (config.max_trials, config.max_search_interval, config.always_search_steps))
    assert type(AdamSLSRule(c=0.1, max_trials=np.int16(5)).max_trials) is int
    rule = LABPALRule(sgd_steps=np.int64(7), t_max=np.int32(50))
    assert (type(rule.sgd_steps), type(rule.t_max)) == (int, int)
    assert LRFactorSearch(opt, interval=np.int64(5)).interval == 5
    for value, named in ((10.0, "a float"), ("10", "a str"), (True, "a bool")):
        with pytest.raises(ValueError, match=f"max_trials must be an integer >= 1, got {value!r} \\({named}, not an "
                                             "integer\\)"):
            FusedSaLSa(_model().parameters(), max_trials=value)
    with pytest.raises(ValueError, match=r"always_search_steps must be an integer >= 0, got -1$"):
        FusedSaLSa(_model().parameters(), always_search_steps=-1)
    with pytest.raises(ValueError, match=r"t_max must be None or an integer >= 1, got 2.5 \(a float"):
        LABPALRule(t_max=2.5)
    from salsa_fused.rules import Batches

    assert Batches(np.int64(2), np.int32(3)) == Batches(2, 3) and type(Batches(np.int64(2)).gradient) is int
    with pytest.raises(ValueError, match=r"gradient \(batches a step reads\) must be an integer >= 1, got 0$"):
        Batches(0)
    with pytest.raises(ValueError, match=r"points must be 0 or >= gradient \(2\), got 1$"):
        Batches(2, 1)


def test_a_loss_passed_by_position_is_named_as_steps_call_not_an_internal_method():
    """step(closure, loss) raised TypeError naming FusedSaLSa._unhooked_step (a new user's review)."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    opt.zero_grad()
    loss = F.mse_loss(model(_X), _Y)
    loss.backward()
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"^step\(\) takes the closure as its one positional argument, got 2 .* "
                                        r"step\(closure, loss=loss\)$"):
        opt.step(_closure(model), loss)
    with pytest.raises(TypeError, match=r"^step\(\) takes closure and loss=, got the keyword argument\(s\) 'los'$"):
        opt.step(_closure(model), los=loss)
    with pytest.raises(TypeError, match=r"^step\(\) got the closure twice, by position and as closure=$"):
        opt.step(_closure(model), closure=_closure(model))
    assert_unchanged(before, snapshot(opt))
    opt.step(_closure(model), loss=loss)
    assert opt.search_state.step == 1


# ---------------------------------------------------------------------------- found by a user's audit (session 49)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_weight_decay_that_would_flip_the_weights_is_refused_by_name_before_anything_is_written(backend, dtype):
    # decoupled decay multiplies by 1 - wd * lr * s * eta: at wd 1000 that is about -300 a step, and the
    # weights of a group with no gradient reached -inf in some 20 steps, counted nowhere
    _needs_kernels({"backend": backend})
    model = _model().to(dtype)
    unused = torch.nn.Parameter(torch.ones(2, dtype=dtype))
    opt = FusedSaLSa([{"params": model.parameters()}, {"params": [unused], "weight_decay": 1000.0}], backend=backend)
    closure = lambda: F.mse_loss(model(_X.to(dtype)), _Y.to(dtype)).float() + 0 * unused.sum()  # noqa: E731
    opt.step(closure)  # the first search: the decay's level is 0 before it
    assert torch.equal(unused.detach(), torch.ones(2, dtype=dtype))
    opt.zero_grad()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: the weight decay would take [0-9.e+]+ of the weights "
                                         r"this step \(weight_decay=1000.0 .*Lower weight_decay"):
        opt.step(closure)
    assert_unchanged(before, snapshot(opt))
    assert _all_finite(opt)
    opt.zero_grad()
    opt.param_groups[1]["weight_decay"] = 0.1  # a sane decay steps on
    opt.step(closure)
    assert _all_finite(opt) and 0 < float(unused[0]) < 1


def test_one_parameter_in_two_groups_is_named_as_torch_names_it():
    w, b = torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group \(nothing was "
                                         r"built\)"):  # the constructor's own words, as its other refusals
        FusedSaLSa([{"params": [w]}, {"params": [w, b]}])
    opt = FusedSaLSa([w])
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group \(the group was "
                                         r"not added\)"):
        opt.add_param_group({"params": [b, w]})
    assert len(opt.param_groups) == 1


def test_blocks_of_one_tensor_are_told_apart_in_closed_form_as_the_elements_say():
    """Column blocks were compared element by element, O(blocks x elements): 64 blocks of a 1024 x 1024 matrix
    took 1.9 s at every bucket rebuild (a review). Views with one set of strides are now solved in closed form;
    checked here against the elements themselves on random views of one storage."""
    import itertools
    import random

    from salsa_fused.buckets import _blocks_share, first_sharing_memory

    def offsets(t):
        return {t.storage_offset() + sum(i * s for i, s in zip(index, t.stride()))
                for index in itertools.product(*map(range, t.shape))}

    rng, storage, decided = random.Random(0), torch.zeros(2000), 0
    for _ in range(1500):
        dims = rng.randint(1, 3)
        strides = tuple(rng.choice([1, 2, 3, 5, 16, 40]) for _ in range(dims))
        a, b = (storage.as_strided(tuple(rng.randint(1, 5) for _ in range(dims)), strides, rng.randint(0, 60))
                for _ in range(2))
        told = _blocks_share(a, b)
        if told is not None:
            decided += 1
            assert told == bool(offsets(a) & offsets(b)), (a.shape, b.shape, strides)
    assert decided > 500
    matrix = torch.zeros(1024, 1024)
    assert first_sharing_memory([matrix[:, 16 * i:16 * (i + 1)] for i in range(64)]) is None
    assert first_sharing_memory([matrix[:, :3], matrix[:, 2:5]]) == (0, 1)


def test_parameters_that_share_memory_are_refused_and_disjoint_views_of_one_buffer_are_not():
    a = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(torch.empty(6))
    b.data = a.data
    with pytest.raises(ValueError, match=r"two parameters \(shapes \(6,\), \(6,\)\) share memory"):
        FusedSaLSa([a, b])
    with pytest.raises(ValueError, match=r"share memory.*\(nothing was built\)"):  # groups compared at the end
        FusedSaLSa([{"params": [a]}, {"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [b]}])
    flat = torch.randn(10)
    first, second = torch.nn.Parameter(flat[:6]), torch.nn.Parameter(flat[4:])
    with pytest.raises(ValueError, match="share memory"):
        FusedSaLSa([first, second])
    opt = FusedSaLSa([first])  # a later group over the same memory is refused and not added
    with pytest.raises(ValueError, match="share memory.*the group was not added"):
        opt.add_param_group({"params": [second]})
    assert len(opt.param_groups) == 1
    halves = [torch.nn.Parameter(flat[:5]), torch.nn.Parameter(flat[5:])]  # a flat buffer's disjoint views
    assert len(FusedSaLSa(halves).param_groups[0]["params"]) == 2


@pytest.mark.parametrize("split", ["columns", "even_odd", "as_strided"])
def test_views_that_interleave_but_share_no_element_step_as_separate_tensors(split):
    """Column blocks of one matrix and every other element reach bytes between each other's; they were refused
    as sharing memory, where AdamW steps them."""
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    views = {"columns": lambda t: (t[:, :3], t[:, 3:]), "even_odd": lambda t: (t.view(-1)[0::2], t.view(-1)[1::2]),
             "as_strided": lambda t: (t.view(-1).as_strided((3, 2), (8, 1)), t.view(-1).as_strided((3, 2), (8, 1), 3))}
    shared = torch.nn.ParameterList(map(torch.nn.Parameter, views[split](base.clone())))
    apart = torch.nn.ParameterList(torch.nn.Parameter(v.clone()) for v in views[split](base.clone()))
    target = torch.randn(base.numel())
    for params in (shared, apart):
        opt = FusedSaLSa(params, backend="torch")
        for _ in range(4):
            opt.zero_grad()
            opt.step(lambda: (torch.cat([p.reshape(-1) for p in params]) - target[:sum(p.numel() for p in params)])
                     .pow(2).sum())
    assert all(torch.equal(a, b) for a, b in zip(shared, apart))
    with pytest.raises(ValueError, match="share memory"):  # one element in common is refused still
        FusedSaLSa([torch.nn.Parameter(base[:, :4]), torch.nn.Parameter(base[:, 3:])])


def test_the_step_time_check_tells_interleaving_weights_from_ones_that_share_an_element():
    """Weights put into param_groups by hand are checked where the buckets are built, by the same rule."""
    base = torch.randn(4, 6)
    left, right = torch.nn.Parameter(base[:, :3]), torch.nn.Parameter(base[:, 3:])
    opt = FusedSaLSa([left], backend="torch")
    opt.param_groups[0]["params"].append(right)
    opt.step(lambda: (left.sum() + right.sum()) ** 2)
    assert opt.search_state.step == 1
    opt.param_groups[0]["params"].append(torch.nn.Parameter(base[1:, 2:4]))
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"the weights of two parameters .* share memory"):
        opt.step(lambda: sum(p.sum() for p in opt.param_groups[0]["params"]) ** 2)


def test_a_group_key_that_state_dict_keeps_for_the_search_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="a param group has the key 'search'"):
        FusedSaLSa([{"params": model.parameters(), "search": {}}])
    opt = FusedSaLSa(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="the key 'search'.*the group was not added"):
        opt.add_param_group({"params": list(model.parameters())[2:], "search": 1})
    assert len(opt.param_groups) == 1
    opt.load_state_dict(opt.state_dict())  # its own state dict still loads


@pytest.mark.parametrize("name", ["growth", "backtrack", "c", "beta3"])
def test_numpy_search_constants_are_python_floats_in_the_state_and_the_checkpoint(name, tmp_path):
    value = {"growth": 1.1, "backtrack": 0.8, "c": 0.5, "beta3": 0.9}[name]
    model, opt = _trained(3, **{name: np.float32(value)})  # refused at every step before: a numpy level
    assert type(getattr(opt.search_config, name)) is float
    saved = opt.state_dict()
    assert all(type(v) is not np.float32 and type(v) is not np.float64 for v in saved["param_groups"][0]["search"].values())
    torch.save(saved, tmp_path / "opt.pt")
    torch.load(tmp_path / "opt.pt", weights_only=True)  # numpy scalars would need an allowlist


def test_a_level_below_the_smallest_normal_float32_is_refused():
    with pytest.raises(ValueError, match=r"init_step_size must be .* from 1.175e-38 \(below it the passes move by 0"):
        FusedSaLSa(_model().parameters(), init_step_size=1e-40)
    FusedSaLSa(_model().parameters(), init_step_size=1e-30)


@pytest.mark.parametrize("value", [3, None, torch.zeros(2)])
def test_load_state_dict_of_something_that_is_not_a_dict_names_it(value):
    _, opt = _trained(2)
    assert_load_refused(opt, value, "load_state_dict\\(\\) takes the dict state_dict\\(\\) returns, got")


def test_a_search_state_that_lost_fields_loads_with_a_warning_naming_them():
    _, opt = _trained(3)
    saved = deepcopy(opt.state_dict())
    del saved["param_groups"][0]["search"]["slope_avg"], saved["param_groups"][0]["search"]["step_size_fast"]
    with pytest.warns(UserWarning, match="the checkpoint's search state has no slope_avg, step_size_fast: they start "
                                         "from their defaults"):
        opt.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(opt.state_dict())  # a whole one: no warning


def test_a_full_state_dict_through_torch_distributed_checkpoint_loads_without_a_warning():
    """``set_optimizer_state_dict(..., full_state_dict=True)`` drops the empty ``rule_state`` on its way in:
    nothing was lost, so nothing warns."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
    model, opt = _trained(3)
    options = StateDictOptions(full_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(model, opt, saved, options=options)
    assert opt.search_state.step == 3
    labpal = FusedSaLSa(_model().parameters(), search_rule="labpal")
    stripped = deepcopy(opt.state_dict())
    stripped["param_groups"][0]["search"].pop("rule_state")
    with pytest.raises(ValueError, match="without the scalars this search_rule keeps"):
        labpal.load_state_dict(stripped)  # a rule that keeps scalars still refuses a checkpoint without them


def test_a_sparse_loss_is_refused_by_name():
    model, opt = _trained(2)
    opt.zero_grad()
    before = snapshot(opt)
    with pytest.raises(TypeError, match="closure\\(\\) must return a dense loss, got a tensor of layout torch.sparse_coo"):
        opt.step(lambda: F.mse_loss(model(_X), _Y).reshape(1).to_sparse())
    assert_unchanged(before, snapshot(opt))


def test_a_bad_loss_bound_with_bind_closure_is_refused_at_the_binding():
    model, opt = _trained(2)
    with pytest.raises(TypeError, match="bind_closure\\(\\)'s loss= must be the loss as a scalar tensor or a real number, got str"):
        opt.bind_closure(_closure(model), loss="x")
    with pytest.raises(ValueError, match="bind_closure\\(\\)'s loss= must be a loss of one element"):
        opt.bind_closure(_closure(model), loss=torch.ones(2))


def test_a_float64_checkpoint_whose_moments_float32_cannot_hold_is_refused_as_such_not_as_corrupt():
    """A float64 AdamW's exp_avg_sq reached 4e40, all finite: the refusal said NaN/inf and corrupt."""
    model, opt = _trained(2)
    saved = deepcopy(opt.state_dict())
    first = next(iter(saved["state"]))
    saved["state"][first]["exp_avg_sq"] = saved["state"][first]["exp_avg_sq"].double() + 4e40
    assert_load_refused(opt, saved, r"exp_avg_sq of parameter 0 hold finite values beyond float32's range "
                                    r"\(3.403e\+38\), where FusedSaLSa keeps its moments")
    saved["state"][first]["exp_avg_sq"][0] = float("nan")  # both: the corrupt one is named
    assert_load_refused(opt, saved, r"hold NaN/inf .*the checkpoint is corrupt")


@pytest.mark.parametrize("extra", [torch.tensor(float("nan")), float("inf")])
def test_a_checkpoint_whose_other_state_holds_nan_is_refused(extra):
    _, opt = _trained(2)
    saved = deepcopy(opt.state_dict())  # state_dict() shares each parameter's state dict with the optimizer
    first = next(iter(saved["state"]))
    saved["state"][first]["step"] = extra  # AdamW keeps a 'step' per parameter: kept, so checked
    assert_load_refused(opt, saved, r"has 'step' holding NaN/inf: the checkpoint is corrupt")
    saved["state"][first]["step"] = torch.tensor(3.0)
    opt.load_state_dict(saved)


def test_numpy_float16_hyperparameters_pass_their_checks_without_numpy_overflow_warnings():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # comparing a float16 with float32's bounds cast the bounds to float16
        opt = FusedSaLSa(model.parameters(), lr=np.float16(0.5), init_step_size=np.float16(0.1), backend="torch")
        opt.step(_closure(model))
    assert opt.search_state.step == 1


@pytest.mark.parametrize("call", ["load_state_dict", "add_param_group"])
def test_load_state_dict_and_add_param_group_from_inside_the_step_are_refused(call):
    """Called from the step's own closure, a load finished the step on the moments it had collected while
    opt.state held the loaded ones (exp_avg differed from a clean step; another checkpoint's moments beside this
    step's search state), and an added group met a half-made step. Refused as a nested step() is."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    opt.step(_closure(model))
    saved = opt.state_dict()
    extra = torch.nn.Parameter(torch.zeros(3))

    def closure():
        if torch.is_grad_enabled():
            opt.load_state_dict(saved) if call == "load_state_dict" else opt.add_param_group({"params": [extra]})
        return _closure(model)()

    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=rf"{call}\(\) was called from inside this FusedSaLSa's own step"):
        opt.step(closure)
    assert_unchanged(before, snapshot(opt))
    opt.zero_grad()
    opt.step(_closure(model))  # between steps, as ever
    getattr(opt, call)(saved if call == "load_state_dict" else {"params": [extra]})


def test_a_checkpoint_whose_level_averages_are_too_far_apart_is_refused_at_the_load():
    """step_size_fast / step_size_slow overflowing made the search interval 0: every later step raised, naming the
    search rule's finish(), and only another load recovered the optimizer."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    opt.step(_closure(model))
    for fast, slow in ((1e-320, 1.0), (3e38, 1e-300)):
        saved = opt.state_dict()
        saved["param_groups"][0]["search"].update(step_size_fast=fast, step_size_slow=slow)
        assert_load_refused(opt, saved, "step_size_fast=.* and step_size_slow=.* are too far apart")
    opt.zero_grad()
    opt.step(_closure(model))


@pytest.mark.parametrize("returned", [None, "yes", float("nan"), 1])
def test_a_schedule_whose_searches_returns_no_bool_is_refused(returned):
    """A schedule whose searches() forgot its return gave None, read as False: no step searched again, the level
    stayed, and nothing said so (scale() returning None was refused by name)."""
    class Schedule:
        def scale(self, step):
            return 1.0

        def searches(self, step):
            return True if step == 1 else returned

    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", schedule=Schedule())
    opt.step(_closure(model))
    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"schedule Schedule.searches\(2\) returned .*; a schedule's searches\(step\) "
                                         r"is True or False"):
        opt.step(_closure(model))
    assert_unchanged(before, snapshot(opt))
    from salsa_fused import LRFactorSearch  # its ScaledSchedule around the schedule read None as False
    other = _model()
    wrapped = FusedSaLSa(other.parameters(), backend="torch", schedule=Schedule())
    factor_search = LRFactorSearch(wrapped, interval=100)
    wrapped.step(_closure(other))
    wrapped.zero_grad()
    with pytest.raises(ValueError, match=r"schedule Schedule.searches\(2\) returned"):
        factor_search.step(_closure(other), lambda: wrapped.step(_closure(other)))


def test_salsa_optimizer_0_1_0s_argument_names_are_refused_with_their_names_here():
    """momentum=, speed_up= and use_mv= (0.1.0's) got Python's bare 'unexpected keyword argument'."""
    model = _model()
    with pytest.raises(TypeError, match=r"FusedSaLSa takes no momentum, use_mv: salsa-optimizer 0.1.0's arguments, "
                                        r"named here momentum=\(beta1, beta2, beta3\) is betas=\(beta1, beta2\), "
                                        r"beta3=beta3; use_mv=True is search_direction='momentum'"):
        FusedSaLSa(model.parameters(), momentum=(0.9, 0.999, 0.9), use_mv=True)
    with pytest.raises(TypeError, match=r"takes no speed_up: salsa-optimizer 0.1.0's argument, named here speed_up "
                                        r"is adaptive_interval"):
        FusedSaLSa(model.parameters(), speed_up=False)


@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("weight_decay", 1e30), ("betas", (0.5, 0.5))])
def test_a_closure_that_writes_a_groups_hyperparameters_during_the_search_is_refused_and_they_go_back(key, value):
    """A closure that stepped a scheduler (or wrote lr = NaN) during the trials went unchecked: NaN surfaced as the
    weights' overflow, weight_decay=1e30 as 'no trial returned a finite loss' (an audit)."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    forward = _closure(model)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        if not torch.is_grad_enabled():  # a trial's forward
            opt.param_groups[0][key] = value
        return forward()

    before = snapshot(opt)
    opt.zero_grad()
    with pytest.raises(ValueError, match=rf"closure\(\) wrote param_groups\[0\]'s {key} during a forward of the "
                                         r"search .* they are put back"):
        opt.step(closure)
    assert_unchanged(before, snapshot(opt))
    opt.zero_grad()
    opt.step(forward)  # and the next step is an ordinary one


@pytest.mark.parametrize("given, said", [
    ({"preset": "pretrain", "total_steps": 100},
     "unexpected keyword arguments 'preset', 'total_steps'; 'preset' and 'total_steps': a preset is built by "
     "presets.from_preset\\(params, 'pretrain', total_steps=N\\)"),
    ({"weight_decy": 0.1}, "unexpected keyword argument 'weight_decy'; 'weight_decy': did you mean 'weight_decay'\\?"),
    ({"nesterov": True}, "unexpected keyword argument 'nesterov'; 'nesterov': not an argument of FusedSaLSa"),
])
def test_an_unknown_keyword_is_refused_in_pythons_words_with_what_was_meant(given, said):
    """Two audits built FusedSaLSa(params, preset='pretrain', total_steps=N), as a user would, and read only
    Python's bare "unexpected keyword argument 'preset'"."""
    with pytest.raises(TypeError, match=f"^FusedSaLSa\\(\\) got an {said}"):
        FusedSaLSa(torch.nn.Linear(2, 1).parameters(), **given)
    # tools that read the signature (LightningCLI, HF) see the named arguments, not a **kwargs that takes any
    parameters = inspect.signature(FusedSaLSa).parameters
    assert "weight_decay" in parameters and all(p.kind is not p.VAR_KEYWORD for p in parameters.values())


def test_a_decay_refused_that_the_last_tested_level_would_also_refuse_names_weight_decay_not_the_growth():
    """One search of a loss of exactly 0 grew the level by 1.1, untested, and weight_decay=3.0 (a typo for 3e-3)
    took 3.3 of the weights: the refusal blamed the untested growth and dropped 'Lower weight_decay' (a review's
    check). At the tested level it takes 3.0, refused as well: the growth is not the cause."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = FusedSaLSa(model.parameters(), weight_decay=3.0, backend="torch")
    opt.zero_grad()
    opt.step(lambda: (model(x) * 0).sum())
    assert opt.search_state.untested_searches == 1
    opt.zero_grad()
    with pytest.raises(ValueError, match="the weight decay would take 3.3 .*Lower weight_decay") as refused:
        opt.step(lambda: (model(x) - 1).pow(2).mean())
    assert "grew untested" not in str(refused.value)


def test_a_move_over_float32_that_the_last_tested_level_would_also_make_does_not_blame_the_growth():
    """As for the decay: after one zero-loss search (the level grown 1.1, untested) an lr of 3.4e38 set by hand makes
    an applied step float32 cannot hold at the tested level as well: the refusal names lr, not the growth."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    opt.zero_grad()
    opt.step(lambda: (model(x) * 0).sum())
    assert opt.search_state.untested_searches == 1
    opt.param_groups[0]["lr"] = 3.4e38  # a scheduler's, say: the applied step is lr / search_lr times the trial
    opt.zero_grad()
    with pytest.raises(ValueError, match="the applied step would be .* lr=3.4e\\+38") as refused:
        opt.step(lambda: (model(x) - 1).pow(2).mean())
    assert "grew untested" not in str(refused.value)


def test_skip_warns_once_when_every_step_of_a_read_window_was_skipped_where_no_search_comes():
    """Past the preset's search phase its plain steps walked a log barrier's weights out of the loss's domain (NaN
    for |w| >= 1): under nonfinite='skip' every later step was skipped, the weights never moved again, and nothing
    said so (107 of 150 steps; an audit's check)."""
    def run(bound: float):
        w = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 10))
        opt = presets.from_preset([w], "pretrain", total_steps=150, backend="torch", nonfinite="skip")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(150):
                opt.zero_grad()
                opt.step(lambda: ((w - bound) ** 2).mean() - 1e-3 * torch.log(1 - w ** 2).mean())
        return opt, [str(c.message) for c in caught if "skipped every one of the last" in str(c.message)]

    stalled, said = run(0.999)
    assert stalled.num_skipped_steps > 50 and len(said) == 1
    assert said[0].startswith("nonfinite='skip' skipped every one of the last 10 steps")
    healthy, said = run(0.5)  # inside the domain: nothing skipped, nothing said
    assert healthy.num_skipped_steps == 0 and said == []
