"""The power EMA of the weights beside a run (benchmarks/quality/weight_average.py, NOTES.md section 62): the
average it keeps, and that the zoo's run beside it is the no-length run bitwise."""

import math

import pytest
import torch

from benchmarks.quality.weight_average import PowerEMA, relative_width


def _iterates(count=9, size=5):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(size, dtype=torch.float64, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("gamma", [0, 3, 7])
def test_the_average_after_t_steps_weights_step_s_as_its_power_law_share(gamma):
    """``β_t = (1 - 1/t)^(γ+1)`` telescopes: step ``s`` weighs ``(s^(γ+1) - (s-1)^(γ+1)) / t^(γ+1)`` after ``t``
    steps (the arithmetic mean at ``γ = 0``), whatever the weights before the first step were."""
    model = torch.nn.Linear(5, 1, bias=False).double()
    ema = PowerEMA(model, gamma)
    for t, w in enumerate(_iterates(), start=1):
        with torch.no_grad():
            model.weight.copy_(w)
        ema.update()
        shares = [(s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t ** (gamma + 1) for s in range(1, t + 1)]
        expected = sum(share * x for share, x in zip(shares, _iterates()[:t]))
        torch.testing.assert_close(ema.model.weight.detach()[0], expected, rtol=1e-12, atol=1e-13)
    assert ema.steps == 9
    assert relative_width(7) == pytest.approx(0.0994, abs=1e-4)
    assert relative_width(17) == pytest.approx(0.0499, abs=1e-4)


def test_reading_the_average_leaves_the_trained_model_and_the_generator_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 1))
    ema = PowerEMA(model, 3)
    x = torch.randn(16, 4)
    ema.update()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    stats = [b.clone() for b in model.buffers()]
    generator = torch.get_rng_state()
    loss = ema.loss(lambda averaged: averaged(x).pow(2).mean())
    assert math.isfinite(loss)
    assert torch.equal(torch.get_rng_state(), generator)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert not torch.equal(ema.model[0].weight, model[0].weight)  # the average, not the trained weights
    evaluated = ema.evaluated_model()
    assert all(torch.equal(a, b) for a, b in zip(evaluated.buffers(), model.buffers()))
    with pytest.raises(ValueError, match="gamma"):
        PowerEMA(model, -1)


def test_the_zoo_run_beside_it_is_the_no_length_run_and_its_losses_are_the_averages():
    from benchmarks.quality import optimizers as O
    from benchmarks.quality import run
    from benchmarks.quality.zoo import tasks as Z

    control = run.train(Z.make("cnn_bn_digits", 0, steps=30), "salsa_recommended_nolength", seed=0)
    built = O.build("nolength_ema7", Z.make("cnn_bn_digits", 0, steps=30), torch.nn.Linear(1, 1), 30)
    assert built.ema is not None and built.optimizer.schedule is None
    averaged = run.train(Z.make("cnn_bn_digits", 0, steps=30), "nolength_ema7", seed=0)
    assert averaged["losses"] == control["losses"] and averaged["step_sizes"] == control["step_sizes"]
    assert averaged["raw_final_train_loss"] == control["final_train_loss"]
    assert math.isfinite(averaged["final_train_loss"]) and averaged["final_train_loss"] != control["final_train_loss"]
    assert math.isfinite(averaged["val_loss"]) and averaged["val_loss"] != control["val_loss"]


def test_the_preset_told_its_length_runs_beside_the_average_as_without_it():
    from benchmarks.quality import run
    from benchmarks.quality.zoo import tasks as Z

    control = run.train(Z.make("mlp_tanh_cycled", 0, steps=40), "salsa_recommended", seed=0)
    averaged = run.train(Z.make("mlp_tanh_cycled", 0, steps=40), "pretrain_ema17", seed=0)
    assert averaged["losses"] == control["losses"] and averaged["raw_final_train_loss"] == control["final_train_loss"]
    assert math.isfinite(averaged["final_train_loss"]) and averaged["final_train_loss"] != control["final_train_loss"]
