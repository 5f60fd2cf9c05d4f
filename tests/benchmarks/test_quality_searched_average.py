"""Schedule-free averaging of FusedSaLSa's steps (benchmarks/quality/searched_average.py, NOTES.md
section 60): ``y`` follows the update, ``x`` is the weighted average of the ``z`` iterates, and the modes
swap the weights without changing them."""

import math

import pytest
import torch

from benchmarks.quality.searched_average import ScheduleFreeAverage
from salsa_fused import FusedSaLSa

TARGET = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)


def _closure(w):
    return lambda: 0.5 * ((w - TARGET) ** 2).sum() + 0.1 * (w ** 4).sum()


def _run(beta, steps=12, **kwargs):
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = FusedSaLSa([w], backend="torch", betas=(0.0, 0.999), **kwargs)
    average = ScheduleFreeAverage(opt, beta=beta)
    ys, levels = [], []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(_closure(w))
        ys.append(w.detach().clone())
        levels.append(average.applied_level())
    return w, opt, average, ys, levels


def test_with_beta_0_the_weights_are_the_optimizers_own_and_x_their_weighted_average():
    w, opt, average, ys, levels = _run(beta=0.0, init_step_size=0.01)  # a level that rises: weights that differ
    plain = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    plain_opt = FusedSaLSa([plain], backend="torch", betas=(0.0, 0.999), init_step_size=0.01)
    for y in ys:
        plain_opt.zero_grad()
        plain_opt.step(_closure(plain))
        assert torch.equal(plain.detach(), y)  # y = z: the averaging never feeds back
    assert opt.search_state.num_searches > 1 and levels[-1] > 2 * levels[0]
    weights, level_max = [], 0.0
    for level in levels:
        level_max = max(level_max, level)
        weights.append(level_max ** 2)
    expected = sum(wt * y for wt, y in zip(weights, ys)) / sum(weights)
    average.eval()
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-14)


def test_y_interpolates_x_and_z_and_the_modes_swap_the_weights():
    w, opt, average, ys, _ = _run(beta=0.9)
    assert torch.equal(w.detach(), ys[-1])
    torch.testing.assert_close(ys[-1], 0.9 * average.x[0] + 0.1 * average.z[0], rtol=1e-12, atol=1e-14)
    assert not torch.equal(average.x[0], average.z[0])
    average.eval()
    assert torch.equal(w.detach(), average.x[0])
    step = opt.search_state.step
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="eval"):
        opt.step(_closure(w))
    assert torch.equal(w.detach(), average.x[0]) and opt.search_state.step == step
    average.train()
    assert torch.equal(w.detach(), ys[-1])
    assert float(_closure(w.detach())()) < float(_closure(torch.zeros(4, dtype=torch.float64))())


def test_the_zoo_builds_it_without_a_run_length_and_evaluates_the_average():
    from benchmarks.quality import optimizers as O
    from benchmarks.quality import run

    task = run.make_task("digits", "tiny")
    for name, beta1 in (("nolength_sf", 0.9), ("nolength_sf_b0", 0.0)):
        built = O.build(name, task, task.model(0), 100)
        assert built.family == "fused" and built.optimizer.schedule is None and built.average is not None
        assert built.optimizer.param_groups[0]["betas"][0] == beta1
    matched = O.build("nolength_sf_ymatch", task, task.model(0), 100).optimizer
    assert [g["lr"] for g in matched.param_groups] == [pytest.approx(10.0)] * len(matched.param_groups)
    assert [g["search_lr"] for g in matched.param_groups] == [1.0] * len(matched.param_groups)
    result = run.train(task, "nolength_sf_b0", seed=0)
    assert result["diverged"] is None and math.isfinite(result["final_train_loss"]) and math.isfinite(result["val_loss"])
    assert len(result["step_sizes"]) == len(result["losses"]) == task.steps
