"""ScheduleFree+ (benchmarks/quality/schedulefree_plus.py, NOTES.md section 47), against its update
written out per coordinate."""

import math

import pytest
import torch

from benchmarks.quality.schedulefree_plus import ScheduleFreePlus
from salsa_fused.errors import NonFiniteError

TARGET = torch.tensor([0.5, -1.0, 2.0])


def _loss(w, u):
    return 0.5 * ((w - TARGET) ** 2).sum() + 0.25 * (u ** 4).sum()


def _by_hand(w, u, steps, warmup, c_warmup, decay, polyak_beta, r=1.0):
    """The update of the module docstring, coordinate by coordinate in float64."""
    beta1, beta2, sf, eps, power = 0.9, 0.95, 0.9, 1e-8, 2.0
    coords = [float(v) for v in w] + [float(v) for v in u]
    z, x, y = list(coords), list(coords), list(coords)
    m, v = [0.0] * len(coords), [0.0] * len(coords)
    e, rate_max, weight_sum, rates = 0.0, 0.0, 0.0, []
    for t in range(1, steps + 1):
        w_now, u_now = y[:3], y[3:]
        f = sum(0.5 * (a - float(b)) ** 2 for a, b in zip(w_now, TARGET)) + sum(0.25 * a ** 4 for a in u_now)
        g = [a - float(b) for a, b in zip(w_now, TARGET)] + [a ** 3 for a in u_now]
        inner = sf * sum(gi * (zi - xi) for gi, zi, xi in zip(g, z, x)) if t > 1 else 0.0
        e = polyak_beta * e + (1 - polyak_beta) * sum(abs(gi) for gi in g) * math.sqrt(math.pi / 2)
        rate = min(1.0, t / warmup) * max(0.0, f + inner) / (e / (1 - polyak_beta ** t))
        rates.append(rate)
        rate_max = max(rate_max, rate)
        if t <= c_warmup:
            c = 1.0
        else:
            weight_sum += t ** r * rate_max ** power
            c = t ** r * rate_max ** power / weight_sum
        for i, gi in enumerate(g):
            z[i] -= rate * rate * decay * y[i]
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            z[i] -= rate * (m[i] / (1 - beta1 ** t)) / (math.sqrt(v[i] / (1 - beta2 ** t)) + eps)
            x[i] = (1 - c) * x[i] + c * z[i]
            y[i] = sf * x[i] + (1 - sf) * z[i]
    return rates, x, y


@pytest.mark.parametrize("warmup,c_warmup,decay,polyak_beta", [(0, 0, 0.0, 0.0), (3, 2, 0.5, 0.9)])
def test_the_steps_follow_the_update_written_out(warmup, c_warmup, decay, polyak_beta):
    w = torch.nn.Parameter(torch.tensor([0.0, 0.3, -0.4], dtype=torch.float64))
    u = torch.nn.Parameter(torch.tensor([1.5, -0.7], dtype=torch.float64))
    start = (w.detach().clone(), u.detach().clone())
    opt = ScheduleFreePlus([{"params": [w]}, {"params": [u]}], weight_decay=decay, polyak_beta=polyak_beta,
                           warmup_steps=warmup, c_warmup=c_warmup, r=1.0)
    opt.train()
    rates = []
    for _ in range(6):
        opt.zero_grad()
        loss = _loss(w, u)
        loss.backward()
        rates.append(opt.step(loss.detach()))
    expected_rates, x, y = _by_hand(*start, 6, warmup or 1, c_warmup, decay, polyak_beta)
    assert rates == pytest.approx(expected_rates, rel=1e-10)
    assert rates[0] > 0 and opt.param_groups[1]["scheduled_lr"] == pytest.approx(expected_rates[-1])
    assert torch.cat([w.detach(), u.detach()]).tolist() == pytest.approx(y, rel=1e-9, abs=1e-12)
    opt.eval()  # the average in the parameters, then back
    assert torch.cat([w.detach(), u.detach()]).tolist() == pytest.approx(x, rel=1e-9, abs=1e-12)
    opt.train()
    assert torch.cat([w.detach(), u.detach()]).tolist() == pytest.approx(y, rel=1e-9, abs=1e-12)


def test_the_rate_is_zero_at_a_zero_loss_and_the_warmup_scales_it():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ScheduleFreePlus([w], warmup_steps=4)
    assert [opt.warmup_factor(t) for t in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    opt.train()
    w.grad = torch.tensor([1.0, -1.0])
    assert opt.step(torch.tensor(0.0)) == 0.0  # Polyak with f* = 0: nothing to gain, no step
    assert w.detach().tolist() == [1.0, 2.0]
    assert opt.param_groups[0]["rate_max"] == 1e-8  # the running max starts at eps, as the reference's
    assert opt.step(torch.tensor(0.0)) == 0.0 and opt.param_groups[0]["average_weight"] == pytest.approx(0.5)
    rate = opt.step(torch.tensor(3.0))
    assert rate == pytest.approx(0.75 * 3.0 / (2.0 * math.sqrt(math.pi / 2)))


def test_bad_input_is_refused_before_anything_moves():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ScheduleFreePlus([w])
    w.grad = torch.tensor([1.0, 1.0])
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step(torch.tensor(1.0))
    opt.train()
    with pytest.raises(NonFiniteError, match="loss"):
        opt.step(torch.tensor(float("nan")))
    w.grad = torch.tensor([1.0, float("inf")])
    with pytest.raises(NonFiniteError, match="gradient"):
        opt.step(torch.tensor(1.0))
    assert w.detach().tolist() == [1.0, 2.0] and opt.t == 0 and not opt.state
    for bad in (dict(lr=0.0), dict(sf_beta=1.0), dict(warmup_steps=-1)):
        with pytest.raises(ValueError):
            ScheduleFreePlus([w], **bad)


def test_the_zoo_runs_it_with_its_warmup_and_records_its_rate():
    from benchmarks.quality import optimizers as O
    from benchmarks.quality import run

    task = run.make_task("digits", "tiny")
    built = O.build("schedulefree_plus_warmup", task, task.model(0), 100)
    assert built.family == "schedulefree_plus" and built.optimizer.warmup_steps == 5 == built.optimizer.c_warmup
    assert O.build("schedulefree_plus", task, task.model(0), 100).optimizer.warmup_steps == 0
    result = run.train(task, "schedulefree_plus_warmup", seed=0)
    assert result["diverged"] is None and math.isfinite(result["final_train_loss"])
    assert len(result["step_sizes"]) == len(result["losses"]) == task.steps
    plain = run.train(task, "schedulefree_plus", seed=0)  # the same first step, before the warm-up's factor
    warmup = max(1, round(0.05 * task.steps))
    assert result["step_sizes"][0] == pytest.approx(plain["step_sizes"][0] / warmup)
    assert all(math.isfinite(s) and s >= 0 for s in result["step_sizes"])
    assert result["forwards_per_step"] == 1.0
