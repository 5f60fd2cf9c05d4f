"""Counts per optimizer step: backend passes, kernel launches, and host reads.

Instruments single ``FusedSaLSa`` steps on any device (the CPU included; the Triton
backend runs under its interpreter, ``TRITON_INTERPRET=1``, when no GPU is present):

- *passes*: calls of the backend's pass functions (``plain_step``, the reduction
  ``slope``, pass A ``first_trial``, pass B ``retrial``, ``restore``),
  each over one bucket (param group x device x dtype);
- *launches*: Triton kernel launches, from ``triton_backend.LAUNCH_COUNTER``;
- *host reads*: calls that bring a tensor's value to Python (``item``, ``tolist``,
  ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu``, ``numpy``, ``to`` a
  CPU device from another) made by code of the ``salsa_fused`` package. On a GPU each
  is a synchronization; the test suite asserts their number per step.

What the design promises (SPEC section 2), with ``B`` buckets and ``n`` trials:
plain step: ``B`` launches, no host read (Triton backend; the torch reference backend
reads finiteness flags by design: docs/performance.md). Search step: ``B`` reduction launches,
``B`` pass-A launches, ``B x (n - 1)`` pass-B launches, ``B`` restore launches only when a
trial forward raises; host reads ``1 + n`` (``f0`` and ``q`` before any write, then ``f1``
of each trial). ``python -m benchmarks.step_counts`` prints and writes these counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from benchmarks import _common as C

C.ensure_triton_interpreter_without_cuda()

import torch  # noqa: E402

import salsa_fused  # noqa: E402
from salsa_fused import FusedSaLSa  # noqa: E402

PACKAGE_DIR = str(Path(salsa_fused.__file__).resolve().parent)
PASS_FUNCTIONS = ("plain_step", "slope", "first_trial", "retrial", "restore")
_READ_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@dataclass
class StepCounts:
    passes: collections.Counter = field(default_factory=collections.Counter)
    launches: collections.Counter = field(default_factory=collections.Counter)
    host_reads: List[str] = field(default_factory=list)  # "method at file:line"
    table_builds: int = 0  # Triton pointer tables (re)built during the step (host work, no sync)

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    def as_dict(self) -> dict:
        return {"passes": dict(self.passes), "launches": dict(self.launches),
                "total_launches": self.total_launches, "host_reads": len(self.host_reads),
                "host_read_sites": list(self.host_reads), "table_builds": self.table_builds}


def _caller_in_package(depth: int = 2) -> Optional[str]:
    frame = sys._getframe(depth)
    filename = frame.f_code.co_filename
    if filename.startswith(PACKAGE_DIR):
        return f"{Path(filename).name}:{frame.f_lineno}"
    return None


@contextlib.contextmanager
def count_host_reads(sink: List[str]) -> Iterator[List[str]]:
    """Record every host read of a tensor value made by ``salsa_fused`` code into ``sink``."""
    originals = {name: getattr(torch.Tensor, name) for name in _READ_METHODS + ("to",)}

    def wrap(name):
        original = originals[name]

        def reader(self, *args, **kwargs):
            site = _caller_in_package()
            if site is not None:
                sink.append(f"{name} at {site}")
            return original(self, *args, **kwargs)
        return reader

    def to(self, *args, **kwargs):
        result = originals["to"](self, *args, **kwargs)
        if isinstance(result, torch.Tensor) and result.device.type == "cpu" and self.device.type != "cpu":
            site = _caller_in_package()
            if site is not None:
                sink.append(f"to(cpu) at {site}")
        return result

    try:
        for name in _READ_METHODS:
            setattr(torch.Tensor, name, wrap(name))
        torch.Tensor.to = to
        yield sink
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_passes(backend_module, sink: collections.Counter) -> Iterator[collections.Counter]:
    """Count calls of the backend's pass functions (each call covers one bucket)."""
    originals = {name: getattr(backend_module, name) for name in PASS_FUNCTIONS}

    def wrap(name):
        original = originals[name]

        def counted(*args, **kwargs):
            sink[name] += 1
            return original(*args, **kwargs)
        return counted

    try:
        for name in PASS_FUNCTIONS:
            setattr(backend_module, name, wrap(name))
        yield sink
    finally:
        for name, original in originals.items():
            setattr(backend_module, name, original)


def triton_launch_counter() -> Optional[collections.Counter]:
    try:
        from salsa_fused.backends import triton_backend
    except ImportError:
        return None
    return getattr(triton_backend, "LAUNCH_COUNTER", None)


def count_step(opt: FusedSaLSa, step: Callable[[], object]) -> StepCounts:
    """Run ``step()`` (one ``opt.step(...)``) and count its passes, launches and host reads."""
    counts = StepCounts()
    launches = triton_launch_counter()
    before = collections.Counter(launches) if launches is not None else collections.Counter()
    backend = opt.backend
    build = getattr(backend, "_build_tables", None)

    def counted_build(*args, **kwargs):
        counts.table_builds += 1
        return build(*args, **kwargs)

    if build is not None:
        backend._build_tables = counted_build
    try:
        with count_passes(backend, counts.passes), count_host_reads(counts.host_reads):
            step()
    finally:
        if build is not None:
            backend._build_tables = build
    if launches is not None:
        counts.launches = collections.Counter(launches) - before
    return counts


