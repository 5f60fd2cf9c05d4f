"""Optimizer state memory: FusedSaLSa (each restore strategy) against AdamW, measured.

*State bytes* are measured, not computed from a formula: every tensor reachable from the
optimizer object (its ``state``, the saved copies of the weights, the backends' cached
tables, counters) is collected, tensors that share storage with a parameter or a gradient
are left out, and the distinct storages' sizes are summed. Targets (issue 7): with
``restore="copy"`` at most AdamW's state plus one copy of the weights; with
``restore="inplace"`` at most AdamW's state plus 2%. Both after a search step (the saved
copies exist from then on) and a plain step.

AdamW keeps its moments in the weights' dtype; FusedSaLSa keeps them in fp32. With fp32
weights the two agree; with bf16 weights FusedSaLSa's moments take twice AdamW's bytes
(the table shows both; the targets are stated for fp32 weights).

On CUDA the peak memory allocated during one step, above what was allocated before it,
is measured too (``torch.cuda.max_memory_allocated``).

    python -m benchmarks.memory [--scale 0.125] [--dtype float32] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import MutableMapping
from typing import Dict, Iterable, List, Optional

from benchmarks import _common as C

C.ensure_triton_interpreter_without_cuda()

import torch  # noqa: E402

from salsa_fused import FusedSaLSa  # noqa: E402
from salsa_fused._rng import RNGSnapshot  # noqa: E402
from salsa_fused.backends import triton_usable  # noqa: E402

INPLACE_OVERHEAD_TARGET = 0.02


def _tensors_in(value, seen_objects: set) -> Iterable[torch.Tensor]:
    """Every tensor reachable through dicts (values), sequences and dataclass-like objects, but for the
    random generators' snapshots a step hands to the next (host memory of a fixed size, 5 KB for the CPU
    generator and a few bytes a CUDA device, whatever the model: not state that scales with it)."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if id(value) in seen_objects or isinstance(value, RNGSnapshot):
        return
    seen_objects.add(id(value))
    if isinstance(value, (dict, MutableMapping)):  # MutableMapping: the optimizer's weak saved copies
        for item in list(value.values()):
            yield from _tensors_in(item, seen_objects)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _tensors_in(item, seen_objects)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors_in(getattr(value, f.name), seen_objects)


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def state_bytes(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> int:
    """Bytes of the distinct tensor storages the optimizer holds, weights and gradients excluded."""
    excluded = {_storage_key(p) for p in params}
    excluded |= {_storage_key(p.grad) for p in params if p.grad is not None}
    seen = {}
    attributes = {k: v for k, v in vars(opt).items() if k not in ("param_groups", "defaults")}
    for t in _tensors_in(attributes, set()):
        key = _storage_key(t)
        if key in excluded or key in seen:
            continue
        seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(scale: float = 0.01, dtype: torch.dtype = torch.float32, device="cpu",
            backends: Optional[List[str]] = None, shapes=None) -> Dict[str, dict]:
    """State bytes of AdamW and FusedSaLSa (per backend and restore strategy), after a search
    step and a plain step, on GPT-2 small's tensor list scaled by ``scale`` (or ``shapes``)."""
    device = torch.device(device)
    shapes = C.gpt2_small_shapes(scale) if shapes is None else shapes
    if backends is None:
        backends = ["torch"] + (["triton"] if triton_usable(device) else [])
    results: Dict[str, dict] = {}
    loss = torch.tensor(1.0, device=device)
    accept = torch.tensor(0.0, device=device)  # f0 - f1 = 1: the first trial passes

    def record(name: str, opt, params, step) -> None:
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            step()
        results[name] = {"state_bytes": state_bytes(opt, params), "step_peak_extra_bytes": peak}

    params = C.make_params(shapes, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    record("AdamW (foreach)", adamw, params, adamw.step)
    del adamw, params
    for backend in backends:
        for restore in ("copy", "inplace"):
            params = C.make_params(shapes, dtype, device)
            opt = FusedSaLSa(params, backend=backend, restore=restore, adaptive_interval=True)
            record(f"FusedSaLSa {backend}/{restore}, search step", opt, params,
                   lambda: opt.step(lambda: accept, loss=loss))
            C.make_next_step_plain(opt)
            record(f"FusedSaLSa {backend}/{restore}, plain step", opt, params,
                   lambda: opt.step(lambda: accept, loss=loss))
            del opt, params
    adamw_bytes = results["AdamW (foreach)"]["state_bytes"]
    for name, record_ in results.items():
        record_["vs_adamw"] = record_["state_bytes"] / adamw_bytes
        record_["extra_over_adamw_in_weights"] = (record_["state_bytes"] - adamw_bytes) / weight_bytes
    results["_meta"] = {"weight_bytes": weight_bytes, "numel": C.numel_of(shapes), "dtype": str(dtype),
                        "n_tensors": len(shapes), "adamw_bytes": adamw_bytes}
    return results


def targets_met(results: Dict[str, dict]) -> Dict[str, bool]:
    """Per FusedSaLSa entry: within the target of its restore strategy."""
    meta = results["_meta"]
    adamw, weights = meta["adamw_bytes"], meta["weight_bytes"]
    met = {}
    for name, r in results.items():
        if not name.startswith("FusedSaLSa"):
            continue
        budget = adamw * (1 + INPLACE_OVERHEAD_TARGET)
        if "/copy" in name:
            budget += weights
        met[name] = r["state_bytes"] <= budget
    return met


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Optimizer state bytes vs AdamW")
    parser.add_argument("--scale", type=C.positive_float, default=0.125)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", type=C.device, default=C.default_device())
    parser.add_argument("--backends", nargs="+", default=None, choices=["torch", "triton"])
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide GPT-2 layout (smoke test; its "
                        "results go to memory_<dtype>_tiny_smoke, not to the published memory_<dtype>)")
    parser.add_argument("--out-dir", type=C.output_dir, default=None)
    args = parser.parse_args(argv)
    results_name = f"memory_{args.dtype}" + ("_tiny_smoke" if args.tiny else "")  # not the published file
    C.results_readable(parser, (args.out_dir or C.RESULTS_DIR) / f"{results_name}.json")
    shapes = C.gpt2_small_shapes(n_layer=1, d_model=32, vocab=100, context=16) if args.tiny else None
    results = measure(args.scale, getattr(torch, args.dtype), args.device, args.backends, shapes)
    met = targets_met(results)
    meta = results["_meta"]
    size = "tiny GPT-2 layout" if args.tiny else f"GPT-2 small x{args.scale:g}"
    rows, table = [], []
    for name, r in results.items():
        if name == "_meta":
            continue
        peak = r["step_peak_extra_bytes"]
        table.append([name, f"{r['state_bytes'] / 2**20:.2f}", f"{r['vs_adamw']:.4f}",
                      f"{r['extra_over_adamw_in_weights']:+.4f}",
                      "-" if peak is None else f"{peak / 2**20:.2f}",
                      {True: "met", False: "MISSED"}.get(met.get(name), "-")])
        rows.append(C.Row(kernel="state_bytes", provider=name, size=size,
                          numel=meta["numel"], dtype=args.dtype, extra=r))
    peak_note = ("" if args.device.type != "cpu" else
                 "Peak memory during a step: not measured on the CPU (the GPU suite measures it).\n\n")
    markdown = (f"# Optimizer state memory, {size} ({meta['n_tensors']} tensors, "
                f"{meta['numel'] / 1e6:.2f}M params), {args.dtype} weights\n\n"
                f"Weights: {meta['weight_bytes'] / 2**20:.2f} MiB. Targets: copy <= AdamW + weights "
                f"(+2% of AdamW), inplace <= AdamW + 2%.\n\n{peak_note}"
                + C.markdown_table(["optimizer", "state MiB", "x AdamW", "extra (in weights)",
                                    "step peak extra MiB", "target"], table))
    print(markdown)
    C.write_results(results_name, rows, C.environment(args.device), markdown, args.out_dir,
                    {"results": results, "targets_met": met})
    return results


if __name__ == "__main__":
    main()
