"""Expensive module fixtures computed in a background thread while the other tests run.

A few fixtures run a whole program in a subprocess (the kernel audit, the GPU suite's smoke
run, the quality stage, the nvcc audit): minutes of work on one core, during which pytest's
own process would wait. A test module declares such work once, at import::

    AUDIT = background.job("kernel audit", compute)   # compute(tmp_dir: Path) -> value

and its fixture returns ``AUDIT.result()``. The jobs of the modules that have selected tests run
one after another in one thread (:class:`Queue`, the longest queued first): from the import of
their module where the session runs whole modules (``runs_whole_module``, set by
``tests/conftest.py``: the other core works while the rest is collected), or else from the end of
collection (:func:`start`). ``tests/conftest.py`` moves those modules' tests to the end of the run,
shortest job first (:func:`jobs_last`), so the other core works through the jobs while this process
runs everything else. ``result()`` runs a job no one has started yet in the caller, or waits for it,
and raises its exception, if any, in the test that reads it: the tests at the end take the short
jobs from the back of the thread's queue while the thread runs the long ones from its front,
and both cores work until the last job is done. A job that mostly waits (``waits=True``) runs from the
start in a thread of its own. A job started nowhere (its module was imported
but none of its tests selected) runs on first use, in the caller. ``seconds_hint`` is a job's
time in CI (2 cores, AVX2, 2026-12-06, commit 4eed09c), which orders both ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set


class Job:
    """One computation, run once; ``result()`` returns its value or raises its exception."""

    def __init__(self, name: str, compute: Callable[[Path], object], module: str, seconds_hint: float,
                 waits: bool = False):
        self.name, self.compute, self.module, self.seconds_hint = name, compute, module, seconds_hint
        self.waits = waits
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._value: object = None
        self._error: Optional[BaseException] = None
        self._tmp: Optional[Path] = None
        #: ``time.monotonic()`` when the computation began and ended (None: not yet).
        self.began: Optional[float] = None
        self.ended: Optional[float] = None

    def run(self) -> None:
        """Compute, unless another thread already did or is doing it (then wait for it)."""
        with self._lock:
            if self._started:
                start = False
            else:
                self._started = start = True
        if not start:
            self._done.wait()
            return
        self.began = time.monotonic()
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"salsa-{self.name.replace(' ', '-')}-"))
            self._value = self.compute(self._tmp)
        except BaseException as error:  # handed to the test that reads the result
            self._error = error
        finally:
            self.ended = time.monotonic()
            self._done.set()

    def result(self):
        self.run()
        if self._error is not None:
            raise self._error
        return self._value

    def cleanup(self) -> None:
        if self._tmp is not None and self._done.is_set():
            shutil.rmtree(self._tmp, ignore_errors=True)


JOBS: Dict[str, Job] = {}
_PROCESSES: Set[subprocess.Popen] = set()


def run_process(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)``, with the
    child killed by ``cleanup()`` if the session ends first (``-x``, Ctrl-C)."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as process:
        _PROCESSES.add(process)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        finally:
            _PROCESSES.discard(process)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def job(name: str, compute: Callable[[Path], object], seconds_hint: float = 60.0, waits: bool = False) -> Job:
    """Declare background work for the test module that defines ``compute`` (``compute.__module__``);
    ``seconds_hint`` only orders the jobs, longest first. A job that ``waits`` spends its time waiting
    (a child past its time limit), not computing: it runs at the start in a thread of its own, beside
    the queue, instead of holding the queue's core idle."""
    declared = Job(name, compute, compute.__module__, seconds_hint, waits)
    JOBS[name] = declared
    if runs_whole_module is not None and runs_whole_module(compute.__code__.co_filename):
        _QUEUE.add([declared])
    return declared


def jobs_last(items: list, module_of: Callable[[object], str]) -> list:
    """``items`` (tests) with those of modules that declared a job moved to the end, the module of the
    shortest job first (each module's tests in their order): the reverse of :func:`start`'s queue."""
    hint: Dict[str, float] = {}
    for j in JOBS.values():
        hint[j.module] = max(hint.get(j.module, 0.0), j.seconds_hint)
    rest = [i for i in items if module_of(i) not in hint]
    waiting = sorted((i for i in items if module_of(i) in hint), key=lambda i: hint[module_of(i)])
    return rest + waiting


class Queue:
    """Jobs run one after another in a daemon thread, the longest queued first; each job that waits
    in a daemon thread of its own. Jobs may be added until :meth:`close`; the thread ends once the
    queue is closed and empty. A job is queued at most once."""

    def __init__(self) -> None:
        self._queued: List[Job] = []
        self._seen: Set[str] = set()
        self._closed = False
        self._changed = threading.Condition()
        self.thread: Optional[threading.Thread] = None

    def add(self, jobs: List[Job]) -> None:
        with self._changed:
            for j in jobs:
                if j.name in self._seen:
                    continue
                self._seen.add(j.name)
                if j.waits:
                    threading.Thread(target=j.run, name=f"background-{j.name}", daemon=True).start()
                else:
                    self._queued.append(j)
            if self._queued and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self._work, name="background-fixtures", daemon=True)
                self.thread.start()
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._queued and not self._closed:
                    self._changed.wait()
                if not self._queued:
                    return
                j = max(self._queued, key=lambda queued: queued.seconds_hint)
                self._queued.remove(j)
            j.run()


_QUEUE = Queue()
#: Set by tests/conftest.py before collection: whether the session runs every test of the module defined
#: in this file (no option picks tests within the paths it was given). A job of such a module is queued
#: when its module is imported, and runs while the rest is collected.
runs_whole_module: Optional[Callable[[str], bool]] = None


def start(modules: List[str]) -> Optional[threading.Thread]:
    """Queue the jobs declared by ``modules`` (those queued at import stay queued) and close the queue:
    collection is over. Returns the queue's thread (None: no job queued)."""
    _QUEUE.add([j for j in JOBS.values() if j.module in modules])
    _QUEUE.close()
    return _QUEUE.thread


def timeline(session_began: float) -> List[str]:
    """One line per job that ran: when it began and ended, in seconds from ``session_began``
    (the CI log shows whether the background thread or the tests are the longer path)."""
    lines = []
    for j in sorted((j for j in JOBS.values() if j.began is not None), key=lambda j: j.began):
        end = f"{j.ended - session_began:.0f}" if j.ended is not None else "unfinished"
        lines.append(f"{j.name}: {j.began - session_began:.0f} s to {end} s")
    return lines


def cleanup() -> None:
    """Kill children still running (the session ended early) and remove the jobs' folders."""
    for process in list(_PROCESSES):
        process.kill()
    for j in JOBS.values():
        j.cleanup()
