"""The overshoot-signal measurements of benchmarks/quality/zoo/signals.py (quality NOTES section 29)."""

import json
import math
import os

import pytest
import torch

from salsa_fused.step_size import LOSS_RISE_SMOOTHING

from benchmarks.quality.run import train
from benchmarks.quality.zoo import runner, signals, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,)]
    return [torch.randn(s, generator=gen) for s in shapes], [torch.rand(s, generator=gen) + 0.1 for s in shapes]


@pytest.mark.parametrize("step", [2, 7])
def test_agreement_is_one_along_its_own_gradient_and_minus_one_against_it(step):
    grads, second = _tensors(0)
    beta1 = 0.9
    same = [g * (1 - beta1 ** (step - 1)) for g in grads]  # m_hat_prev = g
    assert signals.agreement(grads, same, second, step) == pytest.approx(1.0, rel=1e-6)
    assert signals.agreement(grads, [-m for m in same], second, step) == pytest.approx(-1.0, rel=1e-6)


def test_agreement_matches_the_formula_by_hand():
    grads, second = _tensors(1)
    previous, _ = _tensors(2)
    step, (beta1, beta2), eps = 5, (0.9, 0.999), 1e-8
    cross = own = 0.0
    for g, m, v in zip(grads, previous, second):
        for gi, mi, vi in zip(g.flatten().tolist(), m.flatten().tolist(), v.flatten().tolist()):
            p = 1.0 / (math.sqrt(vi / (1 - beta2 ** step)) + eps)
            cross += gi * p * mi / (1 - beta1 ** (step - 1))
            own += gi * gi * p
    assert signals.agreement(grads, previous, second, step) == pytest.approx(cross / own, rel=1e-9)


def test_agreement_is_zero_for_an_orthogonal_momentum_and_refuses_the_first_step():
    grads = [torch.tensor([1.0, 0.0])]
    second = [torch.ones(2)]
    assert signals.agreement(grads, [torch.tensor([0.0, 3.0])], second, 3) == 0.0
    with pytest.raises(ValueError, match="step must be >= 2"):
        signals.agreement(grads, grads, second, 1)


def test_range_statistics_follow_the_range_tests_smoothing():
    stats = signals.range_statistics([2.0, 1.0, float("nan"), 0.0, 4.0])
    a = LOSS_RISE_SMOOTHING  # the preset's range test's smoothing (0.9)
    smoothed = [2.0, a * 2.0 + (1 - a) * 1.0]
    smoothed.append(a * smoothed[-1] + (1 - a) * 4.0)  # the NaN and the 0 are skipped
    low = min(smoothed)
    assert stats["max_over_low"] == pytest.approx(max(s / min(smoothed[:i + 1]) for i, s in enumerate(smoothed)))
    assert stats["max_over_low"] == pytest.approx(smoothed[-1] / low)
    assert stats["max_over_first"] == pytest.approx(max(1.0, smoothed[-1] / 2.0))
    assert signals.range_statistics([]) == dict(max_over_low=1.0, max_over_first=1.0)


def test_measuring_leaves_the_run_as_the_zoo_runs_it():
    row = signals.measure("mlp_relu_teacher", "default", 0, steps=40)
    torch.set_num_threads(1)
    zoo = train(tasks.make("mlp_relu_teacher", 0, steps=40), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]  # bitwise: the measurement only reads
    assert row["searches_in_window"] > 0 and len(row["agreement_by_quarter"]) == 4
    assert all(math.isfinite(x) for x in row["agreement_by_quarter"] + [row["agreement_after"]])


def test_measuring_refuses_a_configuration_it_cannot_read():
    with pytest.raises(ValueError, match="not a plain FusedSaLSa"):
        signals.measure("mlp_relu_teacher", "default", 0, config="adamw_1e-3", steps=5)


@pytest.mark.parametrize("config", ["adamw_3e-2", "pretrain_hold"])
def test_the_sharpness_forward_leaves_the_run_as_the_zoo_runs_it(config):
    # cnn_bn_digits has BatchNorm: the extra forward must not move its running statistics (the val loss
    # reads them) nor the random generators
    row = signals.step_sharpness("cnn_bn_digits", "default", 0, config, steps=12)
    torch.set_num_threads(1)
    zoo = train(tasks.make("cnn_bn_digits", 0, steps=12), config, 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]
    assert row["val_loss"] == zoo["val_loss"]
    assert row["steps_measured"] > 0 and len(row["sharpness_by_fifth"]) == 5


