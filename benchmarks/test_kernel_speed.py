"""Kernel-level timings in pytest-benchmark form (the issue's layer 2), beside kernel_bench.py.

Each provider of ``kernel_bench.providers`` (fused/foreach AdamW, the plain step, the
reduction, pass A, pass B, and a device copy as the roofline) is timed by pytest-benchmark
on one set of tensors per (size, dtype); ``extra_info`` carries the bytes that must move, so
``bytes_moved / mean`` is the effective bandwidth.

    pytest benchmarks/test_kernel_speed.py --benchmark-json benchmarks/results/kernel_speed.json

On a GPU (the default there) it times GPT-2 small's 148-tensor list and flat 1M..256M
tensors; ``SALSA_BENCH_DEVICE=cpu`` runs the same code at tiny sizes (the CI smoke test).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import _common as C
from benchmarks import kernel_bench as KB

DEVICE = torch.device(os.environ.get("SALSA_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cuda":
    SIZES = {"gpt2-small": C.gpt2_small_shapes(), **{f"{n >> 20}M": C.flat_shapes(n)
                                                      for n in (1 << 20, 1 << 24, 1 << 28)}}
    BACKEND = "triton"
else:
    SIZES = {"tiny-gpt2": C.gpt2_small_shapes(scale=0.002, n_layer=2, d_model=16, vocab=64, context=16)}
    BACKEND = "torch"
PROVIDERS = ("adamw_fused", "adamw_foreach", "salsa_plain", "salsa_reduction", "salsa_pass_a",
             "salsa_pass_b", "copy")


@functools.lru_cache(maxsize=1)
def _providers(size: str, dtype_name: str):
    return KB.providers(SIZES[size], KB.DTYPES[dtype_name], DEVICE, BACKEND)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("size", list(SIZES))
def test_kernel_speed(benchmark, size, dtype_name, provider):
    fns = _providers(size, dtype_name)
    if provider not in fns:
        pytest.skip(f"{provider} is not available for {dtype_name} on {DEVICE}")
    fn = fns[provider]
    numel = C.numel_of(SIZES[size])
    moved = fns["_copy_bytes"] if provider == "copy" else numel * KB.bytes_per_param(
        provider, KB.DTYPES[dtype_name])
    benchmark.extra_info.update(device=C.device_name(DEVICE), size=size, numel=numel,
                                dtype=dtype_name, bytes_moved=moved, backend=BACKEND)
    benchmark.group = f"{size} {dtype_name}"

    def timed():
        fn()
        C.synchronize(DEVICE)

    benchmark.pedantic(timed, rounds=30 if DEVICE.type == "cuda" else 3,
                       warmup_rounds=3 if DEVICE.type == "cuda" else 1)


if __name__ == "__main__":  # run as a module it would define the tests and time nothing
    import sys

    print("benchmarks/test_kernel_speed.py is a pytest-benchmark file: run it with pytest, e.g.\n"
          "    pytest benchmarks/test_kernel_speed.py --benchmark-json kernel_speed.json", file=sys.stderr)
    sys.exit(2)