# ---------------------------------------------------------------------------- a demo model
class ScriptedLosses:
    """A closure whose trial losses fail the Armijo test ``n - 1`` times, then pass.

    Trial losses above ``f0`` always fail (the smoothed decrease is negative); a loss far
    below ``f0`` passes. ``raise_at`` makes the given trial's forward raise instead.
    """

    def __init__(self, f0: float, trials: int, raise_at: Optional[int] = None):
        self.f0, self.trials, self.raise_at, self.calls = f0, trials, raise_at, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        if self.raise_at is not None and self.calls == self.raise_at:
            raise KeyboardInterrupt("interrupted trial forward (scripted)")
        return torch.tensor(self.f0 + 1e9 if self.calls < self.trials else self.f0 - 1e3)


def demo_model(device="cpu", seed: int = 0):
    """Three buckets: fp32 weights with decay, fp32 biases without, one bf16 layer."""
    torch.manual_seed(seed)
    first, second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
    last = torch.nn.Linear(8, 1).to(torch.bfloat16)
    model = torch.nn.ModuleList([first, second, last]).to(device)
    groups = [{"params": [first.weight, second.weight], "weight_decay": 0.01},
              {"params": [first.bias, second.bias], "weight_decay": 0.0},
              {"params": list(last.parameters()), "weight_decay": 0.0}]
    x, y = torch.randn(64, 16, device=device), torch.randn(64, 1, device=device)

    def loss_fn():
        h = torch.tanh(second(torch.tanh(first(x))))
        return torch.nn.functional.mse_loss(last(h.to(torch.bfloat16)).float(), y)
    return model, groups, loss_fn


def backward(opt: FusedSaLSa, loss_fn, set_to_none: bool = False) -> torch.Tensor:
    """Zero the gradients in place (their storage, and so the Triton tables, stay) and backward."""
    opt.zero_grad(set_to_none=set_to_none)
    loss = loss_fn()
    loss.backward()
    return loss.detach()


def measure(backend: str, restore: str, trials: Sequence[int] = (1, 3), device="cpu") -> Dict[str, dict]:
    """Counts of a plain step, search steps with each number of trials, and an interrupted search."""
    model, groups, loss_fn = demo_model(device)
    opt = FusedSaLSa(groups, backend=backend, restore=restore, init_step_size=1e-3)
    n_buckets = len(groups)
    # Warm-up: one search step and one plain step build every cache (tables, saved copies).
    opt.step(ScriptedLosses(0.0, 1), loss=backward(opt, loss_fn))
    results: Dict[str, dict] = {}

    def plain():
        loss = backward(opt, loss_fn)
        C.make_next_step_plain(opt)
        counts = count_step(opt, lambda: opt.step(ScriptedLosses(0.0, 1), loss=loss))
        assert opt.search_state.steps_since_search == 1, "expected a plain step"
        return counts

    plain()
    results["plain step"] = plain().as_dict()

    def search(n, raise_at=None):
        loss = backward(opt, loss_fn)
        state = opt.search_state
        state.steps_since_search = 10 ** 6  # the next step searches
        opt._commit(state)
        closure = ScriptedLosses(float(loss), n, raise_at)

        def run():
            try:
                opt.step(closure, loss=loss)
            except KeyboardInterrupt:
                pass
        counts = count_step(opt, run)
        if raise_at is None:
            assert opt.last_search_trials == n, (opt.last_search_trials, n)
        return counts

    for n in trials:
        results[f"search step, {n} trial{'s' if n > 1 else ''}"] = search(n).as_dict()
    results["search step interrupted at trial 2"] = search(3, raise_at=2).as_dict()
    for record in results.values():
        record["buckets"] = n_buckets
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Passes, launches and host reads per FusedSaLSa step")
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--out-dir", type=C.output_dir, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_write:
        C.results_readable(parser, (args.out_dir or C.RESULTS_DIR) / "step_counts.json")
    rows, table, everything = [], [], {}
    for backend in ("triton", "torch"):
        for restore in ("copy", "inplace"):
            try:
                results = measure(backend, restore, device=args.device)
            except RuntimeError as error:  # e.g. triton unavailable
                print(f"{backend}/{restore}: not measured ({error})")
                continue
            everything[f"{backend}/{restore}"] = results
            for case, record in results.items():
                passes = ", ".join(f"{k} {v}" for k, v in sorted(record["passes"].items()))
                table.append([backend, restore, case, record["buckets"], passes,
                              record["total_launches"] if backend == "triton" else "-", record["host_reads"],
                              record["table_builds"] if backend == "triton" else "-"])
                rows.append(C.Row(kernel=case, provider=f"{backend}/{restore}", size="demo model",
                                  extra=record))
    markdown = ("# Passes, kernel launches and host reads per step\n\n"
                "Demo model with 3 buckets (fp32 weights with decay, fp32 biases, a bf16 layer). "
                "Scripted trial losses fix the number of trials. Host reads: tensor values read "
                "by `salsa_fused` code (each a device sync on a GPU). The torch reference backend "
                "reads finiteness flags on a plain step (free on the CPU): one per bucket, one per "
                "block of 256K elements of each tensor of 32K elements or more and one per group of "
                "smaller tensors (up to 256K elements a group), and one more per such block or group "
                "of 16-bit weights; the Triton backend guards on the device.\n\n"
                + C.markdown_table(["backend", "restore", "step", "buckets", "passes", "launches",
                                    "host reads", "table builds"], table))
    print(markdown)
    if not args.no_write:
        C.write_results("step_counts", rows, C.environment(args.device), markdown, args.out_dir, everything)
    return everything


if __name__ == "__main__":
    main()
