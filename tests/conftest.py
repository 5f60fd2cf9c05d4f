"""Run Triton kernels under its CPU interpreter when no CUDA device is present, and let a
test skip only for want of CUDA.

TRITON_INTERPRET must be set before triton is imported and before any kernel is
defined, so it is set here, when pytest loads this file, ahead of every test module.

A skip whose reason does not name CUDA, a GPU or a CUDA toolkit tool is reported as a
failure: a missing test dependency (Triton above all, through which the kernels are proven
on the CPU) must not turn the suite silently green. ``pip install --no-build-isolation -e ".[test]"``
installs every one (and builds the C++ extension).
"""

import importlib.util
import os
import re
import time
from pathlib import Path

import pytest
import torch

from tests import background, triton_interpreter

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    triton_interpreter.install()  # a launch patches triton.language once, not at every device-function call

# One intra-op thread for every test, and through OMP_NUM_THREADS for the programs tests start: the
# tensors are tiny and the other core runs the background jobs (tests/background.py), so a second
# thread only waits for it (the C++ backend's tests ran 2x slower with two, 2026-12-06). A test of
# thread counts sets its own and restores this one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TRITON_MISSING = importlib.util.find_spec("triton") is None
INSTALL_HINT = 'pip install --no-build-isolation -e ".[test]"'
# CUDA itself, a GPU, or the CUDA toolkit's own tools (nvcc, cuobjdump), which GPU-less machines lack
CUDA_REASON = re.compile(r"\b(cuda|gpus?|nvcc|cuobjdump)\b", re.IGNORECASE)


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return str(report.longrepr)


def _turn_skip_into_failure(report) -> None:
    """A skip not caused by a missing CUDA device becomes a failure naming the cause."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if CUDA_REASON.search(reason):
        return
    if TRITON_MISSING and "triton" in reason.lower():
        cause = f"Triton is not installed: {INSTALL_HINT}"
    else:
        cause = f"a test may skip only when it needs CUDA; install every test dependency with {INSTALL_HINT}"
    report.outcome = "failed"
    report.longrepr = f"{cause}\n(skip reason: {reason})"


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the collected tests last to first (a check that no test depends on another)")


def _module_name(item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else ""


def pytest_configure(config):
    background.runs_whole_module = _runs_whole_module(config)


def _runs_whole_module(config):
    """Whether this session runs every test of the module in a file (None: options pick tests within
    modules, so a module's jobs wait for the end of collection)."""
    option = config.option
    if (option.collectonly or option.keyword or option.markexpr or getattr(option, "deselect", None)
            or getattr(option, "lf", False) or getattr(option, "stepwise", False)
            or any("::" in arg for arg in config.args)):
        return None
    roots = [Path(config.invocation_params.dir, arg).resolve() for arg in config.args]

    def runs_whole(filename: str) -> bool:
        path = Path(filename).resolve()
        return any(path == root or root in path.parents for root in roots)

    return runs_whole


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse-order"):
        items.reverse()
    items[:] = background.jobs_last(items, _module_name)  # tests that read a background job: last


_SESSION_BEGAN = time.monotonic()


def pytest_collection_finish(session):
    background.runs_whole_module = None  # a job declared from now on (by a test) is no module's import
    if not session.config.option.collectonly:
        background.start(sorted({_module_name(i) for i in session.items}))


def pytest_terminal_summary(terminalreporter):
    lines = background.timeline(_SESSION_BEGAN)
    if lines:
        terminalreporter.write_sep("-", f"background jobs (the session ran {time.monotonic() - _SESSION_BEGAN:.0f} s)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    background.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _turn_skip_into_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _turn_skip_into_failure(outcome.get_result())
