"""Spawned gloo process groups for the tests.

A worker's body runs inside the group and returns; the group is destroyed only after the
body's frame is gone and cycles are collected, because DDP's reducer holds the group, and a
group freed at interpreter exit joins gloo's threads mid-finalization (a rare SIGABRT).
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import tempfile
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The ranks fork from one server process that imported torch and the package once for the whole
# session (it has run no torch op, so no thread pool is forked): a group starts in a fraction of
# a second instead of two fresh interpreters importing torch, seconds on a busy 2-core machine. It
# imports torch._dynamo too, which the package leaves to the first step or zero_grad (2 s a rank).
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "salsa_fused",
                                        "tests.gloo_group"])


def spawn_in_gloo_group(body: Callable[[int, str], None], out_dir: str, world: int = 2,
                        timeout_s: Optional[float] = None) -> None:
    """Run ``body(rank, out_dir)`` on ``world`` processes joined in one gloo group. The ranks
    meet through a file (no port to race for with other jobs on the machine). ``timeout_s``: a
    collective that waits longer raises (a test of ranks that could fall out of step fails, not hangs)."""
    rendezvous = tempfile.mktemp(prefix="salsa_pg_", dir=out_dir)
    mp.start_processes(_run_in_group, args=(body, rendezvous, out_dir, world, timeout_s), nprocs=world, join=True,
                       start_method="forkserver")


def _run_in_group(rank: int, body, rendezvous: str, out_dir: str, world: int, timeout_s: Optional[float]) -> None:
    torch.set_num_threads(1)
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, **extra)
    try:
        body(rank, out_dir)
    except BaseException:
        gc.collect()
        dist.destroy_process_group()
        raise
    gc.collect()
    dist.barrier()  # no rank tears gloo down while a peer still talks to it
    dist.destroy_process_group()
