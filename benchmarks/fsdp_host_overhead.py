"""Host time of a plain step under FSDP2: DTensor parameters, 2 gloo processes on the CPU.

Each rank holds a module of ``n`` parameters of 64 elements (sharded by ``fully_shard`` into
DTensors of 32 local elements) with DTensor gradients. Timed on the host clock around
``step()``, side by side on the same parameters:

- ``fused_salsa_plain``: FusedSaLSa's plain step (Triton backend, launches stubbed as in
  ``benchmarks.host_overhead``: the Python work of the optimizer and the backend alone; it
  reads the DTensors' local shards once per bucket and keys its cache by their pointers);
- ``loss_all_reduce``: the one 4-byte all-reduce a plain step makes (every rank judges the
  same averaged loss); gloo runs it synchronously on the host, NCCL queues it on the GPU, so
  ``fused_salsa_plain - loss_all_reduce`` is the part a GPU run would also spend;
- ``adamw_foreach`` and ``adamw_fused``: ``torch.optim.AdamW`` on the DTensors (their ops
  dispatch through DTensor, the host cost pytorch#134191 measured under FSDP2); on the CPU the
  tensors are tiny, so their time is host time too.

The rank-0 medians are reported (both ranks run the same steps, gloo keeps them in step).

    python -m benchmarks.fsdp_host_overhead [--sizes 148 1000] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from benchmarks import _common as C

C.ensure_triton_interpreter_without_cuda()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

DEFAULT_OUT = C.RESULTS_DIR / "fsdp_host_overhead.jsonl"
WORLD = 2
WORKER_THREADS = 1  # each rank's torch threads: two ranks on a 2-core machine
NUMEL_PER_TENSOR = 64


class _Params(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(NUMEL_PER_TENSOR)) for _ in range(n))


def _median_ms(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    dist.barrier()
    samples = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        samples.append(time.perf_counter() - began)
    dist.barrier()
    return statistics.median(samples) * 1e3


def _worker(rank: int, rendezvous: str, sizes: List[int], steps: int, warmup: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from benchmarks.host_overhead import NeverSearch, stubbed_launches
    from salsa_fused import FusedSaLSa

    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        lines = []
        for n in sizes:
            torch.manual_seed(0)
            module = fully_shard(_Params(n), mesh=mesh)
            params = list(module.parameters())
            assert all(hasattr(p, "_local_tensor") for p in params), "fully_shard left plain tensors"
            with torch.no_grad():
                for p in params:
                    p.grad = torch.full_like(p, 1e-3)
            results: Dict[str, float] = {}
            opt = FusedSaLSa(params, backend="triton", schedule=NeverSearch(), init_step_size=1e-6)
            loss = torch.tensor(1.0)
            with torch.no_grad(), stubbed_launches():
                results["fused_salsa_plain"] = _median_ms(lambda: opt.step(lambda: loss, loss=loss), steps, warmup)
            one = torch.zeros(1)
            results["loss_all_reduce"] = _median_ms(lambda: dist.all_reduce(one), steps, warmup)
            for name, kwargs in (("adamw_foreach", {"foreach": True}), ("adamw_fused", {"fused": True})):
                try:
                    adamw = torch.optim.AdamW(params, lr=1e-6, **kwargs)
                    results[name] = _median_ms(adamw.step, steps, warmup)
                except RuntimeError as error:  # no such AdamW for DTensors on this build
                    results[name] = float("nan")
                    if rank == 0:
                        print(f"{name}: {error}", flush=True)
            if rank == 0:
                lines.append(f"{n}\t" + "\t".join(f"{k}={v!r}" for k, v in results.items()))
        if rank == 0:
            Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(sizes=(148, 1000), steps: int = 20, warmup: int = 3) -> List[dict]:
    """One record per size: rank 0's host ms per step and the ratios to the AdamWs."""
    with tempfile.TemporaryDirectory(prefix="salsa_fsdp_host_") as scratch:
        out = os.path.join(scratch, "rank0.tsv")
        rendezvous = os.path.join(scratch, "rendezvous")
        mp.spawn(_worker, args=(rendezvous, list(sizes), steps, warmup, out), nprocs=WORLD, join=True)
        rows = Path(out).read_text(encoding="utf-8").split("\n")
    records = []
    for line in filter(None, rows):
        n, *fields = line.split("\t")
        values = {k: float(v) for k, v in (f.split("=") for f in fields)}
        record = {"n_tensors": int(n), "world_size": WORLD, "numel_per_tensor": NUMEL_PER_TENSOR,
                  "steps": steps, **{f"{k}_p50_host_ms": v for k, v in values.items()}}
        without = values["fused_salsa_plain"] - values["loss_all_reduce"]
        record["fused_salsa_plain_without_all_reduce_ms"] = without
        for baseline in ("adamw_foreach", "adamw_fused"):
            if values.get(baseline) == values.get(baseline):  # not NaN
                record[f"fused_salsa_plain_vs_{baseline}"] = values["fused_salsa_plain"] / values[baseline]
                record[f"without_all_reduce_vs_{baseline}"] = without / values[baseline]
        records.append(record)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=C.positive_int, nargs="+", default=[148, 1000])
    parser.add_argument("--steps", type=C.positive_int, default=20)
    parser.add_argument("--out", type=C.output_file, default=DEFAULT_OUT, help="JSONL file the rows are appended to")
    args = parser.parse_args(argv)
    env = C.environment(torch.device("cpu"), threads=WORKER_THREADS)
    for record in measure(args.sizes, args.steps):
        C.append_jsonl(args.out, {"name": f"fsdp2 plain step host time, {record['n_tensors']} tensors",
                                  "values": record, "env": env})
        print(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
