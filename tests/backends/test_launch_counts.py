"""Kernel launches per Triton backend call: one per bucket for every pass.

Counted with ``triton_backend.LAUNCH_COUNTER`` on a bucket of many tensors (all
16-byte aligned: the common case). A bucket holding a misaligned view takes one more
launch (the unhinted path), and the pointer tables are built once, not per call.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from salsa_fused.backends import torch_backend, triton_backend
from salsa_fused.backends.base import GRADIENT, MOMENTUM, Bucket, Hyper, Move, PassArgs

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="triton cannot run here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HYPER = Hyper(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, bias_correction1=0.19,
              bias_correction2=0.002, lr=1.0)
SIZES = [3000, 1, 17, 2048, 5, 300]  # 6 tensors, 8 blocks


def make_bucket(saved: bool, misaligned: bool = False) -> Bucket:
    def tensor(n, dtype=torch.float32):
        base = torch.rand(n + int(misaligned), dtype=dtype, device=DEVICE)
        return base[1:] if misaligned else base

    return Bucket([tensor(n) for n in SIZES], [tensor(n) for n in SIZES], [tensor(n) for n in SIZES],
                  [tensor(n) for n in SIZES], [tensor(n) for n in SIZES] if saved else None,
                  DEVICE, torch.float32, 0)


def launches(call) -> dict:
    before = triton_backend.LAUNCH_COUNTER.copy()
    call()
    return dict(triton_backend.LAUNCH_COUNTER - before)


@pytest.mark.parametrize("saved", [True, False])
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM])
def test_one_launch_per_pass(saved, direction):
    bucket = make_bucket(saved)
    loss = torch.tensor(1.0, device=DEVICE)
    count = torch.zeros((), dtype=torch.int64, device=DEVICE)
    assert launches(lambda: triton_backend.slope(bucket, PassArgs(HYPER, direction=direction))) == {
        "_slope_kernel": 1}
    assert launches(lambda: triton_backend.first_trial(bucket, PassArgs(HYPER, Move(0.5, decay=0.5), direction))) == {
        "_first_trial_kernel": 1}
    assert launches(lambda: triton_backend.retrial(bucket, PassArgs(HYPER, Move(0.4, 0.5, 0.5), direction))) == {
        "_retrial_kernel": 1}
    assert launches(lambda: triton_backend.restore(bucket, PassArgs(HYPER, Move(0.0, 0.4, 0.5), direction))) == {
        "_restore_kernel": 1}
    assert launches(lambda: triton_backend.plain_step(bucket, PassArgs(HYPER, Move(0.3, decay=0.3), grad_scale=torch.ones((), device=DEVICE)), loss, found_inf=torch.zeros((), device=DEVICE), nonfinite_count=count)) == {"_plain_step_kernel": 1}


def test_slope_is_one_launch_and_one_partial_per_block():
    """q = one kernel writing a partial per block, then a fixed-order torch sum of the partials."""
    bucket = make_bucket(saved=False)
    triton_backend.slope(bucket, PassArgs(HYPER, direction=GRADIENT))  # tables built, cached
    sums = []
    real_sum = torch.Tensor.sum

    def spy_sum(self, *args, **kwargs):
        sums.append(self.numel())
        return real_sum(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "sum", spy_sum):
        counted = launches(lambda: triton_backend.slope(bucket, PassArgs(HYPER, direction=GRADIENT)))
    assert counted == {"_slope_kernel": 1}
    blocks = sum(-(-n // triton_backend.BLOCK) for n in SIZES)
    assert sums == [blocks]


def test_misaligned_view_adds_one_launch():
    bucket = make_bucket(saved=True, misaligned=True)
    aligned = make_bucket(saved=True)
    mixed = Bucket(bucket.params + aligned.params, bucket.grads + aligned.grads,
                   bucket.exp_avg + aligned.exp_avg, bucket.exp_avg_sq + aligned.exp_avg_sq,
                   bucket.saved + aligned.saved, DEVICE, torch.float32, 0)
    assert launches(lambda: triton_backend.first_trial(mixed, PassArgs(HYPER, Move(0.5, decay=0.5), GRADIENT))) == {
        "_first_trial_kernel": 2}


def test_tables_built_once_per_layout():
    bucket = make_bucket(saved=True)
    with mock.patch.object(triton_backend, "_build_tables", wraps=triton_backend._build_tables) as build:
        for _ in range(3):
            triton_backend.slope(bucket, PassArgs(HYPER, direction=GRADIENT))
            triton_backend.first_trial(bucket, PassArgs(HYPER, Move(0.5, decay=0.5), GRADIENT))
            triton_backend.retrial(bucket, PassArgs(HYPER, Move(0.4, 0.5, 0.5), GRADIENT))
        assert build.call_count == 1
        # New gradient storage (zero_grad(set_to_none=True) then backward): only the table's
        # gradient column is rewritten, no rebuild, and the kernels read the new gradients.
        bucket.grads = [g.clone() * 2 for g in bucket.grads]
        reference = Bucket([p.clone() for p in bucket.params], [g.clone() for g in bucket.grads],
                           [m.clone() for m in bucket.exp_avg], [v.clone() for v in bucket.exp_avg_sq],
                           [w.clone() for w in bucket.saved], DEVICE, bucket.dtype, 0)
        triton_backend.retrial(bucket, PassArgs(HYPER, Move(0.3, 0.4, 0.5), GRADIENT))
        torch_backend.retrial(reference, PassArgs(HYPER, Move(0.3, 0.4, 0.5), GRADIENT))
        assert build.call_count == 1
        for ours, expected in zip(bucket.params, reference.params):
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
        # A gradient that is not 16-byte aligned changes the launch split: a full rebuild.
        storage = torch.empty(bucket.grads[3].numel() + 1, dtype=bucket.grads[3].dtype, device=DEVICE)
        bucket.grads[3] = storage[1:].view_as(bucket.grads[3]).copy_(bucket.grads[3])
        triton_backend.retrial(bucket, PassArgs(HYPER, Move(0.2, 0.3, 0.5), GRADIENT))
        assert build.call_count == 2


def test_empty_bucket_launches_nothing():
    bucket = Bucket([], [], [], [], None, DEVICE, torch.float32, 0)
    assert launches(lambda: (triton_backend.slope(bucket, PassArgs(HYPER, direction=GRADIENT)),
                             triton_backend.plain_step(bucket, PassArgs(HYPER, Move(0.1, decay=0.1)), torch.tensor(1.0, device=DEVICE)))) == {}


@pytest.mark.parametrize("with_scaler", [False, True])
def test_optimizer_plain_step_counts_inside_the_kernel(with_scaler):
    """A plain step's whole work is the bucket launches: the loss and GradScaler's found_inf are
    counted by the first bucket's kernel, not by torch ops beside it (each a launch on a GPU)."""
    from salsa_fused import FusedSaLSa
    from salsa_fused.backends import base

    class NeverSearch:
        def scale(self, step):
            return 1.0

        def searches(self, step):
            return False

    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (300, 7)]
    biases = [torch.nn.Parameter(torch.randn(5, device=DEVICE))]
    opt = FusedSaLSa([{"params": params}, {"params": biases, "weight_decay": 0.0}], backend="triton",
                     schedule=NeverSearch(), init_step_size=1.0)
    for p in params + biases:
        p.grad = torch.randn_like(p)
    if with_scaler:
        opt.grad_scale, opt.found_inf = torch.ones((), device=DEVICE), torch.ones((), device=DEVICE)
    weights = [p.detach().clone() for p in params + biases]
    with mock.patch.object(base, "count_step", side_effect=AssertionError("counted with torch ops")), \
            mock.patch.object(triton_backend, "count_step", side_effect=AssertionError("counted with torch ops")):
        counted = launches(lambda: opt.step(lambda: torch.tensor(float("nan")), loss=torch.tensor(float("nan"))))
    assert counted == {"_plain_step_kernel": 2}
    # a NaN loss; with the scaler's found_inf set the step is its skip only, not also a NaN loss,
    # and the step itself took that skip back out (k unchanged: docs/training.md)
    assert opt._counts.step_counts.tolist() == [int(not with_scaler), 0]
    assert opt.search_state.step == int(not with_scaler)
    assert all(torch.equal(w, p) for w, p in zip(weights, params + biases))  # a NaN loss moves nothing
