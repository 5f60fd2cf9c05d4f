"""Issue 14's targets read off the zoo's rows (benchmarks/quality/zoo/scorecard.py), and the README's
blocks, which are that reading of the committed rows."""

import json
import math
import os

import pytest

from benchmarks.quality.zoo import runner, scorecard as S, tasks as Z

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZOO = os.path.join(ROOT, "benchmarks", "quality", "results", "zoo")
README = os.path.join(ROOT, "README.md")
#: the README's blocks: split -> (files of rows, the recommended configuration's name in them): every row run on one
#: machine, seeds 0-1 at one commit (NOTES.md sections 73-74) and seeds 2-3 at another (section 77)
README_BLOCKS = {
    "validation": (("validation_repro74.jsonl", "validation_seeds23_77.jsonl", "validation_onerate82.jsonl",
                    "validation_beta91.jsonl"), "pretrain_hold_decayfromhold"),
    "holdout": (("holdout_repro74.jsonl", "holdout_seeds23_77.jsonl", "holdout_onerate82.jsonl", "holdout_beta91.jsonl"),
                "pretrain_hold_decayfromhold")}
#: the second denominator the README's cards add a row for (NOTES.md section 91)
ALSO_ADAMW = "tuned-betas"
#: the rows the README's one-rate yardstick is chosen on (NOTES.md section 82)
ONE_RATE_FROM = ("development.jsonl", "development_onerate82.jsonl")


def _row(task, config, length, seed, loss, level=1e-3, forwards=1.0):
    return dict(task=task, config=config, seed=seed, length=length, steps=Z.ZOO[task].steps_for(length),
                split=Z.ZOO[task].split, final_train_loss=loss, val_loss=loss, level_mean=level,
                forwards_per_step=forwards, diverged=None if loss is not None else "step 3", commit="x", date="d")


def _task_rows(task, length, cand, defaults=1.0, refs=(1.0, 1.0, 1.0), seeds=(0, 1)):
    """AdamW's best (1e-2) at loss 1, and each configuration at its ratio to it."""
    rows = []
    for seed in seeds:
        rows += [_row(task, "adamw_1e-3", length, seed, 3.0), _row(task, "adamw_1e-2", length, seed, 1.0, level=1e-2),
                 _row(task, "adamw_1e-1", length, seed, 2.0)]
        if cand is not None:
            rows.append(_row(task, "cand", length, seed, cand, level=2e-2, forwards=1.5))
        rows.append(_row(task, S.DEFAULTS, length, seed, defaults))
        rows += [_row(task, ref, length, seed, value) for ref, value in zip(runner.REFERENCES, refs)]
    return rows


