"""Draw the PNGs from the benchmark JSON files in ``benchmarks/results`` (or ``--dir``).

- ``kernel_bench*.png``: effective bandwidth of each provider by size and dtype, with the
  copy roofline;
- ``train_bench*.png``: step time (ms, rolling mean) and FusedSaLSa's / SaLSa's step size
  over steps, per optimizer;
- ``gpu/<run>/training.png``, for each GPU suite run (``bash benchmarks/gpu_suite.sh --out DIR``;
  the committed ones lie in ``results/gpu/``, or ``--dir`` is such a ``DIR`` itself): the training
  stage's loss, step time and step size per optimizer, from the curves in its ``details.tar.gz``.

Figures from a CPU smoke run carry "not measured: no GPU" in their title. Finding nothing to
draw is an error (exit 1) that names what was looked for.

    python -m benchmarks.plot_results [--dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import List, Optional

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


def _gpu_suite_curves(run_dir: Path) -> dict:
    """``{optimizer: its training_<name>.json}`` from a GPU suite run's ``details.tar.gz``."""
    curves = {}
    with tarfile.open(run_dir / "details.tar.gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.startswith("training_") and name.endswith(".json"):
                data = json.load(archive.extractfile(member))
                curves[data.get("optimizer", name[len("training_"):-len(".json")])] = data
    return curves


def plot_gpu_suite(run_dir: Path) -> Optional[Path]:
    """``run_dir/training.png`` from the training stage's curves; None when the run has none."""
    curves = _gpu_suite_curves(run_dir)
    if not curves:
        return None
    env, smoke = {}, False
    rows_path = run_dir / "rows.jsonl"
    if rows_path.exists():
        for line in rows_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed stage
            env, smoke = row.get("env", env), row.get("smoke", smoke)
            if env:
                break
    title = f"{env.get('device', 'unknown device')}, torch {env.get('torch', '?')}, {env.get('date', '')[:10]}"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, data) in enumerate(sorted(curves.items())):
        for ax, key in zip(axes, ("loss", "step_ms", "step_size")):
            values = [v for v in data.get(key) or [] if v is not None]
            if values:  # one colour per optimizer on every panel (AdamW has no step size)
                window = max(1, len(values) // 30) if key != "step_size" else 1
                ax.plot(range(1, len(values) + 1), _rolling(values, window), label=name, linewidth=1,
                        color=colors[index % len(colors)])
    for ax, label in zip(axes, ("training loss (rolling mean)", "step time, ms (rolling mean)", "step size eta")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"GPU suite, training stage — {title}" + (f" ({C.NOT_MEASURED})" if smoke else ""), fontsize=9)
    fig.tight_layout()
    out = run_dir / "training.png"
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
    suites = sorted({p.parent for pattern in ("details.tar.gz", "gpu/*/details.tar.gz")
                     for p in directory.glob(pattern)})
    written += [out for out in map(plot_gpu_suite, suites) if out is not None]
    for path in written:
        print(f"wrote {path}")
    if not written:
        raise SystemExit(f"plot_results: nothing to draw in {directory}: it has no kernel_bench*.json, no "
                         "train_bench*.json and no GPU suite run with training curves (details.tar.gz, "
                         "itself or in gpu/*/)")
    return written


if __name__ == "__main__":
    main()
