"""LRFactorSearch (salsa_fused.lr_factor) against seed 004's reference, decision for decision.

The reference (tests/reference/lr_factor.py) tries ``theta - f*lr*grad`` with plain SGD;
on torch.optim.SGD the module's trials ``w0 + f*(w1 - w0)`` are the same points, so with
the scoring batch equal to the training batch both must see the same losses and choose
the same rate (float64, to rounding). Then: other optimizers (AdamW: ``f`` times the step
it took; FusedSaLSa: the schedule scale), exact restoration, resume, bad input.
"""

import copy
import io
import math
import traceback

import pytest
import torch

from salsa_fused import FusedSaLSa, NonFiniteError
from salsa_fused.lr_factor import FACTOR_5, LRFactorSearch, factor_scores
from tests.models import tanh_mlp
from tests.reference.lr_factor import LRFactorScheduler, weighted_factor


def make_model(dtype=torch.float64, seed=0):
    return tanh_mlp(6, 16, 1, seed=seed, dtype=dtype)


def batch(k, dtype=torch.float64):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    return x, torch.sin(x[:, :2].sum(1, keepdim=True))


def loss_on(model, xy):
    x, y = xy
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("factors", [(2.0, 1.0, 0.5), FACTOR_5])
def test_sgd_matches_the_reference_decision_for_decision(factors):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    search = LRFactorSearch(opt, interval=3, factors=factors)
    decisions = 0
    for k in range(12):
        xy = batch(k)
        twin = copy.deepcopy(model)  # the reference decides from the weights before the step
        opt.zero_grad()
        loss_on(model, xy).backward()
        due = (k + 1) % 3 == 0
        lr_before = opt.param_groups[0]["lr"]
        search.step(lambda: loss_on(model, xy))
        if due:
            decisions += 1
            reference = LRFactorScheduler(twin.parameters(), lr_before, factors)
            new_lr = reference.choose(lambda: loss_on(twin, xy))
            expected = reference.history[-1]
            got = search.last_decision
            assert got["losses"] == pytest.approx(expected["losses"], rel=1e-12, abs=0)
            assert got["scores"] == pytest.approx(expected["scores"], rel=1e-9)
            assert opt.param_groups[0]["lr"] == pytest.approx(new_lr, rel=1e-12)
        else:
            assert opt.param_groups[0]["lr"] == lr_before
    assert decisions == 4 and search.scale != 1.0


def test_adamw_trials_are_multiples_of_the_step_taken_and_weights_come_back_bitwise():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}]
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1)
    search = LRFactorSearch(opt, interval=1)
    for k in range(3):
        xy = batch(k)
        opt.zero_grad()
        loss_on(model, xy).backward()
        twin, twin_opt = copy.deepcopy(model), copy.deepcopy(opt)
        twin_opt.param_groups[0]["params"] = list(twin[0].parameters())
        twin_opt.param_groups[1]["params"] = list(twin[2].parameters())
        twin_opt.state = {tp: copy.deepcopy(opt.state[p]) for tp, p in zip(twin.parameters(), model.parameters())}
        for tp, p in zip(twin.parameters(), model.parameters()):
            tp.grad = p.grad.clone()
        before = [p.detach().clone() for p in twin.parameters()]
        twin_opt.step()
        lrs = [g["lr"] for g in opt.param_groups]
        search.step(lambda: loss_on(model, xy))
        for p, tp in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, tp)  # the step AdamW took, bitwise: trial weights never left behind
        expected = []
        with torch.no_grad():
            for f in search.factors:
                probe = copy.deepcopy(twin)
                for pp, w0, w1 in zip(probe.parameters(), before, twin.parameters()):
                    pp.copy_(w0 + f * (w1 - w0))
                expected.append(float(loss_on(probe, xy)))
        assert search.last_decision["losses"] == pytest.approx(expected, rel=1e-12)
        _, factor = weighted_factor(search.factors, expected)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * factor for lr in lrs], rel=1e-12)


def test_trial_forwards_replay_one_random_state_and_leave_the_generator_after_one_forward():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = LRFactorSearch(opt, interval=1)
    draws = []

    def noisy_closure():
        draws.append(float(torch.rand(())))
        return loss_on(model, batch(0))

    opt.zero_grad()
    loss_on(model, batch(0)).backward()
    torch.manual_seed(123)
    search.step(noisy_closure)
    assert len(draws) == 3 and len(set(draws)) == 1
    after = float(torch.rand(()))
    torch.manual_seed(123)
    assert [float(torch.rand(())), float(torch.rand(()))] == [draws[0], after]


