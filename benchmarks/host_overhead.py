"""Host time of a plain step at 148 and 10,000 tensors, beside ``torch.optim.AdamW(fused=True)``.

A plain step of ``FusedSaLSa`` (Triton backend; every step plain through a schedule that
never searches) is timed on the host clock around ``step()``, with each Triton kernel
replaced by a stub that records the launch and runs nothing (``--launch stubbed``: the
Python work of the optimizer and the backend alone), or with the real kernels
(``--launch real``, CUDA only: the host returns before the device finishes, so this is
the time the step holds the Python thread). ``torch.optim.AdamW(fused=True)`` runs on the
same tensors (its kernel is real: on the CPU the tensors are tiny so that it is host time
too). Gradients (``--grads``) keep their storage from step to step (``kept``:
``zero_grad(set_to_none=False)``), alternate between two storages per tensor (``cycled``:
``set_to_none=True`` with a caching allocator that hands the freed blocks back in turn), or
get new storage before every step (``new``: ``set_to_none=True`` without allocator reuse).
Each FusedSaLSa row says whether the bucket cache read the groups in C++
(``group_signature``: the extension loaded) or in Python.

Tensor lists: ``148``: GPT-2 small's shapes (on the CPU every tensor is cut to 64
elements: host time does not depend on sizes with the launch stubbed); ``10000``:
10,000 tensors (GPT-2 small's 124.4M elements split evenly on a GPU, 64 each on the CPU).

    python -m benchmarks.host_overhead                 # both sizes, rows appended to
                                                       # benchmarks/results/host_overhead.jsonl
    python -m benchmarks.host_overhead --profile 10000 # where the stubbed step's host time goes
    python -m benchmarks.host_overhead --calls 148     # Python calls per stubbed step (deterministic)

Each row carries the commit, versions, device and date. Targets (issue 17): 10,000 tensors
at most fused AdamW's host time; 148 tensors at most 0.2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

from benchmarks import _common as C

C.ensure_triton_interpreter_without_cuda()  # stubbed launches resolve the triton backend on the CPU

import torch  # noqa: E402

from salsa_fused import FusedSaLSa, buckets  # noqa: E402

DEFAULT_OUT = C.RESULTS_DIR / "host_overhead.jsonl"
CPU_NUMEL_PER_TENSOR = 64
GPT2_SMALL_NUMEL = 124_439_808


class NeverSearch:
    """A schedule that keeps the level and never searches: every step is a plain step."""

    def scale(self, step: int) -> float:
        return 1.0

    def searches(self, step: int) -> bool:
        return False


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records nothing and runs nothing."""

    def __init__(self, kernel):
        self.__name__ = getattr(kernel, "__name__", type(kernel).__name__)
        self.arg_names = getattr(kernel, "arg_names", ())
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


@contextlib.contextmanager
def stubbed_launches() -> Iterator[Dict[str, _NoLaunch]]:
    """Replace every kernel of ``salsa_fused.backends.triton_kernels`` by a ``_NoLaunch``."""
    from salsa_fused.backends import triton_kernels as K
    originals = {name: getattr(K, name) for name in dir(K) if name.endswith("_kernel")}
    stubs = {name: _NoLaunch(kernel) for name, kernel in originals.items()}
    try:
        for name, stub in stubs.items():
            setattr(K, name, stub)
        yield stubs
    finally:
        for name, kernel in originals.items():
            setattr(K, name, kernel)


def tensor_shapes(n_tensors: int, device: torch.device) -> List[tuple]:
    if device.type != "cuda":
        return [(CPU_NUMEL_PER_TENSOR,)] * n_tensors
    if n_tensors == 148:
        return C.gpt2_small_shapes()
    return C.flat_shapes(GPT2_SMALL_NUMEL, n_tensors)


def _host_seconds(step: Callable[[], object], before: Callable[[], None], steps: int, warmup: int,
                  device: torch.device) -> List[float]:
    """Host-clock seconds of each ``step()``; ``before()`` runs untimed ahead of each."""
    for _ in range(warmup):
        before()
        step()
    C.synchronize(device)
    samples = []
    for _ in range(steps):
        before()
        began = time.perf_counter()
        step()
        samples.append(time.perf_counter() - began)
    C.synchronize(device)
    return samples


