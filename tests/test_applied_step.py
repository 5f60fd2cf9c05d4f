"""The step and the decay every pass applies, against a float64 formula (salsa_fused.applied).

Two param groups with different ``lr``, weight decay, and a schedule whose scale is not 1;
the loss is linear (``f(w) = sum(a * w)``, so ``g = a``) and run in the two-phase form, so
the closure only sees the trial forwards (the check of loss= at w0 marked done: scripted_losses)
and its return value scripts the search. The
expected weights use the moments the optimizer stored, in float64 (SPEC section 1):

    d = g / (sqrt(v_hat) + eps)   (trials, direction "gradient"),  u = m_hat / (sqrt(v_hat) + eps)
    decay: w0 * (1 - wd * lr_g * s * eta)     on every pass of a step, plain or search
"""

import math

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.step_size import WarmupStableDecay
from tests.scripted import scripted_losses

LRS = (1.0, 0.5)
WD = 0.1
GROWTH, BACKTRACK = 1.1, 0.8
BETAS, EPS = (0.9, 0.999), 1e-8


class FixedSchedule:
    """A constant scale; searches on or off."""

    def __init__(self, scale: float, search: bool = True):
        self._scale, self._search = scale, search

    def scale(self, step: int) -> float:
        return self._scale

    def searches(self, step: int) -> bool:
        return self._search


def make(schedule, restore="copy", level=0.2):
    torch.manual_seed(0)
    weights = [torch.randn(7, dtype=torch.float32, requires_grad=True) for _ in LRS]
    slopes = [torch.randn(7, dtype=torch.float32) for _ in LRS]
    groups = [{"params": [w], "lr": lr} for w, lr in zip(weights, LRS)]
    opt = FusedSaLSa(groups, backend="torch", weight_decay=WD, init_step_size=level, growth=GROWTH,
                     backtrack=BACKTRACK, betas=BETAS, eps=EPS, restore=restore, schedule=schedule)
    return scripted_losses(opt), weights, slopes


def backward(weights, slopes, zero=False):
    for w in weights:
        w.grad = None
    loss = sum((w * a).sum() for w, a in zip(weights, slopes))
    if zero:  # value 0 with the same gradient: the search's guard fails (0.1.0 skips on f0 == 0)
        loss = loss - loss.detach()
    loss.backward()
    return loss


def directions(opt, w, step):
    """(d along the gradient, u along m_hat) in float64 from the stored moments after ``step``."""
    state = opt.state[w]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    precond = 1 / ((v / (1 - BETAS[1] ** (step + 1))).sqrt() + EPS)
    return w.grad.double() * precond, m / (1 - BETAS[0] ** (step + 1)) * precond


def expected(w0, lr, scale, level, step, direction):
    return w0.double() * (1 - WD * lr * scale * level) - step * direction


def close(actual, want):
    torch.testing.assert_close(actual.double(), want, rtol=2e-6, atol=1e-7)


def test_plain_step_applies_the_scaled_step_and_decay():
    opt, weights, slopes = make(FixedSchedule(0.3, search=False))
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes)
    eta = opt.step_size
    reported = opt.effective_step_sizes
    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(lambda: pytest.fail("a plain step runs no trial"), loss=loss)
    for w, start, lr, step_size in zip(weights, w0, LRS, reported):
        _, u = directions(opt, w, 1)
        assert step_size == pytest.approx(lr * 0.3 * eta * GROWTH, rel=1e-12)
        close(w, expected(start, lr, 0.3, eta, lr * 0.3 * eta * GROWTH, u))


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_first_trial_probes_the_level_and_the_accepted_trial_is_scaled(restore):
    opt, weights, slopes = make(FixedSchedule(0.3), restore)
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes)
    eta = opt.step_size
    seen = []

    def closure():
        seen.append([w.detach().clone() for w in weights])
        return loss.detach().clone()  # f1 == f0: accepted

    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(closure, loss=loss)
    assert len(seen) == 1
    for trial_w, w, start, lr in zip(seen[0], weights, w0, LRS):
        d, _ = directions(opt, w, 1)
        close(trial_w, expected(start, lr, 0.3, eta, lr * eta * GROWTH, d))
        close(w, expected(start, lr, 0.3, eta, lr * 0.3 * eta * GROWTH, d))


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_retrial_backtracks_from_the_same_decayed_start(restore):
    opt, weights, slopes = make(FixedSchedule(0.3), restore)
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes)
    eta = opt.step_size
    seen = []

    def closure():
        seen.append([w.detach().clone() for w in weights])
        return loss.detach() + (1e3 if len(seen) == 1 else 0.0)  # reject the first trial

    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(closure, loss=loss)
    assert len(seen) == 2
    second = eta * GROWTH * BACKTRACK
    for trial_w, w, start, lr in zip(seen[1], weights, w0, LRS):
        d, _ = directions(opt, w, 1)
        close(trial_w, expected(start, lr, 0.3, eta, lr * second, d))
        close(w, expected(start, lr, 0.3, eta, lr * 0.3 * second, d))


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_restore_puts_back_the_weights_after_decayed_trials(restore):
    opt, weights, slopes = make(FixedSchedule(0.3), restore)
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss.detach() + 1e3

    with pytest.raises(KeyboardInterrupt):
        opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
        opt.step(closure, loss=loss)
    for w, start in zip(weights, w0):
        if restore == "copy":
            assert torch.equal(w.detach(), start)
        else:
            close(w, start.double())


