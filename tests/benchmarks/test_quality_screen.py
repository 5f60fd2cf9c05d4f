"""benchmarks.quality.screen: pooling run logs and ranking candidates against AdamW."""

import json

import pytest

from benchmarks.quality import screen

LOG = """\
teacher   adamw_1e-2           seed 0: train 0.3000 val 0.1 1.0 ms/step 1.00 fwd/step
teacher   adamw_1e-2           seed 1: train 0.5000 val 0.1 1.0 ms/step 1.00 fwd/step
teacher   adamw_3e-2           seed 0: train 0.2000 val 0.1 1.0 ms/step 1.00 fwd/step
teacher   adamw_3e-2           seed 1: train 0.4000 val 0.1 1.0 ms/step 1.00 fwd/step
teacher   old_name             seed 0: train 0.2200 val 0.1 1.0 ms/step 1.30 fwd/step
teacher   old_name             seed 1: train 0.4400 val 0.1 1.0 ms/step 1.30 fwd/step
teacher   cand                 seed 0: train 0.1800 val 0.1 1.0 ms/step 1.30 fwd/step
teacher   cand                 seed 1: train 0.3600 val 0.1 1.0 ms/step 1.30 fwd/step
| a summary line | 1 | 2 |
"""


def test_collect_and_table(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    out = tmp_path / "losses.json"
    assert screen.main(["collect", str(log), "--rename", "old_name=reference", "--out", str(out)]) == 0
    losses = json.loads(out.read_text())
    assert set(losses["teacher"]) == {"adamw_1e-2", "adamw_3e-2", "reference", "cand"}
    assert losses["teacher"]["cand"] == {"0": 0.18, "1": 0.36}
    text = screen.table(screen.collect([str(log)], {"old_name": "reference"}), "reference")
    assert "best AdamW adamw_3e-2 (mean 0.3000)" in text
    # cand: mean 0.27 / 0.30 = 0.900; per seed 0.18/0.22 and 0.36/0.44, both 9/11
    assert f"| cand | 2 | 0.900 | {9 / 11:.3f} ± 0.000 |" in text
    assert "| reference | 2 | 1.100 | - |" in text
    assert text.index("| cand |") < text.index("| reference |")


def test_candidates_on_fewer_seeds_are_compared_on_their_own(tmp_path):
    log = tmp_path / "run.log"
    extra = "".join(f"teacher   {name:20s} seed {seed}: train {loss:.4f} val 0.1 1 ms/step 1 fwd/step\n"
                    for name, seed, loss in [("adamw_1e-2", 2, 0.1), ("adamw_3e-2", 2, 0.9),
                                             ("partial", 1, 0.2), ("partial", 2, 0.05), ("lonely", 0, 0.1)])
    log.write_text(LOG + extra)
    text = screen.table(screen.collect([str(log)], {}), None)
    assert "seeds 0-2 (3), best AdamW adamw_1e-2" in text
    # partial has seeds 1 and 2; on those AdamW 1e-2 averages (0.5 + 0.1) / 2 = 0.30 (3e-2: 0.65)
    assert f"| partial | 2 (1-2) | {0.125 / 0.30:.3f} | - |" in text
    assert "lonely" not in text  # one seed: no mean worth ranking


def test_bad_rename_is_refused(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    with pytest.raises(SystemExit):
        screen.main(["collect", str(log), "--rename", "no-equals-sign", "--out", str(tmp_path / "x.json")])


def test_screen_reads_the_lines_the_runner_writes(tmp_path):
    from benchmarks.quality import run

    result = dict(seed=7, final_train_loss=0.123456, val_loss=0.2, step_time_ms=1.0, forwards_per_step=1.3,
                  diverged=None)
    log = tmp_path / "run.log"
    log.write_text(run.run_line("teacher", "salsa_recommended", result) + "\n"
                   + run.run_line("teacher", "adamw_3e-2", result) + " (grid extension)\n")
    assert screen.collect([str(log)], {}) == {"teacher": {"salsa_recommended": {7: 0.1235}, "adamw_3e-2": {7: 0.1235}}}


def test_table_pools_files_and_keeps_the_seeds_asked_for(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    screen.main(["collect", str(log), "--out", str(first)])
    more = "".join(f"teacher   {name:20s} seed 2: train {loss:.4f} val 0.1 1 ms/step 1 fwd/step\n"
                   for name, loss in [("adamw_1e-2", 0.2), ("adamw_3e-2", 0.4), ("cand", 0.3)])
    (tmp_path / "more.log").write_text(more)
    screen.main(["collect", str(tmp_path / "more.log"), "--out", str(second)])
    assert screen.main(["table", str(first), str(second), "--reference", "old_name"]) == 0
    pooled = capsys.readouterr().out
    assert "seeds 0-2 (3)" in pooled and "| cand | 3 |" in pooled
    assert screen.main(["table", str(first), str(second), "--seeds", "2"]) == 0
    only_two = capsys.readouterr().out
    # seed 2 alone: best AdamW is 1e-2 (0.2), cand 0.3 -> 1.5; seed 2 has no old_name run
    assert "seeds 2-2 (1), best AdamW adamw_1e-2" in only_two and "old_name" not in only_two
    assert screen.main(["table", str(first), "--seeds", "5-9"]) == 0  # no seed left: no table, no crash


def test_pooled_files_must_agree_and_seed_lists_must_parse(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    screen.main(["collect", str(log), "--out", str(first)])
    (tmp_path / "other.log").write_text(LOG.replace("train 0.1800", "train 0.1900"))
    screen.main(["collect", str(tmp_path / "other.log"), "--out", str(second)])
    with pytest.raises(SystemExit):
        screen.main(["table", str(first), str(second)])
    with pytest.raises(ValueError, match="two different losses"):
        screen.merge([screen.collect([str(log)], {}), screen.collect([str(tmp_path / "other.log")], {})])
    assert screen.parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="bad seed list"):
        screen.parse_seeds("0-x")
