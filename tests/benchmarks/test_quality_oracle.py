"""The oracle bound over configurations (benchmarks/quality/oracle.py, NOTES.md section 43)."""

import json
import math

import pytest

from benchmarks.quality import oracle


def _row(task, length, config, seed, loss):
    return dict(task=task, split="development", length=length, config=config, seed=seed, final_train_loss=loss,
                val_loss=loss, level_mean=1e-3, forwards_per_step=1.2, diverged=None, steps=100)


def _grid(task, length, best):
    return [_row(task, length, config, seed, loss) for seed in (0, 1)
            for config, loss in (("adamw_1e-3", best), ("adamw_3e-3", 2 * best))]


def test_the_oracle_keeps_the_best_configuration_per_task_and_divides_by_the_best_adamw():
    rows = _grid("lm_small", "default", 1.0) + _grid("gru_adding", "default", 0.01)
    for seed in (0, 1):
        rows += [_row("lm_small", "default", "low", seed, 1.2), _row("lm_small", "default", "high", seed, 1.02),
                 _row("gru_adding", "default", "low", seed, 0.008 + 0.002 * seed),  # mean 0.009
                 _row("gru_adding", "default", "high", seed, 0.05)]
    result = oracle.bound(rows, ["low", "high"])
    default = result["default"]
    assert default["per_task"]["lm_small"] == ("high", pytest.approx(1.02))
    assert default["per_task"]["gru_adding"] == ("low", pytest.approx(0.9))
    assert default["geomean"] == pytest.approx(math.sqrt(1.02 * 0.9))
    assert default["above_1_15"] == [] and default["above_1_03"] == []
    assert default["best_counts"] == {"high": 1, "low": 1}
    assert set(result) == {"default"}  # no rows at the other lengths


def test_a_task_without_rows_of_every_configuration_is_left_out_and_named():
    rows = _grid("lm_small", "short", 1.0) + _grid("gru_adding", "short", 1.0)
    for seed in (0, 1):
        rows += [_row("lm_small", "short", "a", seed, 2.0), _row("lm_small", "short", "b", seed, 1.5),
                 _row("gru_adding", "short", "a", seed, 1.1)]
    short = oracle.bound(rows, ["a", "b"])["short"]
    assert list(short["per_task"]) == ["lm_small"] and short["missing"] == ["gru_adding"]
    assert short["above_1_15"] == ["lm_small"] and short["geomean"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="configs is empty"):
        oracle.bound(rows, [])


def test_the_command_reads_files_with_an_alias_and_a_seed_filter(tmp_path, capsys):
    rows = _grid("lm_small", "long", 1.0) + [_row("lm_small", "long", "adamw_1e-3", 2, 1.0),
                                             _row("lm_small", "long", "adamw_3e-3", 2, 2.0)]
    rows += [_row("lm_small", "long", "pretrain", 0, 1.1), _row("lm_small", "long", "pretrain", 1, 1.3),
             _row("lm_small", "long", "pretrain", 2, 9.0), _row("lm_small", "long", "other", 0, 1.4),
             _row("lm_small", "long", "other", 1, 1.4)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "pretrain_hold,other", "--alias", "pretrain=pretrain_hold",
                        "--seeds", "0-1"]) == 0
    out = capsys.readouterr().out
    assert "| long | 1.200 | lm_small 1.2 | 1 of 1 | pretrain_hold 1 |" in out
    assert oracle.main([str(path), "--configs", "pretrain_hold,other", "--alias", "pretrain=pretrain_hold"]) == 0
    assert "| long | 1.400 | lm_small 1.4 | 1 of 1 | other 1 |" in capsys.readouterr().out  # seed 2's 9.0 counts
    with pytest.raises(SystemExit):
        oracle.main([str(path), "--configs", "a", "--alias", "broken"])


