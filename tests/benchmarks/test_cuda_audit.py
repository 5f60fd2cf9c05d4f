"""The CUDA kernels (csrc/cuda/) compile with nvcc for sm_80 and sm_90a without torch, with no
spills, registers that leave room for two 256-thread blocks per SM, and a vectorized path
whose 128-bit accesses move exactly the design's bytes per parameter (SPEC section 2).

Runs benchmarks/cuda_audit.py (about a minute of nvcc per architecture); skipped only where
nvcc is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cuda_audit
from tests import background

ARCHS = ["sm_80", "sm_90a"]
KERNELS = {"slope_kernel", "slope_finish_kernel", "first_trial_kernel", "retrial_kernel", "restore_kernel",
           "plain_step_kernel"}
# SPEC section 2, fp32 weights, gradients and state (restore: copy path 8 + in-place path 16);
# along the raw gradient no kernel moves m or v (restore: 8 + 12).
FP32_BYTES = {("plain_step_kernel", "momentum"): 28, ("plain_step_kernel", "raw"): 12,
              ("first_trial_kernel", "gradient"): 32, ("first_trial_kernel", "momentum"): 32,
              ("first_trial_kernel", "raw"): 16,
              ("retrial_kernel", "gradient"): 16, ("retrial_kernel", "momentum"): 16, ("retrial_kernel", "raw"): 12,
              ("restore_kernel", "gradient"): 24, ("restore_kernel", "momentum"): 24, ("restore_kernel", "raw"): 20,
              ("slope_kernel", "gradient"): 8, ("slope_kernel", "momentum"): 12, ("slope_kernel", "raw"): 4}
# Weight-sized accesses per element (weight reads and writes, the saved copy's): 16-bit weights with
# fp32 gradients move 2 bytes less for each (restore: its copy path 2, its in-place path 2).
WEIGHT_ACCESSES = {"first_trial_kernel": 3, "retrial_kernel": 2, "restore_kernel": 4, "plain_step_kernel": 2,
                   "slope_kernel": 0}


def _audit(_tmp):
    if cuda_audit.find_tool("nvcc") is None:
        return None
    record = cuda_audit.run(ARCHS)
    return {"nvcc": record["nvcc"], **{arch["arch"]: arch for arch in record["archs"]}}


AUDIT = background.job("nvcc audit", _audit, seconds_hint=44)


@pytest.fixture(scope="module")
def audit():
    if cuda_audit.find_tool("nvcc") is None:
        pytest.skip("nvcc is not installed")
    return AUDIT.result()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_without_spills(audit, arch):
    kernels = audit[arch]["kernels"]
    assert {k["kernel"] for k in kernels} == KERNELS
    # slope_finish + for each of fp32, bf16, fp16: 4 passes x 3 directions + the plain step x 2, and for
    # bf16 and fp16 weights with fp32 gradients the 3 weight-writing passes x 3 directions + the plain step x 2
    assert len(kernels) == 1 + 3 * 14 + 2 * 11
    for k in kernels:
        where = f"{arch} {k['kernel']} {k['weight']} {k['grad']} direction={k['direction']}"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, where
        assert k["stack"] == 0, where
        assert 0 < k["registers"] <= 128, where


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_path_moves_the_design_bytes(audit, arch):
    if cuda_audit.find_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump to read the SASS")
    for k in audit[arch]["kernels"]:
        if k["grad"] is None:
            continue
        where = f"{arch} {k['kernel']} {k['weight']} {k['grad']} direction={k['direction']}"
        assert (k["vector_loads"], k["vector_stores"]) == (k["expected_vector_loads"],
                                                            k["expected_vector_stores"]), where
        if k["grad"] == "float":
            fp32 = FP32_BYTES[(k["kernel"], k["direction"])]
            narrower = 0 if k["weight"] in (None, "float") else 2 * WEIGHT_ACCESSES[k["kernel"]]
            assert k["vector_bytes_per_param"] == fp32 - narrower, where
        # The vectorized path of a 16-bit stream is one 128-bit access per 8 elements: no 64-bit
        # global data accesses (those are the tables' pointers, LDG.64, never LD.64/ST.64).
        assert "LD.64" not in k["sass"] and "ST.64" not in k["sass"] and "STG.64" not in k["sass"], where


def test_the_committed_audit_is_what_this_commit_compiles(audit):
    """benchmarks/results/cuda_audit.{json,md}, which docs/performance.md cites, describe the kernels
    as they are: every kernel's registers, spills and stack equal this build's with the same nvcc (a
    change of flags without a new audit left a register count stale)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cuda_audit.json"
    committed = json.loads(path.read_text())["runs"][-1]
    assert committed["nvcc"] == audit["nvcc"], (
        f"the committed audit ran {committed['nvcc']}, this one {audit['nvcc']}: run python -m "
        "benchmarks.cuda_audit and commit its results")

    def figures(arch):
        return {(k["kernel"], k["weight"], k["grad"], k["direction"]):
                (k["registers"], k["spill_stores"], k["spill_loads"], k["stack"]) for k in arch["kernels"]}

    for arch in committed["archs"]:
        now, then = figures(audit[arch["arch"]]), figures(arch)
        stale = sorted(f"{k}: committed {then.get(k)}, now {v}" for k, v in now.items() if then.get(k) != v)
        assert not stale and now.keys() == then.keys(), (
            f"{arch['arch']}: run python -m benchmarks.cuda_audit and commit its results; stale: " + "; ".join(stale[:10]))


def test_the_record_names_a_modified_tree_dirty(monkeypatch, tmp_path):
    """The commit recorded is _common.git_commit's: a tree with uncommitted code reads ``+dirty``."""
    from benchmarks import _common as C

    monkeypatch.setattr(C, "git_commit", lambda root=None: "0123456789ab+dirty")
    monkeypatch.setattr(cuda_audit, "find_tool", lambda name: "echo" if name == "nvcc" else None)
    monkeypatch.setattr(cuda_audit, "audit_arch", lambda arch, nvcc, cuobjdump, tmp: {"arch": arch, "kernels": []})
    record = cuda_audit.run(["sm_80"])
    assert record["git_commit"] == "0123456789ab+dirty"
    (tmp_path / "cuda_audit.json").write_text('{"runs": [')
    with pytest.raises(ValueError, match="cuda_audit.json is not a results file"):
        cuda_audit.write(record, tmp_path)
