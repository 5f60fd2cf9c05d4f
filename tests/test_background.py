"""tests/background.py: a job runs once, hands its value or its exception to every reader, and
cleanup kills a child still running."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import background

ROOT = Path(__file__).resolve().parents[1]


def test_a_job_runs_once_for_concurrent_readers(tmp_path):
    calls = []

    def compute(tmp):
        calls.append(tmp)
        time.sleep(0.05)
        return len(calls)

    job = background.Job("counted", compute, module=__name__, seconds_hint=1)
    results = []
    readers = [threading.Thread(target=lambda: results.append(job.result())) for _ in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    assert results == [1, 1, 1, 1] and len(calls) == 1 and calls[0].is_dir()
    job.cleanup()
    assert not calls[0].exists()


def test_the_exception_reaches_the_reader():
    def compute(tmp):
        raise ValueError("no ptxas here")

    job = background.Job("failing", compute, module=__name__, seconds_hint=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="no ptxas here"):
            job.result()
    job.cleanup()


CLEANUP_SCRIPT = """
import sys, threading, time
from tests import background
outcome = {}
def run():
    try:
        background.run_process([sys.executable, "-c", "import time; time.sleep(60)"], timeout=120)
        outcome["returned"] = True
    except BaseException as error:
        outcome["error"] = error
thread = threading.Thread(target=run)
thread.start()
deadline = time.monotonic() + 20
while not background._PROCESSES and time.monotonic() < deadline:
    time.sleep(0.01)
assert background._PROCESSES, "the child never started"
started = time.monotonic()
background.cleanup()
thread.join(timeout=20)
assert not thread.is_alive() and not background._PROCESSES
print(f"killed after {time.monotonic() - started:.1f} s")
"""


def test_cleanup_kills_a_child_still_running():
    # In its own interpreter: cleanup() here would kill this session's own background jobs.
    done = subprocess.run([sys.executable, "-c", CLEANUP_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[2]) < 20


def test_the_timeline_says_when_each_job_began_and_ended(monkeypatch):
    monkeypatch.setattr(background, "JOBS", {})
    began = time.monotonic()
    quick = background.job("quick", lambda tmp: time.sleep(0.05))
    background.job("never started", lambda tmp: None)
    quick.result()
    quick.cleanup()
    (line,) = background.timeline(began)
    start, end = (float(x) for x in line.removeprefix("quick: ").removesuffix(" s").split(" s to "))
    assert line.startswith("quick: ") and 0 <= start <= end and end - start >= 0.0


def test_the_tests_that_read_a_job_come_last_shortest_job_first(monkeypatch):
    """The reverse of the thread's queue (longest first): the tests at the end run the short jobs
    themselves while the thread runs the long ones, instead of waiting on the thread job by job."""
    monkeypatch.setattr(background, "JOBS", {})
    for name, module, hint in (("long", "m_long", 200), ("short", "m_short", 20), ("mid", "m_mid", 80)):
        background.JOBS[name] = background.Job(name, lambda tmp: None, module, hint)
    items = [("m_long", 1), ("plain", 1), ("m_short", 1), ("m_mid", 1), ("m_long", 2), ("plain", 2), ("m_short", 2)]
    ordered = background.jobs_last(items, lambda item: item[0])
    assert ordered == [("plain", 1), ("plain", 2), ("m_short", 1), ("m_short", 2), ("m_mid", 1),
                       ("m_long", 1), ("m_long", 2)]


def test_a_job_that_waits_runs_at_once_beside_the_queue(monkeypatch):
    """The queue's thread is busy with a long job; the waiting job starts anyway and ends first."""
    monkeypatch.setattr(background, "JOBS", {})
    release = threading.Event()
    long = background.job("long", lambda tmp: release.wait(20), seconds_hint=100)
    waiting = background.job("waiting", lambda tmp: time.sleep(0.05) or "waited", seconds_hint=20, waits=True)
    queue = background.Queue()
    queue.add([long, waiting])
    queue.close()
    try:
        deadline = time.monotonic() + 10
        while waiting.ended is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting.ended is not None and long.ended is None
        assert waiting.result() == "waited"
    finally:
        release.set()
        queue.thread.join(timeout=20)
    assert long.result() is True
    for j in (long, waiting):
        j.cleanup()


def test_the_queue_takes_jobs_until_closed_longest_first_and_each_once():
    """Jobs queued while the thread runs another (a module imported during collection) run after it,
    the longest first; a job queued twice (at import, then at the end of collection) runs once."""
    order = []
    release = threading.Event()
    first = background.Job("first", lambda tmp: release.wait(20) and order.append("first"), __name__, 1)
    short = background.Job("short", lambda tmp: order.append("short"), __name__, 5)
    long = background.Job("long", lambda tmp: order.append("long"), __name__, 50)
    queue = background.Queue()
    queue.add([first])
    deadline = time.monotonic() + 10
    while first.began is None and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.add([short])
    queue.add([long, first])
    release.set()
    queue.add([short])
    queue.close()
    queue.thread.join(timeout=20)
    assert not queue.thread.is_alive()
    assert order == ["first", "long", "short"]
    for j in (first, short, long):
        j.cleanup()


def test_a_session_that_runs_whole_modules_queues_their_jobs_at_import(tmp_path):
    """In its own session: the job of a module given by path starts while the next module is collected
    (a second, so that a busy machine schedules the queue's thread); under -k it starts only after
    collection."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_first.py").write_text(
        "import time\n"
        "from tests import background\n"
        "def _compute(tmp):\n"
        "    return time.monotonic()\n"
        "JOB = background.job('first module job', _compute, seconds_hint=1)\n"
        "def test_reads_it():\n"
        "    assert JOB.result() > 0\n")
    (tmp_path / "test_second.py").write_text(
        "import time\n"
        "time.sleep(1)  # collection goes on for a second; the job starts meanwhile or not at all\n"
        "COLLECTED = time.monotonic()\n"
        "def test_plain():\n"
        "    from tests import background\n"
        "    job = background.JOBS['first module job']\n"
        "    began_early = job.began is not None and job.began < COLLECTED\n"
        "    print('JOB-BEGAN-BEFORE-SECOND-COLLECTED' if began_early else 'JOB-BEGAN-AFTER')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    outputs = {}
    for name, extra in (("whole", []), ("picked", ["-k", "plain or reads"])):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:randomly",
                               *extra, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs[name] = done.stdout
    assert "JOB-BEGAN-BEFORE-SECOND-COLLECTED" in outputs["whole"], outputs["whole"]
    assert "JOB-BEGAN-AFTER" in outputs["picked"], outputs["picked"]
