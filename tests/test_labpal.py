"""LABPAL (salsa_fused.labpal) against the readable reference (tests/reference/labpal.py): the same
approximations, parabola minima and updates, SGD and NSGD, with the batch-size schedule; the
multi-batch closure contract, accumulation, bit-exact resume, bad input, DDP."""

import copy
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salsa_fused.errors import NonFiniteError
from salsa_fused.labpal import LABPAL
from tests.models import tanh_mlp
from tests.reference.labpal import LABPAL as ReferenceLABPAL

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SETTINGS = dict(approximation_batches=4, sgd_steps=5, t_max=40)  # k(t) reaches 2 and 4 in 20 steps
STEPS = 20


def _model(dtype=torch.float32):
    return tanh_mlp(5, 12, 1, dtype=dtype)


def _batch(step, index, rank=0, size=16):
    generator = torch.Generator().manual_seed(10_000 * rank + 100 * step + index)
    x = torch.randn(size, 5, generator=generator)
    return x, torch.sin(2 * x.sum(1, keepdim=True))


def _closure(model, step, accumulation=1, calls=None):
    def closure(i):
        if calls is not None:
            calls.append(i)
        x, y = _batch(step, i // accumulation)
        part = len(x) // accumulation
        x, y = x[(i % accumulation) * part:][:part], y[(i % accumulation) * part:][:part]
        dtype = next(model.parameters()).dtype
        x, y = x.to(dtype), y.to(dtype)
        return torch.nn.functional.mse_loss(model(x), y)
    return closure


def _close(a, b, rel=1e-4):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def _run(opt, model, steps, accumulation=1):
    decisions = []
    for k in steps:
        opt.step(_closure(model, k, accumulation))
        decisions.append(dict(opt.last_decision))
    return decisions


@pytest.mark.parametrize("mode", ["SGD", "NSGD"])
def test_decisions_are_the_references(mode):
    """In float64: with mu = 0.01 the fit's curvature is a second difference of losses ~1e-4
    apart, so fp32 loss rounding moves s_min by ~1e-3 relative (the decisions stay the same)."""
    reference_model, model = _model(torch.float64), _model(torch.float64)
    reference = ReferenceLABPAL(list(reference_model.parameters()), mode=mode, **SETTINGS)
    for k in range(STEPS):
        reference.step(_closure(reference_model, k))
    opt = LABPAL(model.parameters(), mode=mode, **SETTINGS)
    decisions = _run(opt, model, range(STEPS))
    assert [d["kind"] for d in decisions] == [h["kind"] for h in reference.history]
    assert [d["batches"] for d in decisions] == [h["batches"] for h in reference.history]
    assert {h["batches"] for h in reference.history if h["kind"] == "update"} == {1, 2, 4}
    approximations = [(d, h) for d, h in zip(decisions, reference.history) if h["kind"] == "approximation"]
    assert len(approximations) >= 3
    for d, h in approximations:
        assert _close(d["s_min"], h["s_min"], 1e-8) and _close(d["move"], h["move"], 1e-8)
        assert all(_close(x, y, 1e-12) for x, y in zip(d["losses"], h["losses"]))
    assert any(h["s_min"] is not None for _, h in approximations)
    state = opt.labpal_state
    assert _close(state.update_step, reference.update_step, 1e-8)
    assert _close(state.learning_rate, reference.learning_rate, 1e-8)
    assert state.batches_consumed == reference.t
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_closure_is_called_for_the_batches_it_announces_and_the_counts_add_up():
    model = _model()
    opt = LABPAL(model.parameters(), **SETTINGS)
    extra_forwards = 0  # an approximation: 3n - k forwards without backward
    for k in range(STEPS):
        needed, calls = opt.batches_needed(), []
        opt.step(_closure(model, k, calls=calls))
        assert sorted(set(calls)) == list(range(needed))
        decision = opt.last_decision
        if decision["kind"] == "approximation":
            extra_forwards += 3 * decision["batches"] - decision["direction_batches"]
    state = opt.labpal_state
    assert state.num_forward_evals == state.num_backward_evals + extra_forwards
    assert state.step == STEPS


def test_accumulation_splits_each_batch_and_takes_the_same_decisions():
    whole_model, split_model = _model(torch.float64), _model(torch.float64)  # float64: see above
    whole = LABPAL(whole_model.parameters(), **SETTINGS)
    split = LABPAL(split_model.parameters(), accumulation=2, **SETTINGS)
    a = _run(whole, whole_model, range(STEPS))
    b = _run(split, split_model, range(STEPS), accumulation=2)
    assert [d["kind"] for d in a] == [d["kind"] for d in b]
    assert all(_close(x.get("s_min"), y.get("s_min"), 1e-8) for x, y in zip(a, b))
    for p, q in zip(whole_model.parameters(), split_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_resume_from_state_dict_is_bit_exact():
    model = _model()
    opt = LABPAL(model.parameters(), mode="SGD", **SETTINGS)
    _run(opt, model, range(7))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _run(opt, model, range(7, 14))
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt_b = LABPAL(resumed.parameters(), mode="SGD", **SETTINGS)
    opt_b.load_state_dict(saved_opt)
    _run(opt_b, resumed, range(7, 14))
    assert opt.labpal_state == opt_b.labpal_state
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    bad = copy.deepcopy(saved_opt)
    bad["param_groups"][0]["labpal"]["update_step"] = float("nan")
    with pytest.raises(ValueError, match="update_step must be None or a finite number"):
        opt_b.load_state_dict(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="Adam"), "mode must be one of"),
    (dict(approximation_batches=2), "approximation_batches must be >= 4"),
    (dict(sgd_steps=0), "sgd_steps must be an integer >= 1"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
    (dict(t_max=0), "t_max must be None or an integer >= 1"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LABPAL(_model().parameters(), **kwargs)


def test_bad_closures_and_non_finite_losses_leave_the_weights():
    model = _model()
    opt = LABPAL(model.parameters(), **SETTINGS)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="closure\\(i\\) runs the forward pass"):
        opt.step(None)
    with pytest.raises(TypeError, match="closure\\(0\\) must return the scalar loss"):
        opt.step(lambda i: 1.0)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        opt.step(lambda i: _closure(model, 0)(i) * float("nan"))
    fails_later = _closure(model, 0)

    def raising(i, seen=[]):  # fails on a trial point of the approximation
        seen.append(i)
        if len(seen) > 6:
            raise KeyError("no batch")
        return fails_later(i)

    with pytest.raises(KeyError):
        opt.step(raising)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert opt.labpal_state.step == 0


# ---------------------------------------------------------------------------- DDP (2 gloo ranks)
WORLD = 2


def _ddp_worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = LABPAL(model.parameters(), **SETTINGS)
        decisions = []
        for k in range(12):
            opt.step(lambda i: torch.nn.functional.mse_loss(*(lambda b: (model(b[0]), b[1]))(
                _batch(k, i, rank=rank, size=8))))
            decisions.append(dict(opt.last_decision))
        torch.save(dict(decisions=decisions, weights=[p.detach().clone() for p in model.parameters()]),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_take_the_same_decisions():
    with tempfile.TemporaryDirectory() as out_dir:
        rendezvous = tempfile.mktemp(prefix="salsa_pg_", dir=out_dir)
        mp.spawn(_ddp_worker, args=(rendezvous, out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    a, b = ranks[0]["decisions"], ranks[1]["decisions"]
    fits = [d for d in a if d["kind"] == "approximation"]
    assert len(fits) >= 2
    for x, y in zip(a, b):  # the point losses differ per rank before the average: compare the fit
        assert x["kind"] == y["kind"] and x.get("s_min") == y.get("s_min") and x.get("losses") == y.get("losses")
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(p, q)