def test_guard_failed_search_moves_along_momentum_with_the_scaled_step_and_decay():
    opt, weights, slopes = make(FixedSchedule(0.3))
    w0 = [w.detach().clone() for w in weights]
    loss = backward(weights, slopes, zero=True)
    eta = opt.step_size
    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(lambda: pytest.fail("the guard failed: no trial"), loss=loss)
    for w, start, lr in zip(weights, w0, LRS):
        _, u = directions(opt, w, 1)
        close(w, expected(start, lr, 0.3, eta, lr * 0.3 * eta * GROWTH, u))


def test_bug_search_step_decay_follows_the_schedule():
    """Issue 15 (a): warm-up, weight decay 0.1, zero gradient: a search step shrinks the weights
    by ``1 - wd * lr * scale * eta`` as a plain step of the same schedule does (was 0.900). The level is
    given (``init_step_size``): the placeholder decays nothing before the first search
    (tests/test_training_habits.py)."""
    schedule = WarmupStableDecay(100, warmup=0.5, decay=0.2)
    w = torch.ones(4, requires_grad=True)
    opt = scripted_losses(FusedSaLSa([w], backend="torch", weight_decay=0.1, schedule=schedule, init_step_size=1.0))
    w.grad = torch.zeros(4)
    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(lambda: pytest.fail("no trial"), loss=torch.tensor(1.0))
    assert opt.num_searches == 1
    torch.testing.assert_close(w.detach(), torch.full((4,), 1 - 0.1 * schedule.scale(1)))


def test_bug_effective_step_sizes_report_the_schedule():
    """Issue 15 (b): the reported step is the applied one, 0 at the schedule's last step; past the
    end (issue 14) the schedule's last positive step (tests/test_run_length.py)."""
    schedule = WarmupStableDecay(4, warmup=0.5, decay=0.5)
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    opt = FusedSaLSa([{"params": [w], "lr": 0.5}], backend="torch", schedule=schedule)
    assert opt.applied_steps == [pytest.approx(0.5 * schedule.scale(1) * 1.0 * 1.1)]
    assert opt.effective_step_sizes == opt.applied_steps  # the earlier name, kept
    a = torch.randn(5)
    for _ in range(3):
        w.grad = None
        opt.step(lambda: (w * a).sum())  # the one-phase form runs the backward itself
    assert opt.applied_steps == opt.effective_step_sizes == [0.0]  # step 4 of 4 ends the decay on zero
    w.grad = None
    loss = (w * a).sum()
    loss.backward()
    before = w.detach().clone()
    opt.mark_forward()  # scripted losses: the caller's loss is the trials' reference
    opt.step(lambda: (w * a).sum(), loss=loss)
    assert torch.equal(w.detach(), before) and math.isfinite(opt.step_size)
    held = schedule.scale(3)
    assert held > 0 and opt.effective_step_sizes == [pytest.approx(0.5 * held * opt.step_size * 1.1)]