def test_adamw_in_the_presets_shape_follows_the_presets_schedule_at_peak_one():
    from dataclasses import replace

    from benchmarks.quality import optimizers as O
    from benchmarks.quality import run
    from salsa_fused import presets

    task = run.make_task("digits", "tiny")
    built = O.build("wsdadamw_3e-2", task, task.model(0), 100)
    shape = replace(presets.preset_kwargs(presets.RECOMMENDED, 100)["schedule"], peak=1.0)
    rates = []
    for _ in range(100):
        rates.append(built.optimizer.param_groups[0]["lr"])
        built.optimizer.step()
        built.scheduler.step()
    assert rates == pytest.approx([3e-2 * shape.scale(k) for k in range(1, 101)])
    assert rates[19] == pytest.approx(3e-2) and rates[-1] == 0.0  # the top at 20%, zero on the last step
    O.known(["wsdadamw_1e-3", "adamw_1e-3", "adamw20_1e-3"])
    for bad in ("wsdadamw_fast", "adamw_fast", "adamw20_fast"):  # every rate-named form refuses a bad rate
        with pytest.raises(ValueError, match="expected a rate after"):
            O.known([bad])
        with pytest.raises(ValueError, match="expected a rate after"):
            O.build(bad, task, task.model(0), 100)


def test_an_optional_configuration_counts_only_where_it_has_rows():
    rows = _grid("lm_small", "default", 1.0) + _grid("gru_adding", "default", 1.0)
    for seed in (0, 1):
        rows += [_row("lm_small", "default", "a", seed, 1.2), _row("gru_adding", "default", "a", seed, 1.1),
                 _row("lm_small", "default", "a_extended", seed, 1.05)]
    default = oracle.bound(rows, ["a"], optional=["a_extended"])["default"]
    assert default["per_task"] == {"gru_adding": ("a", pytest.approx(1.1)),
                                   "lm_small": ("a_extended", pytest.approx(1.05))}
    assert default["missing"] == []


def test_section_45_names_shorten_the_warm_up_and_keep_the_search_phase():
    from dataclasses import replace

    from benchmarks.quality import optimizers as O
    from benchmarks.quality import run

    task = run.make_task("digits", "tiny")
    shipped = O.build("pretrain_hold", task, task.model(0), 100).schedule
    for name, warmup in (("pretrain_warm5", 0.05), ("pretrain_warm10", 0.1)):
        schedule = O.build(name, task, task.model(0), 100).schedule
        assert schedule == replace(shipped, warmup=warmup)
        assert schedule.decay_start == shipped.decay_start == 20  # the search phase stays 20%
        assert schedule.scale(int(warmup * 100)) == schedule.scale(20) == shipped.peak


def _traced(task, length, config, seed, final, trace):
    return dict(_row(task, length, config, seed, final), loss_trace=trace)


def test_a_pick_at_a_fraction_keeps_per_seed_the_configuration_lowest_there_and_scores_its_final_loss():
    early_low_late_high = [1.0] * 10 + [0.2] * 10 + [5.0] * 80  # lowest at 20%, worst at the end
    steady = [1.0] * 20 + [0.5] * 80
    rows = _grid("lm_small", "default", 1.0)
    rows += [_traced("lm_small", "default", "bold", 0, 5.0, early_low_late_high),
             _traced("lm_small", "default", "calm", 0, 0.5, steady),
             _traced("lm_small", "default", "bold", 1, 0.4, steady),  # on seed 1 bold is lowest at the end only
             _traced("lm_small", "default", "calm", 1, 0.6, [0.9] * 100)]
    picked = oracle.picked_at(rows, ["bold", "calm"], at=0.2)
    assert [(r["seed"], r["picked_from"], r["final_train_loss"]) for r in picked] == [(0, "bold", 5.0),
                                                                                     (1, "calm", 0.6)]
    assert {r["config"] for r in picked} == {"picked@0.2"}
    late = {r["seed"]: r["picked_from"] for r in oracle.picked_at(rows, ["bold", "calm"], at=1.0)}
    assert late == {0: "calm", 1: "bold"}  # at the end the pick is the final loss's (up to the window)
    default = oracle.bound(rows + picked, ["picked@0.2"])["default"]
    assert default["per_task"]["lm_small"] == ("picked@0.2", pytest.approx((5.0 + 0.6) / 2))
    with pytest.raises(ValueError, match="fraction of the run"):
        oracle.picked_at(rows, ["bold"], at=0.0)
    with pytest.raises(ValueError, match="configs is empty"):
        oracle.picked_at(rows, [], at=0.5)


