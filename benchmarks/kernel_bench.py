"""Kernel-level timings: FusedSaLSa's passes against AdamW's step, with a copy roofline.

For each size (one tensor of N parameters, and GPT-2 small's real list of 148 tensors,
124.4M parameters) and weight dtype (fp32, bf16), on one set of weights and gradients:

- ``adamw_fused`` / ``adamw_foreach``: ``torch.optim.AdamW(...).step()``;
- ``salsa_plain``: the backend's plain step (one pass: moments and the Adam update);
- ``salsa_reduction``: the reduction pass of a search step (``q``; reads g, m, v);
- ``salsa_pass_a``: pass A of a search step (moments, saved copy, first trial);
- ``salsa_pass_b``: pass B (one further trial, from the saved copy);
- ``copy``: ``dst.copy_(src)`` of a buffer as large as the plain step's traffic, whose
  bandwidth (bytes read + written / time) is the roofline.

Effective bandwidth = bytes that must move / time; bytes per parameter with weight
bytes ``w`` (4 fp32, 2 bf16), gradient bytes ``w``, fp32 moments: plain step
``2w + w + 16``, reduction ``w + 8``, pass A ``plain + w`` (saved copy), pass B
``2w + w + 4``; AdamW (moments in the weights' dtype) ``3w + 4w``.

Timings are interleaved across providers (CUDA events around ``inner`` back-to-back calls
per sample). The backend is Triton on CUDA; without a GPU (``--device cpu``, used by
the smoke test) the torch backend runs at tiny sizes (``--tiny``, required there) and the
results say they are not GPU figures. Tiny runs go to ``kernel_bench_cpu_smoke`` (CPU) or
``kernel_bench_tiny_smoke`` (GPU), never to the published ``kernel_bench``.

    python -m benchmarks.kernel_bench                  # GPU: 1M .. 1B and GPT-2 small
    python -m benchmarks.kernel_bench --device cpu --tiny
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List

import torch

from benchmarks import _common as C
from salsa_fused.backends import resolve
from salsa_fused.backends.base import GRADIENT, Bucket, Hyper, Move, PassArgs

GPU_SIZES = [2 ** 20, 2 ** 22, 2 ** 24, 2 ** 26, 2 ** 28, 2 ** 30]
TINY_SIZES = [2 ** 12, 2 ** 16]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bytes_per_param(kind: str, dtype: torch.dtype) -> int:
    w = torch.empty((), dtype=dtype).element_size()
    return {"salsa_plain": 3 * w + 16, "salsa_reduction": w + 8, "salsa_pass_a": 4 * w + 16,
            "salsa_pass_b": 3 * w + 4, "adamw_fused": 7 * w, "adamw_foreach": 7 * w}[kind]


def providers(shapes, dtype: torch.dtype, device: torch.device, backend_name: str) -> Dict[str, Callable]:
    """Step functions over one shared set of weights and gradients (state per provider)."""
    params = C.make_params(shapes, dtype, device)
    fns: Dict[str, Callable] = {}
    for name, flag in (("adamw_fused", "fused"), ("adamw_foreach", "foreach")):
        try:
            adamw = torch.optim.AdamW(params, lr=1e-6, **{flag: True})
            adamw.step()
            fns[name] = adamw.step
        except RuntimeError as error:  # fused AdamW without support for this device/dtype
            print(f"{name}: unavailable ({error})")
    backend = resolve(backend_name, device)
    grads = [p.grad for p in params]
    zeros = lambda: [torch.zeros_like(p, dtype=torch.float32) for p in params]  # noqa: E731
    exp_avg, exp_avg_sq = zeros(), zeros()
    bucket = Bucket([p.detach() for p in params], grads, exp_avg, exp_avg_sq,
                    [torch.empty_like(p) for p in params], device, dtype, 0)
    plain_bucket = Bucket(bucket.params, grads, zeros(), zeros(), None, device, dtype, 0)
    hyper = Hyper(0.9, 0.999, 1e-8, 0.0, 1 - 0.9 ** 11, 1 - 0.999 ** 11, 1.0)
    loss = torch.tensor(1.0, device=device)
    counter = torch.zeros((), dtype=torch.int64, device=device)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    fns["salsa_plain"] = no_grad(lambda: backend.plain_step(plain_bucket, PassArgs(hyper, Move(1e-6, decay=1e-6)), loss, nonfinite_count=counter))
    fns["salsa_reduction"] = no_grad(lambda: backend.slope(bucket, PassArgs(hyper, direction=GRADIENT)))
    fns["salsa_pass_a"] = no_grad(lambda: backend.first_trial(bucket, PassArgs(hyper, Move(1e-6, decay=1e-6), GRADIENT)))
    fns["salsa_pass_b"] = no_grad(lambda: backend.retrial(bucket, PassArgs(hyper, Move(1e-6, 1.25e-6, 1e-6), GRADIENT)))
    numel = C.numel_of(shapes)
    copy_bytes = numel * bytes_per_param("salsa_plain", dtype) // 2  # read + write = plain's traffic
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    fns["_copy_bytes"] = 2 * copy_bytes  # read + write
    return fns


def bench(shapes, label: str, dtype_name: str, device: torch.device, backend_name: str,
          repeats: int) -> List[C.Row]:
    dtype = DTYPES[dtype_name]
    fns = providers(shapes, dtype, device, backend_name)
    copy_bytes = fns.pop("_copy_bytes")
    numel = C.numel_of(shapes)
    # Calls per sample: enough back-to-back calls for about 2 ms of work per sample.
    estimate = C.time_once(fns["salsa_plain"], device) if device.type == "cuda" else 1.0
    inner = max(1, min(100, int(2e-3 / max(estimate, 1e-6)))) if device.type == "cuda" else 1
    samples = C.interleaved(fns, device, repeats=repeats, warmup=2, inner=inner)
    roofline = copy_bytes / statistics.median(samples["copy"])
    adamw_ref = statistics.median(samples.get("adamw_fused", samples["adamw_foreach"]))
    rows = []
    for name, s in samples.items():
        median = statistics.median(s)
        moved = copy_bytes if name == "copy" else numel * bytes_per_param(name, dtype)
        bandwidth = moved / median
        rows.append(C.row_from_samples(
            "copy" if name == "copy" else name.split("_", 1)[1], name, label, s, numel=numel,
            dtype=dtype_name, extra={"bytes_moved": moved, "GBps": bandwidth / 1e9,
                                     "fraction_of_copy_bandwidth": bandwidth / roofline,
                                     "vs_adamw_fused": median / adamw_ref, "inner": inner,
                                     "backend": backend_name if name.startswith("salsa") else "torch"}))
    return rows


def results_name(on_gpu: bool, tiny: bool) -> str:
    """The results file's name: only a GPU run at full sizes goes to the published one."""
    if not on_gpu:
        return "kernel_bench_cpu_smoke"
    return "kernel_bench_tiny_smoke" if tiny else "kernel_bench"