def test_sharpness_is_below_two_for_small_steps_on_a_convex_task():
    # logistic regression at a tenth of its best rate: every step lowers its batch's loss
    row = signals.step_sharpness("logreg", "default", 0, "adamw_3e-2", steps=30)
    assert all(0.0 < r < 2.0 for r in row["sharpness_by_fifth"])


@pytest.mark.parametrize("config", ["adamw_3e-2", "pretrain_hold"])
def test_the_chord_forward_leaves_the_run_as_the_zoo_runs_it(config):
    row = signals.chord_ratio("cnn_bn_digits", "default", 0, config, windows=(3, 5), steps=16)
    torch.set_num_threads(1)
    zoo = train(tasks.make("cnn_bn_digits", 0, steps=16), config, 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]
    assert row["val_loss"] == zoo["val_loss"]
    assert row["windows_measured"] == {"3": 5, "5": 3}  # steps 4, 7, 10, 13, 16 and 6, 11, 16


def test_the_chord_ratio_is_the_midpoints_loss_over_the_loss_reached():
    # windows of 5 over 11 steps: measured at steps 6 (weights w_0 -> w_5) and 11 (w_5 -> w_10); the
    # fifths of 11 steps are (0,2], (2,4], (4,7], (7,9], (9,11]
    row = signals.chord_ratio("logreg", "default", 0, "adamw_3e-1", windows=(5,), steps=11)
    task, model, built = signals._start("logreg", "default", 0, "adamw_3e-1", 11, ("torch",))
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    weights = [[p.detach().clone() for p in params]]
    for batch in task.batches[:10]:
        signals._take_step(built, task, model, batch)
        weights.append([p.detach().clone() for p in params])

    def loss_at(ws, batch):
        with torch.no_grad():
            for p, w in zip(params, ws):
                p.copy_(w)
            return float(task.loss(model, batch))

    expected = [loss_at([0.5 * (a + b) for a, b in zip(weights[start], weights[start + 5])], task.batches[start + 5])
                / loss_at(weights[start + 5], task.batches[start + 5]) for start in (0, 5)]
    by_fifth = row["chord_by_fifth"]["5"]
    assert by_fifth[2] == pytest.approx(expected[0], rel=1e-12) and by_fifth[4] == pytest.approx(expected[1], rel=1e-12)
    assert math.isnan(by_fifth[0]) and math.isnan(by_fifth[1]) and math.isnan(by_fifth[3])
    assert expected[0] != pytest.approx(1.0, abs=1e-3)  # the midpoint is somewhere else


def test_best_adamw_rates_are_the_tables_best_rates():
    rows = runner.read_rows([os.path.join(ROOT, "benchmarks", "quality", "results", "zoo", "development.jsonl")])
    rates = signals.best_adamw_rates(rows)
    summary = runner.summarize(rows)
    assert rates and rates == {(e["task"], e["length"]): e["best_lr"] for e in summary.values()}
    assert rates[("lm_small", "default")] == 3e-3 and rates[("gru_adding", "short")] == 9e-2


def test_the_sharpness_measurement_refuses_a_beam():
    with pytest.raises(ValueError, match="not a plain FusedSaLSa or torch configuration"):
        signals.step_sharpness("mlp_relu_teacher", "default", 0, "beam_cool_margin_hold", steps=5)