def _fresh_grads(params) -> Callable[[], None]:
    def renew():
        for p in params:
            p.grad = p.grad.clone()  # new storage, as zero_grad(set_to_none=True) + backward gives
    return renew


def _cycled_grads(params) -> Callable[[], None]:
    storages = itertools.cycle([[p.grad.clone() for p in params], [p.grad.clone() for p in params]])

    def alternate():
        for p, grad in zip(params, next(storages)):
            p.grad = grad  # the other of two storages, as a caching allocator's reuse gives
    return alternate


GRAD_MODES = {"kept": lambda params: (lambda: None), "cycled": _cycled_grads, "new": _fresh_grads}


def salsa_plain_step(params, device: torch.device, backend: str = "triton") -> Callable[[], object]:
    opt = FusedSaLSa(params, backend=backend, schedule=NeverSearch(), init_step_size=1e-6)
    loss = torch.tensor(1.0, device=device)
    return lambda: opt.step(lambda: loss, loss=loss)


def measure(n_tensors: int, device: torch.device, dtype: torch.dtype = torch.float32,
            launch: str = "stubbed", steps: int = 20, warmup: int = 3,
            grads: str = "kept") -> Dict[str, dict]:
    """Host ms per step of FusedSaLSa's plain step and of fused AdamW on the same tensors."""
    if launch == "real" and device.type != "cuda":
        raise ValueError("real launches are timed on CUDA only (the CPU interpreter is not a launch)")
    shapes = tensor_shapes(n_tensors, device)
    params = C.make_params(shapes, dtype, device)
    before = GRAD_MODES[grads](params)
    results: Dict[str, dict] = {}
    stubs = stubbed_launches() if launch == "stubbed" else contextlib.nullcontext({})
    with torch.no_grad(), stubs as stubbed:
        samples = _host_seconds(salsa_plain_step(params, device), before, steps, warmup, device)
    launches = sum(s.launches for s in stubbed.values()) / (steps + warmup) if stubbed else None
    results["fused_salsa_plain"] = {"samples": samples, "launches_per_step": launches,
                                    "group_signature": buckets._group_signature() is not None}
    try:
        adamw = torch.optim.AdamW(params, lr=1e-6, fused=True)
        results["adamw_fused"] = {"samples": _host_seconds(adamw.step, before, steps, warmup, device)}
    except RuntimeError as error:  # no fused AdamW for this device or dtype
        results["adamw_fused"] = {"error": str(error)}
    reference = results["adamw_fused"].get("samples")
    for name, r in results.items():
        if "samples" in r:
            r.update({k.replace("_ms", "_host_ms"): v for k, v in C.quantiles_ms(r.pop("samples")).items()})
            if reference:
                r["vs_adamw_fused"] = r["p50_host_ms"] / (statistics.median(reference) * 1e3)
        r.update(n_tensors=n_tensors, numel=C.numel_of(shapes), dtype=str(dtype).replace("torch.", ""),
                 launch=launch if name != "adamw_fused" else "real", grads=grads, steps=steps)
    return results


def profile(n_tensors: int, device: torch.device, steps: int = 10, top: int = 25) -> str:
    """cProfile of ``steps`` stubbed plain steps: the functions by their own time."""
    params = C.make_params(tensor_shapes(n_tensors, device), torch.float32, device)
    with torch.no_grad(), stubbed_launches():
        step = salsa_plain_step(params, device)
        for _ in range(3):
            step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def python_calls(n_tensors: int, device: torch.device, backend: str = "triton", grad: bool = False,
                 steps: int = 100, warmup: int = 5, made_in: Optional[str] = None) -> float:
    """Python calls (cProfile's count: functions and builtins) per stubbed plain step, the calling
    ``lambda`` included; deterministic, unlike the host clock. ``grad``: ``step()`` called with grad
    enabled (a training loop's case) instead of under ``torch.no_grad()`` as :func:`measure` times it.
    ``made_in``: count only the calls made from code in that directory (the package's own: what torch's
    version does not move)."""
    calls = sum(calls_by_function(n_tensors, device, backend, grad, steps, warmup, made_in).values())
    if made_in is not None:
        return calls / steps
    return (calls - 2 * steps) / steps  # less the profiler's own two calls a step (its enable/disable overhead)


