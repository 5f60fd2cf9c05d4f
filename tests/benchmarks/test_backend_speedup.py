"""benchmarks.backend_speedup runs the demo and zoo tasks on both CPU backends and appends one record."""

import json
import math

import pytest

from benchmarks import backend_speedup
from salsa_fused import backends


def test_times_both_backends_and_appends_one_record(tmp_path):
    import torch

    if not backends.usable("cpp", torch.device("cpu")):
        pytest.fail("the C++ extension is not built: pip install --no-build-isolation -e \".[test]\"")
    out = tmp_path / "speedup.jsonl"
    threads = torch.get_num_threads()
    record = backend_speedup.run(rounds=1, demo_steps=2, zoo_steps=3, threads=1, tasks=["logreg", "mlp_gelu_sin"],
                                 results=out)
    assert torch.get_num_threads() == threads  # the caller's setting comes back
    assert set(record["demo_seconds"]) == {"torch", "cpp"}
    assert all(s > 0 for s in record["demo_seconds"].values())
    assert record["demo_speedup"] == pytest.approx(record["demo_seconds"]["torch"] / record["demo_seconds"]["cpp"])
    assert set(record["zoo_speedup_by_task"]) == {"logreg", "mlp_gelu_sin"}
    ms = record["zoo_step_ms"]
    for task, factor in record["zoo_speedup_by_task"].items():
        assert factor == pytest.approx(ms["torch"][task] / ms["cpp"][task]) and math.isfinite(factor)
    assert record["zoo_speedup_geomean"] == pytest.approx(math.sqrt(math.prod(record["zoo_speedup_by_task"].values())))
    for key in ("git_commit", "torch", "device", "date", "load_average"):
        assert record[key], key
    # the device names the threads the runs had, not the caller's setting restored after them
    assert "1 torch threads" in record["device"] and record["threads"] == 1
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["zoo_steps"] == 3


def test_an_unknown_task_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo task 'no_such_task'"):
        backend_speedup.run(rounds=1, demo_steps=0, zoo_steps=2, threads=1, tasks=["no_such_task"],
                            results=tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "logreg,no_such_task"], r"unknown zoo tasks \['no_such_task'\]"),
    (["--demo-steps", "0", "--zoo-steps", "0"], "nothing to measure"),
    (["--tasks", ","], "argument --tasks: expected comma-separated names"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
])
def test_the_command_line_is_refused_before_anything_runs(tmp_path, flags, message, capsys, monkeypatch):
    """Refused before the demo (minutes) runs, and nothing appended."""
    monkeypatch.setattr(backend_speedup, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as refused:
        backend_speedup.main([*flags, "--out", str(tmp_path / "x.jsonl")])
    assert refused.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.jsonl").exists()


def test_an_out_that_is_a_directory_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backend_speedup, "run", lambda *a, **k: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as refused:
        backend_speedup.main(["--out", str(tmp_path)])
    assert refused.value.code == 2 and "argument --out: " in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
