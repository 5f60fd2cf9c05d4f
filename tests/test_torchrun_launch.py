"""The tests' torchrun launcher kills a stalled run whole: the launcher and every rank."""
import os
import time

import pytest

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


def test_a_run_past_its_limit_fails_and_leaves_no_rank_behind(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(_SLEEPER)
    with pytest.raises(AssertionError, match="ran past 20 s, killed with its ranks"):
        run_torchrun(2, script, tmp_path, timeout=20)
    pids = [int((tmp_path / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), pids