def calls_by_function(n_tensors: int, device: torch.device, backend: str = "triton", grad: bool = False,
                      steps: int = 100, warmup: int = 5, made_in: Optional[str] = None) -> Dict[str, int]:
    """:func:`python_calls` per callee (``file:line function``), summed over the ``steps`` steps: where a rise
    in the count comes from."""
    params = C.make_params(tensor_shapes(n_tensors, device), torch.float32, device)
    with torch.set_grad_enabled(grad), stubbed_launches():
        step = salsa_plain_step(params, device, backend)
        for _ in range(warmup):
            step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
    by_function: Dict[str, int] = {}
    for (path, line, name), row in pstats.Stats(profiler).stats.items():
        count = (row[1] if made_in is None else
                 sum(calls for caller, (_, calls, _, _) in row[4].items() if caller[0].startswith(made_in)))
        if count:
            key = f"{path.rsplit('/', 1)[-1]}:{line} {name}"
            by_function[key] = by_function.get(key, 0) + count
    return by_function


def rows(sizes=(148, 10000), device: Optional[torch.device] = None, steps: int = 20,
         launches=("stubbed",), grad_modes=tuple(GRAD_MODES)) -> Iterator[dict]:
    """``{"name", "values"}`` records, one per (provider, size, launch mode, gradient mode), each yielded as soon
    as its measurement ends: a caller that appends them keeps what was measured when a time limit kills it."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for n in sizes:
        for launch in launches:
            for grads in grad_modes:
                for provider, values in measure(n, device, launch=launch, steps=steps, grads=grads).items():
                    if provider == "adamw_fused" and launch != launches[0]:
                        continue  # AdamW has no stubbed form: once per size and gradient mode
                    yield {"name": f"{provider} {n} tensors, launch {values['launch']}, grads {grads}",
                           "values": values}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=C.positive_int, nargs="+", default=[148, 10000])
    parser.add_argument("--steps", type=C.positive_int, default=20)
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--launch", nargs="+", default=None, choices=["stubbed", "real"],
                        help="default: stubbed, and real too on CUDA")
    parser.add_argument("--grads", nargs="+", default=list(GRAD_MODES), choices=list(GRAD_MODES),
                        help="gradient storage from step to step (default: all three)")
    parser.add_argument("--out", type=C.output_file, default=DEFAULT_OUT, help="JSONL file the rows are appended to")
    parser.add_argument("--profile", type=C.positive_int, default=None, metavar="N_TENSORS",
                        help="print a cProfile of stubbed plain steps at this many tensors instead")
    parser.add_argument("--calls", type=C.positive_int, default=None, metavar="N_TENSORS",
                        help="print Python calls per stubbed plain step at this many tensors instead "
                             "(backends triton and auto, under no_grad and with grad on)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if "real" in (args.launch or ()) and device.type != "cuda":
        parser.error(f"--launch real: real launches are timed on CUDA only, not on --device {args.device}")
    if args.profile is not None:
        print(profile(args.profile, device))
        return 0
    if args.calls is not None:
        for backend in ("triton", "auto"):
            for grad in (False, True):
                print(f"{backend} backend, grad {'on' if grad else 'off'}: "
                      f"{python_calls(args.calls, device, backend, grad):.1f} Python calls per plain step")
        return 0
    launches = tuple(args.launch or (("stubbed", "real") if device.type == "cuda" else ("stubbed",)))
    env = C.environment(device)
    for record in rows(args.sizes, device, args.steps, launches, tuple(args.grads)):
        record = {"stage": "host_overhead", **record, "env": env}
        C.append_jsonl(args.out, record)
        v = record["values"]
        reader = {True: ", groups read in C++", False: ", groups read in Python"}.get(v.get("group_signature"), "")
        print(f"{record['name']}: {v.get('p50_host_ms', float('nan')):.3f} ms host "
              f"(x{v.get('vs_adamw_fused', float('nan')):.2f} fused AdamW{reader}) {v.get('error', '')}")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