@pytest.mark.parametrize("args, message", [
    (["--config", "beam_cool_margin_hold"], "not a plain FusedSaLSa configuration"),
    (["--config", "beam_cool_margin_hold", "--sharpness"], "not a plain FusedSaLSa or torch configuration"),
    (["--config", "adamw_1e-3"], "not a plain FusedSaLSa configuration"),
    (["--config", "nope"], "unknown optimizer 'nope'"),
    (["--seeds", "a-b"], "bad seeds 'a-b'"),
    (["--lengths", "longer"], "unknown length 'longer'"),
    (["--around-best-adamw", "x.jsonl"], "goes with --sharpness or --chord"),
    (["--sharpness", "--chord"], "choose one"),
    (["--line-scan", "--rehearsal"], "choose one"),
    (["--rehearsal", "--config", "salsa_faithful"], "no WarmupStableDecay schedule"),
    (["--line-scan", "--config", "salsa_faithful"], "no WarmupStableDecay schedule"),
    (["--branches", "r2=0.5"], "--branches goes with --rehearsal"),
    (["--rehearsal", "--branches", "r2=1.5"], "bad branch 'r2=1.5'"),
    (["--multiples", "1,2"], "--multiples goes with --rehearsal"),
    (["--switch-at", "0.1"], "--switch-at F goes with --rehearsal"),
    (["--rehearsal", "--switch-at", "1.5"], "--switch-at F goes with --rehearsal"),
    (["--rehearsal", "--switch-at", "0.1", "--branches", "r2=0.5"], "--switch-at F goes with --rehearsal"),
    (["--rehearse-at", "0.1"], "--rehearse-at F goes with --rehearsal or --line-scan"),
    (["--rehearsal", "--rehearse-at", "0"], "--rehearse-at F goes with --rehearsal or --line-scan"),
    (["--rehearsal", "--rehearse-at", "0.1", "--switch-at", "0.1"], "--rehearse-at F goes with --rehearsal or --line-scan"),
    (["--rehearsal", "--multiples", "1,-2"], "bad --multiples '1,-2'"),
    (["--rehearsal", "--multiples", "1,x"], "bad --multiples '1,x'"),
    (["--rehearsal", "--branches", "r2=0.5,r2=0.25"], "bad branch 'r2=0.25'"),
    (["--rehearsal", "--branches", "r-2=0.5"], "bad branch 'r-2=0.5'"),
    (["--rehearsal", "--branches", "r2"], "bad branch 'r2'"),
    (["--config", "beam_cool_margin_hold", "--chord"], "not a plain FusedSaLSa or torch configuration"),
    (["--sharpness", "--around-best-adamw", "/nonexistent/rows.jsonl"], "no such file"),
])
def test_bad_arguments_are_named_before_any_row_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        signals.main(["--tasks", "mlp_relu_teacher", *args, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_around_best_adamw_refuses_a_config_and_a_file_without_the_task(tmp_path, capsys):
    rows = os.path.join(ROOT, "benchmarks", "quality", "results", "zoo", "development.jsonl")
    for args, message in ((["--config", "pretrain_hold"], "leave out --config"),
                          (["--tasks", "logreg"], "no AdamW grid rows")):
        with pytest.raises(SystemExit):
            signals.main(["--tasks", "mlp_relu_teacher", "--sharpness", "--around-best-adamw", rows, *args,
                          "--out", str(tmp_path / "rows.jsonl")])
        assert message in capsys.readouterr().err


def test_the_polyak_ratios_follow_their_formulas_and_are_nan_where_undefined():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert signals.polyak_l1_ratio(6.0, grads, 0.5) == pytest.approx(6.0 / (6.0 * math.sqrt(math.pi / 2)) / 0.5)
    assert math.isnan(signals.polyak_l1_ratio(0.0, grads, 0.5))
    assert math.isnan(signals.polyak_l1_ratio(1.0, [torch.zeros(2)], 0.5))
    assert math.isnan(signals.polyak_l1_ratio(float("inf"), grads, 0.5))
    assert signals.polyak_slope_ratio(2.0, 4.0, 0.25) == pytest.approx(2.0)
    assert math.isnan(signals.polyak_slope_ratio(2.0, -1.0, 0.25)) and math.isnan(signals.polyak_slope_ratio(2.0, 1.0, 0.0))
    assert signals._medians([(1, 3.0), (2, 1.0), (3, math.nan), (4, 2.0), (5, 9.0), (6, 7.0)], [0, 4, 6]) == [2.0, 8.0]
    assert math.isnan(signals._medians([(1, 1.0)], [1, 2])[0])


def test_measuring_records_the_polyak_ratios_over_the_search_phase():
    row = signals.measure("mlp_relu_teacher", "default", 0, steps=40)
    for key in ("polyak_l1_by_quarter", "polyak_slope_by_quarter"):
        assert len(row[key]) == 4 and all(math.isfinite(v) and v > 0 for v in row[key]), (key, row[key])


def test_the_line_minimum_is_the_lowest_point_and_its_parabola_the_vertex():
    multiples = signals.LINE_SCAN_MULTIPLES
    quadratic = [(q - 1.7) ** 2 for q in multiples]  # lowest on the ladder at 2; the three points 1, 2, 4 span it
    found = signals.line_minimum(multiples, quadratic)
    assert found["line_min_multiple"] == 2.0 and found["line_parabola_multiple"] == pytest.approx(1.7, rel=1e-12)
    rising = [float(i) for i in range(len(multiples))]  # no step lowers the loss: the minimum at q = 0, no vertex
    assert signals.line_minimum(multiples, rising)["line_min_multiple"] == 0.0
    assert math.isnan(signals.line_minimum(multiples, rising)["line_parabola_multiple"])
    falling = [-q for q in multiples[:-1]] + [math.nan]  # a non-finite loss is infinitely high, not the lowest
    found = signals.line_minimum(multiples, falling)
    assert found["line_min_multiple"] == multiples[-2] and math.isnan(found["line_parabola_multiple"])
    concave_tie = [3.0, 1.0, 1.0, 3.0]  # a tie: the smaller multiple; the points through it are convex
    assert signals.line_minimum([0.0, 1.0, 2.0, 3.0], concave_tie) == dict(line_min_multiple=1.0,
                                                                            line_parabola_multiple=1.5)


def test_the_line_scan_reads_the_upcoming_batches_along_the_freezes_step_and_leaves_the_run_as_the_zoo_runs_it():
    # cnn_bn_digits has BatchNorm: the scan's forwards must not move its running statistics
    steps, name = 40, "cnn_bn_digits"
    row = signals.line_scan(name, "default", 0, steps=steps)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]  # bitwise: the scan only reads
    freeze = steps - round(0.8 * steps)
    assert row["freeze_step"] == freeze and len(row["line_scan_losses"]) == len(signals.LINE_SCAN_MULTIPLES)
    # at q = 0 the weights before the freeze's step, at q = the multiple it applied the weights after it
    applied = row["applied_multiple_at_freeze"]
    again = signals.line_scan(name, "default", 0, multiples=(0.0, applied), batches=3, steps=steps)
    task, model, built = signals._start(name, "default", 0, "pretrain_hold", steps, ("fused",))
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    means = []
    for k, batch in enumerate(task.batches[:freeze]):
        if k + 1 == freeze:
            means.append(sum(signals._loss_elsewhere(task, model, b, params) for b in task.batches[freeze:freeze + 3]) / 3)
        signals._take_step(built, task, model, batch)
    means.append(sum(signals._loss_elsewhere(task, model, b, params) for b in task.batches[freeze:freeze + 3]) / 3)
    assert again["line_scan_losses"] == pytest.approx(means, rel=1e-5) and means[0] != pytest.approx(means[1], rel=1e-3)


def test_a_line_scan_during_the_warm_up_reads_along_the_step_it_names():
    steps, name = 60, "cnn_bn_digits"
    row = signals.line_scan(name, "default", 0, multiples=(0.0, 1.0), batches=3, steps=steps, at=0.1)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]
    assert row["line_scan_step"] == 6 and "freeze_step" not in row
    # at q = 0 the weights before step 6, at the multiple step 6 applied the weights after it
    applied = row["applied_multiple_at_scan"]
    assert 0 < applied < 2  # mid warm-up: under the preset's peak
    again = signals.line_scan(name, "default", 0, multiples=(0.0, applied), batches=3, steps=steps, at=0.1)
    task, model, built = signals._start(name, "default", 0, "pretrain_hold", steps, ("fused",))
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    means = []
    for k, batch in enumerate(task.batches[:6]):
        if k + 1 == 6:
            means.append(sum(signals._loss_elsewhere(task, model, b, params) for b in task.batches[6:9]) / 3)
        signals._take_step(built, task, model, batch)
    means.append(sum(signals._loss_elsewhere(task, model, b, params) for b in task.batches[6:9]) / 3)
    assert again["line_scan_losses"] == pytest.approx(means, rel=1e-5) and means[0] != pytest.approx(means[1], rel=1e-3)
    with pytest.raises(ValueError, match="leave no 8 batches after the scan"):
        signals.line_scan(name, "default", 0, steps=steps, at=0.95)