def test_a_pick_skips_a_seed_without_every_configuration_and_a_window_without_finite_losses():
    rows = [_traced("gru_adding", "short", "a", 0, 1.0, [math.nan] * 10 + [2.0] * 90),
            _traced("gru_adding", "short", "b", 0, 3.0, [1.0] * 100),
            _traced("gru_adding", "short", "a", 1, 1.0, [1.0] * 100)]
    picked = oracle.picked_at(rows, ["a", "b"], at=0.1)
    assert [(r["seed"], r["picked_from"]) for r in picked] == [(0, "b")]  # a's window is all NaN: inf
    assert oracle.early_loss(rows[0], 0.1) == math.inf and oracle.early_loss(rows[0], 0.2) == 2.0


def test_the_command_reports_a_pick_and_what_it_picked(tmp_path, capsys):
    rows = _grid("lm_small", "long", 1.0)
    rows += [_traced("lm_small", "long", "bold", s, 1.5, [0.1] * 100) for s in (0, 1)]
    rows += [_traced("lm_small", "long", "calm", s, 1.1, [0.2] * 100) for s in (0, 1)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "bold,calm", "--pick-at", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "| long | 1.500 | lm_small 1.5 | 1 of 1 | picked@0.3 1 |" in out and "long: bold 2" in out
    with pytest.raises(SystemExit):
        oracle.main([str(path), "--configs", "bold,calm", "--pick-at", "1.5"])


def test_spearman_ranks_with_ties_and_refuses_unpaired_values():
    assert oracle.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert oracle.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert oracle.spearman([1, 1, 2, 3], [5, 6, 7, 8]) == pytest.approx(0.9486833)  # ties: mean ranks
    assert math.isnan(oracle.spearman([1, 2], [1, 2])) and math.isnan(oracle.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="pairs"):
        oracle.spearman([1, 2, 3], [1, 2])


def _leveled(task, length, config, seed, loss, level):
    return dict(_row(task, length, config, seed, loss), level_mean=level)


def test_a_signal_that_rises_where_a_larger_multiple_wins_correlates_with_the_best_multiple(tmp_path, capsys):
    rows = []
    wants = {"a": 0.5, "b": 1.0, "c": 2.0}  # each task's best multiple of the control's level
    for task, best in wants.items():
        rows += _grid(task, "default", 1.0)  # AdamW's mean rate: 1e-3 in _row
        for seed in (0, 1):
            for name, multiple in (("low", 0.5), ("control", 1.0), ("high", 2.0)):
                rows.append(_leveled(task, "default", name, seed, 1.0 + abs(math.log2(multiple / best)),
                                     1e-3 * multiple))
            rows.append(_leveled(task, "default", "signal", seed, 5.0, 1e-3 * best * 3))  # tracks the wanted one
    report = oracle.signal_report(rows, {"low": 0.5, "control": 1.0, "high": 2.0}, "control", "signal")
    assert [(t, m) for t, _, m, _, _ in report["pairs"]] == [("a", 0.5), ("b", 1.0), ("c", 2.0)]
    assert report["rho"] == pytest.approx(1.0)
    assert report["spread_control"] == 0.0 and report["spread_signal"] == pytest.approx(math.sqrt(2 / 3))
    with pytest.raises(ValueError, match="control"):
        oracle.signal_report(rows, {"low": 0.5}, "control", "signal")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "low=0.5,control=1,high=2", "--control", "control",
                        "--signal", "signal"]) == 0
    out = capsys.readouterr().out
    assert "3 task-lengths" in out and "with log2(best multiple): 1.00" in out and "a default: best multiple 0.5" in out
    with pytest.raises(SystemExit):
        oracle.main([str(path), "--configs", "low=half,control=1", "--control", "control", "--signal", "signal"])


