"""Section 38's screens: Mechanic's learned scale (benchmarks/quality/mechanic.py) and the warm-up to 3x/4x."""

import math
from dataclasses import replace

import pytest
import torch

from benchmarks.quality import optimizers as O
from benchmarks.quality import run
from benchmarks.quality.mechanic import BETAS, Mechanic
from salsa_fused.errors import NonFiniteError


def _quadratic(seed=0, n=20):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=gen)
    curvature = torch.rand(n, generator=gen) + 0.1
    x = torch.nn.Parameter(torch.zeros(n))
    return x, lambda: 0.5 * (curvature * (x - target) ** 2).sum()


def test_weights_are_the_reference_minus_the_scale_times_the_accumulated_base_updates():
    x, loss_of = _quadratic()
    opt = Mechanic(torch.optim.SGD([x], lr=0.5), weight_decay=0.0)
    total_base_update = torch.zeros_like(x)
    for _ in range(30):
        opt.zero_grad()
        loss_of().backward()
        ref = None if opt.x_ref is None else opt.x_ref[0].clone()
        delta_before = None if opt.delta is None else opt.delta[0].clone()
        opt.step()
        ref = opt.x_ref[0] if ref is None else ref
        # the base's own update from `before`: SGD's -lr * g; Δ gains its negative
        base_update = -0.5 * x.grad
        total_base_update += base_update
        expected_delta = -base_update if delta_before is None else delta_before - base_update
        torch.testing.assert_close(opt.delta[0], expected_delta)
        torch.testing.assert_close(x.detach(), ref - opt.scale * opt.delta[0])
        assert torch.equal(opt.x_ref[0], torch.zeros_like(x))  # x_ref is the first weights, never moved
    torch.testing.assert_close(opt.delta[0], -total_base_update)


def test_scale_grows_from_s_init_while_the_base_direction_keeps_lowering_the_loss():
    x, loss_of = _quadratic()
    opt = Mechanic(torch.optim.Adam([x], lr=1.0), s_init=1e-8)
    first = float(loss_of().detach())
    for _ in range(300):
        opt.zero_grad()
        loss_of().backward()
        opt.step()
    assert opt.scale > 1e3 * len(BETAS) * 1e-8
    assert float(loss_of().detach()) < 0.5 * first
    assert all(math.isfinite(v) for v in opt.s.tolist())


def test_non_finite_gradient_is_refused_before_the_scale_moves():
    x, loss_of = _quadratic()
    opt = Mechanic(torch.optim.SGD([x], lr=0.1, momentum=0.9))  # a base with state to leave untouched
    for _ in range(3):
        opt.zero_grad()
        loss_of().backward()
        opt.step()
    opt.zero_grad()
    loss_of().backward()
    x.grad[0] = float("nan")
    s_before, x_before, delta_before = opt.s.clone(), x.detach().clone(), opt.delta[0].clone()
    base_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.base.state[x].items()}
    with pytest.raises(NonFiniteError, match="non-finite"):
        opt.step()
    assert torch.equal(opt.s, s_before) and torch.equal(x.detach(), x_before)
    assert torch.equal(opt.delta[0], delta_before)
    assert opt.base.state[x].keys() == base_state.keys()
    assert all(torch.equal(opt.base.state[x][k], v) if torch.is_tensor(v) else opt.base.state[x][k] == v
               for k, v in base_state.items())


def test_screen_names_build_what_section_38_measured():
    task = run.make_task("digits", "tiny")
    built = O.build("mechanic_adam_s1e-3", task, task.model(0), 100)
    assert built.family == "mechanic" and built.optimizer.s_init == 1e-3
    assert built.optimizer.base.param_groups[0]["lr"] == pytest.approx(O.warmup_cosine(0, 100))
    shipped = O.build("pretrain_hold", task, task.model(0), 100).schedule
    for peak in (0.25, 0.5, 1.0, 3.0, 4.0, 8.0, 16.0):
        name = f"pretrain_peak{peak:g}"
        assert O.build(name, task, task.model(0), 100).schedule == replace(shipped, peak=peak)


def test_mechanic_runs_through_the_suites_training_loop():
    task = run.make_task("digits", "tiny", steps=12)
    result = run.train(task, "mechanic_adam", 0)
    assert result["diverged"] is None and len(result["step_sizes"]) == 12
    assert all(math.isfinite(v) and v >= 0 for v in result["step_sizes"])