def test_each_target_is_read_as_the_issue_writes_it():
    names = sorted(Z.names("holdout"))
    assert len(names) == 6
    rows = []
    for length in Z.LENGTHS:
        for task in names:
            rows += _task_rows(task, length, 1.0)
    card = S.scorecard(rows, "holdout", "cand")
    for length in Z.LENGTHS:
        c = card[length]
        assert c["geomean"] == pytest.approx(1.0) and c["geomean_met"] and not c["above"] and not c["missing"]
        assert not c["worse_than_defaults"] and all(a == dict(count=6, met=True) for a in c["ahead"].values())
        assert c["forwards_mean"] == c["forwards_max"] == 1.5
        assert c["tasks"][0]["level_ratio"] == pytest.approx(2.0) and c["tasks"][0]["best_lr"] == pytest.approx(1e-2)
        # the grid's rates next to the best end at 2x (1e-1) and 3x (1e-3) its loss
        assert c["tasks"][0]["grid_step_off"] == pytest.approx((2.0, 3.0))
        assert c["grid_step_off"]["better"] == dict(geomean=pytest.approx(2.0), above=6, tasks=6)
        assert c["grid_step_off"]["worse"] == dict(geomean=pytest.approx(3.0), above=6, tasks=6)

    # at "long": one task at 1.3 (above 1.15; the geomean 1.037 > 1.03), one 6% worse than the
    # defaults, a reference ahead on two tasks of six (4/6 < 3/4), one task without the configuration at "short"
    first, second, third = names[:3]
    rows = [r for r in rows if not (r["length"] == "long" and r["task"] in (first, second, third))
            and not (r["length"] == "short" and r["task"] == first and r["config"] == "cand")]
    rows += _task_rows(first, "long", 1.3, refs=(1.0, 1.0, 2.0))
    rows += _task_rows(second, "long", 1.06, defaults=1.0, refs=(1.0, 1.0, 1.0))
    rows += _task_rows(third, "long", 0.9, refs=(0.8, 1.0, 1.0))
    card = S.scorecard(rows, "holdout", "cand")
    long = card["long"]
    assert long["geomean"] == pytest.approx((1.3 * 1.06 * 0.9) ** (1 / 6)) and not long["geomean_met"]
    assert long["above"] == [first] and long["worse_than_defaults"] == [first, second]
    assert long["ahead"]["prodigy_warmup"] == dict(count=3, met=False)  # behind on the first three
    assert long["ahead"]["prodigy_plus_sf"] == dict(count=5, met=True)
    short = card["short"]
    assert short["missing"] == [first] and math.isnan(short["geomean"]) and not short["geomean_met"]
    assert short["above"] == [first] and short["worse_than_defaults"] == [first]
    assert short["ahead"]["prodigy_warmup"]["count"] == 5
    assert card["default"]["geomean_met"]
    text = S.markdown(card, "holdout", "cand", "the command")
    assert f"| {first} | no rows | 1.000 (2x) | **1.300** (2x) | — / 1.50 / 1.50 |" in text
    assert "| geomean <= 1.03 | —: **missed** | 1.000: met | 1.037: **missed** |" in text
    assert f"**missed** (1: {first})" in text and f"**missed** (2: {first}, {second})" in text
    assert "| at or ahead of Prodigy + warm-up on 75% of tasks | 5/6: met | 6/6: met | 3/6: **missed** |" in text
    assert f"Tasks without rows (every target they enter counts as missed): short: {first}." in text
    assert ("| yardstick: AdamW a grid step off its best rate, the worse side: geomean (tasks above 1.15) "
            "| 3.000 (6/6) | 3.000 (6/6) | 3.000 (6/6) |") in text


def test_the_yardstick_reads_the_grid_rates_next_to_the_best_and_the_one_neighbour_at_an_end():
    task = sorted(Z.names("holdout"))[0]
    rows = []
    for seed in (0, 1):
        rows += [_row(task, "adamw_1e-3", "default", seed, 1.2), _row(task, "adamw_3e-3", "default", seed, 1.0),
                 _row(task, "adamw_1e-2", "default", seed, 1.1), _row(task, "adamw_3e-2", "default", seed, 5.0),
                 _row(task, "adamw_1e-4", "long", seed, 1.0), _row(task, "adamw_3e-4", "long", seed, 1.5)]
    card = S.scorecard(rows, "holdout", "cand")
    by_task = {t["task"]: t for t in card["default"]["tasks"]}
    assert by_task[task]["grid_step_off"] == pytest.approx((1.1, 1.2))  # 3e-2's 5.0 is two steps off
    assert card["default"]["grid_step_off"]["worse"] == dict(geomean=pytest.approx(1.2), above=1, tasks=1)
    assert card["default"]["grid_step_off"]["better"]["above"] == 0
    long = {t["task"]: t for t in card["long"]["tasks"]}
    assert long[task]["edge"] and long[task]["grid_step_off"] == pytest.approx((1.5, 1.5))
    assert card["short"]["grid_step_off"]["better"]["tasks"] == 0  # no grid: no yardstick, not a zero


def test_a_task_with_rows_but_no_adamw_grid_is_named_so_not_as_without_rows():
    """The card said 'Tasks without rows' of a task whose configuration had rows and whose AdamW grid had
    none (a new user's review): the two are told apart."""
    first, second = sorted(Z.names("holdout"))[:2]
    rows = _task_rows(first, "default", 1.0)
    rows += [_row(second, "cand", "default", seed, 1.0) for seed in (0, 1)]  # no grid for the second
    card = S.scorecard(rows, "holdout", "cand")
    assert card["default"]["missing"][0] == second and card["default"]["no_grid"] == [second]
    text = S.markdown(card, "holdout", "cand", "the command")
    assert (f"Of those, with rows but no complete AdamW grid to divide by (run `--configs adamw_grid` on them "
            f"first): default: {second}.") in text