def test_the_line_scan_refuses_a_run_without_a_freeze_or_the_batches_after_it():
    with pytest.raises(ValueError, match="no WarmupStableDecay schedule"):
        signals.line_scan("mlp_relu_teacher", "default", 0, config="salsa_faithful", steps=20)
    with pytest.raises(ValueError, match="leave no 8 batches after the freeze"):
        signals.line_scan("mlp_relu_teacher", "default", 0, steps=9)


def _preset_at_its_freeze(name, steps):
    """The zoo's run of the preset on ``name`` (``steps`` steps) up to its freeze: (task, model, built, params)."""
    task, model, built = signals._start(name, "default", 0, "pretrain_hold", steps, ("fused",))
    for batch in task.batches[:built.schedule.decay_start]:
        signals._take_step(built, task, model, batch)
    return task, model, built, [p for g in built.optimizer.param_groups for p in g["params"]]


def test_the_lowest_multiple_counts_a_non_finite_loss_as_highest_and_breaks_ties_low():
    assert signals.lowest_multiple([0.5, 1.0, 2.0], [3.0, 1.0, 2.0]) == 1.0
    assert signals.lowest_multiple([0.5, 1.0, 2.0], [math.nan, 2.0, 2.0]) == 1.0
    assert signals.lowest_multiple([0.5, 1.0, 2.0], [math.inf, 5.0, math.nan]) == 1.0


