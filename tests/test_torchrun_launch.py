"""The tests' torchrun launcher kills a stalled run whole: the launcher and every rank."""
import os
import time
from pathlib import Path

from tests import background
from torchrun_launch import run_torchrun

_SLEEPER = """
import os, sys, time
open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pid"), "w").write(str(os.getpid()))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its parent counts as gone
        return stat.read().split(") ", 1)[1][0] != "Z"


def _run_past_the_limit(tmp: Path):
    """The sleeper under a 20 s limit (idle waiting: a background job in a thread of its own):
    the launcher's error, and the ranks' pids once they are gone or 10 s have passed."""
    script = tmp / "sleeper.py"
    script.write_text(_SLEEPER)
    try:
        run_torchrun(2, script, tmp, timeout=20)
        error = None
    except AssertionError as raised:
        error = str(raised)
    pids = [int((tmp / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return error, [pid for pid in pids if _alive(pid)]


PAST_THE_LIMIT = background.job("torchrun past its limit", _run_past_the_limit, seconds_hint=20, waits=True)


def test_a_run_past_its_limit_fails_and_leaves_no_rank_behind():
    error, alive = PAST_THE_LIMIT.result()
    assert error is not None and "ran past 20 s, killed with its ranks" in error, error
    assert not alive, alive