def test_a_diverged_run_misses_every_target_it_enters():
    rows = []
    for length in Z.LENGTHS:
        for task in Z.names("holdout"):
            rows += _task_rows(task, length, 1.0)
    task = Z.names("holdout")[0]
    rows = [r for r in rows if not (r["task"] == task and r["length"] == "default" and r["config"] == "cand")]
    rows += [_row(task, "cand", "default", 0, None), _row(task, "cand", "default", 1, 1.0)]
    card = S.scorecard(rows, "holdout", "cand")["default"]
    assert card["geomean"] == math.inf and not card["geomean_met"] and card["above"] == [task]
    assert card["worse_than_defaults"] == [task] and card["ahead"]["prodigy_warmup"]["count"] == 5
    with pytest.raises(ValueError, match="no task in split"):
        S.scorecard(rows, "test", "cand")


def _holdout_rows(cand_by_task_seed, length="default", seeds=(0, 1, 2, 3)):
    """Every hold-out task at ``length`` with AdamW's best at loss 1 and the configuration at
    ``cand_by_task_seed.get((task, seed), 1.0)``."""
    rows = []
    for task in Z.names("holdout"):
        rows += _task_rows(task, length, None, seeds=seeds)
        rows += [_row(task, "cand", length, seed, cand_by_task_seed.get((task, seed), 1.0)) for seed in seeds]
    return rows


def test_the_geomean_interval_resamples_each_tasks_seeds_and_is_the_geomean_where_seeds_agree():
    """NOTES.md section 77: how far the geomean rests on the seeds drawn."""
    card = S.scorecard(_holdout_rows({}), "holdout", "cand")["default"]
    assert card["geomean"] == pytest.approx(1.0) and card["geomean_interval"] == pytest.approx((1.0, 1.0))
    assert card["seeds"] == [4] and card["tasks"][0]["seed_pairs"] == [(1.0, 1.0)] * 4

    task = Z.names("holdout")[0]
    rows = _holdout_rows({(task, 0): 3.0, (task, 1): 3.0})  # that task: 2.0 on the four seeds' mean
    card = S.scorecard(rows, "holdout", "cand")["default"]
    low, high = card["geomean_interval"]
    assert card["geomean"] == pytest.approx(2.0 ** (1 / 6))
    # the draws of that task's seeds give 1x (no 3.0 drawn) to 3x (only 3.0s); the interval is inside and
    # straddles the whole sample's geomean, and a second reading is the same (a seeded generator)
    assert 1.0 <= low < card["geomean"] < high <= 3.0 ** (1 / 6)
    assert S.scorecard(rows, "holdout", "cand")["default"]["geomean_interval"] == (low, high)
    text = S.markdown({"default": card}, "holdout", "cand", "the command")
    assert f"| geomean, 5%-95% over the seeds resampled per task | {runner._fmt(low)}-{runner._fmt(high)} |" in text
    assert "mean of the seeds (4 per task-length)" in text


def test_the_geomean_interval_is_not_drawn_through_a_diverged_run():
    task = sorted(Z.names("holdout"))[0]  # the card's first task
    rows = [r for r in _holdout_rows({}) if not (r["task"] == task and r["config"] == "cand" and r["seed"] == 2)]
    rows.append(_row(task, "cand", "default", 2, None))
    card = S.scorecard(rows, "holdout", "cand")["default"]
    assert card["tasks"][0]["seed_pairs"] is None and card["geomean_interval"] is None
    assert "| geomean, 5%-95% over the seeds resampled per task | — |" in S.markdown(
        {"default": card}, "holdout", "cand", "the command")


def test_the_card_can_divide_by_adamw_tuned_over_its_weight_decay():
    """NOTES.md section 78: with the no-decay grid (here 0.5x the zoo's best at 1e-2, worse 3x either side) the
    tuned-decay card divides by it, and its yardstick reads that grid's neighbours."""
    rows = []
    for task in Z.names("holdout"):
        rows += _task_rows(task, "default", 1.0)
        rows += [_row(task, f"adamwwd0_{lr}", "default", seed, loss) for seed in (0, 1)
                 for lr, loss in (("1e-3", 1.5), ("1e-2", 0.5), ("1e-1", 1.5))]
    zoo = S.scorecard(rows, "holdout", "cand")["default"]
    tuned = S.scorecard(rows, "holdout", "cand", runner.TUNED_OVER_DECAY)["default"]
    assert zoo["geomean"] == pytest.approx(1.0) and tuned["geomean"] == pytest.approx(2.0)
    assert tuned["tasks"][0]["grid_step_off"] == pytest.approx((3.0, 3.0))
    assert tuned["tasks"][0]["defaults"] == pytest.approx(2.0)  # every configuration divides by the better AdamW
    text = S.markdown({"default": tuned}, "holdout", "cand", S.command(["f"], "holdout", "cand", "tuned-decay"),
                      "tuned-decay")
    assert "--config cand --adamw tuned-decay`" in text
    assert "a grid bracketing its best; the better of weight decay 0.1 on matrices and none)" in text
    assert S.command(["f"], "holdout", "cand").endswith("--config cand")


