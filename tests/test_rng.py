"""Random state around a search (SPEC section 1, "where we deliberately differ").

The step's first forward draws from the caller's generator as usual; every trial
forward replays exactly that state (equal dropout masks); after the step the
generator is where that one forward left it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salsa_fused import FusedSaLSa
from salsa_fused.line_search import plan_step


_X = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
_Y = _X.sum(1, keepdim=True).sin()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(32, 1))


class RecordingClosure:
    """Forward with dropout; records each call's draws and dropout mask and whether grad was on."""

    def __init__(self, model):
        self.model, self.draws, self.masks, self.grad_enabled = model, [], [], []
        self._hook = model[2].register_forward_hook(
            lambda module, inputs, output: self.masks.append(output != 0))

    def __call__(self):
        self.draws.append(torch.rand(4))
        self.grad_enabled.append(torch.is_grad_enabled())
        return F.mse_loss(self.model(_X), _Y)


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_trials_replay_the_first_forward_and_the_generator_ends_after_one_forward(restore):
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=100.0, restore=restore)
    closure = RecordingClosure(model)
    torch.manual_seed(1234)
    opt.step(closure)  # step 1 always searches; eta=100 forces several backtracks
    after_step = torch.get_rng_state()
    assert opt.last_search_trials >= 3
    assert len(closure.draws) == 1 + opt.last_search_trials
    assert closure.grad_enabled[0] and not any(closure.grad_enabled[1:])
    for draws, mask in zip(closure.draws[1:], closure.masks[1:]):
        assert torch.equal(draws, closure.draws[0])
        assert torch.equal(mask, closure.masks[0])

    one_forward = RecordingClosure(_model())
    torch.manual_seed(1234)
    one_forward()
    assert torch.equal(one_forward.draws[0], closure.draws[0])
    assert torch.equal(after_step, torch.get_rng_state())


def test_consecutive_steps_draw_as_one_forward_each():
    """Two search steps advance the generator exactly as two plain forwards do: the second
    step's first forward gets the draws a second forward would get (fresh masks)."""
    model, reference_model = _model(), _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    closure, reference = RecordingClosure(model), RecordingClosure(reference_model)
    torch.manual_seed(7)
    opt.step(closure)
    first = len(closure.draws)
    opt.zero_grad()
    opt.step(closure)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    reference()
    reference()
    assert not torch.equal(closure.draws[first], closure.draws[0])
    assert torch.equal(reference.draws[1], closure.draws[first])
    assert torch.equal(torch.get_rng_state(), after)


def test_plain_step_draws_exactly_one_forward():
    model, reference_model = _model(), _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    closure = RecordingClosure(model)
    for _ in range(300):
        if not plan_step(opt.search_state, opt.search_config).is_search:
            break
        opt.zero_grad()
        opt.step(closure)
    else:
        raise AssertionError("no plain step came up")
    calls = len(closure.draws)
    state = torch.get_rng_state()
    opt.zero_grad()
    opt.step(closure)
    assert len(closure.draws) == calls + 1
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    RecordingClosure(reference_model)()
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("zeroed", [False, True], ids=["no zero_grad", "zero_grad"])
def test_two_phase_trials_share_one_state_and_the_generator_ends_after_your_forward(zeroed):
    """Two-phase form: the optimizer did not see your forward, so the reference forward at w0 and the trials
    replay one state (all equal) and leave the generator after your forward. After zero_grad() it is the
    state found there, the draws your forward made (your gradient's masks); they replayed the draws after
    your forward, other masks: a Dropout(0.3) MLP's level fell to 2e-8 and its loss stalled at 0.40-0.51
    where a marked run reached 0.02 (an audit's finding). With neither zero_grad() nor an earlier
    two-phase step it is the state found at the step() call."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=100.0)
    closure = RecordingClosure(model)
    torch.manual_seed(99)
    if zeroed:
        opt.zero_grad()
    loss = closure()
    loss.backward()
    after_forward = torch.get_rng_state()
    opt.step(closure, loss=loss)
    assert opt.last_search_trials >= 2
    replays = closure.draws[1:]  # the reference forward, then the trials
    assert len(replays) == 1 + opt.last_search_trials
    assert all(torch.equal(d, replays[0]) for d in replays)
    assert all(torch.equal(m, closure.masks[1]) for m in closure.masks[1:])
    assert torch.equal(replays[0], closure.draws[0]) == zeroed
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_two_phase_with_mark_forward_replays_the_callers_forwards():
    """Gradient accumulation over two micro-batches with dropout: mark_forward() before the
    first one, and the trial closure (both micro-batches, in order) sees the very masks of the
    caller's forwards; afterwards the generator is where the caller's forwards left it."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=100.0)
    closure = RecordingClosure(model)

    def accumulated():
        return (closure() + closure()) / 2

    torch.manual_seed(5)
    opt.mark_forward()
    loss = 0.0
    for _ in range(2):
        micro = closure() / 2
        micro.backward()
        loss = loss + micro.detach()
    caller_draws, caller_masks = list(closure.draws), list(closure.masks)
    after_forwards = torch.get_rng_state()
    opt.step(accumulated, loss=loss)
    trials = opt.last_search_trials
    assert trials >= 2
    # the first search checks loss= with one forward at w0 (both micro-batches), replaying as the trials do
    for micro in range(2):
        assert torch.equal(closure.draws[2 + micro], caller_draws[micro])
        assert torch.equal(closure.masks[2 + micro], caller_masks[micro])
    trial_draws, trial_masks = closure.draws[4:], closure.masks[4:]
    assert len(trial_draws) == 2 * trials
    for t in range(trials):
        for micro in range(2):
            assert torch.equal(trial_draws[2 * t + micro], caller_draws[micro])
            assert torch.equal(trial_masks[2 * t + micro], caller_masks[micro])
    assert torch.equal(torch.get_rng_state(), after_forwards)
    # The mark serves one step: the next two-phase step replays the state at its call again.
    assert opt._handoff.forward_rng is None