def test_fused_salsa_scales_the_applied_step_through_its_schedule():
    model = make_model(torch.float32)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    search = LRFactorSearch(opt, interval=4)
    assert search.target == "schedule"
    with pytest.raises(ValueError, match="already has an LRFactorSearch"):
        LRFactorSearch(opt, interval=4)
    for k in range(8):
        xy = batch(k, torch.float32)
        opt.zero_grad()
        search.step(lambda: loss_on(model, xy), lambda: opt.step(lambda: loss_on(model, xy)))
    assert search.last_decision is not None and search.scale != 1.0
    assert opt.schedule.scale(opt.search_state.step + 1) == search.scale
    # The next step's applied move is scale times the move of the same optimizer state at scale 1.
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    xy = batch(100, torch.float32)
    moves, scale_chosen = [], search.scale
    for scale in (scale_chosen, 1.0):
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
        opt.load_state_dict(copy.deepcopy(state))
        search.scale = scale
        opt.zero_grad()
        opt.step(lambda: loss_on(model, xy))
        moves.append(torch.cat([(p.detach() - w).reshape(-1) for p, w in zip(model.parameters(), weights)]))
    torch.testing.assert_close(moves[0], scale_chosen * moves[1], rtol=1e-5, atol=1e-8)


def _run(steps, resume_at=None):
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    search = LRFactorSearch(opt, interval=2)
    for k in range(steps):
        if k == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "search": search.state_dict()},
                       buffer)
            buffer.seek(0)
            saved = torch.load(buffer)
            model = make_model(torch.float32, seed=1)
            opt = torch.optim.AdamW(model.parameters(), lr=0.5)
            search = LRFactorSearch(opt, interval=2)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            search.load_state_dict(saved["search"])
        xy = batch(k, torch.float32)
        opt.zero_grad()
        loss_on(model, xy).backward()
        search.step(lambda: loss_on(model, xy))
    return model, opt, search


def test_resume_is_bitwise():
    straight = _run(9)
    resumed = _run(9, resume_at=5)
    for p, q in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(p, q)
    assert straight[1].param_groups[0]["lr"] == resumed[1].param_groups[0]["lr"]
    assert straight[2].state_dict() == resumed[2].state_dict()
    assert straight[2].scoring_forward_evals == resumed[2].scoring_forward_evals == 3 * 4  # 4 decisions, 3 factors