def test_the_card_adds_a_row_against_adamw_tuned_over_beta2_and_keeps_its_own_denominator(tmp_path):
    """NOTES.md section 91: with AdamW at beta2 0.95 at 0.25x the zoo's best on every task, the card still divides by
    the zoo's grid and says, in one more row, the geomean against the better of the two grids."""
    rows = []
    for length in Z.LENGTHS:
        for task in Z.names("holdout"):
            rows += _task_rows(task, length, 1.0)
            rows += [_row(task, f"adamwb95_{lr}", length, seed, loss) for seed in (0, 1)
                     for lr, loss in (("1e-3", 0.75), ("1e-2", 0.25), ("1e-1", 0.75))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = tmp_path / "page.md"
    page.write_text("\n".join(S.markers("holdout")) + "\n")
    assert runner.main(["scorecard", str(path), "--split", "holdout", "--config", "cand", "--also-adamw",
                        "tuned-betas", "--update", str(page)]) == 0
    text = page.read_text()
    assert "| geomean <= 1.03 | 1.000: met | 1.000: met | 1.000: met |" in text
    assert ("| against AdamW with weight decay 0.1 on matrices, the better of betas (0.9, 0.999) and (0.9, 0.95) "
            "(`--adamw tuned-betas`): geomean (tasks above 1.15) | 4.000 (6/6) | 4.000 (6/6) | 4.000 (6/6) |") in text
    assert "--config cand --also-adamw tuned-betas`" in text


def test_the_update_rewrites_only_its_own_block_and_refuses_a_page_without_it(tmp_path):
    page = tmp_path / "page.md"
    text = "intro\n" + "\n".join(S.markers("holdout")) + "\nafter\n"
    page.write_text(text)
    assert S.replace_block(text, "holdout", "new\n") == "intro\n<!-- zoo scorecard: holdout -->\nnew\n" \
                                                      "<!-- end zoo scorecard: holdout -->\nafter\n"
    for broken in ("intro\n", text + S.markers("holdout")[0], "\n".join(reversed(S.markers("holdout")))):
        with pytest.raises(ValueError, match="once each"):
            S.replace_block(broken, "holdout", "new\n")
    rows = os.path.join(ZOO, "holdout.jsonl")
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit):  # a usage error, and the page as it was
        runner.main(["scorecard", rows, "--split", "holdout", "--config", "pretrain", "--update", str(page)])
    assert page.read_text() == "no markers here\n"


@pytest.mark.parametrize("split", sorted(README_BLOCKS))
def test_the_readme_shows_the_committed_rows_as_the_scorecard_reads_them(split):
    """The README's tables are generated, not typed: this fails when a row or the page changes alone."""
    names, config = README_BLOCKS[split]
    files = [os.path.relpath(os.path.join(ZOO, name), ROOT) for name in names]
    chooser = [os.path.relpath(os.path.join(ZOO, name), ROOT) for name in ONE_RATE_FROM]
    chosen = S.one_rate(runner.read_rows([os.path.join(ROOT, f) for f in chooser]))
    assert chosen["config"] == "adamw_3e-2" and not chosen["edge"]
    rows = runner.read_rows([os.path.join(ROOT, f) for f in files])
    card = S.scorecard(rows, split, config, one_rate=chosen["config"])
    also = (ALSO_ADAMW, S.scorecard(rows, split, config, runner.ADAMW_DENOMINATORS[ALSO_ADAMW][0]))
    expected = S.markdown(card, split, config, S.command(files, split, config, one_rate_from=chooser,
                                                         also_adamw=ALSO_ADAMW), also=also)
    with open(README, encoding="utf-8") as handle:
        assert S.block_of(handle.read(), split) == expected


