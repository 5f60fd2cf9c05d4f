"""The ahead-of-time kernel audit (benchmarks/kernel_audit.py) passes: no spills, 128-bit
main streams on sm_90a's aligned path, bytes per parameter within SPEC section 2.

The audit compiles for real GPU targets, which the Triton interpreter this test process
may run under (tests/conftest.py) cannot do, so it runs in a subprocess without
TRITON_INTERPRET and hands back its records as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import background

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = {"slope", "plain_step", "first_trial", "retrial", "restore"}
# SPEC section 2, fp32 weights, gradients and state.
FP32_BUDGET = {"plain_step": 28, "first_trial": 32, "retrial": 16}


def _audit(_tmp: Path):
    if not PTXAS.exists():
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return background.run_process([sys.executable, "-m", "benchmarks.kernel_audit", "--json"],
                                  cwd=ROOT, env=env, timeout=1800)


AUDIT = background.job("kernel audit", _audit, seconds_hint=150)


@pytest.fixture(scope="module")
def records():
    if not PTXAS.exists():
        pytest.skip("triton has no bundled ptxas (no NVIDIA backend)")
    result = AUDIT.result()
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def _where(r):
    return f"{r['kernel']} {r['target']} {r['dtype']} {'aligned' if r['aligned'] else 'unaligned'}"


def test_every_launched_kernel_is_audited(records):
    for r in records:
        assert set(r) >= {"kernel", "target", "dtype", "registers", "spill_bytes", "vector_bits",
                          "bytes_per_param"}
    assert {r["kernel"].split("[")[0] for r in records} == KERNELS
    assert {r["target"] for r in records} == {"sm_80", "sm_90a"}
    assert {r["dtype"] for r in records} == {"fp32", "bf16", "fp16"}
    assert {r["aligned"] for r in records} == {True, False}


def test_no_kernel_spills(records):
    spilling = [f"{_where(r)}: {r['spill_bytes']} B" for r in records if r["spill_bytes"] != 0]
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in records)


def test_main_streams_are_128_bit_on_the_aligned_path(records):
    narrow = [f"{_where(r)}: {r['vector_bits']} bits" for r in records
              if r["aligned"] and r["target"] == "sm_90a" and r["vector_bits"] < 128]
    assert not narrow, narrow
    # The 128-bit traffic of the compiled code is exactly the streams of the design.
    mismatched = [f"{_where(r)}: {r['bytes_per_param_ptx']} vs {r['bytes_per_param']}" for r in records
                  if r["aligned"] and r["bytes_per_param_ptx"] != r["bytes_per_param"]]
    assert not mismatched, mismatched


def test_bytes_per_param_within_spec_budget(records):
    over = [f"{_where(r)}: {r['bytes_per_param']} > {FP32_BUDGET[r['kernel'].split('[')[0]]}"
            for r in records if r["dtype"] == "fp32" and r["kernel"].split("[")[0] in FP32_BUDGET
            and r["bytes_per_param"] > FP32_BUDGET[r["kernel"].split("[")[0]]]
    assert not over, over
    plain = [r for r in records if r["kernel"] == "plain_step" and r["dtype"] == "fp32"]
    assert plain and all(r["bytes_per_param"] == 28 for r in plain)


def test_grad_scaler_variants_are_audited(records):
    """Every kernel is compiled as the optimizer launches it under a GradScaler too."""
    scaled = {r["kernel"].split("[")[0] for r in records if "amp" in r["kernel"]}
    assert scaled == KERNELS


def test_machine_code_moves_the_streams_in_128_bit_accesses(records):
    """Read from the SASS (cuobjdump -sass): ptxas kept the PTX's widths and traffic."""
    aligned = [r for r in records if r["aligned"] and r["target"] == "sm_90a"]
    if any(r["sass_vector_bits"] is None for r in aligned):
        pytest.skip("no cuobjdump to read the SASS with")
    narrow = [f"{_where(r)}: {r['sass_vector_bits']} bits" for r in aligned if r["sass_vector_bits"] < 128]
    assert not narrow, narrow
    mismatched = [f"{_where(r)}: {r['bytes_per_param_sass']} vs {r['bytes_per_param']}" for r in aligned
                  if r["bytes_per_param_sass"] != r["bytes_per_param"]]
    assert not mismatched, mismatched


