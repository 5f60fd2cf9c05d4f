"""Buckets per step when parameters sit out steps (an MoE's experts), with counts merged and kept apart.

A parameter whose ``.grad`` is ``None`` at a step sits it out, and its bias corrections count only the
steps it took part in (docs/api.md). Tensors whose counts differ then need their own launch of each
pass, except where both corrections are exactly 1 in the arithmetic of the bucket's dtype: there the
counts share one bucket (:func:`salsa_fused.buckets.merged_counts`). Here ``--experts`` experts
(``--width`` x ``--width`` linear layers with biases, averaged, then a tanh and a linear head) are each
used on a random ``--use`` fraction of ``--steps`` closure steps. Two models with the same weights and
batches step in turn: one as the package builds its buckets (counts merged), one with every count in a
bucket of its own (as before the merge). Reported: the buckets per step (median over each half of the
run), the rebuilds, whether the two ends are bitwise the same weights and moments, and the host time
of ``step()`` (median over the second half; the two alternate step by step, so the ratio is side by
side).

    python -m benchmarks.sat_out_buckets [--backend torch] [--betas 0.9 0.95] [--steps 600]

A row goes to ``benchmarks/results/sat_out_buckets.jsonl`` with the commit, versions, device and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional
from unittest import mock

from benchmarks import _common as C

import torch  # noqa: E402

from salsa_fused import FusedSaLSa, buckets  # noqa: E402

DEFAULT_OUT = C.RESULTS_DIR / "sat_out_buckets.jsonl"


class _Experts(torch.nn.Module):
    def __init__(self, experts: int, width: int) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(experts))
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, used: List[int]) -> torch.Tensor:
        return self.head(torch.tanh(sum(self.experts[e](x) for e in used) / len(used)))


def _counting(opt: FusedSaLSa, counts: List[int]) -> None:
    collect = opt._collect_buckets

    def counted(*args, **kwargs):
        found = collect(*args, **kwargs)
        counts.append(len(found))
        return found

    opt._collect_buckets = counted


def measure(backend: str = "torch", betas=(0.9, 0.95), steps: int = 600, experts: int = 8, use: float = 0.9,
            width: int = 16, batch: int = 32, seed: int = 0) -> Dict[str, object]:
    """The two runs side by side (module docstring); a dict of what they measured."""
    torch.manual_seed(seed)
    merged = _Experts(experts, width)
    apart = _Experts(experts, width)
    apart.load_state_dict(merged.state_dict())
    models = {"merged": merged, "apart": apart}
    opts = {name: FusedSaLSa(model.parameters(), backend=backend, betas=tuple(betas)) for name, model in models.items()}
    counts: Dict[str, List[int]] = {name: [] for name in models}
    seconds: Dict[str, List[float]] = {name: [] for name in models}
    for name, opt in opts.items():
        _counting(opt, counts[name])
    data = torch.Generator().manual_seed(seed + 1)
    merged_rule = buckets.first_step_corrected_to_one
    for _ in range(steps):
        x = torch.randn(batch, width, generator=data)
        y = x.sum(1, keepdim=True).sin()
        used = [e for e in range(experts) if torch.rand((), generator=data) < use] or [0]
        for name, opt in opts.items():
            model = models[name]
            opt.zero_grad(set_to_none=True)
            rule = merged_rule if name == "merged" else (lambda *args: sys.maxsize)
            with mock.patch.object(buckets, "first_step_corrected_to_one", rule):
                start = time.perf_counter()
                opt.step(lambda: torch.nn.functional.mse_loss(model(x, used), y))
                seconds[name].append(time.perf_counter() - start)
    half = steps // 2
    ends = {name: [p.detach() for p in models[name].parameters()]
            + [opts[name].state[p][key] for p in models[name].parameters() for key in ("exp_avg", "exp_avg_sq")]
            for name in models}
    values: Dict[str, object] = {
        "backend": backend, "betas": list(betas), "steps": steps, "experts": experts, "use": use, "width": width,
        "bitwise_same": all(torch.equal(a, b) for a, b in zip(ends["merged"], ends["apart"])),
        "searches": opts["merged"]._search.num_searches,
    }
    for name in models:
        values[f"{name}_buckets_median_first_half"] = statistics.median(counts[name][:half])
        values[f"{name}_buckets_median_second_half"] = statistics.median(counts[name][half:])
        values[f"{name}_buckets_mean_second_half"] = statistics.fmean(counts[name][half:])
        values[f"{name}_rebuilds"] = opts[name]._buckets.rebuilds
        values[f"{name}_step_ms_median_second_half"] = 1e3 * statistics.median(seconds[name][half:])
    values["step_time_merged_over_apart"] = (values["merged_step_ms_median_second_half"]
                                             / values["apart_step_ms_median_second_half"])
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "cpp", "triton"])
    parser.add_argument("--betas", type=C.positive_float, nargs=2, default=[0.9, 0.95])
    parser.add_argument("--steps", type=C.int_at_least(2), default=600)
    parser.add_argument("--experts", type=C.int_at_least(1), default=8)
    parser.add_argument("--use", type=C.positive_float, default=0.9, help="the fraction of steps an expert is used on")
    parser.add_argument("--out", type=C.output_file, default=DEFAULT_OUT, help="JSONL file the row is appended to")
    args = parser.parse_args(argv)
    if not all(beta < 1 for beta in args.betas):
        parser.error(f"argument --betas: each must be below 1, got {args.betas}")
    if args.use > 1:
        parser.error(f"argument --use: must be at most 1, got {args.use}")
    if args.backend == "triton":
        C.ensure_triton_interpreter_without_cuda()
    values = measure(args.backend, args.betas, args.steps, args.experts, args.use)
    C.append_jsonl(args.out, {"stage": "sat_out_buckets", "values": values, "env": C.environment("cpu")})
    for key, value in values.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
