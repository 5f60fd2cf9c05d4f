"""The GPU check end to end on the CPU: ``bash benchmarks/gpu_suite.sh --out DIR --smoke``.

Every stage runs at tiny sizes in its own process and writes its rows as it goes; the
run leaves at most five files in DIR and nothing in the repository. The driver's own
behaviour (a failed stage is logged and the next one runs; a stage without time left is
not started) is checked directly.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from tests import background

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache"}


def _repo_files() -> set:
    """Every file and folder of the checkout (a new empty folder, e.g. pytest-benchmark's .benchmarks/, counts)."""
    found = set()
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        found.update(os.path.relpath(os.path.join(directory, f), ROOT) + "/" for f in subdirs)
        found.update(os.path.relpath(os.path.join(directory, f), ROOT) for f in files)
    return found


def _smoke(tmp: Path):
    out = tmp / "gpu_suite"
    out.mkdir()
    before = _repo_files()
    # --slow 6: time limits for a busy 2-core CI machine (each stage also starts torch afresh).
    done = background.run_process(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--out", str(out), "--smoke",
                                   "--slow", "6"], cwd=ROOT, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    return done, out, rows, _repo_files() - before


SMOKE = background.job("gpu suite smoke", _smoke, seconds_hint=72)


@pytest.fixture(scope="module")
def smoke():
    return SMOKE.result()


def test_every_stage_passes(smoke):
    done, out, rows, _ = smoke
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [s["stage"] for s in summary["stages"]] == list(gpu_suite.STAGE_NAMES)
    statuses = {s["stage"]: s["status"] for s in summary["stages"]}
    assert all(status == "passed" for status in statuses.values()), (statuses, done.stdout[-3000:])
    assert done.returncode == 0
    assert summary["smoke"] is True


def test_results_are_a_few_files_and_nothing_lands_in_the_repo(smoke):
    _, out, _, new_repo_files = smoke
    names = {p.name for p in out.iterdir()}
    assert names == set(gpu_suite.OUT_FILES)  # at most 8 files come back from a lent machine
    assert not new_repo_files, sorted(new_repo_files)
    with tarfile.open(out / "details.tar.gz") as archive:
        members = archive.getnames()
    assert any(name.endswith("training_fused_salsa_copy.json") for name in members), members
    assert "CPU smoke run" in (out / "summary.md").read_text(encoding="utf-8")


def test_rows_carry_their_environment_and_every_stage_has_rows(smoke):
    _, _, rows, _ = smoke
    for row in rows:
        assert {"stage", "name", "status", "values", "env"} <= set(row)
        for key in ("device", "torch", "triton", "date", "git_commit"):
            assert row["env"][key], key
        assert row["smoke"] is True
    assert {row["stage"] for row in rows} == set(gpu_suite.STAGE_NAMES)
    assert not [row["name"] for row in rows if row["status"] == "failed"]


def test_the_smoke_summary_says_what_it_did_not_check(smoke):
    """The smoke summary read "passed" for a pytest stage whose 7 tests all skipped, reported 0 host syncs where
    nothing was checked (the sync check is CUDA's), and left out the launches per step that decide the stage
    (an audit's reading)."""
    _, out, rows, _ = smoke
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "not checked on the CPU" in text and "every test skipped (no CUDA device): none ran" in text
    plain = next(v for name, v in _values(rows, "cuda_checks").items() if name.startswith("plain steps"))
    assert plain["host_syncs"] == "not checked on the CPU"
    launches = ", ".join(map(str, plain["triton_launches_per_plain_step"]))
    assert "triton_launches_per_plain_step" in text and f"| {launches} |" in text


def _values(rows, stage):
    return {row["name"]: row["values"] for row in rows if row["stage"] == stage}


def test_plain_steps_launch_once_per_bucket(smoke):
    checks = _values(smoke[2], "cuda_checks")
    plain = [v for name, v in checks.items() if name.startswith("plain steps")]
    assert len(plain) == 3  # fp32, bf16, GradScaler
    for v in plain:
        assert v["triton_launches_per_plain_step"] == [v["buckets"]] * v["plain_steps"]
        assert v["searches"] == 1 and v["weights_changed"] and v["finite"]


def test_kernel_timing_covers_both_dtypes_and_the_roofline(smoke):
    timing = _values(smoke[2], "kernel_timing")
    for dtype in ("fp32", "bf16"):
        for provider in ("adamw_fused", "adamw_foreach", "salsa_plain", "salsa_reduction", "salsa_pass_a",
                         "salsa_pass_b", "copy"):
            row = timing[f"{provider} {dtype}"]
            assert row["p50_ms"] > 0 and "148 tensors" in row["size"]
    assert timing["salsa_plain fp32"]["bytes_moved"] == 28 * timing["salsa_plain fp32"]["numel"]
    # CPU smoke figures get ratios, never a verdict that would read as the GPU target's
    assert "targets fp32 (met = True)" not in timing
    assert timing["fp32 ratios to fused AdamW (CPU smoke: not judged)"]["plain / fused AdamW"] > 0


def test_host_overhead_rows_stand_beside_fused_adamw(smoke):
    host = _values(smoke[2], "host_overhead")
    for n in (148, 1000):
        for grads in ("kept", "cycled", "new"):
            salsa = host[f"fused_salsa_plain {n} tensors, launch stubbed, grads {grads}"]
            assert salsa["p50_host_ms"] > 0 and salsa["vs_adamw_fused"] > 0
            assert salsa["launches_per_step"] == 1  # one bucket, one (stubbed) launch
            assert salsa["group_signature"]  # the smoke run loads the checkout's extension
            assert salsa["beside_extension_build"] is False  # the smoke form builds nothing
            assert host[f"adamw_fused {n} tensors, launch real, grads {grads}"]["p50_host_ms"] > 0


def test_large_tensor_step_matches_the_formula_at_start_middle_and_tail(smoke):
    (values,) = _values(smoke[2], "large_tensor").values()
    assert set(values["checks"]) == {"start", "across 2^31", "tail"}
    for check in values["checks"].values():
        assert check["m_rel_err"] <= 1e-5 and check["w_err_in_bf16_ulps"] <= 1.01
    assert values["backend"] in ("triton", "cpp", "torch")  # the backend that ran, not "auto"


def test_q_reduction_is_deterministic_and_close_to_float64(smoke):
    determinism = _values(smoke[2], "determinism")
    assert len(determinism) == 2
    for values in determinism.values():
        assert values["bitwise_equal_over_3_runs"] is True
        assert values["rel_err_vs_float64"] < 1e-5


def test_training_compares_every_optimizer(smoke):
    training = _values(smoke[2], "training")
    assert set(training) == {"adamw_fused", "fused_salsa_recommended", "fused_salsa_copy", "fused_salsa_inplace",
                             "salsa_published", "adamw_fused, run again last",
                             "steady-state overhead, steps 3-4 (CPU smoke: not judged)"}
    # AdamW again last: same model, batches and settings give the same losses.
    assert training["adamw_fused, run again last"]["mean_loss_last_50"] == training["adamw_fused"]["mean_loss_last_50"]
    overhead = training["steady-state overhead, steps 3-4 (CPU smoke: not judged)"]
    assert overhead["fused_salsa_copy / (adamw + extra forwards)"] > 0
    assert not any("met" in key for key in overhead)  # no verdict on CPU smoke figures
    # Same model, batches and defaults: the faithful FusedSaLSa takes the published package's steps.
    assert training["fused_salsa_copy"]["backtracks"] == training["salsa_published"]["backtracks"]
    assert training["fused_salsa_copy"]["final_step_size"] == pytest.approx(
        training["salsa_published"]["final_step_size"], rel=1e-4)


def test_step_profile_reports_each_optimizer(smoke):
    profiles = _values(smoke[2], "step_profile")
    assert {name.split(",")[0] for name in profiles} == {"profile adamw_fused", "profile fused_salsa_copy",
                                                         "profile fused_salsa_inplace"}
    copy = profiles["profile fused_salsa_copy, 2 steps after 2"]
    assert copy["wall_ms"] > 0 and copy["forwards_per_step"] >= 1 and copy["top_host_ops"].count(" ms x") >= 3


def test_a_failed_stage_is_logged_and_the_next_one_runs(tmp_path):
    details = tmp_path / "details"
    details.mkdir()
    suite = gpu_suite.Suite(tmp_path, smoke=True, budget=60, details=details)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    broken = suite.run_stage(gpu_suite.Stage("no_such_stage", 30, 30, "a stage the runner does not know"), env)
    assert broken["status"] == "failed" and "exit code" in broken["reason"]
    suite.budget = 0  # nothing left: the next stage is recorded as not run, not started
    skipped = suite.run_stage(gpu_suite.STAGES[0], env)
    assert skipped["status"] == "not run" and "no time left" in skipped["reason"]
    suite.stages += [broken, skipped]
    suite.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in summary["stages"]] == ["failed", "not run"]
    assert "no_such_stage" in (tmp_path / "suite.log").read_text(encoding="utf-8")