def test_register_counts_are_those_of_the_launched_cubin(records):
    """The log's registers are the ones the cubin Triton built declares (cuobjdump -res-usage),
    with no stack frame: counts from a second ptxas run with other flags once differed on 38
    records and hid an fp16 spill."""
    aligned = [r for r in records if r["aligned"]]
    if any(r["cubin_registers"] is None for r in aligned):
        pytest.skip("no cuobjdump to read the cubin with")
    differing = [f"{_where(r)}: cubin {r['cubin_registers']}, log {r['registers']}" for r in aligned
                 if r["cubin_registers"] != r["registers"]]
    assert not differing, differing
    stacked = [f"{_where(r)}: {r['cubin_stack_bytes']} B" for r in aligned if r["cubin_stack_bytes"]]
    assert not stacked, stacked


def test_16_bit_plain_step_fits_three_blocks_per_sm(records):
    """On sm_90a the register cap lets 3 blocks of 8 warps share an SM, without spills."""
    plain = [r for r in records if r["kernel"].startswith("plain_step") and r["aligned"]
             and r["dtype"] in ("bf16", "fp16") and r["target"] == "sm_90a"]
    assert plain
    assert all(r["blocks_per_sm"] >= 3 and r["spill_bytes"] == 0 for r in plain), [
        (_where(r), r["registers"], r["blocks_per_sm"]) for r in plain]


def test_raw_direction_moves_only_weights_and_gradients(records):
    """Along "raw" no kernel touches m, v: fp32 slope 4 B/param, plain step and retrial 12, first
    trial 16 with a copy (12 in place), restore 8 from the copy (12 in place), in the compiled code."""
    expected = {"slope": 4, "plain_step": 12, "first_trial[copy": 16, "first_trial[inplace": 12,
                "retrial": 12, "restore[copy": 8, "restore[inplace": 12}
    raw = [r for r in records if "raw" in r["kernel"] or r["kernel"].startswith("restore[copy")]
    assert {r["kernel"].split("[")[0] for r in raw} == KERNELS
    for r in raw:
        if r["dtype"] != "fp32":
            continue
        bytes_per_param = next(v for k, v in expected.items() if r["kernel"].startswith(k))
        assert r["bytes_per_param"] == bytes_per_param, _where(r)
        assert "m" not in r["streams_read"] + r["streams_written"], _where(r)
        if r["aligned"]:
            assert r["bytes_per_param_ptx"] == bytes_per_param, _where(r)


def test_written_results_append_each_run(tmp_path):
    """kernel_audit.json keeps every run with its commit, versions and date (a file from before
    runs were appended is kept as the first run); kernel_audit.md lists them all."""
    (tmp_path / "kernel_audit.json").write_text(json.dumps([{"kernel": "old", "registers": 9}]))
    code = ("import sys; from pathlib import Path; from benchmarks import kernel_audit as K; "
            "records = [{'kernel': 'plain_step[momentum]', 'target': 'sm_90a', 'dtype': 'fp32', 'aligned': True, "
            "'registers': 40, 'blocks_per_sm': 6, 'spill_bytes': 0, 'vector_bits': 128, "
            "'sass_vector_bits': None, 'bytes_per_param': 28, 'bytes_per_param_ptx': 28}]; "
            "[K.write(records, [], Path(sys.argv[1])) for _ in range(2)]")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = background.run_process([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "kernel_audit.json").read_text())["runs"]
    assert [len(run["records"]) for run in runs] == [1, 1, 1] and runs[0]["records"][0]["kernel"] == "old"
    for run in runs[1:]:
        assert run["environment"]["git_commit"] and run["environment"]["date"] and run["environment"]["triton"]
    markdown = (tmp_path / "kernel_audit.md").read_text()
    assert "plain_step[momentum]" in markdown and markdown.count(runs[2]["environment"]["date"]) >= 2
