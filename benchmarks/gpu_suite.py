"""The GPU check: every stage of the speed and correctness evidence in one bounded run.

    bash benchmarks/gpu_suite.sh --out "$OUT"            # GPU: <= 9.2 minutes in all (550 s)
    bash benchmarks/gpu_suite.sh --out DIR --smoke       # the same stages on the CPU, tiny sizes
                                                         # (CI: --smoke --slow 6, tests/benchmarks/test_gpu_suite.py)

Made for a borrowed machine: no network, its own torch (never installed or replaced), one
call of at most 10 minutes, and only what lies in ``--out`` comes back. So:

- each stage runs in its own process under its own time limit (``STAGES``: seconds per
  stage, clipped to what is left of ``--budget``; raised to what the budget holds beyond the
  own limits of the stages after it, so time the earlier stages left goes to the next one and
  every later stage keeps its own); a stage that fails, times out or cannot
  run (no triton, no pytest) is logged as such and the next one runs;
- every measurement is appended to ``rows.jsonl`` the moment it is taken (one JSON object
  a line: stage, name, values, and the environment: device, versions, commit, date);
- ``--out`` holds at most five files: ``rows.jsonl``, ``suite.log`` (each stage's output),
  ``summary.json`` and ``summary.md`` (rewritten after every stage) and ``details.tar.gz``
  (per-stage detail files, e.g. pytest's junit XML and the training curves);
- nothing is written into the repository (no bytecode, no pytest cache); scratch files
  live in a temporary directory;
- the exit code is 0 only when every chosen stage passed: a stage that failed, timed out or
  was not run (no time left, a missing requirement) makes it 1, as ``summary.md`` lists them.
  A refused command line (exit 2) leaves an earlier run's files in ``--out`` as they were; an
  ``--out`` that holds them is refused unless ``--replace`` is given, and a ``--smoke`` run
  into ``benchmarks/results`` (the GPU runs' committed results) is refused.

The published ``salsa-optimizer`` 0.1.0 joins the training stage when it imports, or when
its wheel (``--wheel``, else ``$SALSA_WHEEL``, ``shared/wheels/``, ``../shared/wheels/``)
can be unpacked into a scratch directory (``pip install --no-deps --no-index --target``, or
unzipping the pure-Python wheel when pip is missing); otherwise it is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks import _common as C

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 550.0  # the whole GPU run, CUDA context and Triton JIT compiles included
SMOKE_BUDGET_S = 480.0
WHEEL_NAME = "SaLSa_Optimizer-0.1.0-py3-none-any.whl"
OUT_FILES = ("rows.jsonl", "suite.log", "summary.json", "summary.md", "details.tar.gz")
BUILD_RUNNING_ENV = "SALSA_GPU_SUITE_BUILD_RUNNING"  # set for host_overhead while the extension still builds


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_seconds: float  # time limit on a GPU (H100/H200), JIT compiles included
    smoke_seconds: float  # time limit of the CPU smoke form
    what: str


# In order of value. The GPU limits add up to 535 s of the 550 s budget; the rest covers
# the driver itself (starting a process per stage, packing the details). The smoke limits
# (430 s of 480) leave a 2-core CPU about twice what it took: each stage spends 4-5 s on
# imports alone (determinism took 12.4 s, cuda_checks 19.4 s, training 19.7 s). The extension's
# build is not a stage: it runs beside the first stages (CPU cores only) and is waited for,
# inside cuda_extension's limit, when that stage starts. host_overhead runs on it when it is
# done by then (its rows say whether: ``group_signature``), as an installed package would.
STAGES = (
    Stage("cuda_checks", 45, 50, "plain steps under sync-debug 'error' (fp32, bf16, GradScaler), "
          "launches and CUDA kernels per plain step, triton vs torch reference on the device"),
    Stage("kernel_timing", 45, 40, "GPT-2 small's 148 tensors, fp32 and bf16: plain step, reduction, "
          "pass A, pass B vs fused and foreach AdamW, and a copy-bandwidth roofline"),
    Stage("host_overhead", 75, 40, "host time of a plain step at 148 and 10,000 tensors "
          "(launch stubbed and real) beside torch.optim.AdamW(fused=True)"),
    Stage("cuda_extension", 70, 80, "the C++/CUDA extension (csrc/, JIT-built in the background from the "
          "suite's start): its CUDA kernels vs the torch reference, plain steps under sync-debug 'error', "
          "pass timings beside fused AdamW, tests/backends/test_cpp_backend.py -k cuda"),
    Stage("large_tensor", 30, 30, "one plain step on a tensor of more than 2^31 elements (bf16), "
          "checked against a reference computation at its start, across 2^31 and at its tail"),
    Stage("determinism", 25, 30, "the search's q reduction: bitwise across repeats, error against float64"),
    Stage("training", 140, 60, "GPT-2 small, B=8, T=512, bf16 autocast, 300 steps: fused AdamW, "
          "FusedSaLSa (copy, inplace, recommended preset), published SaLSa 0.1.0 if installed, AdamW again "
          "last; steady-state time vs AdamW + the extra forwards"),
    Stage("step_profile", 45, 50, "torch.profiler over 10 steady steps of GPT-2 small: device busy vs idle "
          "time per step, host waits on the device, top host ops (AdamW, FusedSaLSa copy and inplace)"),
    Stage("pytest", 60, 50, "pytest tests/test_cuda.py, tests/backends/test_triton_backend.py and "
          "tests/backends/test_launch_counts.py (--smoke: tests/test_cuda.py only; when pytest is installed)"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- the wheel
def find_wheel(explicit: Optional[str]) -> Optional[Path]:
    candidates = [explicit, os.environ.get("SALSA_WHEEL"), ROOT / "shared" / "wheels" / WHEEL_NAME,
                  ROOT.parent / "shared" / "wheels" / WHEEL_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def published_salsa_path(wheel: Optional[Path], scratch: Path, log) -> Optional[str]:
    """A directory to put on PYTHONPATH so that ``salsa`` (0.1.0) imports, '' when it already
    does, None when it cannot (logged)."""
    probe = subprocess.run([sys.executable, "-c", "import salsa.SaLSA"], capture_output=True, cwd=scratch)
    if probe.returncode == 0:
        log("published SaLSa: already importable")
        return ""
    if wheel is None:
        log(f"published SaLSa: not installed and no {WHEEL_NAME} found (--wheel, $SALSA_WHEEL, "
            "shared/wheels/, ../shared/wheels/): skipped")
        return None
    target = scratch / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                          "--disable-pip-version-check", "--target", str(target), str(wheel)],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        log(f"published SaLSa: pip could not install the wheel ({pip.stderr.strip()[-300:]}); unzipping it")
        try:
            with zipfile.ZipFile(wheel) as archive:  # a pure-Python wheel is a zip of the package
                archive.extractall(target)
        except (OSError, zipfile.BadZipFile) as error:
            log(f"published SaLSa: cannot unpack {wheel}: {error}; skipped")
            return None
    check = subprocess.run([sys.executable, "-c", "import salsa.SaLSA"], capture_output=True, text=True,
                           cwd=scratch, env={**os.environ, "PYTHONPATH": str(target)})
    if check.returncode != 0:
        log(f"published SaLSa: installed from {wheel} but does not import ({check.stderr.strip()[-300:]}); "
            "skipped")
        return None
    log(f"published SaLSa: installed from {wheel} into a scratch directory")
    return str(target)


# ---------------------------------------------------------------------------- the driver
class ExtensionBuild:
    """The C++/CUDA extension compiled in a background process (``SALSA_FUSED_JIT=1``, into
    ``scratch/torch_extensions``): nvcc takes a minute or more, on CPU cores the GPU stages
    leave idle. ``env`` is what a stage needs to load the result."""

    def __init__(self, scratch: Path, details: Path, env: Dict[str, str], log):
        self.env = {**env, "SALSA_FUSED_JIT": "1", "TORCH_EXTENSIONS_DIR": str(scratch / "torch_extensions"),
                    "MAX_JOBS": env.get("MAX_JOBS", "8")}
        self.log_path = details / "cuda_build.log"
        self.began = time.monotonic()
        self.seconds: Optional[float] = None
        self.stopped = False  # killed unfinished: its lock file is gone, nothing of it is loadable
        self.log = log
        self._log_file = open(self.log_path, "w", encoding="utf-8")
        code = ("import sys, torch; from salsa_fused import _ext; from salsa_fused.backends import cpp_backend; "
                "ok = cpp_backend.supports(torch.device('cuda')); "
                "print('built with CUDA kernels' if ok else f'not built: {_ext._error}', flush=True); "
                "sys.exit(0 if ok else 1)")
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=self.env, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log(f"C++/CUDA extension: building in the background (pid {self.process.pid}, log details/cuda_build.log)")

    def wait(self, limit: float) -> None:
        try:
            code = self.process.wait(timeout=max(limit, 1))
            self.seconds = round(time.monotonic() - self.began, 1)
            self.log(f"C++/CUDA extension: build exited {code} after {self.seconds} s")
        except subprocess.TimeoutExpired:
            self.stop()
            self.log(f"C++/CUDA extension: build not done after {time.monotonic() - self.began:.0f} s; stopped")

    def succeeded(self) -> bool:
        """The build has finished, successfully (a stage may load it without waiting)."""
        return self.process.poll() == 0

    def running(self) -> bool:
        """The build has not finished yet."""
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill an unfinished build, and remove the lock torch's JIT holds while it builds: a
        later load would otherwise wait on that lock for ever (torch's FileBaton)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.stopped = True
            for lock in Path(self.env["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
                lock.unlink(missing_ok=True)
        self._log_file.close()


class Suite:
    def __init__(self, out: Path, smoke: bool, budget: float, details: Path, slow: float = 1.0):
        self.out, self.smoke, self.budget, self.details, self.slow = out, smoke, budget, details, slow
        self.started = time.monotonic()
        self.stages: List[dict] = []
        self.build: Optional[ExtensionBuild] = None
        self.not_run = ""  # why no stage ran at all (no CUDA device)

    def log(self, message: str) -> None:
        line = f"[{_now()}] {message}"
        print(line, flush=True)
        with open(self.out / "suite.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def stage_env(self, stage: Stage, env: Dict[str, str]) -> Dict[str, str]:
        """``env``, or for host_overhead the built extension's once the background build has
        succeeded: the bucket cache then reads groups with the compiled ``group_signature``; while
        it still runs, ``env`` with :data:`BUILD_RUNNING_ENV` set, which its rows report."""
        if stage.name == "host_overhead" and self.build is not None and self.build.succeeded():
            self.log("host_overhead: on the C++ extension built in the background")
            return self.build.env
        if stage.name == "host_overhead" and self.build is not None and self.build.running():
            # its rows say so: the compile (MAX_JOBS processes) shares the host with the timed steps
            self.log("host_overhead: beside the extension's build, still running")
            return {**env, BUILD_RUNNING_ENV: "1"}
        return env

    def own_limit(self, stage: Stage) -> float:
        """The stage's own seconds (times ``--slow``)."""
        return (stage.smoke_seconds if self.smoke else stage.gpu_seconds) * self.slow

    def run_stage(self, stage: Stage, env: Dict[str, str], later: Sequence[Stage] = ()) -> dict:
        """Run ``stage`` under its own limit, or longer where the budget holds more than the own limits of the
        ``later`` stages: time the earlier stages left unused goes to this one (a pytest stage whose tests grew),
        and every later stage still gets its own limit."""
        spare = self.remaining() - 5 - sum(map(self.own_limit, later))
        limit = min(max(self.own_limit(stage), spare), self.remaining() - 5)
        record = {"stage": stage.name, "what": stage.what, "limit_s": round(max(limit, 0), 1)}
        if limit < 10:
            record.update(status="not run", reason=f"no time left ({self.remaining():.0f} s of the budget)")
            self.log(f"== {stage.name}: not run, no time left")
            return record
        self.log(f"== {stage.name} (limit {limit:.0f} s): {stage.what}")
        if stage.name == "cuda_extension" and self.build is not None:
            waited = time.monotonic()
            self.build.wait(limit - 20)  # leave the stage time to run on what was built
            limit -= time.monotonic() - waited
            if self.build.stopped:  # loading it would start the build again, in the stage's last seconds
                record.update(status="failed", seconds=round(time.monotonic() - waited, 1),
                              reason="the background build of the extension did not finish in time "
                                     "(details/cuda_build.log)")
                self.log(f"== {stage.name}: failed, the build did not finish")
                return record
            env = {**self.build.env, "SALSA_GPU_SUITE_BUILD_SECONDS": str(self.build.seconds or "")}
        else:
            env = self.stage_env(stage, env)
        command = [sys.executable, "-m", "benchmarks.gpu_stages", stage.name, "--out", str(self.out),
                   "--details", str(self.details)] + (["--smoke"] if self.smoke else [])
        began = time.monotonic()
        with open(self.out / "suite.log", "a", encoding="utf-8") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
                status = "passed" if code == 0 else "failed"
                reason = "" if code == 0 else f"exit code {code}"
                if code == 3:
                    status, reason = "not run", "a requirement is missing (see suite.log)"
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(process.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        process.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                status, reason = "timeout", f"stopped after {limit:.0f} s (rows so far are kept)"
        record.update(status=status, reason=reason, seconds=round(time.monotonic() - began, 1))
        self.log(f"== {stage.name}: {status} in {record['seconds']} s {reason}")
        return record

    def write_summary(self) -> None:
        rows = []
        path = self.out / "rows.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a killed stage
        summary = {"smoke": self.smoke, "budget_s": self.budget,
                   "elapsed_s": round(time.monotonic() - self.started, 1), "date": _now(),
                   "stages": self.stages, "rows": len(rows), "not_run": self.not_run}
        # each file written beside and renamed over: a run killed while writing keeps the last whole one
        for name, text in (("summary.json", json.dumps(summary, indent=1) + "\n"),
                           ("summary.md", summary_markdown(summary, rows))):
            (self.out / f".{name}.partial").write_text(text, encoding="utf-8")
            os.replace(self.out / f".{name}.partial", self.out / name)
        with tarfile.open(self.out / ".details.tar.gz.partial", "w:gz") as archive:
            archive.add(self.details, arcname="details")
        os.replace(self.out / ".details.tar.gz.partial", self.out / "details.tar.gz")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # a short list of scalars (launches per step): its values, not left out
        return ", ".join(map(_cell, value))
    return str(value)


def summary_markdown(summary: dict, rows: List[dict]) -> str:
    if summary.get("not_run"):
        kind = f"not run: {summary['not_run']}, nothing measured"
    else:
        kind = "CPU smoke run at tiny sizes (not GPU figures)" if summary["smoke"] else "GPU run"
    device = next((r["env"]["device"] for r in rows if "env" in r), "unknown")
    lines = [f"# GPU suite: {kind}", "", f"Device: {device}; {summary['date']}; "
             f"{summary['elapsed_s']} s of a {summary['budget_s']:.0f} s budget.", "",
             "| stage | status | seconds | limit | note |", "|---|---|---:|---:|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s.get('seconds', '-')} | {s['limit_s']} | "
                     f"{s.get('reason', '')} |")
    for stage in STAGE_NAMES:
        stage_rows = [r for r in rows if r.get("stage") == stage]
        if not stage_rows:
            continue
        keys = []
        for r in stage_rows:
            keys += [k for k in r.get("values", {}) if k not in keys and not isinstance(r["values"][k], dict)
                     and not (isinstance(r["values"][k], list) and any(isinstance(v, (list, dict))
                                                                        for v in r["values"][k]))]
        lines += ["", f"## {stage}", "", "| name | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in stage_rows:
            values = r.get("values", {})
            lines.append(f"| {r['name']} | " + " | ".join(_cell(values.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="The GPU check: every stage under its own time limit")
    parser.add_argument("--out", required=True, type=C.output_dir,
                        help="directory for the (at most five) result files")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same stages end to end")
    parser.add_argument("--stages", type=C.comma_list, default=list(STAGE_NAMES),
                        help="comma-separated subset, in order")
    parser.add_argument("--budget", type=C.positive_float, default=None, help="seconds for the whole run")
    parser.add_argument("--wheel", default=None, help=f"path of {WHEEL_NAME}")
    parser.add_argument("--slow", type=C.positive_float, default=1.0,
                        help="multiply every time limit and the budget (a loaded or slow machine)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite an earlier run's results in --out (refused without it)")
    args = parser.parse_args(argv)
    chosen = args.stages
    unknown = sorted(set(chosen) - set(STAGE_NAMES))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {', '.join(STAGE_NAMES)}")
    out = args.out.resolve()
    results = (ROOT / "benchmarks" / "results").resolve()
    if args.smoke and (out == results or results in out.parents):
        parser.error(f"--out {out} is in benchmarks/results, where the GPU runs' committed results live: a smoke run's "
                     "CPU figures do not go there; use a scratch directory")
    earlier = sorted(p.name for p in out.iterdir() if p.name in OUT_FILES) if out.is_dir() else []
    if earlier and not args.replace:
        parser.error(f"--out {out} holds an earlier run's results ({', '.join(earlier)}): pass --replace to overwrite "
                     "them, or another --out (a run copied back from a GPU and not yet committed would be lost)")
    out.mkdir(parents=True, exist_ok=True)
    leftovers = [p.name for p in out.iterdir() if p.name in OUT_FILES or p.name.endswith(".partial")]
    for name in leftovers:  # after every refusal: a refused call leaves an earlier run's results
        (out / name).unlink()  # a fresh run: rows are appended, so an old file would mix runs
    budget = (args.budget if args.budget is not None else (SMOKE_BUDGET_S if args.smoke else TOTAL_BUDGET_S)) * args.slow
    with tempfile.TemporaryDirectory(prefix="salsa_gpu_suite_") as scratch_name:
        scratch = Path(scratch_name)
        details = scratch / "details"
        details.mkdir()
        suite = Suite(out, args.smoke, budget, details, args.slow)
        suite.log(f"GPU suite{' (smoke)' if args.smoke else ''}: stages {', '.join(chosen)}; budget {budget:.0f} s; "
                  f"python {sys.executable}")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the repository
        env["PYTHONUNBUFFERED"] = "1"
        if args.smoke:
            env["TRITON_INTERPRET"] = "1"  # the Triton kernels run on the CPU interpreter
        if "training" in chosen:
            extra = published_salsa_path(find_wheel(args.wheel), scratch, suite.log)
            if extra:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH", "")) if p)
        if not args.smoke:
            probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                                   env=env, cwd=ROOT)
            if probe.returncode != 0:
                suite.log("no CUDA device: GPU figures stay 'not measured: no GPU' (use --smoke on a CPU)")
                suite.not_run = "no CUDA device"
                suite.stages.append({"stage": "all", "what": "", "limit_s": 0, "status": "not run",
                                     "reason": "no CUDA device"})
                suite.write_summary()
                return 1
        if "cuda_extension" in chosen and not args.smoke:  # the smoke form uses the checkout's build
            suite.build = ExtensionBuild(scratch, details, env, suite.log)
        by_name = {s.name: s for s in STAGES}
        try:
            for index, name in enumerate(chosen):
                later = [by_name[n] for n in chosen[index + 1:]]
                suite.stages.append(suite.run_stage(by_name[name], env, later))
                suite.write_summary()
        finally:
            if suite.build is not None:
                suite.build.stop()
        suite.write_summary()  # with the build's log in the details
        suite.log(f"done in {time.monotonic() - suite.started:.0f} s; results in {out}")
    missed = [f"{s['stage']} ({s['status']})" for s in suite.stages if s["status"] != "passed"]
    if missed:  # not run (no time left, a missing requirement) counts: the exit code says what summary.md says
        suite.log(f"stages that did not pass: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
