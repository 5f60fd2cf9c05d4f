"""Where a training step's time goes: device busy time vs wall time, and the host's top ops.

For an optimizer of ``train_bench`` (same model, batches and settings), ``warmup`` steps run
first, then ``steps`` steps run under ``torch.profiler`` (CPU and, on CUDA, device activity),
synchronized only at both ends of the window. Per step of the window:

- ``wall_ms``: host wall time of the window / steps;
- ``device_busy_ms``: the union of the device kernels' and copies' intervals / steps, so
  ``device_idle_ms = wall_ms - device_busy_ms`` is time the device waited on the host
  (a host read that drained the queue, or a host too slow to keep it fed);
- ``syncs_per_step``, ``sync_wait_ms``, ``d2h_copies_per_step``: the host's waits on the
  device (each drains its queue) and the time spent in them, and device-to-host copies;
- the host ops with the most self time (``top_host_ops``).

    python -m benchmarks.step_profile --optimizer fused_salsa_copy   # GPU
    python -m benchmarks.step_profile --device cpu --tiny            # CPU, tiny model

Each optimizer's figures are appended as a row, with the commit, versions, device and date, to
``benchmarks/results/step_profile.jsonl`` (``step_profile_cpu_smoke.jsonl`` with ``--tiny``; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import _common as C
from benchmarks import train_bench as TB

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _union_ms(intervals: List[Tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds in, ms out)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total / 1e3


def profile_steps(name: str, device: torch.device, tiny: bool, warmup: int = 20, steps: int = 10,
                  top: int = 12) -> Dict[str, object]:
    """Profile ``steps`` steps of optimizer ``name`` after ``warmup`` unprofiled ones."""
    run = TB.prepare(name, warmup + steps, device, tiny)
    for i in range(warmup):
        run.one_step(i)
    searches_before = getattr(run.opt, "num_searches", None)
    forwards_before = getattr(run.opt, "num_forward_evals", None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for i in range(warmup, warmup + steps):
            run.one_step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - began
    events = prof.events()
    device_intervals = [(e.time_range.start, e.time_range.end) for e in events
                        if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _union_ms(device_intervals) if device_intervals else None
    d2h = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and "DtoH" in e.name]
    syncs = [e for e in events if e.name in SYNC_OPS]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    host_top = sorted(((a.key, a.self_cpu_time_total / 1e3 / steps, a.count / steps) for a in prof.key_averages()),
                      key=lambda r: -r[1])[:top]
    wall_ms = wall * 1e3 / steps
    result = {
        "optimizer": name, "steps": steps, "warmup": warmup, "wall_ms": wall_ms,
        "device_busy_ms": None if busy is None else busy / steps,
        "device_idle_ms": None if busy is None else wall_ms - busy / steps,
        "syncs_per_step": len(syncs) / steps,
        "sync_wait_ms": sum(e.cpu_time_total for e in syncs) / 1e3 / steps,
        "d2h_copies_per_step": len(d2h) / steps,
        "top_host_ops": [{"op": k, "self_ms_per_step": ms, "calls_per_step": n} for k, ms, n in host_top],
        "table": table,
    }
    if searches_before is not None:
        result["searches_per_step"] = (run.opt.num_searches - searches_before) / steps
        result["forwards_per_step"] = (run.opt.num_forward_evals - forwards_before) / steps
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", nargs="+", default=["adamw_fused", "fused_salsa_copy"],
                        choices=list(TB.OPTIMIZERS))
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CPU smoke)")
    parser.add_argument("--warmup", type=C.int_at_least(0), default=20)
    parser.add_argument("--steps", type=C.positive_int, default=10)
    parser.add_argument("--out", default=None,
                        help="JSONL file each optimizer's row is appended to (default: "
                             "benchmarks/results/step_profile.jsonl, step_profile_cpu_smoke.jsonl with --tiny)")
    args = parser.parse_args(argv)
    if args.device.type == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (the default model is GPT-2 small: minutes a step here)")
    out = args.out or C.RESULTS_DIR / ("step_profile_cpu_smoke.jsonl" if args.tiny else "step_profile.jsonl")
    for name in args.optimizer:
        result = profile_steps(name, args.device, args.tiny, args.warmup, args.steps)
        print(result.pop("table"))
        print(json.dumps(result, indent=1))
        C.append_jsonl(out, {"optimizer": name, "tiny": args.tiny, "warmup": args.warmup, "steps": args.steps,
                             "values": result, "env": C.environment(args.device)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