def test_host_overhead_runs_on_the_background_build_once_it_succeeded(tmp_path):
    """The host stage times the compiled group_signature path when the JIT build is done;
    before that, or after a failed build, it runs without it (its rows say which), and while the build
    still runs beside it, its rows say that too (the compile shares the host with the timed steps)."""
    class Build:
        env = {"SALSA_FUSED_JIT": "1"}
        exit_code = None

        def succeeded(self):
            return self.exit_code == 0

        def running(self):
            return self.exit_code is None

    suite = gpu_suite.Suite(tmp_path, smoke=False, budget=60, details=tmp_path)
    stages = {s.name: s for s in gpu_suite.STAGES}
    plain = {"PATH": "/bin"}
    assert suite.stage_env(stages["host_overhead"], plain) is plain  # no build started
    suite.build = Build()
    beside = {**plain, gpu_suite.BUILD_RUNNING_ENV: "1"}
    for exit_code, expected in [(None, beside), (1, plain), (0, Build.env)]:
        suite.build.exit_code = exit_code
        assert suite.stage_env(stages["host_overhead"], plain) == expected, exit_code
        assert suite.stage_env(stages["kernel_timing"], plain) is plain


def test_a_build_stopped_unfinished_fails_its_stage_and_leaves_no_lock(tmp_path):
    """A build killed at its limit leaves torch's JIT lock; loading again in the stage would wait
    on it until the stage's own limit. The stage is failed at once, and the lock removed."""
    import subprocess

    lock = tmp_path / "torch_extensions" / "salsa_fused_jit" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    build = gpu_suite.ExtensionBuild.__new__(gpu_suite.ExtensionBuild)
    build.env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    build.began, build.seconds, build.stopped, build.log = 0.0, None, False, lambda message: None
    build._log_file = open(tmp_path / "cuda_build.log", "w", encoding="utf-8")
    build.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    suite = gpu_suite.Suite(tmp_path, smoke=True, budget=60, details=tmp_path)
    suite.build = build
    record = suite.run_stage(gpu_suite.Stage("cuda_extension", 21, 21, "the extension"), dict(os.environ))
    assert record["status"] == "failed" and "did not finish" in record["reason"], record
    assert build.process.poll() is not None and not lock.exists()


