"""The benchmarks' command lines: a bad flag is refused by name (exit 2) before anything is measured
or written. (kernel_bench, train_bench and memory run end to end in test_benchmarks_smoke.py.)"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import host_overhead, kernel_bench, memory, step_counts, step_profile, train_bench

ROOT = Path(__file__).resolve().parents[2]


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2, err
    return err


def _never(*args, **kwargs):
    pytest.fail("measured before refusing")


@pytest.mark.parametrize("flags, message", [
    (["--tiny", "--sizes", "-5"], "argument --sizes: must be at least 1, got -5"),
    (["--tiny", "--sizes", "0"], "argument --sizes: must be at least 1, got 0"),
    (["--tiny", "--repeats", "-1"], "argument --repeats: must be at least 1, got -1"),
    (["--tiny", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--tiny", "--dtypes"], "argument --dtypes: expected at least one argument"),
    ([], "--device cpu runs only with --tiny"),  # the GPU sizes, up to 2^30 elements, on a CPU
    (["--tiny", "--out-dir", __file__], "argument --out-dir: "),
])
def test_kernel_bench_refuses_bad_flags(tmp_path, flags, message, capsys, monkeypatch):
    monkeypatch.setattr(kernel_bench, "bench", _never)
    argv = ["--device", "cpu", *flags] + ([] if "--out-dir" in flags else ["--out-dir", str(tmp_path)])
    assert message in _refused(kernel_bench.main, argv, capsys)
    assert not list(tmp_path.iterdir())


def test_a_damaged_results_file_is_named_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kernel_bench, "bench", _never)
    monkeypatch.setattr(train_bench, "run_one", _never)
    monkeypatch.setattr(memory, "measure", _never)
    monkeypatch.setattr(step_counts, "measure", _never)
    for main, name, flags in ((kernel_bench.main, "kernel_bench_cpu_smoke", ["--device", "cpu", "--tiny"]),
                              (train_bench.main, "train_bench_cpu_smoke", ["--device", "cpu", "--tiny"]),
                              (memory.main, "memory_float32_tiny_smoke", ["--device", "cpu", "--tiny"]),
                              (step_counts.main, "step_counts", ["--device", "cpu"])):
        damaged = tmp_path / f"{name}.json"
        damaged.write_text('{"runs": [')
        assert f"{damaged} is not a results file" in _refused(main, [*flags, "--out-dir", str(tmp_path)], capsys)
        assert damaged.read_text() == '{"runs": ['


def test_tiny_kernel_timings_stay_out_of_the_published_file():
    assert kernel_bench.results_name(on_gpu=True, tiny=False) == "kernel_bench"
    assert kernel_bench.results_name(on_gpu=True, tiny=True) == "kernel_bench_tiny_smoke"
    assert kernel_bench.results_name(on_gpu=False, tiny=True) == "kernel_bench_cpu_smoke"


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--profile", "0"], "argument --profile: must be at least 1, got 0"),
    (["--calls", "0"], "argument --calls: must be at least 1, got 0"),
    (["--sizes"], "argument --sizes: expected at least one argument"),
    (["--grads"], "argument --grads: expected at least one argument"),
    (["--launch", "real", "--device", "cpu"], "--launch real: real launches are timed on CUDA only"),
    (["--out", "{tmp}"], "argument --out: "),  # a directory
])
def test_host_overhead_refuses_bad_flags(tmp_path, flags, message, capsys, monkeypatch):
    for name in ("rows", "profile", "python_calls"):
        monkeypatch.setattr(host_overhead, name, _never)
    argv = ["--out", str(tmp_path / "rows.jsonl"), *(f.format(tmp=tmp_path) for f in flags)]
    assert message in _refused(host_overhead.main, argv, capsys)
    assert not list(tmp_path.iterdir())


def test_step_profile_refuses_zero_steps(capsys, monkeypatch):
    monkeypatch.setattr(step_profile, "profile_steps", _never)
    assert "argument --steps: must be at least 1, got 0" in _refused(step_profile.main, ["--steps", "0"], capsys)
    assert "argument --optimizer: expected at least one argument" in _refused(step_profile.main, ["--optimizer"],
                                                                              capsys)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1"], "argument --steps: must be at least 2, got 1"),  # two timing windows
    (["--steps", "0"], "argument --steps: must be at least 2, got 0"),
    (["--optimizers"], "argument --optimizers: expected at least one argument"),
])
def test_train_bench_refuses_bad_flags(tmp_path, flags, message, capsys, monkeypatch):
    monkeypatch.setattr(train_bench, "run_one", _never)
    argv = ["--device", "cpu", "--tiny", "--out-dir", str(tmp_path), *flags]
    assert message in _refused(train_bench.main, argv, capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a check for machines without a CUDA device")
@pytest.mark.parametrize("module", [host_overhead, kernel_bench, memory, step_counts, step_profile, train_bench])
def test_a_cuda_device_that_is_not_here_is_refused_by_name(module, capsys, monkeypatch):
    """``--device cuda`` on a CPU-only torch ended in torch's AssertionError ("Torch not compiled with CUDA
    enabled") deep in the first tensor four of these made (an audit's runs)."""
    for name in ("measure", "profile_steps", "run_one", "run"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _never)
    assert "argument --device: cuda: no such CUDA device here" in _refused(module.main, ["--device", "cuda"], capsys)
    assert "argument --device: expected cpu, cuda or cuda:N, got 'gpu'" in _refused(module.main, ["--device", "gpu"],
                                                                                     capsys)


