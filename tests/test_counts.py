"""Counts per step (issue 7, layer 1): backend passes, Triton launches, host reads; state memory.

Single steps on the CPU (the Triton backend under its interpreter) are instrumented by
``benchmarks/step_counts.py``: pass functions are wrapped, ``triton_backend.LAUNCH_COUNTER``
is read, and every ``Tensor.item/tolist/__bool__/__float__/__int__/cpu/...`` made by
``salsa_fused`` code is recorded. The demo model has 3 buckets (two param groups of fp32
tensors and one bf16 layer).
"""

import pytest
import torch

from benchmarks import memory as M
from benchmarks import step_counts as S
from salsa_fused import FusedSaLSa
from salsa_fused.backends import triton_usable

BUCKETS = 3
needs_triton = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                  reason="triton backend unavailable (needs triton and TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def triton_counts():
    return {restore: S.measure("triton", restore, trials=(1, 4)) for restore in ("copy", "inplace")}


@pytest.fixture(scope="module")
def torch_counts():
    return {restore: S.measure("torch", restore, trials=(1, 4)) for restore in ("copy", "inplace")}


@needs_triton
@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_triton_plain_step_is_one_launch_per_bucket_and_never_reads_the_device(triton_counts, restore):
    plain = triton_counts[restore]["plain step"]
    assert plain["launches"] == {"_plain_step_kernel": BUCKETS}
    assert plain["passes"] == {"plain_step": BUCKETS}
    assert plain["host_reads"] == 0, plain["host_read_sites"]
    assert plain["table_builds"] == 0  # tables are cached while the tensors stay


@needs_triton
@pytest.mark.parametrize("restore", ["copy", "inplace"])
@pytest.mark.parametrize("trials", [1, 4])
def test_triton_search_step_launches_and_reads(triton_counts, restore, trials):
    """Reduction + pass A per bucket, one pass B per bucket and further trial, no restore;
    host reads: f0 and q once before any write, then one small read per trial."""
    record = triton_counts[restore][f"search step, {trials} trial{'s' if trials > 1 else ''}"]
    expected = {"_slope_kernel": BUCKETS, "_first_trial_kernel": BUCKETS}
    if trials > 1:
        expected["_retrial_kernel"] = BUCKETS * (trials - 1)
    assert record["launches"] == expected
    assert record["host_reads"] == 1 + trials, record["host_read_sites"]
    sites = record["host_read_sites"]
    assert sum(site.startswith("tolist at functional.py") for site in sites) == 1, sites  # f0, q, flags
    # trial losses, read where the ranks' losses are shared (SearchReduction.shared_loss)
    assert sum(site.startswith("tolist at distributed.py") for site in sites) == trials, sites


@needs_triton
@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_triton_interrupted_search_restores_once_per_bucket(triton_counts, restore):
    record = triton_counts[restore]["search step interrupted at trial 2"]
    assert record["launches"] == {"_slope_kernel": BUCKETS, "_first_trial_kernel": BUCKETS,
                                  "_retrial_kernel": BUCKETS, "_restore_kernel": BUCKETS}
    assert record["host_reads"] == 2  # f0/q, then the first trial's loss; the second trial raised


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_torch_backend_passes_and_reads(torch_counts, restore):
    """The reference backend makes the same passes; on a plain step it reads flags on the host
    by design, free on the CPU: per bucket one (loss/found_inf finite), per block of ``CPU_BLOCK``
    elements of a large tensor and per group of small ones one (gradients finite, checked while the
    block is in cache), and per block or group of 16-bit weights one more (the new weights'
    extremes: none may round to inf)."""
    from salsa_fused.backends.torch_backend import CPU_BLOCK, cpu_step_units
    counts = torch_counts[restore]
    plain = counts["plain step"]
    assert plain["passes"] == {"plain_step": BUCKETS}
    _, param_groups, _ = S.demo_model()  # one bucket per group
    blocks = groups = sixteen_bit = 0
    for group in param_groups:
        numels, dtype = [p.numel() for p in group["params"]], group["params"][0].dtype
        for grouped, indices in cpu_step_units(numels):
            reads = 1 if grouped else -(-numels[indices[0]] // CPU_BLOCK)
            groups, blocks = groups + grouped * reads, blocks + (not grouped) * reads
            sixteen_bit += reads if dtype == torch.bfloat16 else 0
    assert sixteen_bit > 0 and groups > 0  # the demo has a bf16 bucket (its tensors all small: grouped)
    assert plain["host_reads"] == BUCKETS + groups + blocks + sixteen_bit
    sites = plain["host_read_sites"]
    assert sum(site.startswith("__bool__ at torch_backend.py") for site in sites) == BUCKETS + groups
    assert sum(site.startswith("__float__ at torch_backend.py") for site in sites) == blocks
    assert sum(site.startswith("tolist at torch_backend.py") for site in sites) == sixteen_bit
    search = counts["search step, 4 trials"]
    assert search["passes"] == {"slope": BUCKETS, "first_trial": BUCKETS,
                                "retrial": 3 * BUCKETS}
    assert search["host_reads"] == 5
    interrupted = counts["search step interrupted at trial 2"]
    assert interrupted["passes"]["restore"] == BUCKETS


def test_host_read_counter_sees_reads_made_by_package_code_only():
    """The instrument itself: a read inside salsa_fused is recorded, one in the test is not."""
    from salsa_fused.backends import torch_backend
    from salsa_fused.backends.base import Move, PassArgs
    sink = []
    x = torch.ones(3)
    with S.count_host_reads(sink):
        x.sum().item()  # made here, not by the package
        loss = torch.tensor(float("nan"))
        bucket = _one_tensor_bucket()
        torch_backend.plain_step(bucket, PassArgs(_hyper(), Move(1e-3, decay=1e-3)), loss)  # returns after one flag read
    assert len(sink) == 1 and sink[0].startswith("__bool__ at torch_backend.py:"), sink


def _one_tensor_bucket():
    from salsa_fused.backends.base import Bucket
    w = torch.ones(4)
    return Bucket([w], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], None,
                  torch.device("cpu"), torch.float32, 0)