def test_unknown_stage_names_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--stages", "kernel_timing,warp_drive"])
    assert "warp_drive" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--slow", "0"], ["--slow", "nan"], ["--budget", "0"], ["--budget", "-5"],
                                   ["--stages", ""], ["--stages", ","]])
def test_a_refused_command_line_leaves_an_earlier_runs_results(tmp_path, flags, capsys):
    for name in gpu_suite.OUT_FILES:
        (tmp_path / name).write_text("an earlier run\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--stages", "determinism", *flags])
    assert refused.value.code == 2 and flags[0] in capsys.readouterr().err
    for name in gpu_suite.OUT_FILES:
        assert (tmp_path / name).read_text(encoding="utf-8") == "an earlier run\n", name


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_refused_not_read_as_the_working_directory(tmp_path, out, capsys, monkeypatch):
    """`gpu_suite.sh --out "$OUT"` with OUT unset: refused by name, the working directory's files kept."""
    monkeypatch.chdir(tmp_path)
    for name in gpu_suite.OUT_FILES:
        (tmp_path / name).write_text("an earlier run\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        gpu_suite.main(["--out", out, "--smoke", "--stages", "determinism"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--out" in err and "$OUT" in err
    assert {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()} == dict.fromkeys(
        gpu_suite.OUT_FILES, "an earlier run\n")


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "summary.md"
    a_file.write_text("an earlier run\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        gpu_suite.main(["--out", str(a_file), "--smoke", "--stages", "determinism"])
    assert refused.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err
    assert a_file.read_text(encoding="utf-8") == "an earlier run\n"


@pytest.mark.parametrize("form", ["--out", "--out="])
def test_a_relative_out_is_the_callers_directory_not_the_repositorys(tmp_path, form):
    """gpu_suite.sh changes into the repository before Python reads --out: a relative --out was read there,
    and a smoke run wrote its five files into the checkout (an audit's run). A relative file of the caller's
    is refused as a file now, which only a path read in the caller's directory can see."""
    (tmp_path / "summary.md").write_text("an earlier run\n", encoding="utf-8")
    out = ["--out", "summary.md"] if form == "--out" else ["--out=summary.md"]
    done = background.run_process(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), *out, "--stages", "bogus"],
                                  cwd=tmp_path, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "is a file, not a directory" in done.stderr, done.stderr
    assert not (ROOT / "summary.md").exists()


def test_every_skip_of_the_gpu_pytest_stage_names_cuda():
    """On the GPU the pytest stage turns a skip whose reason names no CUDA device into a failure
    (tests/conftest.py): a CPU-only test of the stage's files, skipped there as "compares with the C++ CPU
    backend", would have failed the stage 18 times (an audit's reading), which the smoke form, running
    tests/test_cuda.py alone, never shows."""
    from benchmarks import gpu_stages
    from tests.conftest import CUDA_REASON

    ran = []
    gpu_stages._run_pytest, real = (lambda ctx, files, *rest: ran.extend(files)), gpu_stages._run_pytest
    try:
        gpu_stages.stage_pytest(type("Context", (), {"smoke": False})())
    finally:
        gpu_stages._run_pytest = real
    assert len(ran) >= 3, ran
    for name in ran:
        text = (ROOT / name).read_text(encoding="utf-8")
        for condition, reason in re.findall(r"skipif\((.*?),\s*reason=\s*\(?((?:\"[^\"]*\"\s*)+)", text, flags=re.S):
            if "DEVICE" in condition or "cuda" in condition:
                assert CUDA_REASON.search(reason), f"{name}: skipif({condition}) says {reason!r}"


def test_the_smoke_limits_leave_a_two_core_cpu_headroom():
    """A 2-core CPU took 12.4 s for determinism (4-5 s of it imports), 19.4 s for cuda_checks, 19.7 s for
    training: every smoke limit leaves about twice that, and the budget holds them all."""
    smoke = {s.name: s.smoke_seconds for s in gpu_suite.STAGES}
    assert min(smoke.values()) >= 30 and smoke["cuda_checks"] >= 40 and smoke["training"] >= 40, smoke
    assert sum(smoke.values()) <= gpu_suite.SMOKE_BUDGET_S


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU-only check")
def test_without_a_gpu_the_summary_says_nothing_was_measured(tmp_path):
    code = gpu_suite.main(["--out", str(tmp_path), "--stages", "determinism"])
    heading = (tmp_path / "summary.md").read_text(encoding="utf-8").splitlines()[0]
    assert code == 1 and heading == "# GPU suite: not run: no CUDA device, nothing measured", heading


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU-only check")
def test_a_stage_without_a_gpu_or_smoke_is_a_missing_requirement(tmp_path, capsys):
    """Exit 3, which the suite reads as "not run: a requirement is missing", not a traceback."""
    from benchmarks import gpu_stages

    assert gpu_stages.main(["determinism", "--out", str(tmp_path), "--details", str(tmp_path)]) == gpu_stages.MISSING
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "rows.jsonl").exists()


