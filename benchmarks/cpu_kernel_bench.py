"""The C++ CPU kernels (backend "cpp") against fused and foreach AdamW, pass by pass.

On GPT-2 small's 148 tensor shapes with every leading dimension scaled by ``--scale 0.125``
(15.6M parameters, the list issue 18 and benchmarks/cpu_fallback.py use), fp32 and bf16 weights (fp32 moments), 1 and 2 intra-op threads. Providers,
each on its own weights and state (gradients shared), timed interleaved round by round:

- ``adamw_fused``: ``torch.optim.AdamW(fused=True).step``; ``adamw_foreach``: ``foreach=True``;
- ``cpp_plain``: the backend's ``plain_step`` (28 B/param in fp32, like AdamW);
- ``torch_plain``: the torch reference backend's ``plain_step``, for scale;
- ``cpp_pass_a``: ``first_trial`` with the saved copy (32 B/param: target <= 1.25x fused);
- ``cpp_pass_b``: ``retrial`` from the saved copy (16 B/param: target <= 0.7x fused);
- ``cpp_slope``: the q reduction (8 B/param along the gradient);
- ``cpp_restore_inplace``: ``restore`` without a saved copy (16 B/param along the gradient: w, g, v; w);
- ``cpp_plain_raw``, ``cpp_pass_a_raw``, ``cpp_slope_raw``: the same passes along direction
  ``"raw"`` (d = g, no moments: 12, 16 and 4 B/param).

With ``--device cuda`` (a GPU and the CUDA kernels built) the same providers run on the GPU,
plus ``triton_plain``, into ``results/cuda_kernel_bench``. Ratios are of medians to
``adamw_fused`` measured in the same rounds. Every run is
appended to ``results/cpu_kernel_bench.json`` (commit, versions, device, date, load
average); ``results/cpu_kernel_bench.md`` shows the latest run and one line per earlier run.

    python -m benchmarks.cpu_kernel_bench [--scale 0.125] [--repeats 15] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks import _common as C
from salsa_fused.backends import cpp_backend, torch_backend
from salsa_fused.backends.base import GRADIENT, RAW, Bucket, Hyper, Move, PassArgs

TARGETS = {"cpp_plain": 1.2, "cpp_pass_a": 1.25, "cpp_pass_b": 0.7}
DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes the kernels and fused AdamW take
BASELINE = "adamw_fused"


def _bucket(shapes, dtype: torch.dtype, grads: List[torch.Tensor], device: str) -> Bucket:
    params = [p.detach() for p in C.make_params(shapes, dtype, device, grads=grads)]
    exp_avg = [(g.float() * 0.1) for g in grads]
    exp_avg_sq = [(g.float() * g.float() * 1e-3 + 1e-12) for g in grads]
    saved = [torch.empty_like(p) for p in params]
    return Bucket(params, list(grads), exp_avg, exp_avg_sq, saved, torch.device(device), dtype, group_index=0)


def build(shapes, dtype: torch.dtype, device: str = "cpu") -> Dict[str, object]:
    grads = [p.grad for p in C.make_params(shapes, dtype, device, seed=1)]
    hyper = Hyper(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=1 - 0.9 ** 11,
                  bias_correction2=1 - 0.999 ** 11, lr=1.0)
    loss = torch.tensor(2.0, device=device)
    fns = {}
    for name, kwargs in (("adamw_fused", {"fused": True}), ("adamw_foreach", {"foreach": True})):
        adamw = torch.optim.AdamW(C.make_params(shapes, dtype, device, grads=grads), lr=1e-4, **kwargs)
        fns[name] = adamw.step
    plain, reference, search, trial, slope, raw, in_place = (_bucket(shapes, dtype, grads, device) for _ in range(7))
    in_place.saved = None
    plain_args = PassArgs(hyper, Move(1e-4, decay=1e-4))
    fns["cpp_plain"] = lambda: cpp_backend.plain_step(plain, plain_args, loss)
    fns["torch_plain"] = lambda: torch_backend.plain_step(reference, plain_args, loss)
    if device == "cuda":  # the Triton kernels beside the CUDA ones
        from salsa_fused.backends import triton_backend
        triton_bucket = _bucket(shapes, dtype, grads, device)
        fns["triton_plain"] = lambda: triton_backend.plain_step(triton_bucket, plain_args, loss)
    trial_args = PassArgs(hyper, Move(1e-4, decay=1e-4), GRADIENT)
    fns["cpp_pass_a"] = lambda: cpp_backend.first_trial(search, trial_args)
    cpp_backend.first_trial(trial, trial_args)
    retrial_args = PassArgs(hyper, Move(0.8e-4, 1e-4, 1e-4), GRADIENT)
    fns["cpp_pass_b"] = lambda: cpp_backend.retrial(trial, retrial_args)
    fns["cpp_slope"] = lambda: cpp_backend.slope(slope, PassArgs(hyper, direction=GRADIENT))
    restore_args = PassArgs(hyper, Move(0.0, 1e-4, 1e-4), GRADIENT)
    fns["cpp_restore_inplace"] = lambda: cpp_backend.restore(in_place, restore_args)
    raw_plain_args, raw_trial_args = PassArgs(hyper, Move(1e-4, decay=1e-4), RAW), PassArgs(hyper, Move(1e-4), RAW)
    fns["cpp_plain_raw"] = lambda: cpp_backend.plain_step(raw, raw_plain_args, loss)
    fns["cpp_pass_a_raw"] = lambda: cpp_backend.first_trial(raw, raw_trial_args)
    fns["cpp_slope_raw"] = lambda: cpp_backend.slope(raw, PassArgs(hyper, direction=RAW))
    return fns


def run(scale: float, repeats: int, threads_list: List[int], dtypes: List[str], warmup: int = 2,
        device: str = "cpu") -> dict:
    shapes = C.gpt2_small_shapes(scale)
    numel = C.numel_of(shapes)
    size = f"gpt2-small x{scale:g} ({len(shapes)} tensors, {numel / 1e6:.1f}M)"
    load_before = os.getloadavg()
    default_threads = torch.get_num_threads()
    results, rows = [], []
    try:
        for dtype in dtypes:
            with torch.no_grad():
                fns = build(shapes, getattr(torch, dtype), device)
                for threads in threads_list if device == "cpu" else [torch.get_num_threads()]:
                    torch.set_num_threads(threads)
                    samples = C.interleaved(fns, device, repeats=repeats, warmup=warmup)
                    medians = {name: statistics.median(s) for name, s in samples.items()}
                    ratios = {name: medians[name] / medians[BASELINE] for name in fns}
                    results.append({"dtype": dtype, "threads": threads,
                                    "median_ms": {k: v * 1e3 for k, v in medians.items()},
                                    "vs_adamw_fused": ratios,
                                    "targets_met": {k: ratios[k] <= t for k, t in TARGETS.items()}})
                    rows += [C.row_from_samples("cpu_pass", name, size, samples[name], numel=numel, dtype=dtype,
                                                extra={"threads": threads, "vs_adamw_fused": ratios[name]})
                             for name in fns]
    finally:
        torch.set_num_threads(default_threads)
    env = C.environment(device)
    env["loadavg_before"] = " ".join(f"{x:.2f}" for x in load_before)
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env["cpu_isa"] = torch.ops.salsa_fused.cpu_isa()
    return {"environment": env, "size": size, "numel": numel, "repeats": repeats, "results": results,
            "rows": [vars(r) for r in rows]}


def write(run_record: dict, out_dir: Path, name: str = "cpu_kernel_bench") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    runs = C.read_runs(json_path) + [run_record]
    json_path.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n", encoding="utf-8")
    render(runs, md_path, name)


def render(runs: list, md_path: Path, name: str = "cpu_kernel_bench") -> None:
    """The table file of ``runs`` (the .json's): every run's ratios in one table, then each run's own
    table, newest first; rebuilt whole from the .json, so no run's figures leave it."""
    history = C.markdown_table(
        ["date", "commit", "size", "repeats", "load avg", "dtype", "threads", "plain", "pass A", "pass B", "slope"],
        [[rec["environment"]["date"], rec["environment"]["git_commit"], rec.get("size", "?"), rec.get("repeats", "?"),
          rec["environment"]["loadavg_before"], r["dtype"], r["threads"]]
         + [r["vs_adamw_fused"][p] for p in ("cpp_plain", "cpp_pass_a", "cpp_pass_b", "cpp_slope")]
         for rec in runs for r in rec["results"]])
    sections = "\n".join(_run_section(rec) for rec in reversed(runs))
    md_path.write_text(
        f"# {name}: C++ kernels vs AdamW, every run\n\n"
        "Ratios to `adamw_fused` measured in the same interleaved rounds; targets: plain <= 1.2x, pass A "
        "<= 1.25x, pass B <= 0.7x. Each run's size and repeats are in its row: a smoke run (a small "
        "`--scale`, few repeats) is not a measurement of the published size.\n\n"
        f"## Every run (ratios to fused AdamW)\n\n{history}\n{sections}", encoding="utf-8")


def _run_section(run_record: dict) -> str:
    """One run's full table (absolute medians and every provider), headed by its environment."""
    env = run_record["environment"]
    providers = list(run_record["results"][0]["median_ms"])
    table = C.markdown_table(
        ["dtype", "threads"] + [f"{p} ms (x fused)" for p in providers],
        [[r["dtype"], r["threads"]] + [f"{r['median_ms'][p]:.1f} ({r['vs_adamw_fused'][p]:.2f}x)" for p in providers]
         for r in run_record["results"]])
    return (f"## {env['date']}, commit {env['git_commit']}: {run_record.get('size', '?')}\n\n"
            f"<!-- generated by {env['command']} -->\n\n"
            f"Device: {env['device']} (kernels: {env.get('cpu_isa', '?')}); torch {env['torch']}; load average "
            f"{env['loadavg_before']} before, {env.get('loadavg_after', '?')} after (a shared machine: other jobs "
            f"ran alongside). Medians of {run_record.get('repeats', '?')} interleaved repeats.\n\n{table}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=C.positive_float, default=0.125,
                        help="fraction of GPT-2 small's leading dims")
    parser.add_argument("--repeats", type=C.positive_int, default=15)
    parser.add_argument("--threads", type=C.positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the CUDA kernels against fused AdamW and Triton (results/cuda_kernel_bench)")
    parser.add_argument("--out-dir", type=C.output_dir, default=C.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device here (torch {torch.__version__}, built for CUDA "
                     f"{torch.version.cuda or 'none'})")
    if not cpp_backend.supports(args.device):
        parser.error(f"--device {args.device}: the C++ extension has no {args.device} kernels here "
                     "(build it: pip install --no-build-isolation -e .)")
    name = "cpu_kernel_bench" if args.device == "cpu" else "cuda_kernel_bench"
    C.results_readable(parser, args.out_dir / f"{name}.json")
    record = run(args.scale, args.repeats, args.threads, args.dtypes, device=args.device)
    write(record, args.out_dir, name)
    for r in record["results"]:
        print(r["dtype"], r["threads"], "threads:",
              "  ".join(f"{k} {v:.1f}ms ({r['vs_adamw_fused'][k]:.2f}x)" for k, v in r["median_ms"].items()))


if __name__ == "__main__":
    main()
