"""benchmarks.sat_out_buckets: the merged and the kept-apart runs side by side, their row, its flags."""

from __future__ import annotations

import json

import pytest

from benchmarks import sat_out_buckets


def test_the_merged_run_takes_fewer_buckets_and_the_same_steps_bitwise(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert sat_out_buckets.main(["--betas", "0.5", "0.5", "--steps", "60", "--experts", "4", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    values = row["values"]
    assert values["bitwise_same"] is True and values["searches"] > 0
    assert values["merged_buckets_median_second_half"] == 1 < values["apart_buckets_median_second_half"]
    assert values["merged_rebuilds"] == values["apart_rebuilds"]
    assert {"git_commit", "torch", "device", "date"} <= set(row["env"])
    assert "appended to" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--betas", "0.9", "1.0"], "argument --betas: each must be below 1"),
    (["--use", "1.5"], "argument --use: must be at most 1"),
    (["--steps", "1"], "argument --steps: must be at least 2"),
    (["--backend", "cuda"], "argument --backend: invalid choice"),
])
def test_bad_flags_are_refused_by_name_before_anything_is_measured(tmp_path, flags, message, capsys, monkeypatch):
    monkeypatch.setattr(sat_out_buckets, "measure", lambda *args, **kwargs: pytest.fail("measured before refusing"))
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit) as refused:
        sat_out_buckets.main([*flags, "--out", str(out)])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
