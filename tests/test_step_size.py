"""The schedule of salsa_fused.step_size (WarmupStableDecay), and the optimizer's checks of
``search_rule`` and ``schedule``."""

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.step_size import Cooldown, WarmupStableDecay


def test_warmup_stable_decay_values():
    schedule = WarmupStableDecay(100, warmup=0.1, decay=0.2, final=0.0)
    assert schedule.warmup_steps == 10 and schedule.decay_start == 80
    assert schedule.scale(1) == pytest.approx(0.1)
    assert schedule.scale(10) == 1.0 and schedule.scale(50) == 1.0 and schedule.scale(80) == 1.0
    assert schedule.scale(90) == pytest.approx(0.5)
    assert schedule.scale(100) == 0.0  # the run ends on final; past it, its last positive scale:
    assert schedule.scale(101) == schedule.scale(150) == schedule.scale(99) == pytest.approx(0.05)
    assert schedule.searches(80) and not schedule.searches(81)
    assert WarmupStableDecay(10, warmup=0.0, decay=0.5, final=0.2).scale(1) == 1.0
    assert WarmupStableDecay(10, warmup=0.0, decay=0.5, final=0.2).scale(10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="step"):
        schedule.scale(0)


def test_warmup_stable_decay_peak_scales_every_phase_and_one_is_exact():
    shape = WarmupStableDecay(100, warmup=0.2, decay=0.8)
    peaked = WarmupStableDecay(100, warmup=0.2, decay=0.8, peak=2.0)
    assert peaked.decay_start == peaked.warmup_steps == 20  # no stable phase: search in the warmup only
    assert peaked.scale(10) == pytest.approx(1.0) and peaked.scale(20) == 2.0
    assert peaked.scale(60) == pytest.approx(1.0) and peaked.scale(100) == 0.0
    assert peaked.scale(101) == peaked.scale(99) == pytest.approx(2.0 / 80)
    assert peaked.searches(20) and not peaked.searches(21)
    for k in range(1, 120):  # peak 1 (the default) is the unpeaked schedule bit for bit
        assert WarmupStableDecay(100, 0.05, 0.5, peak=1.0).scale(k) == WarmupStableDecay(100, 0.05, 0.5).scale(k)
        assert peaked.scale(k) == 2.0 * shape.scale(k)


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=0), "total_steps"), (dict(total_steps=10.5), "total_steps"),
    (dict(total_steps=10, peak=0.0), "peak"), (dict(total_steps=10, peak=float("inf")), "peak"),
    (dict(total_steps=10, peak="2"), "peak"),
    (dict(total_steps=10, warmup=-0.1), "warmup"), (dict(total_steps=10, warmup=0.6, decay=0.6), "warmup \\+ decay"),
    (dict(total_steps=10, warmup="0.1"), "warmup"), (dict(total_steps=10, decay=None), "decay"),
    (dict(total_steps=10, final=True), "final"), (dict(total_steps=10, final=float("nan")), "final")])
def test_warmup_stable_decay_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupStableDecay(**kwargs)


def test_optimizer_rejects_bad_rule_and_schedule():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="search_rule"):
        FusedSaLSa([w], search_rule=3)
    with pytest.raises(TypeError, match="schedule"):
        FusedSaLSa([w], schedule=object())


def test_numpy_and_fraction_fractions_are_accepted_as_python_floats():
    import fractions

    import numpy as np
    schedule = WarmupStableDecay(100, warmup=np.float32(0.25), decay=fractions.Fraction(1, 5), final=np.float64(0.1),
                                 peak=np.float32(2.0))
    assert (schedule.warmup, schedule.decay, schedule.final, schedule.peak) == (0.25, 0.2, 0.1, 2.0)
    assert all(type(v) is float for v in (schedule.warmup, schedule.decay, schedule.final, schedule.peak))
    assert type(Cooldown(0, 10, final=np.float32(0.5)).final) is float
    with pytest.raises(ValueError, match="warmup must be a number in \\[0, 1\\], got True"):
        WarmupStableDecay(100, warmup=True)


@pytest.mark.parametrize("decay", [0.0, 0.2, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999])
def test_shortest_total_steps_is_the_fewest_that_leave_a_step_before_the_cooldown(decay):
    shortest = WarmupStableDecay(1000, warmup=0.0, decay=decay).shortest_total_steps()
    assert WarmupStableDecay(shortest, warmup=0.0, decay=decay).decay_start >= 1
    assert shortest == 1 or WarmupStableDecay(shortest - 1, warmup=0.0, decay=decay).decay_start < 1