def test_a_feature_that_grows_with_the_wanted_multiple_correlates_with_it(tmp_path, capsys):
    rows, features = [], []
    wants = {"a": 0.5, "b": 1.0, "c": 2.0}
    for task, best in wants.items():
        rows += _grid(task, "long", 1.0)
        for seed in (0, 1):
            for name, multiple in (("low", 0.5), ("control", 1.0), ("high", 2.0)):
                rows.append(_row(task, "long", name, seed, 1.0 + abs(math.log2(multiple / best))))
            features.append(dict(task=task, length="long", seed=seed, split="development",
                                 ratio=[1.0, 1.0, 1.0, 10 * best * (1 + seed)]))
    features.append(dict(task="d", length="long", seed=0, split="development", ratio=[1, 1, 1, 5]))  # no oracle row
    multiples = {"low": 0.5, "control": 1.0, "high": 2.0}
    report = oracle.feature_report(rows, features, multiples, "ratio", 3)
    assert [(t, m) for t, _, m, _ in report["pairs"]] == [("a", 0.5), ("b", 1.0), ("c", 2.0)]
    assert report["pairs"][0][3] == pytest.approx(5 * math.sqrt(2))  # the geometric mean over seeds
    assert report["rho"] == pytest.approx(1.0)
    assert oracle.feature_report(rows, features, multiples, "ratio", 9)["pairs"] == []  # no such index: no value
    rows_path, feature_path = tmp_path / "rows.jsonl", tmp_path / "features.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    feature_path.write_text("".join(json.dumps(r) + "\n" for r in features))
    assert oracle.main([str(rows_path), "--configs", "low=0.5,control=1,high=2", "--feature", "ratio:3",
                        "--feature-rows", str(feature_path)]) == 0
    assert "3 task-lengths; Spearman of log2(ratio:3) with log2(best multiple): 1.00" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        oracle.main([str(rows_path), "--configs", "low=0.5,control=1", "--feature", "ratio:3"])


def test_the_reports_count_a_grids_optional_ends_and_a_signal_without_rows_reads_nan():
    rows = _grid("a", "short", 1.0)
    for seed in (0, 1):
        rows += [_leveled("a", "short", "control", seed, 2.0, 1e-3), _leveled("a", "short", "high", seed, 1.5, 2e-3),
                 _leveled("a", "short", "highest", seed, 1.1, 1.6e-2)]
    features = [dict(task="a", length="short", seed=0, split="development", ratio=3.0)]
    plain = oracle.feature_report(rows, features, {"control": 1.0, "high": 2.0}, "ratio")
    extended = oracle.feature_report(rows, features, {"control": 1.0, "high": 2.0}, "ratio",
                                     optional={"highest": 16.0})
    assert plain["pairs"][0][2] == 2.0 and extended["pairs"][0][2] == 16.0
    empty = oracle.signal_report(rows, {"control": 1.0, "high": 2.0}, "control", "no_such_signal")
    assert empty["pairs"] == [] and math.isnan(empty["spread_signal"]) and math.isnan(empty["rho"])


def test_a_run_that_diverged_is_not_picked_by_its_truncated_trace():
    diverged = dict(_traced("lm_small", "long", "bold", 0, math.nan, [0.1] * 30), diverged="step 29: loss is nan")
    rows = [diverged, _traced("lm_small", "long", "calm", 0, 1.0, [0.5] * 100)]
    assert oracle.early_loss(diverged, 0.2) == math.inf
    assert [r["picked_from"] for r in oracle.picked_at(rows, ["bold", "calm"], at=0.2)] == ["calm"]


def test_a_missing_rows_file_is_named_not_skipped(tmp_path, capsys):
    from benchmarks.quality.zoo import runner

    with pytest.raises(ValueError, match="no such rows file"):
        runner.read_rows([str(tmp_path / "absent.jsonl")])
    assert runner.read_rows([str(tmp_path / "absent.jsonl")], missing_ok=True) == []
    with pytest.raises(SystemExit):
        oracle.main([str(tmp_path / "absent.jsonl"), "--configs", "a"])
    assert "no such rows file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["table", str(tmp_path / "absent.jsonl")])



