"""Generic tests driven by the table in tests/spec.py: every backend against the torch reference,
state_dict round trips, no-op steps and bad constructor inputs, for every configuration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salsa_fused import FusedSaLSa
from spec import BACKENDS, CONFIGS, ERROR_INPUTS, TOLERANCES


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 6
_X = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
_Y = _X[:, :2].sum(1, keepdim=True).cos()


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    scalar = torch.nn.Parameter(torch.tensor(0.5))  # a 0-dim parameter in its own group
    return model.to(DEVICE, dtype), scalar.to(DEVICE, dtype).detach().requires_grad_()


def _run(backend, config, dtype, steps=STEPS, model=None, opt=None):
    if model is None:
        model = _model(dtype)
    net, scalar = model
    if opt is None:
        groups = [{"params": list(net.parameters())}, {"params": [scalar], "lr": 0.5}]
        opt = FusedSaLSa(groups, backend=backend, **config.kwargs)
    x, y = _X.to(DEVICE, dtype), _Y.to(DEVICE)
    for k in range(steps):
        rows = slice(4 * (k % 4), 4 * (k % 4) + 4)
        closure = lambda: F.mse_loss((net(x[rows]) * scalar).float(), y[rows])  # noqa: E731
        opt.zero_grad()
        if k == 2:  # a gradient set to None mid-run: that parameter sits the step out
            loss = closure()
            loss.backward()
            scalar.grad = None
            opt.step(closure, loss=loss)
        else:
            opt.step(closure)
    return (net, scalar), opt


def _weights(model):
    net, scalar = model
    return [p.detach() for p in net.parameters()] + [scalar.detach()]


def _backends():
    return [pytest.param(info.name, marks=pytest.mark.skipif(not info.usable(), reason=f"{info.name} cannot run"))
            for info in BACKENDS]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_follows_the_torch_reference(backend, config, dtype):
    tolerance = TOLERANCES[backend][dtype]
    reference, ref_opt = _run("torch", config, dtype)
    ours, opt = _run(backend, config, dtype)
    assert opt.num_searches == ref_opt.num_searches
    for a, b in zip(_weights(ours), _weights(reference)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance.rtol, atol=tolerance.atol,
                                   msg=lambda m: f"{m}\n({tolerance.reason})")
    assert opt.step_size == pytest.approx(ref_opt.step_size, rel=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", _backends())
def test_state_dict_round_trip_resumes_bitwise(backend, config):
    straight, straight_opt = _run(backend, config, torch.float32, steps=STEPS)
    half, half_opt = _run(backend, config, torch.float32, steps=STEPS // 2)
    resumed_model = _model(torch.float32)
    for a, b in zip(_weights(resumed_model), _weights(half)):
        a.copy_(b)
    net, scalar = resumed_model
    groups = [{"params": list(net.parameters())}, {"params": [scalar], "lr": 0.5}]
    resumed_opt = FusedSaLSa(groups, backend=backend, **config.kwargs)
    resumed_opt.load_state_dict(half_opt.state_dict())
    assert resumed_opt.search_state == half_opt.search_state
    # the rest of the run, on the same batches the straight run saw
    x, y = _X.to(DEVICE), _Y.to(DEVICE)
    for k in range(STEPS // 2, STEPS):
        rows = slice(4 * (k % 4), 4 * (k % 4) + 4)
        resumed_opt.zero_grad()
        closure = lambda: F.mse_loss((net(x[rows]) * scalar).float(), y[rows])  # noqa: E731
        resumed_opt.step(closure)
    # The straight run dropped the scalar's gradient at step 2 (k == 2), before the split: same inputs.
    assert resumed_opt.search_state == straight_opt.search_state
    for a, b in zip(_weights(resumed_model), _weights(straight)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", _backends())
def test_step_without_gradients_changes_nothing(backend, config):
    model = _model(torch.float32)
    net, scalar = model
    opt = FusedSaLSa([{"params": list(net.parameters())}, {"params": [scalar], "lr": 0.5}], backend=backend,
                     **config.kwargs)
    before = [w.clone() for w in _weights(model)]
    state = opt.state_dict()
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    assert opt.state_dict()["param_groups"] == state["param_groups"]


@pytest.mark.parametrize("kwargs, error, message", ERROR_INPUTS, ids=[e[2][:30] for e in ERROR_INPUTS])
def test_bad_constructor_input_raises_with_its_reason(kwargs, error, message):
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(error, match=message):
        FusedSaLSa([w], **kwargs)
