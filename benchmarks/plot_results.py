"""Draw the PNGs from the benchmark JSON files in ``benchmarks/results`` (or ``--dir``).

- ``kernel_bench*.png``: effective bandwidth of each provider by size and dtype, with the
  copy roofline;
- ``train_bench*.png``: step time (ms, rolling mean) and FusedSaLSa's / SaLSa's step size
  over steps, per optimizer.

Figures from a CPU smoke run carry "not measured: no GPU" in their title.

    python -m benchmarks.plot_results [--dir benchmarks/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import matplotlib

from benchmarks import _common as C

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _title_suffix(data: dict) -> str:
    env = data["environment"]
    measured = data.get("summary", {}).get("gpu_measured", False)
    return f"{env['device']}" + ("" if measured else f" ({C.NOT_MEASURED})")


def plot_kernel(path: Path) -> Path:
    data = C.latest_run(path)
    rows = [r for r in data["rows"] if r.get("extra", {}).get("GBps") is not None]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sizes = list(dict.fromkeys(r["size"] for r in rows if r["dtype"] == dtype))
        providers = list(dict.fromkeys(r["provider"] for r in rows if r["dtype"] == dtype))
        for provider in providers:
            values = [next((r["extra"]["GBps"] for r in rows if r["dtype"] == dtype and r["size"] == s
                            and r["provider"] == provider), float("nan")) for s in sizes]
            style = dict(linestyle="--", color="black") if provider == "copy" else {}
            ax.plot(range(len(sizes)), values, marker="o", label=provider, **style)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("effective bandwidth, GB/s")
        ax.set_title(f"{dtype} weights", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Kernel bandwidth vs copy roofline — {_title_suffix(data)}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rolling(values: List[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_train(path: Path) -> Path:
    data = C.latest_run(path)
    series = data["summary"]["series"]
    fig, (ax_time, ax_eta) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, s in series.items():
        steps = s["step_ms"]
        window = max(1, len(steps) // 100)
        ax_time.plot(range(1, len(steps) + 1), _rolling(steps, window), label=name, linewidth=1)
        if s["step_size"]:
            ax_eta.plot(range(1, len(s["step_size"]) + 1), s["step_size"], label=name, linewidth=1)
    ax_time.set_xlabel("step")
    ax_time.set_ylabel("step time, ms (rolling mean)")
    ax_time.legend(fontsize=7)
    ax_eta.set_xlabel("step")
    ax_eta.set_ylabel("step size eta")
    ax_eta.set_yscale("log")
    ax_eta.legend(fontsize=7)
    fig.suptitle(f"Training step time and step size — {_title_suffix(data)}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> List[Path]:
    parser = argparse.ArgumentParser(description="PNGs from the benchmark results")
    parser.add_argument("--dir", default=str(C.RESULTS_DIR))
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    written = [plot_kernel(p) for p in sorted(directory.glob("kernel_bench*.json"))]
    written += [plot_train(p) for p in sorted(directory.glob("train_bench*.json"))]
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
