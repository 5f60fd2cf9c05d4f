"""Weight decay set by the run length (benchmarks/quality/decay_per_run.py, NOTES.md section 79): the factor of
each step, that it is applied once per step whatever the level, and its refusals."""

import pytest
import torch

from benchmarks.quality import optimizers as O
from benchmarks.quality.decay_per_run import DecayPerRun
from benchmarks.quality.zoo import runner
from salsa_fused import FusedSaLSa, presets


def _optimizer(model, steps, weight_decay=0.0):
    groups = [{"params": [model.weight], "weight_decay": weight_decay}, {"params": [model.bias], "weight_decay": 0.0}]
    return presets.from_preset(groups, "pretrain", total_steps=steps, backend="torch")


def test_a_tensor_with_no_gradient_shrinks_by_the_product_of_the_factors_and_the_level_does_not_enter():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    idle = torch.nn.Parameter(torch.ones(4))  # in no loss: only the decay moves it
    steps = 20
    opt = _optimizer(model, steps)
    opt.add_param_group({"params": [idle], "weight_decay": 0.0})
    decay = DecayPerRun(opt, [model.weight, idle], kappa=2.0, total_steps=steps)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    expected = 1.0
    for k in range(1, steps + 1):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        shape = opt.schedule.scale(k) / opt.schedule.peak
        assert decay.factor(k) == pytest.approx(1 - 2.0 * shape / steps)
        expected *= decay.factor(k)
        torch.testing.assert_close(idle.detach(), torch.full((4,), expected), rtol=1e-6, atol=0)
    assert decay.steps == steps and decay.factor(steps) == 1.0  # the cooldown's last step applies no decay


def test_the_zoo_configuration_decays_the_models_matrices_and_the_optimizer_nothing():
    from benchmarks.quality.zoo import tasks as Z
    task = Z.make("cnn_bn_digits", 0, steps=12)
    model = task.model(0)
    built = O.build("pretrain_decay_per_run", task, model, 12)
    assert {id(p) for p in built.decay.params} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert all(group["weight_decay"] == 0.0 for group in built.optimizer.param_groups)
    assert built.decay.kappa == 1.0 and built.decay.total_steps == 12


def test_the_run_differs_from_the_no_decay_run_only_when_kappa_is_above_zero():
    traces = {}
    for name, kappa in (("_test_decay_zero", 0.0), ("_test_decay_one", 1.0)):
        O.REGISTRY[name] = O._decay_per_run(kappa)
    try:
        for name in ("pretrain_nowd", "_test_decay_zero", "_test_decay_one"):
            traces[name] = runner.run_unit(("cnn_bn_digits", name, 0, "default", 12), {})["loss_trace"]
    finally:
        for name in ("_test_decay_zero", "_test_decay_one"):
            O.REGISTRY.pop(name, None)
    assert len(traces["pretrain_nowd"]) > 1 and traces["_test_decay_zero"] == traces["pretrain_nowd"]
    assert traces["_test_decay_one"][0] == traces["pretrain_nowd"][0]  # the first loss is before any decay
    assert traces["_test_decay_one"] != traces["pretrain_nowd"]


def test_it_refuses_an_optimizer_that_decays_itself_one_without_a_schedule_and_a_bad_kappa():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="decays weights itself"):
        DecayPerRun(_optimizer(model, 10, weight_decay=0.1), [model.weight], 1.0, 10)
    with pytest.raises(ValueError, match="needs one with"):
        DecayPerRun(FusedSaLSa(model.parameters()), [model.weight], 1.0, 10)
    for kappa in (-1.0, float("nan"), float("inf"), "1", True, 10.0):  # 10 of 10 steps: a factor of 0 at the peak
        with pytest.raises(ValueError, match="kappa"):
            DecayPerRun(_optimizer(model, 10), [model.weight], kappa, 10)
    for steps in (0, True, 2.0):
        with pytest.raises(ValueError, match="total_steps must be"):
            DecayPerRun(_optimizer(model, 10), [model.weight], 0.5, steps)