def test_the_pytest_stage_leaves_pytest_benchmarks_storage_out_of_the_repository(tmp_path, monkeypatch):
    """pytest-benchmark makes .benchmarks/ in the working directory (the repository) unless it is left out."""
    from benchmarks import gpu_stages

    commands = []
    ctx = gpu_stages.Context("pytest", tmp_path, tmp_path, smoke=True)
    monkeypatch.setattr(gpu_stages.subprocess, "run", lambda command, **kwargs: commands.append(command)
                        or __import__("subprocess").CompletedProcess(command, 0))
    gpu_stages._run_pytest(ctx, ["tests/test_cuda.py"], "pytest", [])
    (command,) = commands
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "-p"] == [
        "no:cacheprovider", "no:benchmark", "no:randomly"]


def test_a_stage_not_run_makes_the_exit_code_nonzero(tmp_path):
    """A budget too small for any stage: every stage is 'not run: no time left', and the exit code
    says so (on a lent GPU machine only the exit code and summary.md come back at a glance)."""
    code = gpu_suite.main(["--out", str(tmp_path), "--smoke", "--stages", "determinism", "--budget", "12"])
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in summary["stages"]] == ["not run"]
    assert code == 1
    assert "stages that did not pass: determinism (not run)" in (tmp_path / "suite.log").read_text(encoding="utf-8")


