"""One way for the tests to launch ``python -m torch.distributed.run`` (torchrun) on the CPU.

A run past its time limit is killed whole, the launcher and every rank, and fails with the output it
had. torchrun starts each rank in a session of its own, so neither a bare
``subprocess.run(timeout=...)`` nor killing the launcher's process group reaches the ranks: left
behind, they hold the machine and the output pipes (reading those pipes then waits for ever). The
ranks are found as the launcher's descendants in ``/proc``."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list:
    """The processes below ``pid`` (Linux ``/proc``; none found elsewhere)."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(") ", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill_tree(pid: int) -> None:
    for victim in [pid, *_descendants(pid)]:  # listed before the first kill: orphans get a new parent
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_torchrun(processes: int, script, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node processes script args``, with this checkout first on the path (as
    ``pip install -e .`` gives it) and one OpenMP thread per rank, as torchrun itself sets by default.
    Returns the finished process; raises AssertionError, with the output, past ``timeout`` seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=ROOT) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(command[3:])} ran past {timeout:g} s, killed with its ranks\n"
                                 f"{stdout[-3000:]}{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