def test_a_floor_from_a_signals_level_raises_the_multiple_only_where_the_signal_is_higher(tmp_path, capsys):
    rows = []
    for task, best, signal_level in (("a", 1.0, 1e-3), ("b", 4.0, 4e-3), ("c", 2.0, 1e-4)):
        rows += _grid(task, "default", 1.0)
        for seed in (0, 1):
            for name, multiple in (("low", 1.0), ("control", 2.0), ("high", 4.0), ("higher", 8.0)):
                rows.append(_leveled(task, "default", name, seed, 1.0 + abs(math.log2(multiple / best)),
                                     1e-3 * multiple / 2))  # the control applies 2x its searched level, 1e-3
            rows.append(_leveled(task, "default", "signal", seed, 9.0, signal_level))
    multiples = {"low": 1.0, "control": 2.0, "high": 4.0, "higher": 8.0}
    floor = oracle.floor_report(rows, multiples, "control", "signal", 1.0)["default"]
    # a: the signal's level equals the control's -> 2x kept; b: 4x the control's -> 8x; c: below -> kept
    assert {t: p[0] for t, p in floor["per_task"].items()} == {"a": "control", "b": "higher", "c": "control"}
    assert floor["per_task"]["b"][1:] == (2.0, 2.0)
    assert floor["geomean"] == pytest.approx((2.0 * 2.0 * 1.0) ** (1 / 3))
    assert floor["above_1_15"] == ["a", "b"]
    half = oracle.floor_report(rows, multiples, "control", "signal", 0.5)["default"]
    assert half["per_task"]["b"][0] == "high" and half["per_task"]["b"][1] == 1.0  # 2 * 0.5 * 4 = 4x
    with pytest.raises(ValueError, match="scale"):
        oracle.floor_report(rows, multiples, "control", "signal", 0.0)
    with pytest.raises(ValueError, match="control"):
        oracle.floor_report(rows, {"low": 1.0}, "control", "signal", 1.0)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "low=1,control=2,high=4,higher=8", "--control", "control",
                        "--signal", "signal", "--floor-scale", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "default: 3 tasks" in out and "floor binds on 1" in out


def test_trace_features_read_progress_and_roughness_from_a_runs_loss_trace(tmp_path, capsys):
    smooth = [1.0 - 0.005 * i for i in range(100)]  # a steady descent: progress < 1, roughness 1
    bouncy = [1.0 + (0.1 if i % 2 else 0.0) for i in range(100)]  # bounces, no trend in [0.1, 0.2)
    rows = [dict(_traced("a", "default", "control", 0, 1.0, smooth), split="development"),
            dict(_traced("b", "default", "control", 0, 1.0, bouncy), split="development"),
            dict(_traced("c", "default", "control", 0, 1.0, smooth), diverged="step 3: loss is nan"),
            _traced("a", "default", "other", 0, 1.0, bouncy)]
    features = {r["task"]: r for r in oracle.trace_features(rows, "control")}
    assert set(features) == {"a", "b"}  # the diverged run and the other configuration have none
    a = features["a"]
    assert a["search_progress"] == pytest.approx(sum(smooth[15:20]) / sum(smooth[10:15]))
    assert a["stable_progress"] == pytest.approx(sum(smooth[30:40]) / sum(smooth[20:30]))
    assert a["roughness_over_trend"] == pytest.approx(1.0)
    assert features["b"]["roughness_over_trend"] == pytest.approx(0.1 / (0.1 / 9))  # window ends 1.1 - 1.0
    wants = {"a": 2.0, "b": 0.5}  # the smooth run wants the preset's 2x, the rough one 0.5x
    rows = [dict(r, final_train_loss=1.0 + abs(math.log2(2.0 / wants[r["task"]])))
            for r in rows if r["task"] in wants and r["config"] == "control"]
    for task, best in wants.items():
        rows += [r for r in _grid(task, "default", 1.0) if r["seed"] == 0]
        rows.append(_row(task, "default", "low", 0, 1.0 + abs(math.log2(0.5 / best))))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "low=0.5,control=2", "--feature", "roughness_over_trend",
                        "--trace-config", "control", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "a default: best multiple 2, roughness_over_trend 1\n" in out
    assert "b default: best multiple 0.5, roughness_over_trend 9\n" in out
    with pytest.raises(SystemExit):
        oracle.main([str(path), "--configs", "low=0.5,control=2", "--feature", "roughness_over_trend"])