def test_an_out_holding_an_earlier_run_is_refused_unless_replace_is_given(tmp_path, capsys):
    """A run into an --out that held a GPU run's files (copied back, not yet committed) deleted them silently."""
    (tmp_path / "rows.jsonl").write_text("an earlier run\n", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        gpu_suite.main(["--out", str(tmp_path), "--smoke", "--stages", "determinism"])
    assert refused.value.code == 2 and "--replace" in capsys.readouterr().err
    assert (tmp_path / "rows.jsonl").read_text(encoding="utf-8") == "an earlier run\n"


def test_a_smoke_run_into_the_committed_results_is_refused(capsys):
    out = ROOT / "benchmarks" / "results" / "gpu" / "a_smoke_run"
    with pytest.raises(SystemExit) as refused:
        gpu_suite.main(["--out", str(out), "--smoke", "--replace", "--stages", "determinism"])
    assert refused.value.code == 2 and "benchmarks/results" in capsys.readouterr().err
    assert not out.exists()


def test_a_stage_gets_the_time_the_budget_holds_beyond_the_later_stages_own_limits(tmp_path, monkeypatch):
    """The pytest stage, last, got its fixed 60 s though 280 s of the 550 s budget were left (an audit's reading
    of the GPU runs): a time-out there loses its counts. Every later stage still gets its own limit."""
    class Finished:  # a stage process that ends at once
        def __init__(self, *args, **kwargs):
            pass

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(gpu_suite.subprocess, "Popen", Finished)
    suite = gpu_suite.Suite(tmp_path, False, 550.0, tmp_path, 1.0)
    first, second = gpu_suite.Stage("determinism", 30, 30, "a"), gpu_suite.Stage("pytest", 60, 60, "b")
    assert suite.run_stage(first, dict(os.environ), [second])["limit_s"] == pytest.approx(550 - 5 - 60, abs=2)
    assert suite.run_stage(second, dict(os.environ))["limit_s"] == pytest.approx(550 - 5, abs=2)
    tight = gpu_suite.Suite(tmp_path, False, 80.0, tmp_path, 1.0)  # no spare time: the own limit
    assert tight.run_stage(first, dict(os.environ), [second])["limit_s"] == pytest.approx(30, abs=0.5)