def _hyper():
    from salsa_fused.backends.base import Hyper
    return Hyper(0.9, 0.999, 1e-8, 0.0, 0.19, 0.002, 1.0)


# ---------------------------------------------------------------------------- memory
TINY_SHAPES = [(100, 32), (16, 32), (32,), (32,), (32, 96), (96,), (32, 32), (32,), (32, 128), (128,),
               (128, 32), (32,)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_state_memory_targets(backend):
    """Measured state bytes: copy <= AdamW + one copy of the weights; inplace <= AdamW + 2%."""
    results = M.measure(dtype=torch.float32, backends=[backend], shapes=TINY_SHAPES)
    meta = results["_meta"]
    adamw, weights = meta["adamw_bytes"], meta["weight_bytes"]
    assert adamw >= 2 * weights  # AdamW's two moments were measured, not assumed
    for when in ("search step", "plain step"):
        copy = results[f"FusedSaLSa {backend}/copy, {when}"]["state_bytes"]
        inplace = results[f"FusedSaLSa {backend}/inplace, {when}"]["state_bytes"]
        assert inplace <= 1.02 * adamw, (when, inplace, adamw)
        assert copy <= 1.02 * adamw + weights, (when, copy, adamw, weights)
        assert copy - inplace >= weights  # the copy strategy really holds a copy of the weights
    assert all(M.targets_met(results).values())


def test_state_bytes_counts_distinct_storages_and_excludes_weights():
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(6))]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = FusedSaLSa(params, restore="copy", backend="torch")
    assert M.state_bytes(opt, params) == 2 * 16 * 4  # fp32 moments, created eagerly
    opt.step(lambda: torch.tensor(0.0), loss=torch.tensor(1.0))  # a search step: saved copies appear
    after = M.state_bytes(opt, params)
    assert 3 * 16 * 4 <= after <= 3 * 16 * 4 + 64, after  # + the 0-dim non-finite counters


# ---------------------------------------------------------------------------- CPU fallback speed-up
def _strided_copy(x: torch.Tensor) -> torch.Tensor:
    """Same values in non-contiguous storage (every other element of a buffer)."""
    y = torch.empty((*x.shape, 2), dtype=x.dtype)[..., 0]
    y.copy_(x)
    assert not y.is_contiguous() or x.numel() <= 1
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_blocked_cpu_plain_step_is_bitwise_the_foreach_form(monkeypatch, dtype, weight_decay, scaled, nonfinite):
    """The CPU plain step runs block by block (cache-friendly), small tensors in foreach groups;
    non-contiguous tensors take the foreach form that the parity tests check against
    salsa-optimizer 0.1.0. Same bits, also where some gradient elements are NaN/inf (the guarded
    path, per block, per group or per bucket)."""
    from salsa_fused.backends import torch_backend
    from salsa_fused.backends.base import Bucket, Hyper, Move, PassArgs
    monkeypatch.setattr(torch_backend, "CPU_BLOCK", 1000)  # several blocks and ragged tails; below 125: grouped
    generator = torch.Generator().manual_seed(0)
    shapes = [(2500,), (3, 5), (40, 60), (1,), (1001,)]

    def tensors(scale, dtype_):
        return [(torch.randn(s, generator=generator) * scale).to(dtype_) for s in shapes]
    weights, grads = tensors(0.1, dtype), tensors(1e-3 * (1024.0 if scaled else 1.0), dtype)
    exp_avg, exp_avg_sq = tensors(1e-3, torch.float32), [t.abs() for t in tensors(1e-3, torch.float32)]
    blocked = Bucket([t.clone() for t in weights], grads, [t.clone() for t in exp_avg],
                     [t.clone() for t in exp_avg_sq], None, torch.device("cpu"), dtype, 0)
    foreach = Bucket(*[[_strided_copy(t) for t in ts] for ts in (weights, grads, exp_avg, exp_avg_sq)],
                     None, torch.device("cpu"), dtype, 0)
    grad_scale = torch.tensor(1024.0) if scaled else None
    counts = {id(blocked): torch.zeros((), dtype=torch.int64), id(foreach): torch.zeros((), dtype=torch.int64)}
    for step in range(1, 4):
        hyper = Hyper(0.9, 0.999, 1e-8, weight_decay, 1 - 0.9 ** (step + 1), 1 - 0.999 ** (step + 1), 1.0)
        if nonfinite and step == 2:  # in the second block of one tensor, the first of another, a small one
            for bucket in (blocked, foreach):
                bucket.grads[0][1500] = float("nan")
                bucket.grads[2][3, 7] = float("-inf")
                bucket.grads[1][2, 4] = float("nan")
        for bucket in (blocked, foreach):
            torch_backend.plain_step(bucket, PassArgs(hyper, Move(1e-3, decay=1e-3), grad_scale=grad_scale),
                                     torch.tensor(1.0), nonfinite_count=counts[id(bucket)])
    for name in ("params", "exp_avg", "exp_avg_sq"):
        for a, b in zip(getattr(blocked, name), getattr(foreach, name)):
            assert torch.equal(a, b), name
    assert counts[id(blocked)].item() == counts[id(foreach)].item() == (3 * 2 if nonfinite else 0)
    assert not torch.equal(blocked.params[0], weights[0].to(dtype))  # the weights did move