def test_the_rehearsal_reads_the_batches_after_each_branch_and_leaves_the_run_as_the_zoo_runs_it():
    # cnn_bn_digits has BatchNorm: the branches' steps must not move the run's running statistics
    steps, name = 60, "cnn_bn_digits"
    row = signals.rehearsal(name, "default", 0, multiples=(0.0, 2.0, 8.0), steps=steps)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]  # bitwise: every branch was put back
    freeze = steps - round(0.8 * steps)
    assert row["freeze_step"] == freeze and row["rehearsal_multiples"] == [0.0, 2.0, 8.0]
    assert (row["rehearsal_steps_r8"], row["rehearsal_steps_r4"]) == (round(48 / 8), round(48 / 4))
    # a branch at multiple 0 moves no weight: it reads the batches after it at the weights after step F
    task, model, built, params = _preset_at_its_freeze(name, steps)
    for key in ("r8", "r4"):
        n = row[f"rehearsal_steps_{key}"]
        after = task.batches[freeze + n:freeze + n + signals.REHEARSAL_BATCHES]
        still = sum(signals._loss_elsewhere(task, model, b, params) for b in after) / len(after)
        losses = row[f"rehearsal_losses_{key}"]
        assert losses[0] == pytest.approx(still, rel=1e-6)
        assert losses[1] != pytest.approx(losses[0], rel=1e-3) and losses[2] != pytest.approx(losses[1], rel=1e-3)
        assert row[f"rehearsal_min_multiple_{key}"] == signals.lowest_multiple([0.0, 2.0, 8.0], losses)


def test_a_rehearsal_branch_applies_its_multiple_of_the_frozen_level_decayed_to_zero(monkeypatch):
    task, model, built, params = _preset_at_its_freeze("mlp_relu_teacher", 40)
    freeze = built.schedule.decay_start
    applied, original = [], signals._Branch.scale
    monkeypatch.setattr(signals._Branch, "scale",
                        lambda self, step: applied.append(original(self, step)) or original(self, step))
    before = [p.detach().clone() for p in params]
    signals._branch_loss(task, model, built.optimizer, params, freeze, 4, 3.0, 2)
    # every step of the branch asks for its scale: 3 times the decay from 3/4 to 0
    assert set(applied) == {3.0 * (freeze + 4 - k) / 4 for k in range(freeze + 1, freeze + 5)}
    assert all(torch.equal(b, p) for b, p in zip(before, params))  # put back


def test_the_rehearsal_refuses_a_run_without_a_freeze_or_the_steps_after_it():
    with pytest.raises(ValueError, match="no WarmupStableDecay schedule"):
        signals.rehearsal("mlp_relu_teacher", "default", 0, config="salsa_faithful", steps=20)
    with pytest.raises(ValueError, match="leave no r8 branch"):
        signals.rehearsal("mlp_relu_teacher", "default", 0, steps=12)


def test_branch_fractions_are_read_from_the_command_line():
    assert signals.branch_fractions("r2=0.5,r8=0.125") == {"r2": 0.5, "r8": 0.125}


