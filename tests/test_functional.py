"""The functional core (salsa_fused/functional.py) called without the class: built from a bucket,
param-group scalars and a search state by hand, it makes FusedSaLSa's steps to the bit."""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import make_next_step_plain
from salsa_fused import FusedSaLSa
from salsa_fused import functional as F
from salsa_fused.backends import torch_backend
from salsa_fused.backends.base import Bucket
from salsa_fused.distributed import SearchReduction
from salsa_fused.line_search import SearchConfig, SearchState
from salsa_fused.rules import moment_step, plan_step, resolve_rule

GROUP = dict(lr=0.5, search_lr=0.5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _loss(w, target):
    return 0.5 * ((w - target) ** 2).sum()


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_functional_steps_are_the_optimizers(restore):
    torch.manual_seed(0)
    target = torch.randn(257)
    start = torch.randn(257)
    w_class = start.clone().requires_grad_(True)
    opt = FusedSaLSa([{"params": [w_class], "lr": GROUP["lr"], "weight_decay": GROUP["weight_decay"]}],
                     backend="torch", restore=restore, always_search_steps=2)
    w = start.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
    saved = [torch.empty_like(w)] if restore == "copy" else None
    rule, config, state = resolve_rule("salsa"), SearchConfig(always_search_steps=2), SearchState()
    counts = F.DeviceCounts.zeros(torch.device("cpu"))
    kinds = []
    for i in range(8):
        if i in (4, 6):  # the interval's decision made by hand, the same on both sides
            make_next_step_plain(opt)
            state = opt.search_state
        opt.zero_grad()
        opt.step(lambda: _loss(w_class, target))
        grad = (w - target).clone()  # the gradient of _loss
        bucket = Bucket([w], [grad], [exp_avg], [exp_avg_sq], saved, torch.device("cpu"), torch.float32, 0)
        plan = plan_step(rule, state, config)
        plan.state.num_forward_evals += 1
        plan.state.num_backward_evals += 1
        # the optimizer's init_step_size is not given: its placeholder level decays nothing before the first search
        passes = F.Passes.of(torch_backend, [bucket], [GROUP], moment_step(rule, plan.state.step), 1.0,
                             state.step_size, decay_level=0.0 if state.num_searches == 0 else None)
        f0 = _loss(w, target).reshape(())
        if plan.is_search:
            state = F.search_step(passes, plan, state, f0, lambda: _loss(w, target).item(), rule=rule,
                                  config=config, search_direction="gradient", param_groups=[GROUP],
                                  counts=counts, found_inf=None, reduction=SearchReduction(), nonfinite="raise",
                                  has_saved_copy=saved is not None, device=torch.device("cpu"))
        else:
            F.plain_step(passes, plan.trial_step_size, f0, None, counts, SearchReduction())
            state = plan.state
        kinds.append(plan.is_search)
        assert torch.equal(w, w_class.detach())
        assert state == opt.search_state
    assert any(kinds) and not all(kinds)  # searches and plain steps both ran


@pytest.mark.parametrize("init_step_size, named", [(1.0, True), (1e-3, False)])
def test_the_every_trial_failed_warning_names_a_decay_that_fails_every_trial(init_step_size, named):
    """A user fine-tunes a fitted weight with weight_decay=0.1 and init_step_size=1.0: every trial shrinks it
    by 0.1 whatever the trial, so all of them fail. The warning blamed loss= (this is the one-phase form) or a
    closure returning NaN, and said nothing of the decay; it now names the shrink. At init_step_size=1e-3 it passes."""
    import warnings

    target = torch.linspace(1.0, 2.0, 16)
    w = target.clone().add_(1e-3).requires_grad_(True)
    opt = FusedSaLSa([w], weight_decay=0.1, init_step_size=init_step_size, backend="torch", max_trials=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        opt.step(lambda: _loss(w, target))
    failed = [str(x.message) for x in caught if "every trial" in str(x.message)]
    assert len(failed) == (1 if named else 0)
    if named:
        assert "shrank the weights by 1e-3 or more" in failed[0]


def test_a_search_that_ends_at_its_last_trial_reads_float16_overflow_once_per_trial(monkeypatch):
    """The weights at the accepted trial were checked in the trial loop; a reordering read them again after every
    search on float16 weights (one finiteness reduction and a host read more per search: a review's count, 21
    reads where 16 were due over 5 steps)."""
    reads = []
    gained = F._NonFiniteBefore.gained
    monkeypatch.setattr(F._NonFiniteBefore, "gained", lambda self, *a, **k: reads.append(1) or gained(self, *a, **k))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).half()
    x, y = torch.randn(16, 8).half(), torch.randn(16, 4).half()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    trials = 0
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))
        trials += opt.last_search_trials
    assert len(reads) == trials