def test_a_rate_chosen_on_other_rows_reads_the_flattery_and_the_configuration_against_it():
    """NOTES.md section 72: AdamW's rate picked on other seeds' grid, scored on these rows."""
    first, second = sorted(Z.names("holdout"))[:2]
    scored = _task_rows(first, "default", 1.5) + _task_rows(second, "default", 1.2)  # best 1e-2 on both
    choose = [dict(r, seed=r["seed"] + 2) for r in _task_rows(first, "default", 1.0)]
    for r in choose:  # other seeds: 1e-1 best for the first task
        if r["config"] == "adamw_1e-1":
            r["final_train_loss"] = 0.5
    choose += [dict(r, seed=r["seed"] + 2) for r in _task_rows(second, "default", 1.0)]
    result = S.rate_chosen_elsewhere(scored, choose, "holdout", "cand")["default"]
    assert result["tasks"][first] == dict(rate=pytest.approx(1e-1), best_rate=pytest.approx(1e-2), adamw=pytest.approx(2.0),
                                          config=pytest.approx(0.75), config_in_sample=pytest.approx(1.5))
    assert result["tasks"][second]["adamw"] == pytest.approx(1.0) and result["tasks"][second]["config"] == pytest.approx(1.2)
    assert result["adamw"] == dict(geomean=pytest.approx(2 ** 0.5), above=[first])
    assert result["config"]["above"] == [second] and result["config_in_sample"]["above"] == [first, second]
    assert len(result["missing"]) == 4  # the other hold-out tasks have no rows
    text = S.chosen_markdown({"default": result}, "cand")
    assert "| default | 1.414 (1) | 1.342 (2) | 0.949 (1) | 1/2 |" in text


def _development_rows(losses):
    """Development rows of the grid's rates: ``losses`` maps rate -> per-task loss (a list, one per task, for
    every length), seeds 0-1."""
    rows = []
    for length in Z.LENGTHS:
        for i, task in enumerate(sorted(Z.names("development"))):
            rows += [_row(task, f"adamw_{rate}", length, seed, per_task[i]) for rate, per_task in losses.items()
                     for seed in (0, 1)]
    return rows


def test_one_rate_is_the_grid_rate_with_the_lowest_geomean_over_the_development_task_lengths():
    """NOTES.md section 82. Six development tasks: 1e-2 is best on four (ratio 1), 3e-2 on two; 3e-2's ratios
    (1.1 on four, 1 on two) have a lower geomean than 1e-2's (1 on four, 2 on two). A rate without rows on every
    task-length (9e-2, on one) is not chosen, but it is the best AdamW where it ran, and every ratio there is
    over it (the first task at short: 3e-2 2.2, 1e-2 2)."""
    losses = {"1e-3": [3.0] * 6, "1e-2": [1.0, 1.0, 1.0, 1.0, 2.0, 2.0], "3e-2": [1.1, 1.1, 1.1, 1.1, 1.0, 1.0],
              "1e-1": [5.0] * 6}
    rows = _development_rows(losses)
    rows += [_row(sorted(Z.names("development"))[0], "adamw_9e-2", "short", seed, 0.5) for seed in (0, 1)]
    chosen = S.one_rate(rows)
    assert chosen["config"] == "adamw_3e-2" and not chosen["edge"] and chosen["task_lengths"] == 18
    assert list(chosen["geomeans"]) == ["adamw_1e-3", "adamw_1e-2", "adamw_3e-2", "adamw_1e-1"]
    assert chosen["geomeans"]["adamw_3e-2"] == pytest.approx((1.1 ** 11 * 2.2) ** (1 / 18))
    assert chosen["geomeans"]["adamw_1e-2"] == pytest.approx(2 ** (7 / 18))
    at_end = S.one_rate(_development_rows({"1e-2": [1.0] * 6, "3e-2": [2.0] * 6}))
    assert at_end["config"] == "adamw_1e-2" and at_end["edge"]
    with pytest.raises(ValueError, match="no task-length of split 'development'"):
        S.one_rate([r for r in rows if r["split"] != "development"])