def test_two_phase_with_dropout_trains_alike_with_and_without_a_mark():
    """Without mark_forward() the search pays its reference forward and takes the marked run's steps."""
    runs = []
    for mark in (True, False):
        model = _model()
        opt = FusedSaLSa(model.parameters(), backend="torch")
        closure = RecordingClosure(model)
        torch.manual_seed(3)
        for _ in range(30):
            opt.zero_grad()
            if mark:
                opt.mark_forward()
            loss = closure()
            loss.backward()
            opt.step(closure, loss=loss)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.num_forward_evals, opt.num_searches))
    (marked, marked_forwards, searches), (unmarked, unmarked_forwards, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(marked, unmarked))
    assert unmarked_forwards == marked_forwards + searches - 1  # the marked run's first search checks loss=


@pytest.mark.parametrize("zero", ["model.zero_grad()", "p.grad = None"])
def test_two_phase_without_the_optimizers_zero_grad_replays_from_where_the_last_step_left_the_generators(zero):
    """model.zero_grad() (or setting the gradients to None) records no random state: the trials replayed the
    state at the step() call, after your forward, other masks than your gradient's, and every search
    paid a reference forward even where your forward drew nothing (309 forwards to 232 over 78 searches, a
    helper measured). From the second step on they replay from where the last step left the generators."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=100.0)
    closure = RecordingClosure(model)
    torch.manual_seed(99)
    for step in range(2):
        if zero == "model.zero_grad()":
            model.zero_grad()
        else:
            for p in model.parameters():
                p.grad = None
        first = len(closure.draws)
        loss = closure()
        loss.backward()
        after_forward = torch.get_rng_state()
        opt.step(closure, loss=loss)
        assert torch.equal(torch.get_rng_state(), after_forward)
    replays = closure.draws[first + 1:]  # the second step's reference forward, then its trials
    assert len(replays) >= 2
    assert all(torch.equal(d, closure.draws[first]) for d in replays)
    assert all(torch.equal(m, closure.masks[first]) for m in closure.masks[first + 1:])


@pytest.mark.parametrize("form", ["one-phase", "bound, one-phase", "two-phase", "bound, two-phase"])
def test_only_a_two_phase_step_leaves_its_random_state_for_the_next(form):
    """Without zero_grad(), a two-phase step (loss=, or a closure bound with loss=) keeps where it left the
    generators for the next step's replay; a one-phase step, bound or not, has no use for it and takes no
    snapshot (a bound closure without loss= was counted as two-phase: a capture a step for nothing)."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    closure = RecordingClosure(model)
    torch.manual_seed(3)
    loss = None
    if form.endswith("two-phase"):
        loss = closure()
        loss.backward()
    if form.startswith("bound"):
        opt.bind_closure(closure, loss=loss)
        opt.step()
    elif loss is not None:
        opt.step(closure, loss=loss)
    else:
        opt.step(closure)
    kept = opt._handoff.zero_grad_rng
    assert (kept is not None) == form.endswith("two-phase")
    if kept is not None:
        assert torch.equal(kept.cpu, torch.get_rng_state())

