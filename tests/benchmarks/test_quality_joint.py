"""Section 39's joint search over the preset's constants: names, the sample, and the preset's own point."""

import pytest

from benchmarks.quality import joint
from benchmarks.quality import optimizers as O
from benchmarks.quality import run


def test_names_round_trip_and_the_sample_is_fixed_distinct_and_excludes_the_preset():
    points = joint.sample()
    names = [joint.name_of(p) for p in points]
    assert len(set(names)) == joint.SAMPLE_SIZE and joint.name_of(joint.PRESET) not in names
    assert [joint.parse(n) for n in names] == points
    assert names == [joint.name_of(p) for p in joint.sample()]
    assert joint.name_of(joint.PRESET) == "joint_b0.95_c0.5_g1.1_p2_w0.2_dm_i10"


@pytest.mark.parametrize("name, match", [
    ("joint_b0.95_c0.5_g1.1_p2_w0.2_dm", "missing"),
    ("joint_b0.95_c0.5_g1.1_p2_w0.2_dm_i10_b0.9", "once each"),
    ("joint_b0.8_c0.5_g1.1_p2_w0.2_dm_i10", "outside the space"),
    ("joint_b0.95_c0.5_g1.1_p2_w0.2_dx_i10", "outside the space"),
    ("joint_b0.95_c0.5_g1.1_p2_w0.2_dm_i4", "outside the space"),
    ("joint_bx_c0.5_g1.1_p2_w0.2_dm_i10", "outside the space"),
])
def test_malformed_names_are_refused_before_any_run(name, match):
    with pytest.raises(ValueError, match=match):
        O.known([name])


def test_the_presets_point_builds_the_shipped_preset_and_trains_bitwise_like_it():
    task = run.make_task("digits", "tiny", steps=40)
    name = joint.name_of(joint.PRESET)
    built, shipped = (O.build(n, task, task.model(0), 40) for n in (name, "pretrain_hold"))
    assert built.schedule == shipped.schedule
    assert built.optimizer.search_config == shipped.optimizer.search_config
    assert run.train(task, name, 0)["losses"] == run.train(task, "pretrain_hold", 0)["losses"]


def test_a_point_sets_each_constant():
    point = dict(b=0.9, c=0.3, g=1.2, p=3.0, w=0.3, d="g", i=3)
    task = run.make_task("digits", "tiny", steps=40)
    built = O.build(joint.name_of(point), task, task.model(0), 100)
    config = built.optimizer.search_config
    assert (config.beta3, config.c, config.growth, config.max_search_interval) == (0.9, 0.3, 1.2, 3)
    assert built.optimizer.search_direction == "gradient"
    assert (built.schedule.warmup, built.schedule.decay, built.schedule.peak) == (0.3, 0.7, 3.0)


def _row(task, length, config, seed, loss, forwards=1.2):
    return dict(task=task, length=length, config=config, seed=seed, final_train_loss=loss, val_loss=loss,
                level_mean=1e-3, forwards_per_step=forwards, diverged=None, steps=100)


def test_rank_orders_by_tasks_above_the_bound_then_geomean_and_drops_points_over_the_forwards_bound():
    a, b = (joint.name_of(dict(joint.PRESET, p=p)) for p in (1.5, 3.0))
    c = joint.name_of(dict(joint.PRESET, b=0.9))
    rows = []
    for task in ("lm_small", "gru_adding"):
        for seed in (0, 1):
            rows += [_row(task, "default", "adamw_1e-3", seed, 1.0), _row(task, "default", "adamw_3e-3", seed, 2.0),
                     _row(task, "default", "pretrain_hold", seed, 1.1)]
            rows.append(_row(task, "default", a, seed, 1.3 if task == "lm_small" else 0.5))  # one above, geomean 0.81
            rows.append(_row(task, "default", b, seed, 1.05))  # none above, geomean 1.05
            rows.append(_row(task, "default", c, seed, 0.9, forwards=1.4))  # best losses, too many forwards
    table = joint.rank(rows)
    assert [t["name"] for t in table] == [b, "pretrain_hold", a, c]
    assert table[0]["above"] == 0 and table[0]["geomean"] == pytest.approx(1.05)
    assert table[2]["above"] == 1 and table[2]["geomean"] == pytest.approx((1.3 * 0.5) ** 0.5)
    assert not table[3]["forwards_ok"]
