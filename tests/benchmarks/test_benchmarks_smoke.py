"""The long GPU suite end to end without a GPU: ``bash benchmarks/long_suite.sh --smoke`` on the CPU.

Every stage (counts, memory, kernel-level and training-level benchmarks, plots) runs at
tiny sizes and writes its JSON/markdown/PNG; GPU figures are marked as not measured.
"""

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks import _common as C
from tests import background

ROOT = Path(__file__).resolve().parents[2]


def _long_suite(tmp: Path):
    out = tmp / "long_suite_smoke"
    done = background.run_process(["bash", str(ROOT / "benchmarks" / "long_suite.sh"), "--smoke", "--quality",
                                   "--out-dir", str(out)], cwd=ROOT, timeout=600,
                                  env={**os.environ, "PYTHON": sys.executable})
    return done, out


LONG_SUITE = background.job("long suite smoke", _long_suite, seconds_hint=43)


@pytest.fixture(scope="module")
def smoke_dir():
    done, out = LONG_SUITE.result()
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _load(path: Path) -> dict:
    data = C.latest_run(path)
    env = data["environment"]
    for key in ("device", "torch", "triton", "cuda", "date", "command"):
        assert env[key], key
    for row in data["rows"]:
        for key in ("kernel", "provider", "size", "p20_ms", "p50_ms", "p80_ms", "device", "torch", "date",
                    "command"):
            assert key in row, key
    return data


def test_quality_stage_runs_the_shipped_preset_against_adamw(smoke_dir):
    tables = json.loads((smoke_dir / "quality" / "summary.json").read_text(encoding="utf-8"))
    assert {"salsa_recommended", "salsa_author", "salsa_faithful", "adamw_1e-3", "adamw_3e-3"} <= set(tables["gpt"])


def test_every_stage_writes_results(smoke_dir):
    names = {p.name for p in smoke_dir.iterdir()}
    for stem in ("step_counts", "memory_float32_tiny_smoke", "kernel_bench_cpu_smoke", "train_bench_cpu_smoke"):
        assert f"{stem}.json" in names and f"{stem}.md" in names, (stem, names)
    for png in ("kernel_bench_cpu_smoke.png", "train_bench_cpu_smoke.png"):
        assert (smoke_dir / png).stat().st_size > 10_000
    assert "kernel_bench.json" not in names and "train_bench.json" not in names  # GPU-only names
    assert "memory_float32.json" not in names  # the published full-size file


def test_gpu_figures_are_marked_not_measured(smoke_dir):
    for stem in ("kernel_bench_cpu_smoke", "train_bench_cpu_smoke"):
        data = _load(smoke_dir / f"{stem}.json")
        assert data["summary"]["gpu_measured"] is False
        assert C.NOT_MEASURED in (smoke_dir / f"{stem}.md").read_text(encoding="utf-8")


def test_kernel_bench_rows(smoke_dir):
    data = _load(smoke_dir / "kernel_bench_cpu_smoke.json")
    providers = {(r["dtype"], r["provider"]) for r in data["rows"]}
    for dtype in ("fp32", "bf16"):
        for name in ("adamw_foreach", "salsa_plain", "salsa_reduction", "salsa_pass_a", "salsa_pass_b", "copy"):
            assert (dtype, name) in providers, (dtype, name)
    gpt2 = [r for r in data["rows"] if r["size"].startswith("gpt2-small") and r["provider"] == "salsa_plain"]
    assert gpt2 and all("148 tensors" in r["size"] for r in gpt2)
    fp32_plain = next(r for r in data["rows"] if r["provider"] == "salsa_plain" and r["dtype"] == "fp32")
    assert fp32_plain["extra"]["bytes_moved"] == 28 * fp32_plain["numel"]  # SPEC section 2's budget


def test_train_bench_counts_match_the_published_salsa(smoke_dir):
    """Same model, batches and defaults: FusedSaLSa takes the published package's decisions."""
    data = _load(smoke_dir / "train_bench_cpu_smoke.json")
    stats = {r["provider"]: r["extra"] for r in data["rows"]}
    assert set(stats) == {"adamw_fused", "salsa_published", "fused_salsa_copy", "fused_salsa_inplace",
                          "fused_salsa_recommended"}
    assert stats["adamw_fused"]["forwards_per_step"] == 1.0
    published = stats["salsa_published"]
    for name in ("fused_salsa_copy", "fused_salsa_inplace"):
        assert stats[name]["forwards_per_step"] == published["forwards_per_step"] > 1.0
        assert stats[name]["backtracks"] == published["backtracks"]
        assert stats[name]["searches"] == 4  # the first 9 steps always search
    # the preset searches only in its warm-up (20% of the 4 smoke steps: step 1), then plain steps
    assert stats["fused_salsa_recommended"]["searches"] == 1
    assert stats["fused_salsa_recommended"]["forwards_per_step"] == (4 + stats["fused_salsa_recommended"]["backtracks"]
                                                                     + 1) / 4
    series = data["summary"]["series"]
    assert series["fused_salsa_copy"]["step_size"] == pytest.approx(series["salsa_published"]["step_size"],
                                                                    rel=1e-4)


def test_counts_and_memory_results(smoke_dir):
    counts = _load(smoke_dir / "step_counts.json")["summary"]
    assert counts["triton/copy"]["plain step"]["total_launches"] == 3
    assert counts["triton/copy"]["plain step"]["host_reads"] == 0
    memory = _load(smoke_dir / "memory_float32_tiny_smoke.json")["summary"]
    assert memory["targets_met"] and all(memory["targets_met"].values())


def test_pytest_benchmark_form_times_every_provider(smoke_dir):
    """benchmarks/test_kernel_speed.py (pytest-benchmark) ran in the smoke and timed every
    provider for both dtypes, each record carrying the bytes it must move."""
    data = json.loads((smoke_dir / "kernel_speed.json").read_text(encoding="utf-8"))
    records = {(b["params"]["provider"], b["params"]["dtype_name"]): b for b in data["benchmarks"]}
    for dtype in ("fp32", "bf16"):
        for provider in ("salsa_plain", "salsa_reduction", "salsa_pass_a", "salsa_pass_b", "copy",
                         "adamw_foreach"):
            record = records[(provider, dtype)]
            assert record["stats"]["mean"] > 0
            assert record["extra_info"]["bytes_moved"] > 0
