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


def test_kappa_zero_is_the_run_without_it_bitwise():
    runs = {}
    for name in ("pretrain_nowd", "zero"):
        if name == "zero":
            O.REGISTRY["_test_decay_per_run_zero"] = O._decay_per_run(0.0)
            name = "_test_decay_per_run_zero"
        try:
            runs[name] = runner.run_unit(("cnn_bn_digits", name, 0, "default", 12), {})["loss_trace"]
        finally:
            O.REGISTRY.pop("_test_decay_per_run_zero", None)
    assert runs["pretrain_nowd"] == runs["_test_decay_per_run_zero"] and len(runs["pretrain_nowd"]) > 0


def test_it_refuses_an_optimizer_that_decays_itself_one_without_a_schedule_and_a_bad_kappa():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="decays weights itself"):
        DecayPerRun(_optimizer(model, 10, weight_decay=0.1), [model.weight], 1.0, 10)
    with pytest.raises(ValueError, match="needs one with"):
        DecayPerRun(FusedSaLSa(model.parameters()), [model.weight], 1.0, 10)
    for kappa in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="kappa"):
            DecayPerRun(_optimizer(model, 10), [model.weight], kappa, 10)
    with pytest.raises(ValueError, match="total_steps"):
        DecayPerRun(_optimizer(model, 10), [model.weight], 1.0, 0)