def test_the_one_rate_yardstick_reads_that_rate_on_every_task_and_counts_the_configuration_ahead_of_it():
    rows = []
    names = sorted(Z.names("holdout"))
    for i, task in enumerate(names):  # the candidate 1.0 everywhere; AdamW at 1e-1 is 2x the best, at 1e-3 3x
        rows += _task_rows(task, "default", 1.0 if i else 2.5)
    card = S.scorecard(rows, "holdout", "cand", one_rate="adamw_1e-1")["default"]
    assert card["tasks"][1]["one_rate"] == pytest.approx(2.0)
    assert card["one_rate"] == dict(config="adamw_1e-1", geomean=pytest.approx(2.0), above=6, tasks=6, ahead=5)
    text = S.markdown({"default": card}, "holdout", "cand", S.command(["f"], "holdout", "cand", one_rate_from=["d"]))
    assert "--config cand --one-rate-from d`" in text
    assert "| yardstick: AdamW at one rate on every task (`adamw_1e-1`, chosen on development): geomean (tasks above " \
           "1.15) | 2.000 (6/6) |" in text and "| at or ahead of AdamW at that one rate | 5/6 |" in text
    without = S.scorecard([r for r in rows if not (r["config"] == "adamw_1e-1" and r["task"] == names[0])],
                          "holdout", "cand", one_rate="adamw_3e-2")["default"]
    assert without["one_rate"]["tasks"] == 0 and math.isnan(without["one_rate"]["geomean"])
    assert S.scorecard(rows, "holdout", "cand")["default"]["one_rate"] is None
    assert "one rate" not in S.markdown({"default": S.scorecard(rows, "holdout", "cand")["default"]}, "holdout",
                                        "cand", "c")


def test_the_command_refuses_a_one_rate_at_an_end_of_the_development_ladder(tmp_path):
    rows = tmp_path / "development.jsonl"
    import json
    rows.write_text("".join(json.dumps(r) + "\n" for r in _development_rows({"1e-2": [1.0] * 6, "3e-2": [2.0] * 6})))
    with pytest.raises(SystemExit, match="an end of the rates"):
        runner.main(["scorecard", str(rows), "--split", "development", "--config", "adamw_1e-2",
                     "--one-rate-from", str(rows)])


def test_pooled_reads_the_ratios_of_several_splits_together_and_names_a_missing_task(capsys, tmp_path):
    """NOTES.md section 92's pooled figures: one geomean over the tasks of several splits, a task without a
    ratio left out and named, never read as met."""
    holdout, holdout2 = sorted(Z.names("holdout")), sorted(Z.names("holdout2"))
    rows = []
    for length in Z.LENGTHS:
        rows += [r for task in holdout for r in _task_rows(task, length, 2.0)]
        rows += [r for task in holdout2 for r in _task_rows(task, length, 1.0 if task != holdout2[0] else None)]
    result = S.pooled(rows, ["holdout", "holdout2"], "cand")
    for length in Z.LENGTHS:
        entry = result[length]
        assert len(entry["ratios"]) == len(holdout) + len(holdout2) - 1 and entry["missing"] == [holdout2[0]]
        count = len(entry["ratios"])
        assert entry["geomean"] == pytest.approx(2.0 ** (len(holdout) / count))
        assert entry["above"] == holdout
    path = str(tmp_path / "rows.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    assert runner.main(["pooled", path, "--splits", "holdout,holdout2", "--configs", "cand"]) == 0
    printed = capsys.readouterr().out
    assert f"over {len(holdout) + len(holdout2) - 1} ({len(holdout)} above; missing {holdout2[0]})" in printed
    with pytest.raises(SystemExit):
        runner.main(["pooled", path, "--splits", "holdout,test", "--configs", "cand"])


def test_a_grid_whose_best_rate_is_at_its_end_is_named_not_called_bracketing():
    """holdout2's least squares fit (NOTES.md section 92): the runner stopped at its four extensions with the best
    rate at the grid's top, and the card said nothing."""
    names = sorted(Z.names("holdout2"))
    rows = [r for length in Z.LENGTHS for task in names for r in _task_rows(task, length, 1.0)]
    plain = S.markdown(S.scorecard(rows, "holdout2", "cand"), "holdout2", "cand", "cmd")
    assert "Not bracketed" not in plain
    for r in rows:
        if r["task"] == names[0] and r["length"] == "long" and r["config"] == "adamw_1e-1":
            r["final_train_loss"] = 0.5  # the top rate is now the best
    card = S.scorecard(rows, "holdout2", "cand")
    assert [t["task"] for t in card["long"]["tasks"] if t["edge"]] == [names[0]]
    text = S.markdown(card, "holdout2", "cand", "cmd")
    assert f"Not bracketed (`--adamw zoo-grid`)" in text and f"long: {names[0]}." in text
