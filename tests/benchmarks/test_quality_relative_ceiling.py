"""A ceiling on the applied step from the weights' scale (benchmarks/quality/relative_ceiling.py, NOTES.md
section 84): the scale it reads, that the applied step never passes it after the first step, that a ceiling
above every step changes nothing, and its refusals."""

import pytest
import torch

from benchmarks.quality import optimizers as O
from benchmarks.quality.relative_ceiling import RelativeCeiling, weight_scale
from benchmarks.quality.zoo import runner
from salsa_fused import presets


def test_weight_scale_is_the_geometric_mean_rms_of_the_nonzero_matrices():
    a, b = torch.full((2, 3), 2.0), torch.full((4, 1, 2), 0.5)
    assert weight_scale([a, b, torch.ones(5), torch.zeros(3, 3)]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs a matrix"):
        weight_scale([torch.ones(5), torch.zeros(3, 3)])


def _applied_step_after_each_step(relative, steps=30, at_peak=False, factors=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = presets.from_preset(model.parameters(), "pretrain", total_steps=steps, backend="torch")
    ceiling = RelativeCeiling(opt, relative, at_peak) if relative is not None else None
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    steps_applied, weights = [], []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        steps_applied.append(opt.applied_steps[0])
        if factors is not None:
            factors.append((opt.param_groups[0]["lr"] / opt.param_groups[0]["search_lr"],
                            opt.search_state.step_size * opt.search_config.growth * opt.schedule.peak))
        weights.append([p.detach().clone() for p in model.parameters()])
    return ceiling, steps_applied, weights


def test_the_next_applied_step_never_passes_the_ceiling_and_is_capped_only_where_it_would():
    free_ceiling, free, _ = _applied_step_after_each_step(None)
    ceiling, capped, _ = _applied_step_after_each_step(0.02)
    assert all(step <= ceiling.ceiling * (1 + 1e-9) for step in capped)
    assert max(free) > ceiling.ceiling  # the uncapped run passes it, so the cap acted
    assert capped[0] == pytest.approx(min(free[0], ceiling.ceiling))  # one step in, the runs are still alike


def test_a_ceiling_above_every_step_leaves_the_run_bitwise_unchanged():
    _, free, free_weights = _applied_step_after_each_step(None)
    _, high, high_weights = _applied_step_after_each_step(1e6)
    assert free == high
    for a, b in zip(free_weights, high_weights):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_at_peak_the_factor_caps_the_peak_at_the_current_level_and_is_fixed_once_the_level_is():
    factors = []
    ceiling, applied, _ = _applied_step_after_each_step(0.02, steps=40, at_peak=True, factors=factors)
    assert all(f == pytest.approx(min(1.0, ceiling.ceiling / peak_step)) for f, peak_step in factors)
    assert min(f for f, _ in factors) < 1.0  # it acted
    frozen = [f for f, _ in factors[int(0.2 * 40) + 1:]]  # past the search phase the level does not move
    assert len(set(frozen)) == 1
    assert max(applied) <= ceiling.ceiling * (1 + 1e-9)  # the schedule's scale never passes its peak


def test_at_peak_needs_a_schedule_with_a_peak():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="schedule with a peak"):
        RelativeCeiling(presets.from_preset(model.parameters(), "pretrain", total_steps=None, backend="torch"),
                        0.5, at_peak=True)


def test_the_zoo_configuration_caps_the_shipped_preset_at_its_scale():
    from benchmarks.quality.zoo import tasks as Z
    task = Z.make("mlp_gelu_sin", 0, steps=40)
    model = task.model(0)
    built = O.build("pretrain_relceil0.63", task, model, 40)
    assert built.ceiling.ceiling == pytest.approx(0.63 * weight_scale(model.parameters()))
    assert built.optimizer.schedule.decay_from_hold and built.optimizer.schedule.hold_scale_on_loss_rise
    row = runner.run_unit(("mlp_gelu_sin", "pretrain_relceil0.63", 0, "default", 40), {})
    assert row["diverged"] is None and row["level_peak"] <= 1.2 * built.ceiling.ceiling  # recorded as eta*growth


def test_it_refuses_a_bad_relative():
    model = torch.nn.Linear(3, 1)
    for relative in (0.0, -1.0, float("nan"), float("inf"), "1", True):
        opt = presets.from_preset(model.parameters(), "pretrain", total_steps=10, backend="torch")
        with pytest.raises(ValueError, match="relative must be"):
            RelativeCeiling(opt, relative)
