"""The quality suite end to end at its tiny size: every task, each optimizer family, a few steps."""

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from benchmarks.quality import run


def test_quality_suite_runs_end_to_end(tmp_path):
    out = str(tmp_path)
    names = "salsa_faithful,salsa_recommended,prodigy,schedulefree,salsa_published"
    code = run.main(["--size", "tiny", "--tasks", "gpt,digits,seqcls,diabetes", "--optimizers", names,
                     "--adamw-lrs", "1e-3,1e-2", "--steps", "12", "--out", out, "--threads", "1"])
    assert code == 0
    with open(os.path.join(out, "summary.json")) as handle:
        tables = json.load(handle)
    assert set(tables) == {"gpt", "digits", "seqcls", "diabetes"}
    for task, table in tables.items():
        for name in names.split(",") + ["adamw_1e-3", "adamw_1e-2"]:
            row = table[name]
            assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["val_loss"]), (task, name)
            assert row["forwards_per_step"] >= 1.0
        assert table["salsa_faithful"]["forwards_per_step"] > 1.0  # the first steps all search
        assert os.path.exists(os.path.join(out, f"{task}.png"))
        with open(os.path.join(out, f"{task}.json")) as handle:
            runs = json.load(handle)["runs"]
        faithful = runs["salsa_faithful"][0]
        assert len(faithful["losses"]) == 12 and faithful["searches"]
        # same weights and batches for every optimizer: the first loss (before any step) agrees
        firsts = {n: r[0]["losses"][0] for n, r in runs.items()}
        assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| salsa_recommended |" in summary


def test_screen_shapes_by_name_build_the_package_schedule():
    from benchmarks.quality import optimizers as O
    from salsa_fused.step_size import WarmupStableDecay

    task = run.make_task("digits", "tiny")
    assert O.build("shape_w0.2_x2_d0.8", task, task.model(0), 400).schedule == \
        WarmupStableDecay(400, 0.2, 0.8, 0.0, peak=2.0)
    assert O.build("shape_w0.05_x1.5_d0.5_f0.1", task, task.model(0), 400).schedule == \
        WarmupStableDecay(400, 0.05, 0.5, 0.1, peak=1.5)
    assert O.build("shape_w0.2_x2_d0.8", task, task.model(0), 400).optimizer.search_config.beta3 == 0.99
    built = O.build("shape_w0.15_x2.5_d0.85_b0.95", task, task.model(0), 400)
    assert built.schedule == WarmupStableDecay(400, 0.15, 0.85, 0.0, peak=2.5)
    assert built.optimizer.search_config.beta3 == 0.95


def test_search_constant_ablations_change_only_their_constant():
    from benchmarks.quality import optimizers as O

    task = run.make_task("digits", "tiny")
    shipped = O.build("salsa_recommended", task, task.model(0), 400)
    for name, field, value in [("rec_growth1.2", "growth", 1.2), ("rec_always0", "always_search_steps", 0),
                               ("rec_every_step", "adaptive_interval", False)]:
        built = O.build(name, task, task.model(0), 400)
        assert getattr(built.optimizer.search_config, field) == value
        assert built.optimizer.search_config == replace(shipped.optimizer.search_config, **{field: value})
        assert built.schedule == shipped.schedule


def test_knots_schedule_matches_warmup_stable_decay():
    """The piecewise-linear screen schedule (``Knots``, the form the section 6 screen ran the
    ``shape_*`` names through, and the ``ramp*`` entries still use) is the same multiplier and
    freeze as ``WarmupStableDecay`` where both can express the shape."""
    from benchmarks.quality.optimizers import Knots
    from salsa_fused.step_size import WarmupStableDecay

    for knots, search_until, reference in [
            (((0, 0), (0.2, 2), (1, 0)), 0.2, WarmupStableDecay(400, 0.2, 0.8, peak=2.0)),
            (((0, 0), (0.05, 1), (0.5, 1), (1, 0)), 0.5, WarmupStableDecay(400, 0.05, 0.5)),
            (((0, 0), (0.1, 1.5), (0.3, 1.5), (1, 0.15)), 0.3, WarmupStableDecay(400, 0.1, 0.7, 0.1, peak=1.5))]:
        schedule = Knots(400, knots, search_until)
        for k in range(1, 401):
            assert schedule.scale(k) == pytest.approx(reference.scale(k), abs=1e-12), (knots, k)
            assert schedule.searches(k) == reference.searches(k), (knots, k)
    with pytest.raises(ValueError, match="knot fractions"):
        Knots(400, ((0, 0), (0.5, 1), (0.4, 1), (1, 0)), 0.5)


@pytest.mark.parametrize("name, match", [("shape_w0.2_x2_d0.9", "w \\+ d"), ("shape_w0.2_x2", "bad shape"),
                                         ("shape_w0.2_x2_d0.8_q1", "unknown fields"),
                                         ("shape_w0.2_x2_d0.8_b1", "b < 1"),
                                         ("nope", "unknown optimizer")])
