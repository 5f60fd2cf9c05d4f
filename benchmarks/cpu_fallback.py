"""Cost of the torch backend (the CPU fallback) against AdamW on the same tensors.

Providers, each a whole ``optimizer.step`` on its own copy of one tensor list (GPT-2
small's 148 shapes, every leading dimension times ``--scale``; gradients shared):

- ``adamw_foreach``: ``torch.optim.AdamW(foreach=True)``; ``adamw_fused``: ``fused=True``;
- ``salsa_plain``: ``FusedSaLSa(backend="torch")`` on a plain step (no search: moments
  and the Adam update, one finiteness check); ``salsa_plain_pass``: the backend's
  ``plain_step`` alone, without the optimizer's per-step Python work;
- ``salsa_search``: a search step with one trial (reduction pass for ``q``, pass A with the
  saved copy, one forward of a trivial closure, one host read per trial);
- ``salsa_pass_b``: one further trial (pass B, ``retrial``) on its own.

Timings are interleaved round by round; ratios are of medians. Usage::

    python -m benchmarks.cpu_fallback [--scale 0.125] [--repeats 15] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List

import torch

from benchmarks import _common as C
from salsa_fused import FusedSaLSa
from salsa_fused.backends import torch_backend
from salsa_fused.backends.base import GRADIENT, Hyper, Move, PassArgs

PROVIDERS = ("adamw_foreach", "adamw_fused", "salsa_plain", "salsa_plain_pass", "salsa_search", "salsa_pass_b")


def plain_step_optimizer(params, **kwargs) -> FusedSaLSa:
    """A FusedSaLSa that only takes plain steps: no always-search steps, and an interval that
    never comes due (the step-size averages start equal, so ``L = max_search_interval``)."""
    return FusedSaLSa(params, always_search_steps=0, max_search_interval=10 ** 9,
                      init_step_size=1e-4, **kwargs)


def search_step_optimizer(params, **kwargs) -> FusedSaLSa:
    """A FusedSaLSa that searches on every step. Its closure here is a constant below ``loss=`` (one trial
    passes), not the loss at the current weights, so the optimizer's one-time check of ``loss=`` against the
    closure at the same weights (which refused it at the second search) is marked done."""
    optimizer = FusedSaLSa(params, adaptive_interval=False, init_step_size=1e-4, **kwargs)
    optimizer._loss_check_passed()
    return optimizer


def build(shapes, dtype: torch.dtype, device: str = "cpu") -> Dict[str, object]:
    """One step function per provider, each on its own weights and state (gradients shared)."""
    grads = [p.grad for p in C.make_params(shapes, dtype, device, seed=1)]
    fns = {}
    loss = torch.tensor(2.0, device=device)
    accepted = torch.tensor(1.0, device=device)  # f0 - f1 = 1 passes the Armijo test: one trial

    for name, kwargs in (("adamw_foreach", {"foreach": True}), ("adamw_fused", {"fused": True})):
        adamw = torch.optim.AdamW(C.make_params(shapes, dtype, device, grads=grads), lr=1e-4, **kwargs)
        fns[name] = adamw.step

    plain = plain_step_optimizer(C.make_params(shapes, dtype, device, grads=grads), backend="torch")
    fns["salsa_plain"] = lambda: plain.step(lambda: loss, loss=loss)
    plain_pass = plain_step_optimizer(C.make_params(shapes, dtype, device, grads=grads), backend="torch")
    plain_pass.step(lambda: loss, loss=loss)
    (plain_bucket,) = plain_pass._collect_buckets()
    plain_hyper = Hyper.for_step(plain_pass.param_groups[0], plain_pass.search_state.step)

    @torch.no_grad()
    def plain_pass_only():
        torch_backend.plain_step(plain_bucket, PassArgs(plain_hyper, Move(1e-4, decay=1e-4)), loss)

    fns["salsa_plain_pass"] = plain_pass_only

    search = search_step_optimizer(C.make_params(shapes, dtype, device, grads=grads), backend="torch")
    fns["salsa_search"] = lambda: search.step(lambda: accepted, loss=loss)

    retrial_opt = search_step_optimizer(C.make_params(shapes, dtype, device, grads=grads), backend="torch")
    retrial_opt.step(lambda: accepted, loss=loss)  # moments and the saved copy exist
    (bucket,) = retrial_opt._collect_buckets()
    hyper = Hyper.for_step(retrial_opt.param_groups[0], retrial_opt.search_state.step)

    @torch.no_grad()
    def pass_b():
        torch_backend.retrial(bucket, PassArgs(hyper, Move(1e-4, 1.25e-4, 1e-4), GRADIENT))

    fns["salsa_pass_b"] = pass_b
    return fns


def run(scale: float = 0.125, repeats: int = 15, dtype: str = "float32", warmup: int = 2,
        out_dir=None, write: bool = True) -> dict:
    torch_dtype = getattr(torch, dtype)
    shapes = C.gpt2_small_shapes(scale)
    numel = C.numel_of(shapes)
    size = f"gpt2-small x{scale:g} ({len(shapes)} tensors, {numel / 1e6:.1f}M)"
    with torch.no_grad():
        fns = build(shapes, torch_dtype)
    samples = C.interleaved(fns, "cpu", repeats=repeats, warmup=warmup)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    ratios = {name: {"vs_adamw_foreach": medians[name] / medians["adamw_foreach"],
                     "vs_adamw_fused": medians[name] / medians["adamw_fused"]} for name in fns}
    rows: List[C.Row] = [C.row_from_samples("optimizer_step", name, size, samples[name], numel=numel,
                                            dtype=dtype, extra=ratios[name]) for name in fns]
    summary = {"scale": scale, "numel": numel, "n_tensors": len(shapes), "repeats": repeats,
               "median_ms": {k: v * 1e3 for k, v in medians.items()}, "ratios": ratios,
               "target_plain_vs_foreach": 1.2,
               "plain_meets_target": ratios["salsa_plain"]["vs_adamw_foreach"] <= 1.2}
    table = C.markdown_table(
        ["provider", "p20 ms", "p50 ms", "p80 ms", "x AdamW foreach", "x AdamW fused"],
        [[r.provider, r.p20_ms, r.p50_ms, r.p80_ms, r.extra["vs_adamw_foreach"], r.extra["vs_adamw_fused"]]
         for r in rows])
    markdown = (f"# CPU fallback: torch backend vs AdamW, {size}, {dtype}\n\n"
                f"Medians of {repeats} interleaved repeats. Target: plain step <= 1.2x AdamW foreach "
                f"({'met' if summary['plain_meets_target'] else 'missed'}).\n\n{table}")
    if write:
        C.write_results(f"cpu_fallback_{dtype}", rows, C.environment("cpu"), markdown, out_dir, summary)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=C.positive_float, default=0.125, help="fraction of GPT-2 small's size")
    parser.add_argument("--repeats", type=C.positive_int, default=15)
    parser.add_argument("--warmup", type=C.int_at_least(0), default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out-dir", type=C.output_dir, default=None)
    args = parser.parse_args(argv)
    C.results_readable(parser, (args.out_dir or C.RESULTS_DIR) / f"cpu_fallback_{args.dtype}.json")
    summary = run(args.scale, args.repeats, args.dtype, args.warmup, args.out_dir)
    for name, ms in summary["median_ms"].items():
        r = summary["ratios"][name]
        print(f"{name:15s} {ms:9.2f} ms  {r['vs_adamw_foreach']:6.2f}x foreach  {r['vs_adamw_fused']:6.2f}x fused")


if __name__ == "__main__":
    main()