def test_the_rehearsal_command_writes_the_branches_asked_for(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert signals.main(["--rehearsal", "--branches", "r2=0.5", "--tasks", "mlp_relu_teacher", "--lengths", "short",
                         "--seeds", "0", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["rehearsal_steps_r2"] == round(0.5 * (row["steps"] - row["freeze_step"]))
    assert "rehearsal_min_multiple_r2" in row and "rehearsal_losses_r8" not in row and "commit" in row


def test_a_branch_to_the_end_at_the_presets_own_multiple_is_the_presets_run():
    # no back-off and no hold fire on this short run, so the branch at q = peak applies what the preset applies
    steps, name = 60, "mlp_relu_teacher"
    row = signals.rehearsal(name, "default", 0, multiples=(1.0, 2.0), fractions={"full": 1.0}, steps=steps)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"] and row["applied_multiple_at_freeze"] == 2.0
    assert row["rehearsal_steps_full"] == steps - row["freeze_step"] and "rehearsal_losses_full" not in row
    switched = row["rehearsal_final_losses_full"]
    assert switched[1] == pytest.approx(zoo["final_train_loss"], rel=1e-6) and switched[0] != pytest.approx(switched[1])
    assert row["rehearsal_min_multiple_full"] == signals.lowest_multiple([1.0, 2.0], switched)


def test_a_rehearsal_during_the_warm_up_branches_after_its_step_at_the_top_of_each_switched_run(monkeypatch):
    steps, name = 60, "cnn_bn_digits"
    asked, tops = [], []
    original, top_of = signals._branch_loss, signals.switched_top
    monkeypatch.setattr(signals, "_branch_loss", lambda *a, **k: asked.append((a[4], a[6])) or original(*a, **k))
    monkeypatch.setattr(signals, "switched_top", lambda *a: tops.append(a) or top_of(*a))
    row = signals.rehearsal(name, "default", 0, multiples=(0.0, 4.0), fractions={"r4": 0.25}, steps=steps, at=0.1)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"]  # every branch was put back
    assert row["rehearsal_step"] == 6 and "freeze_step" not in row and row["rehearsal_steps_r4"] == round(54 / 4)
    # each branch is at the top of its switched run, under the back-off and hold the run had at step 6
    state = (row["backoff_at_rehearsal"], row["hold_at_rehearsal"])
    assert tops == [(0.0, *state), (4.0, *state)]
    top = top_of(4.0, *state)
    assert asked == [(6, 0.0), (6, top)] and top > 0
    # the branch at 0 reads the batches after it at the weights after step 6, mid warm-up
    task, model, built = signals._start(name, "default", 0, "pretrain_hold", steps, ("fused",))
    for batch in task.batches[:6]:
        signals._take_step(built, task, model, batch)
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    after = task.batches[6 + 14:6 + 14 + signals.REHEARSAL_BATCHES]
    still = sum(signals._loss_elsewhere(task, model, b, params) for b in after) / len(after)
    assert row["rehearsal_losses_r4"][0] == pytest.approx(still, rel=1e-6)
    with pytest.raises(ValueError, match="leaves no step before or after it"):
        signals.rehearsal(name, "default", 0, steps=steps, at=0.001)


def test_the_top_of_a_switched_run_is_its_peak_under_the_hold_and_back_off():
    assert signals.switched_top(4.0, 1.0, 0.0) == 4.0
    assert signals.switched_top(4.0, 0.5, 0.0) == 2.0
    assert signals.switched_top(4.0, 0.5, 1.5) == 0.75  # held below the peak
    assert signals.switched_top(1.0, 0.5, 1.5) == 0.5  # a peak under the hold is the peak


def test_a_switch_of_the_peak_during_the_warm_up_at_the_presets_peak_is_the_presets_run():
    steps, name = 60, "cnn_bn_digits"
    row = signals.switch_during_warmup(name, "default", 0, 0.1, multiples=(1.0, 2.0, 4.0), steps=steps)
    torch.set_num_threads(1)
    zoo = train(tasks.make(name, 0, steps=steps), "pretrain_hold", 0, record_searches=False)
    assert row["final_train_loss"] == zoo["final_train_loss"] and row["switch_step"] == 6  # the run put back
    finals = row["switch_final_losses"]
    assert finals[1] == zoo["final_train_loss"]  # peak 2 is the preset's own schedule: bitwise
    assert finals[0] != pytest.approx(finals[1]) and finals[2] != pytest.approx(finals[1])
    # the run at peak 4 from the first step differs from the switch (its first 6 steps warmed up to 4)
    from_start = train(tasks.make(name, 0, steps=steps), "pretrain_peak4", 0, record_searches=False)
    assert from_start["final_train_loss"] != pytest.approx(finals[2], rel=1e-9)
    with pytest.raises(ValueError, match="leaves no step before or after it"):
        signals.switch_during_warmup(name, "default", 0, 0.001, steps=steps)


@pytest.mark.parametrize("config", ["salsa_recommended", "pretrain_hold_decayfromhold"])
def test_the_branches_refuse_a_schedule_whose_cooldown_decays_from_the_hold(config):
    """NOTES.md section 73: with decay_from_hold the held scale is the peak past the warm-up, so a branch's peak
    q would not move its top; the rehearsal and the switch model section 25's preset and say so."""
    with pytest.raises(ValueError, match="decay_from_hold"):
        signals.rehearsal("mlp_relu_teacher", "default", 0, config=config, steps=40)
    with pytest.raises(ValueError, match="decay_from_hold"):
        signals.switch_during_warmup("mlp_relu_teacher", "default", 0, at=0.1, config=config, steps=40)


def test_the_path_readings_are_the_weights_and_gradients_of_the_zoos_run_by_hand():
    steps, name = 60, "cnn_bn_digits"
    row = signals.path_readings(name, "default", 0, steps=steps)
    assert row["read_step"] == 6 and "final_train_loss" not in row
    task, model, built = signals._start(name, "default", 0, "pretrain_hold", steps, ("fused",))
    params = [p for g in built.optimizer.param_groups for p in g["params"]]
    weights = [[p.detach().clone() for p in params]]
    norms, losses = [], []
    for batch in task.batches[:6]:
        losses.append(signals._take_step(built, task, model, batch))
        norms.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None)))
        weights.append([p.detach().clone() for p in params])

    def distance(a, b, keep=lambda w: True):
        return math.sqrt(sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b) if keep(x)))

    travelled = sum(distance(a, b) for a, b in zip(weights, weights[1:]))
    assert row["path_efficiency"] == pytest.approx(distance(weights[-1], weights[0]) / travelled, rel=1e-9)
    assert 0 < row["path_efficiency"] < 1  # six steps that do not all point one way
    matrix = lambda w: w.dim() >= 2  # noqa: E731
    zero = [torch.zeros_like(w) for w in weights[0]]
    assert row["relative_distance"] == pytest.approx(
        distance(weights[-1], weights[0], matrix) / distance(weights[0], zero, matrix), rel=1e-9)
    # early: steps 1 .. round(0.25 * 6) = 2, late: steps 5 .. 6 (index int(0.75 * 6) = 4 on)
    assert row["grad_norm_growth"] == pytest.approx(sorted(norms[4:])[1] / sorted(norms[:2])[1], rel=1e-9)
    assert row["loss_at_read"] == losses[-1]


def test_a_path_of_one_step_is_straight():
    row = signals.path_readings("mlp_relu_teacher", "default", 0, steps=10, at=0.1)
    assert row["read_step"] == 1
    assert row["path_efficiency"] == pytest.approx(1.0, rel=1e-12) and row["grad_norm_growth"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no step to read at"):
        signals.path_readings("mlp_relu_teacher", "default", 0, steps=4, at=0.1)


def test_the_path_command_reads_where_it_is_told_and_refuses_a_fraction_without_it(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert signals.main(["--path", "--read-at", "0.25", "--tasks", "mlp_relu_teacher", "--lengths", "short",
                         "--seeds", "0", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["read_step"] == round(0.25 * row["steps"]) and "commit" in row and row["path_efficiency"] > 0
    for argv in (["--read-at", "0.2"], ["--path", "--read-at", "1.5"], ["--path", "--line-scan"]):
        with pytest.raises(SystemExit):
            signals.main(argv + ["--tasks", "mlp_relu_teacher", "--out", str(out)])
    assert "--read-at F goes with --path" in capsys.readouterr().err