def test_scoring_forwards_are_counted_one_per_factor_and_none_at_a_decision_that_is_skipped():
    """A step that moved no weight (lr=0 here) decides nothing and runs no scoring forward; a state dict
    saved before the count was kept loads with it at 0."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    search = LRFactorSearch(opt, interval=1, factors=FACTOR_5)
    for lr in (0.0, 0.1):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        loss_on(model, batch(0)).backward()
        search.step(lambda: loss_on(model, batch(1)))
    assert search.last_decision["skipped"] is False and search.scoring_forward_evals == len(FACTOR_5)
    older = {k: v for k, v in search.state_dict().items() if k != "scoring_forward_evals"}
    search.load_state_dict(older)
    assert search.scoring_forward_evals == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(interval=0), ValueError, "interval must be an integer >= 1"),
    (dict(interval=2.0), ValueError, "interval must be an integer >= 1"),
    (dict(interval=1, factors=(1.0,)), ValueError, "at least two factors"),
    (dict(interval=1, factors=(2.0, 0.0)), ValueError, "numbers > 0 that float32 holds"),
    (dict(interval=1, factors=(2.0, math.inf)), ValueError, "numbers > 0 that float32 holds"),
    (dict(interval=1, factors=(2.0, 1e300)), ValueError, "numbers > 0 that float32 holds"),
    (dict(interval=1, factors=(2.0, 2.0, 0.5)), ValueError, "distinct"),
    (dict(interval=1, target="momentum"), ValueError, "target must be one of"),
    (dict(interval=1, target="schedule"), ValueError, "needs a FusedSaLSa"),
])
def test_bad_arguments_raise(kwargs, error, match):
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        LRFactorSearch(opt, **kwargs)


def test_bad_optimizer_and_state_dict_raise():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LRFactorSearch(object(), interval=1)
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    search = LRFactorSearch(opt, interval=2)
    good = search.state_dict()
    for bad, match in [({**good, "interval": 3}, "interval=3"), ({**good, "factors": [4.0, 1.0]}, "factors"),
                       ({**good, "calls": -1}, "calls"), ({**good, "scale": math.nan}, "scale"),
                       ({**good, "scoring_forward_evals": 1.5}, "scoring_forward_evals"),
                       ({k: v for k, v in good.items() if k != "target"}, "lacks 'target'")]:
        with pytest.raises(ValueError, match=match):
            search.load_state_dict(bad)
    assert search.state_dict() == good


_A_LOSS_COMPUTED_BEFORE = torch.tensor(0.5)


@pytest.mark.parametrize("closure_value, error, match", [
    (lambda: torch.ones(2), ValueError, "loss of one element"),
    (lambda: _A_LOSS_COMPUTED_BEFORE, RuntimeError, "same loss tensor at two factors"),  # every factor ties
    (lambda: "loss", TypeError, "scalar tensor or a real number"),
    (lambda: torch.tensor(1), TypeError, "floating-point"),
])
def test_bad_closure_output_leaves_the_optimizer_step_and_rate(closure_value, error, match):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = LRFactorSearch(opt, interval=1)
    opt.zero_grad()
    loss_on(model, batch(0)).backward()
    expected = [p.detach().clone().add_(p.grad, alpha=-0.1) for p in model.parameters()]  # SGD's own form
    with pytest.raises(error, match=match):
        search.step(closure_value)
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)
    assert opt.param_groups[0]["lr"] == 0.1 and search.last_decision is None and search.scale == 1.0


def test_a_closure_rewriting_one_static_buffer_is_scored_as_fresh_losses():
    """CUDA graphs return each replay's loss in the same static buffer: a factor's loss there holds
    that factor's value, and scores as a fresh tensor would, be it a view of the buffer or the buffer
    itself, the same tensor object at every call (as CUDA graph trees return it: refused as "the same
    loss tensor at two factors" until its value was read too)."""
    decisions = []
    for static in (None, "view", "same tensor"):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        search = LRFactorSearch(opt, interval=1)
        buffer = torch.zeros(1, dtype=torch.float64)

        def closure():
            value = loss_on(model, batch(1))
            if static is None:
                return value
            buffer.detach_().copy_(value)
            return buffer[0] if static == "view" else buffer

        opt.zero_grad()
        loss_on(model, batch(0)).backward()
        search.step(closure)
        decisions.append(search.last_decision)
    for other in decisions[1:]:
        assert decisions[0]["losses"] == other["losses"] and decisions[0]["factor"] == other["factor"]


def test_a_static_buffer_whose_factors_tie_is_scored_as_fresh_losses():
    """The same static buffer at every call whose factors' losses tie bitwise (rounded to bfloat16 here: the
    step moves them by less) was refused as "the same loss tensor at two factors". The buffer is now set to
    NaN and the closure run once more: its forward writes there again, and the decision is a fresh tensor's.
    That forward is counted in scoring_forward_evals (it was counted nowhere), and runs once per tied factor:
    the third factor ties both earlier ones, and one forward tells the buffer's memory apart for both (it ran
    once per tied earlier loss: 6 calls). A closure returning a tensor computed before is still refused, its
    value given back."""
    decisions, calls = [], []
    for static in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        search = LRFactorSearch(opt, interval=1)
        buffer = torch.zeros((), dtype=torch.float64)
        calls.append(0)

        def closure():
            calls[-1] += 1
            value = loss_on(model, batch(1)).to(torch.bfloat16).to(torch.float64)
            return buffer.copy_(value) if static else value

        opt.zero_grad()
        loss_on(model, batch(0)).backward()
        search.step(closure)
        decisions.append(search.last_decision)
        assert search.scoring_forward_evals == calls[-1]
    assert len(set(decisions[0]["losses"])) == 1 and decisions[0] == decisions[1]
    assert calls == [3, 3 + 2]  # a tie at the second factor and one at the third: one forward more each
    before = _A_LOSS_COMPUTED_BEFORE.clone()
    with pytest.raises(RuntimeError, match="same loss tensor at two factors"):
        search.step(lambda: _A_LOSS_COMPUTED_BEFORE)
    assert torch.equal(_A_LOSS_COMPUTED_BEFORE, before)


def test_non_finite_trial_losses():
    scores, factor = factor_scores((4.0, 1.0, 0.5), [math.inf, 1.0, 2.0])
    assert scores[0] == 0.0 and factor == pytest.approx(math.exp((math.exp(1 / math.sqrt(2)) * 0 + math.exp(
        -1 / math.sqrt(2)) * math.log(0.5)) / (math.exp(1 / math.sqrt(2)) + math.exp(-1 / math.sqrt(2)))))
    with pytest.raises(NonFiniteError, match="every trial loss"):
        factor_scores((2.0, 1.0), [math.nan, math.inf])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = LRFactorSearch(opt, interval=1)
    opt.zero_grad()
    loss_on(model, batch(0)).backward()
    with pytest.raises(NonFiniteError) as caught:
        search.step(lambda: torch.tensor(math.nan, dtype=torch.float64))
    assert opt.param_groups[0]["lr"] == 0.1
    report = "".join(traceback.format_exception(type(caught.value), caught.value, caught.value.__traceback__))
    assert "the optimizer's step (call 1) was taken" in report  # a caller must not retake the step


WORLD = 2


def _ddp_worker(rank, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    search = LRFactorSearch(opt, interval=2)
    lrs = []
    for k in range(6):
        x, y = batch(10 * k + rank)  # every rank its own batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        search.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        lrs.append(opt.param_groups[0]["lr"])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [torch.tensor(lrs)])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"gathered": gathered, "lrs": lrs}, f"{out_dir}/lr_factor_ddp.pt")


def test_ddp_ranks_choose_the_same_rate_as_one_process_on_the_global_batch(tmp_path):
    """Losses averaged over the ranks: every rank picks the same rate, the one a single process
    picks on the concatenated batch (equal batch sizes: the global mean is the ranks' mean)."""
    from tests.gloo_group import spawn_in_gloo_group

    spawn_in_gloo_group(_ddp_worker, str(tmp_path), WORLD)
    result = torch.load(tmp_path / "lr_factor_ddp.pt")
    assert torch.equal(result["gathered"][0], result["gathered"][1])
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    search = LRFactorSearch(opt, interval=2)
    lrs = []
    for k in range(6):
        parts = [batch(10 * k + r) for r in range(WORLD)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        search.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        lrs.append(opt.param_groups[0]["lr"])
    assert result["lrs"] == pytest.approx(lrs, rel=1e-9)
    assert len(set(lrs)) > 1  # decisions were taken and moved the rate


def _batch_norm_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("how", ["FusedSaLSa model=", "buffers="])
def test_scoring_forwards_leave_batch_norm_statistics_where_the_step_left_them(how):
    """The scoring forwards (one per factor) used to move the running statistics len(factors) more times."""
    net, twin = _batch_norm_net(), _batch_norm_net()
    xy = batch(0, torch.float32)
    runs = []
    for model in (net, twin):
        if how == "buffers=":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            search = LRFactorSearch(opt, interval=1, buffers=model.buffers()) if model is net else None
        else:
            opt = FusedSaLSa(model.parameters(), backend="torch", model=model)
            search = LRFactorSearch(opt, interval=1) if model is net else None
        runs.append((model, opt, search))
    for model, opt, search in runs:
        opt.zero_grad()
        if isinstance(opt, FusedSaLSa):
            step = lambda m=model, o=opt: o.step(lambda: loss_on(m, xy))  # noqa: E731
        else:
            loss_on(model, xy).backward()
            step = opt.step
        if search is None:
            step()
        else:
            search.step(lambda m=model: loss_on(m, xy), step)
            assert search.last_decision["losses"]
    for a, b in zip(net.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_a_step_that_moved_nothing_decides_nothing():
    """A skipped step (GradScaler, a NaN loss): every factor scores alike, and the score-weighted
    geometric mean of FACTOR_5 (0.87) used to change the rate on no evidence."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = LRFactorSearch(opt, interval=1, factors=FACTOR_5)
    xy = batch(0)
    search.step(lambda: loss_on(model, xy), lambda: None)  # the optimizer's step skipped
    assert search.last_decision["skipped"] and search.last_decision["factor"] == 1.0
    assert search.scale == 1.0 and opt.param_groups[0]["lr"] == 0.1
    opt.zero_grad()
    loss_on(model, xy).backward()
    search.step(lambda: loss_on(model, xy))
    assert not search.last_decision["skipped"] and search.scale != 1.0


def test_a_schedule_assigned_after_the_factor_search_wrapped_it_is_refused():
    model = make_model(torch.float32)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    search = LRFactorSearch(opt, interval=2)
    opt.schedule = None
    weights = [p.detach().clone() for p in model.parameters()]
    closure = lambda: loss_on(model, batch(0, torch.float32))  # noqa: E731
    with pytest.raises(RuntimeError, match="schedule was replaced after LRFactorSearch wrapped it"):
        search.step(closure, lambda: opt.step(closure))
    assert search.calls == 0 and all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


_DECISION = {"call": 1, "losses": [0.5, 0.4], "scores": [0.5, 0.4], "factor": 2.0, "scale": 1.0, "skipped": False}


@pytest.mark.parametrize("decision", [3, "x", {"factor": 2.0},  # values checked too, as StepSizeBeam's are:
                                      {"call": "yesterday", "factor": math.nan, "scale": -3.0, "losses": "x"},
                                      {**_DECISION, "call": 4}, {**_DECISION, "factor": math.nan},
                                      {**_DECISION, "scale": 2.0}, {**_DECISION, "losses": "x"},
                                      {**_DECISION, "skipped": 1}, {**_DECISION, "x": 1}])
def test_a_state_dict_whose_last_decision_is_not_a_decision_is_refused(decision):
    search = LRFactorSearch(torch.optim.SGD(make_model().parameters(), lr=0.1), interval=1)
    saved = {**search.state_dict(), "calls": 1}
    search.load_state_dict({**saved, "last_decision": _DECISION})  # one a call writes
    search = LRFactorSearch(torch.optim.SGD(make_model().parameters(), lr=0.1), interval=1)
    with pytest.raises(ValueError, match="last_decision must be None or a decision"):
        search.load_state_dict({**saved, "last_decision": decision})
    assert search.last_decision is None and search.calls == 0


def test_factors_that_are_not_a_sequence_are_named():
    with pytest.raises(TypeError, match="factors must be a sequence of multipliers"):
        LRFactorSearch(torch.optim.SGD(make_model().parameters(), lr=0.1), interval=1, factors=0.5)


def test_a_closed_form_scheduler_keeps_the_decisions_through_the_search_scale():
    """LambdaLR writes lr = base * lambda(k) at every step: the factor search's decisions on AdamW's lr
    were overwritten, silently (a new user's trial). The documented recipe, the search's product of
    decisions in the lambda, keeps every one: lr / base == search.scale after each scheduler step."""
    from torch.optim.lr_scheduler import LambdaLR

    torch.manual_seed(0)
    model = tanh_mlp(4, 8, 1, seed=0)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    search = LRFactorSearch(adamw, interval=2)
    scheduler = LambdaLR(adamw, lambda k: search.scale * 0.5 ** (k // 3))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for k in range(8):
        adamw.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        search.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        scheduler.step()
        assert adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * search.scale * 0.5 ** ((k + 1) // 3), rel=1e-12)
    assert search.calls == 8 and search.last_decision["call"] == 8 and search.scale != 1.0


def test_the_factors_are_scored_at_their_own_weights_inside_an_autocast_region():
    """Called inside an autocast region (the step's own forward there), each factor's forward read autocast's
    cached bf16 copy of the weights from that forward: every factor scored the loss before the step alike."""
    model = make_model(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    search = LRFactorSearch(opt, interval=1)
    xy = batch(0, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_on(model, xy).float().backward()
        search.step(lambda: loss_on(model, xy).float())
        after = model(xy[0])
    losses = search.last_decision["losses"]
    assert len(set(losses)) == len(losses)  # each factor's own weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(after, model(xy[0]))  # a forward after the step reads where it left the weights


def test_around_a_fused_salsa_the_step_must_be_given_or_nothing_would_step():
    model = make_model(torch.float32)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    search = LRFactorSearch(opt, interval=2)
    closure = lambda: loss_on(model, batch(0, torch.float32))  # noqa: E731
    with pytest.raises(TypeError, match="a FusedSaLSa steps through its own closure: pass it as optimizer_step"):
        search.step(closure)
    assert search.calls == 0 and opt.search_state.step == 0
    search.step(closure, lambda: opt.step(closure))
    assert search.calls == 1 and opt.search_state.step == 1


def test_numpy_factors_are_python_floats():
    import numpy as np
    search = LRFactorSearch(torch.optim.SGD(make_model().parameters(), lr=0.1), interval=1,
                            factors=(np.float32(0.5), np.float64(1.0), 2))
    assert search.factors == (0.5, 1.0, 2.0) and all(type(f) is float for f in search.factors)