def test_screen_rejects_bad_optimizer_names_before_running(tmp_path, name, match):
    with pytest.raises(ValueError, match=match):
        run.main(["--size", "tiny", "--tasks", "digits", "--optimizers", name, "--adamw-lrs", "",
                  "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_long_warmup_adamw_check_warms_up_over_a_fifth():
    from benchmarks.quality import optimizers as O

    task = run.make_task("digits", "tiny")
    built = O.build("adamw20_1e-2", task, task.model(0), 100)
    assert built.family == "torch"
    rates = []
    for _ in range(25):
        rates.append(built.optimizer.param_groups[0]["lr"])
        built.optimizer.step()
        built.scheduler.step()
    assert rates[0] == pytest.approx(1e-2 / 20) and rates[19] == pytest.approx(1e-2)


def test_grid_extension_trains_each_seed_on_its_own_batches(tmp_path):
    """A rate added because the best AdamW sat at the end of the grid is the same run, seed for
    seed, as that rate asked for directly."""
    common = ["--size", "tiny", "--tasks", "digits", "--seeds", "0,1", "--steps", "10", "--no-plots",
              "--threads", "1", "--optimizers", ""]
    assert run.main([*common, "--adamw-lrs", "1e-4,3e-4", "--out", str(tmp_path / "grid")]) == 0
    assert run.main([*common, "--adamw-lrs", "9e-4", "--out", str(tmp_path / "direct")]) == 0
    with open(tmp_path / "grid" / "digits.json") as handle:
        extended = json.load(handle)["runs"]["adamw_9e-4"]
    with open(tmp_path / "direct" / "digits.json") as handle:
        direct = json.load(handle)["runs"]["adamw_9e-4"]
    assert [r["seed"] for r in extended] == [0, 1]
    assert [r["losses"] for r in extended] == [r["losses"] for r in direct]
    assert extended[0]["losses"] != extended[1]["losses"]


@pytest.mark.parametrize("name", ["gpt", "digits", "seqcls", "teacher"])
def test_mid_size_tasks_build_and_give_a_finite_loss(name):
    """The "mid" size (larger models, 1000 steps) builds: a transfer check of the CPU-size choice."""
    task = run.make_task(name, "mid", seed=0, steps=2)
    assert task.steps == 2 and len(task.batches) == 2
    model = task.model(0)
    cpu = sum(p.numel() for p in run.make_task(name, "cpu", seed=0, steps=2).model(0).parameters())
    assert sum(p.numel() for p in model.parameters()) > cpu
    with torch.no_grad():
        assert math.isfinite(float(task.loss(model, task.batches[0])))
    assert run.make_task(name, "mid").steps == 1000


def test_the_end_learned_late_runs_the_no_length_preset_then_the_documented_cooldown():
    """Section 59: bitwise the no-length preset until the end is known, then Cooldown(start, 20%)."""
    from benchmarks.quality import optimizers as O
    from salsa_fused.step_size import Cooldown

    task = run.make_task("digits", "tiny", steps=20)
    late, free = (run.train(task, name, 0) for name in ("pretrain_endlate20", "salsa_recommended_nolength"))
    assert late["losses"][:17] == free["losses"][:17]  # step 17 is the cooldown's first, its loss taken before it
    assert late["losses"][17:] != free["losses"][17:]
    assert late["step_sizes"][:16] == free["step_sizes"][:16]
    level = late["step_sizes"][15]  # frozen at step 16's level, then 3/4, 2/4, 1/4, 0 of it
    assert late["step_sizes"][16:] == pytest.approx([level * f for f in (0.75, 0.5, 0.25, 0.0)])
    built = O.build("pretrain_endlate20", task, task.model(0), 20)
    assert built.optimizer.schedule is None


def test_a_preset_told_another_length_plans_for_that_length():
    from benchmarks.quality import optimizers as O

    task = run.make_task("digits", "tiny")
    assert O.build("pretrain_told_third", task, task.model(0), 400).schedule.total_steps == 133
    assert O.build("pretrain_told_triple", task, task.model(0), 400).schedule.total_steps == 1200
    assert O.build("pretrain_told_third", task, task.model(0), 400).schedule == \
        O.build("salsa_recommended", task, task.model(0), 133).schedule


def test_every_run_is_appended_with_where_and_how_it_ran_and_a_rerun_replaces_only_the_tables_entry(tmp_path):
    """The suite's task JSONs keep each optimizer's latest runs (a re-run replaced the committed one, and
    nothing said which code or machine either came from: a new user's review); every run now carries its
    provenance and is appended to runs.jsonl, and the tables list the commits they read."""
    out = str(tmp_path)
    argv = ["--size", "tiny", "--tasks", "digits", "--optimizers", "salsa_faithful", "--adamw-lrs", "",
            "--steps", "6", "--out", out, "--threads", "1", "--no-plots"]
    assert run.main(argv) == 0 and run.main(argv + ["--seeds", "0,1"]) == 0
    with open(os.path.join(out, run.HISTORY)) as handle:
        history = [json.loads(line) for line in handle]
    assert [(h["task"], h["optimizer"], h["seed"]) for h in history] == [("digits", "salsa_faithful", s) for s in (0, 0, 1)]
    for line in history:
        assert {"git_commit", "torch", "triton", "python", "device", "date", "command"} <= set(line)
        assert math.isfinite(line["final_train_loss"]) and line["size"] == "tiny"
    assert history[0]["final_train_loss"] == history[1]["final_train_loss"]  # the same run, appended twice
    with open(os.path.join(out, "digits.json")) as handle:
        runs = json.load(handle)["runs"]["salsa_faithful"]
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["provenance"]["git_commit"] == history[0]["git_commit"]
    summary = open(os.path.join(out, "summary.md")).read()
    assert f"Runs by commit: {history[0]['git_commit']}: 1 optimizer(s) (every run with its date and versions: " \
           "runs.jsonl)." in summary
