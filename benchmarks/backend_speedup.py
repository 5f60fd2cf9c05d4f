"""End-to-end speed-up of the C++ CPU backend ("cpp") over the torch reference ("torch").

Two workloads, each run with both backends alternately (``--rounds`` rounds, the order flipped
every round), on one intra-op thread unless ``--threads`` says otherwise:

- ``demo``: the README's main job, ``examples/pretrain_gpt.py`` with its defaults (200 steps of
  a 2-layer byte GPT) or ``--demo-steps``; wall seconds of the training loop;
- ``zoo``: every quality-zoo task for ``--zoo-steps`` steps with ``salsa_faithful`` (the
  published SaLSa's defaults), seed 0; milliseconds per optimizer step (forward, backward and
  searches included) as ``benchmarks.quality.run.train`` measures them.

The factor is torch's median time over cpp's, per workload (zoo: the geometric mean over tasks
of per-task factors). One record per run is appended to ``results/backend_speedup.jsonl``
(commit, versions, device, date, load average).

    python -m benchmarks.backend_speedup [--rounds 2] [--demo-steps 200] [--zoo-steps 100] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks import _common as C

BACKENDS = ("torch", "cpp")
RESULTS = C.RESULTS_DIR / "backend_speedup.jsonl"


def demo_seconds(backend: str, steps: int) -> float:
    from examples import pretrain_gpt

    with tempfile.TemporaryDirectory() as out:
        args = pretrain_gpt.parse_args(["--backend", backend, "--steps", str(steps), "--no-progress",
                                        "--checkpoint-interval", str(10 * steps), "--out", out])
        summary = pretrain_gpt.train(args)
    return float(summary["seconds"])


def zoo_step_ms(backend: str, steps: int, tasks: Optional[List[str]] = None) -> Dict[str, float]:
    from benchmarks.quality import optimizers as O
    from benchmarks.quality.run import train
    from benchmarks.quality.zoo import tasks as Z

    O.BACKEND = backend
    try:
        return {name: float(train(Z.make(name, 0, steps=steps), "salsa_faithful", 0,
                                  record_searches=False)["step_time_ms"])
                for name in (tasks or sorted(Z.ZOO))}
    finally:
        O.BACKEND = "auto"


def _measure(rounds: int, demo_steps: int, zoo_steps: int, tasks: Optional[List[str]]):
    """Per backend: the demo's seconds per round, and per zoo task its ms per step per round."""
    demo: Dict[str, List[float]] = {b: [] for b in BACKENDS}
    zoo: Dict[str, Dict[str, List[float]]] = {b: {} for b in BACKENDS}
    for r in range(rounds):
        for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            if demo_steps:
                demo[backend].append(demo_seconds(backend, demo_steps))
                print(f"round {r} demo {backend}: {demo[backend][-1]:.1f} s", flush=True)
            if zoo_steps:
                for task, ms in zoo_step_ms(backend, zoo_steps, tasks).items():
                    zoo[backend].setdefault(task, []).append(ms)
                print(f"round {r} zoo {backend}: " + " ".join(
                    f"{t} {v[-1]:.2f}" for t, v in zoo[backend].items()), flush=True)
    return demo, zoo


def run(rounds: int, demo_steps: int, zoo_steps: int, threads: int, tasks: Optional[List[str]] = None,
        results: Path = RESULTS) -> dict:
    from salsa_fused import backends

    try:
        backends.resolve("cpp", torch.device("cpu"))
    except (ImportError, RuntimeError) as error:
        raise SystemExit(f"the cpp backend cannot run here: {error}") from None
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        demo, zoo = _measure(rounds, demo_steps, zoo_steps, tasks)
        environment = C.environment("cpu")  # its device names the threads the runs had
    finally:
        torch.set_num_threads(default_threads)
    record = dict(environment, load_average=list(os.getloadavg()), threads=threads, rounds=rounds,
                  demo_steps=demo_steps, zoo_steps=zoo_steps)
    if demo_steps:
        medians = {b: statistics.median(v) for b, v in demo.items()}
        record["demo_seconds"] = medians
        record["demo_speedup"] = medians["torch"] / medians["cpp"]
    if zoo_steps:
        per_task = {t: statistics.median(zoo["torch"][t]) / statistics.median(zoo["cpp"][t]) for t in zoo["cpp"]}
        record["zoo_step_ms"] = {b: {t: statistics.median(v) for t, v in zoo[b].items()} for b in BACKENDS}
        record["zoo_speedup_by_task"] = per_task
        record["zoo_speedup_geomean"] = math.exp(sum(map(math.log, per_task.values())) / len(per_task))
    C.append_jsonl(results, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=C.positive_int, default=2)
    parser.add_argument("--demo-steps", type=C.int_at_least(0), default=200, help="0 skips the demo")
    parser.add_argument("--zoo-steps", type=C.int_at_least(0), default=100, help="0 skips the zoo")
    parser.add_argument("--threads", type=C.positive_int, default=1)
    parser.add_argument("--tasks", type=C.comma_list, default=None, help="comma-separated zoo tasks (default: all)")
    parser.add_argument("--out", type=C.output_file, default=RESULTS, help="JSONL file the record is appended to")
    args = parser.parse_args(argv)
    if args.demo_steps == 0 and args.zoo_steps == 0:
        parser.error("--demo-steps 0 and --zoo-steps 0 leave nothing to measure")
    tasks = args.tasks
    if tasks is not None:  # before any measurement: the demo takes minutes
        from benchmarks.quality.zoo import tasks as Z
        unknown = sorted(set(tasks) - set(Z.ZOO))
        if unknown:
            parser.error(f"unknown zoo tasks {unknown}; known: {', '.join(sorted(Z.ZOO))}")
    record = run(args.rounds, args.demo_steps, args.zoo_steps, args.threads, tasks, args.out)
    if "demo_speedup" in record:
        print(f"demo: torch {record['demo_seconds']['torch']:.1f} s, cpp {record['demo_seconds']['cpp']:.1f} s: "
              f"{record['demo_speedup']:.2f}x")
    if "zoo_speedup_geomean" in record:
        print("zoo: " + ", ".join(f"{t} {f:.2f}x" for t, f in record["zoo_speedup_by_task"].items())
              + f"; geomean {record['zoo_speedup_geomean']:.2f}x")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