@pytest.mark.parametrize("module", [step_profile, train_bench])
def test_the_gpt2_small_default_is_refused_on_the_cpu(module, capsys, monkeypatch):
    """Without --tiny these ran GPT-2 small on the CPU, past an audit's 2- and 4-minute limits."""
    for name in ("profile_steps", "run_one"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, _never)
    assert "--device cpu runs only with --tiny" in _refused(module.main, ["--device", "cpu"], capsys)


def test_step_profile_appends_a_row_with_its_environment(tmp_path, monkeypatch):
    """It only printed: no row, no commit, versions or date (an audit's finding)."""
    monkeypatch.setattr(step_profile, "profile_steps", lambda *a: {"table": "t", "wall_ms": 1.5})
    out = tmp_path / "rows.jsonl"
    step_profile.main(["--device", "cpu", "--tiny", "--optimizer", "adamw_fused", "--out", str(out)])
    (row,) = [__import__("json").loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["optimizer"] == "adamw_fused" and row["values"] == {"wall_ms": 1.5}
    assert {"git_commit", "torch", "device", "date"} <= set(row["env"])


@pytest.mark.parametrize("flag", ["--sample", "--json"])
def test_kernel_audit_refuses_an_out_dir_it_would_not_write(tmp_path, flag):
    """--sample and --json print the records and write nothing: an --out-dir beside them was ignored silently.
    (A process of its own: the audit refuses to import under TRITON_INTERPRET=1, which the tests set.)"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_audit", flag, "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--out-dir with --sample or --json" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_memory_refuses_an_empty_backend_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "measure", _never)
    argv = ["--device", "cpu", "--tiny", "--backends", "--out-dir", str(tmp_path)]
    assert "argument --backends: expected at least one argument" in _refused(memory.main, argv, capsys)


def test_the_pytest_benchmark_file_run_as_a_module_says_how_to_run_it():
    done = subprocess.run([sys.executable, "-m", "benchmarks.test_kernel_speed", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pytest benchmarks/test_kernel_speed.py" in done.stderr, done.stderr


def test_the_long_suites_smoke_form_never_writes_into_the_committed_results(tmp_path):
    """Without --out-dir it writes into a new temporary directory; --out-dir benchmarks/results and an
    empty --out-dir (an unset variable) are refused before any stage runs."""
    script = str(ROOT / "benchmarks" / "long_suite.sh")
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "PYTHON": "false"}  # every stage fails at once
    for flags, message in ((["--out-dir", "benchmarks/results"], "does not write into the committed"),
                           (["--out-dir", "benchmarks/results/"], "does not write into the committed"),
                           (["--out-dir", ""], "--out-dir needs a directory")):
        done = subprocess.run(["bash", script, "--smoke", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
    done = subprocess.run(["bash", script, "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True)
    (scratch,) = tmp_path.glob("salsa_long_suite_smoke.*")
    assert f"-> {scratch}" in done.stdout, done.stdout


def test_host_overhead_yields_each_row_as_its_measurement_ends(monkeypatch):
    """rows() returned a list after every measurement of a size: the GPU suite's stage, killed at its limit,
    lost every 10,000-tensor row it had measured (H200 run 1). Each row comes as its measurement ends."""
    measured = []

    def fake_measure(n, device, launch, steps, grads):
        measured.append((n, grads))
        return {"salsa": {"launch": launch}}
    monkeypatch.setattr(host_overhead, "measure", fake_measure)
    records = host_overhead.rows((148, 10000), torch.device("cpu"), grad_modes=("fresh", "cycled"))
    assert next(records)["name"] == "salsa 148 tensors, launch stubbed, grads fresh" and measured == [(148, "fresh")]
    assert len(list(records)) == 3 and len(measured) == 4


QUALITY_SCRIPTS = sorted(  # every module of benchmarks/quality that runs as python -m (a package by its __main__.py)
    ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1 if path.name == "__main__.py" else None])
    for path in (ROOT / "benchmarks" / "quality").rglob("*.py")
    if path.name == "__main__.py" or "__main__" in path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("module", QUALITY_SCRIPTS)
def test_every_quality_script_answers_help_without_running(module, capsys, monkeypatch):
    """``python -m benchmarks.quality.reference_headline --help`` built a task and died on float('--help')."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__")
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out