def main(argv=None) -> List[C.Row]:
    parser = argparse.ArgumentParser(description="Kernel-level timings vs AdamW with a copy roofline")
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, few repeats (CPU smoke test)")
    parser.add_argument("--sizes", type=C.positive_int, nargs="+", default=None, help="parameter counts")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=C.positive_int, default=None)
    parser.add_argument("--no-gpt2", action="store_true")
    parser.add_argument("--out-dir", type=C.output_dir, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu and not args.tiny:  # GPU sizes reach 2^30 elements: hours on a CPU, and not its figures
        parser.error(f"--device {args.device} runs only with --tiny (the GPU sizes reach 2^30 elements)")
    name = results_name(on_gpu, args.tiny)
    C.results_readable(parser, (args.out_dir or C.RESULTS_DIR) / f"{name}.json")
    backend_name = "triton" if on_gpu else "torch"
    sizes = args.sizes or (TINY_SIZES if args.tiny else GPU_SIZES)
    repeats = args.repeats or (3 if args.tiny else 25)
    gpt2_scale = 0.001 if args.tiny else 1.0
    cases = [(C.flat_shapes(n), f"{n / 1e6:g}M x1") for n in sizes]
    if not args.no_gpt2:
        shapes = C.gpt2_small_shapes(gpt2_scale)
        cases.append((shapes, f"gpt2-small{'' if gpt2_scale == 1 else f' x{gpt2_scale:g}'} "
                              f"({len(shapes)} tensors, {C.numel_of(shapes) / 1e6:.1f}M)"))
    rows: List[C.Row] = []
    for dtype_name in args.dtypes:
        for shapes, label in cases:
            try:
                rows += bench(shapes, label, dtype_name, device, backend_name, repeats)
            except torch.cuda.OutOfMemoryError as error:
                rows.append(C.Row("all", "all", label, C.numel_of(shapes), dtype_name, note=f"OOM: {error}"))
            if on_gpu:
                torch.cuda.empty_cache()
    if not on_gpu:
        note = (f"\n**{C.NOT_MEASURED}**: these are CPU smoke figures of the torch backend at tiny sizes, "
                "not GPU kernel timings.\n")
    else:
        note = "\nTiny sizes (--tiny): a smoke run, not the published kernel timings.\n" if args.tiny else ""
    table = C.markdown_table(
        ["size", "dtype", "provider", "p50 ms", "GB/s", "of copy BW", "x AdamW fused"],
        [[r.size, r.dtype, r.provider, r.p50_ms, r.extra.get("GBps", "-"),
          r.extra.get("fraction_of_copy_bandwidth", "-"), r.extra.get("vs_adamw_fused", "-")]
         for r in rows])
    markdown = f"# Kernel-level timings ({backend_name} backend)\n{note}\n{table}"
    print(markdown)
    C.write_results(name, rows, C.environment(device),
                    markdown, args.out_dir, {"gpu_measured": on_gpu, "backend": backend_name})
    return rows


if __name__ == "__main__":
    main()