def test_a_multiple_set_from_a_feature_picks_the_nearest_multiple_and_keeps_the_controls_without_one(tmp_path, capsys):
    rows, features = [], []
    wants = {"a": 0.5, "b": 4.0, "c": 2.0, "d": 1.0}
    for task, best in wants.items():
        rows += _grid(task, "default", 1.0)
        for seed in (0, 1):
            for name, multiple in (("half", 0.5), ("one", 1.0), ("control", 2.0), ("four", 4.0)):
                rows.append(_row(task, "default", name, seed, 1.0 + abs(math.log2(multiple / best))))
    # a: the feature 0.25 and 1 on its seeds (geomean 0.5); b: 3 (nearest in log2: 4); c: 0 and nan on
    # both seeds (no feature: the control's 2x); d: 1.4 (between 1 and 2, nearer 1 in log2)
    for task, values in (("a", (0.25, 1.0)), ("b", (3.0, 3.0)), ("c", (0.0, math.nan)), ("d", (1.4, 1.4))):
        features += [dict(task=task, length="default", seed=s, split="development", q=v) for s, v in enumerate(values)]
    multiples = {"half": 0.5, "one": 1.0, "control": 2.0, "four": 4.0}
    rule = oracle.feature_rule_report(rows, features, multiples, "control", "q", 1.0)["default"]
    assert {t: p[0] for t, p in rule["per_task"].items()} == {"a": "half", "b": "four", "c": "control", "d": "one"}
    assert rule["no_feature"] == ["c"] and rule["geomean"] == pytest.approx(1.0)
    assert rule["control_geomean"] == pytest.approx((3.0 * 2.0 * 1.0 * 2.0) ** 0.25) and rule["above_1_15"] == []
    doubled = oracle.feature_rule_report(rows, features, multiples, "control", "q", 2.0)["default"]
    assert {t: p[0] for t, p in doubled["per_task"].items()} == {"a": "one", "b": "four", "c": "control", "d": "control"}
    # a task without one of the multiples is left out: a grid's missing point would steer the rule
    partial = oracle.feature_rule_report([r for r in rows if not (r["task"] == "d" and r["config"] == "four")],
                                         features, multiples, "control", "q", 1.0)["default"]
    assert sorted(partial["per_task"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="scale"):
        oracle.feature_rule_report(rows, features, multiples, "control", "q", -1.0)
    # a power: 2 / q (a: 4 -> four; b: 2/3 and d: 1.43, nearer 0.5 and 2 in log2; c keeps the control's)
    inverse = oracle.feature_rule_report(rows, features, multiples, "control", "q", 2.0, power=-1.0)["default"]
    assert {t: p[0] for t, p in inverse["per_task"].items()} == {"a": "four", "b": "half", "c": "control", "d": "control"}
    with pytest.raises(ValueError, match="power"):
        oracle.feature_rule_report(rows, features, multiples, "control", "q", 1.0, power=math.nan)
    rows_path, feature_path = tmp_path / "rows.jsonl", tmp_path / "features.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    feature_path.write_text("".join(json.dumps(r) + "\n" for r in features))
    assert oracle.main([str(rows_path), "--configs", "half=0.5,one=1,control=2,four=4", "--feature", "q",
                        "--feature-rows", str(feature_path), "--control", "control", "--rule-scale", "1"]) == 0
    out = capsys.readouterr().out
    assert "default: 4 tasks, geomean 1.861 -> 1.000, moved on 3 (no feature: c); above 1.15: none" in out
    assert oracle.main([str(rows_path), "--configs", "half=0.5,one=1,control=2,four=4", "--feature", "q",
                        "--feature-rows", str(feature_path), "--control", "control", "--rule-scale", "2",
                        "--feature-power", "-1"]) == 0
    assert "the multiple at 2 x q ** -1, in place of control's" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        oracle.main([str(rows_path), "--configs", "half=0.5,control=2", "--feature", "q", "--feature-rows",
                     str(feature_path), "--rule-scale", "1"])


def _rehearsal_row(task, length, seed, losses, multiples=(1.0, 2.0, 4.0)):
    return dict(task=task, split="development", length=length, seed=seed, steps=100, config="pretrain_hold",
                rehearsal_multiples=list(multiples), rehearsal_final_losses_full=list(losses))


def test_switched_rows_name_each_multiple_and_carry_the_branchs_final_loss():
    rows = oracle.switched_rows([_rehearsal_row("lm_small", "default", 0, [1.5, 1.1, math.nan])])
    assert [r["config"] for r in rows] == ["switch_1", "switch_2", "switch_4"]
    assert [r["final_train_loss"] for r in rows][:2] == [1.5, 1.1] and rows[2]["diverged"] is not None
    assert all(r["task"] == "lm_small" and r["seed"] == 0 and r["steps"] == 100 for r in rows)
    with pytest.raises(ValueError, match="no branch 'full' to the run's end"):
        oracle.switched_rows([dict(_rehearsal_row("lm_small", "default", 0, [1.0]), rehearsal_final_losses_full=None)])


def test_the_command_picks_among_the_switched_runs(tmp_path, capsys):
    grid = tmp_path / "grid.jsonl"
    grid.write_text("".join(json.dumps(r) + "\n" for r in _grid("lm_small", "default", 1.0)))
    switched = tmp_path / "rehearsal.jsonl"
    switched.write_text("".join(json.dumps(_rehearsal_row("lm_small", "default", s, [1.5, 1.1 + s * 0.02, 1.3])) + "\n"
                                for s in (0, 1)))
    assert oracle.main([str(grid), "--switched", str(switched), "--configs", "switch_1,switch_2,switch_4"]) == 0
    out = capsys.readouterr().out
    assert "switch_2" in out and "1.110" in out  # the mean of 1.10 and 1.12 over the best AdamW's 1.0


def test_switched_rows_read_a_switch_during_the_warm_up_as_well():
    row = dict(task="lm_small", split="development", length="short", seed=1, steps=100, config="pretrain_hold",
               switch_multiples=[0.5, 2.0], switch_final_losses=[1.3, 1.2], switch_step=10)
    rows = oracle.switched_rows([row])
    assert [(r["config"], r["final_train_loss"]) for r in rows] == [("switch_0.5", 1.3), ("switch_2", 1.2)]


def test_a_rehearsals_pick_among_fewer_multiples_reads_only_their_branches(tmp_path, capsys):
    row = dict(task="lm_small", split="development", length="default", seed=0, steps=100,
               rehearsal_multiples=[0.5, 1.0, 2.0, 4.0, 8.0], rehearsal_losses_r2=[3.0, 1.0, 2.5, 2.0, 9.0],
               rehearsal_min_multiple_r2=1.0)
    (picked,) = oracle.rehearsal_picks_among([row], "rehearsal_min_multiple_r2", [0.5, 2.0, 8.0])
    assert picked["rehearsal_min_multiple_r2"] == 2.0 and row["rehearsal_min_multiple_r2"] == 1.0  # not written over
    assert oracle.rehearsal_picks_among([row], "rehearsal_min_multiple_r2", [4.0, 8.0])[0]["rehearsal_min_multiple_r2"] == 4.0
    # a branch to the run's end is read from its final losses
    full = dict(row, rehearsal_final_losses_full=[1.0, 2.0, 0.5, 3.0, 4.0])
    assert oracle.rehearsal_picks_among([full], "rehearsal_min_multiple_full", [0.5, 2.0])[0][
        "rehearsal_min_multiple_full"] == 2.0
    with pytest.raises(ValueError, match=r"no branch 'r2' at \[16.0\]"):
        oracle.rehearsal_picks_among([row], "rehearsal_min_multiple_r2", [0.5, 16.0])
    with pytest.raises(ValueError, match="rehearsal_min_multiple_<branch>"):
        oracle.rehearsal_picks_among([row], "line_min_multiple", [0.5])
    # the command: the feature's pairs carry the pick among the multiples asked for
    rows = [r for task in ("lm_small", "logreg") for r in _grid(task, "default", 1.0)]
    for task, best in (("lm_small", 2.0), ("logreg", 0.5)):
        rows += [_row(task, "default", f"peak{q:g}", seed, 1.0 + abs(math.log2(q / best)))
                 for seed in (0, 1) for q in (0.5, 1.0, 2.0)]
    features = [dict(row, task=task, seed=seed) for task in ("lm_small", "logreg") for seed in (0, 1)]
    grid, feature_path = tmp_path / "rows.jsonl", tmp_path / "rehearsal.jsonl"
    grid.write_text("".join(json.dumps(r) + "\n" for r in rows))
    feature_path.write_text("".join(json.dumps(r) + "\n" for r in features))
    args = [str(grid), "--configs", "peak0.5=0.5,peak1=1,peak2=2", "--feature", "rehearsal_min_multiple_r2",
            "--feature-rows", str(feature_path)]
    assert oracle.main(args + ["--among", "0.5,2,8"]) == 0
    assert "lm_small default: best multiple 2, rehearsal_min_multiple_r2 2" in capsys.readouterr().out
    assert oracle.main(args) == 0
    assert "lm_small default: best multiple 2, rehearsal_min_multiple_r2 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        oracle.main([str(grid), "--configs", "peak1", "--among", "0.5,2"])
    with pytest.raises(SystemExit):
        oracle.main(args + ["--among", "0.5,x"])


def test_a_pilot_keeps_per_seed_the_configuration_that_ended_lowest_at_the_shorter_length():
    rows = _grid("lm_small", "long", 1.0)
    # seed 0: bold wins the short pilot and loses at long; seed 1: calm wins both
    rows += [_row("lm_small", "short", "bold", 0, 0.5), _row("lm_small", "short", "calm", 0, 0.6),
             _row("lm_small", "long", "bold", 0, 3.0), _row("lm_small", "long", "calm", 0, 1.2),
             _row("lm_small", "short", "bold", 1, 0.9), _row("lm_small", "short", "calm", 1, 0.7),
             _row("lm_small", "long", "bold", 1, 0.8), _row("lm_small", "long", "calm", 1, 1.4)]
    picked = oracle.picked_by_pilot(rows, ["bold", "calm"], "short", "long")
    assert [(r["seed"], r["picked_from"], r["length"], r["final_train_loss"]) for r in picked] == [
        (0, "bold", "long", 3.0), (1, "calm", "long", 1.4)]
    assert {r["config"] for r in picked} == {"pilot@short"}
    long = oracle.bound(rows + picked, ["pilot@short"])["long"]
    assert long["per_task"]["lm_small"] == ("pilot@short", pytest.approx((3.0 + 1.4) / 2))
    # a diverged pilot is not picked; a seed without every configuration's pilot is left out
    rows[-8] = dict(rows[-8], diverged=True)
    del rows[-1]
    assert [(r["seed"], r["picked_from"]) for r in oracle.picked_by_pilot(rows, ["bold", "calm"], "short", "long")] \
        == [(0, "calm")]


def test_a_pilot_must_be_shorter_than_its_target_and_name_known_lengths():
    rows = _grid("lm_small", "long", 1.0)
    with pytest.raises(ValueError, match="must be shorter"):
        oracle.picked_by_pilot(rows, ["a"], "long", "default")
    with pytest.raises(ValueError, match="unknown length"):
        oracle.picked_by_pilot(rows, ["a"], "tiny", "long")
    with pytest.raises(ValueError, match="configs is empty"):
        oracle.picked_by_pilot(rows, [], "short", "long")


def test_the_command_reports_a_pilots_pick_and_its_cost(tmp_path, capsys):
    rows = _grid("lm_small", "default", 1.0)
    rows += [_row("lm_small", "short", "bold", s, 0.5) for s in (0, 1)]
    rows += [_row("lm_small", "short", "calm", s, 0.6) for s in (0, 1)]
    rows += [_row("lm_small", "default", "bold", s, 1.5) for s in (0, 1)]
    rows += [_row("lm_small", "default", "calm", s, 1.1) for s in (0, 1)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert oracle.main([str(path), "--configs", "bold,calm", "--pilot", "short:default"]) == 0
    out = capsys.readouterr().out
    assert "| default | 1.500 | lm_small 1.5 | 1 of 1 | pilot@short 1 |" in out
    assert "(runs): bold 2; the pilots cost 2 x 0.333 = 0.67 of the default run" in out
    with pytest.raises(SystemExit):
        oracle.main([str(path), "--configs", "bold,calm", "--pilot", "default:short"])
