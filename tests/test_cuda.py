"""CUDA-only checks of the Triton backend (issue 7, layer 2); skipped without a GPU.

- a plain step never synchronizes with the host: ``torch.cuda.set_sync_debug_mode("error")``
  around plain steps, fp32 and bf16 weights, with and without GradScaler;
- one kernel launch per bucket on a plain step, and the search step's launches;
- the Triton backend agrees with the torch reference backend on the GPU.

Run by ``bash benchmarks/gpu_suite.sh``.
"""

import pytest
import torch

from benchmarks._common import make_next_step_plain, sync_debug_error, two_group_mlp
from salsa_fused import FusedSaLSa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def plain_steps_without_sync(device: torch.device, dtype: torch.dtype, use_scaler: bool, steps: int = 3):
    """Warm up with search steps, then run plain steps with host syncs turned into errors."""
    from salsa_fused.backends import triton_backend
    model, groups, loss_fn = two_group_mlp(device, dtype)
    opt = FusedSaLSa(groups, backend="triton", init_step_size=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10) if use_scaler else None
    for _ in range(3):  # search steps: tables and saved copies are built here
        opt.zero_grad(set_to_none=False)
        opt.step(loss_fn)
    weights_before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        make_next_step_plain(opt)
        opt.zero_grad(set_to_none=False)  # gradients keep their storage: the tables stay cached
        loss = loss_fn()
        if scaler is not None:
            scaler.scale(loss).backward()  # FusedSaLSa reads grad_scale/found_inf on the device
        else:
            loss.backward()
        launches_before = sum(triton_backend.LAUNCH_COUNTER.values())
        with sync_debug_error(device):
            if scaler is not None:
                scaler.step(opt, lambda: loss_fn(), loss=loss.detach())
            else:
                opt.step(loss_fn, loss=loss.detach())
        assert sum(triton_backend.LAUNCH_COUNTER.values()) - launches_before == len(groups)
        if scaler is not None:
            scaler.update()
        assert opt.search_state.steps_since_search == 1  # it was a plain step
    changed = any(not torch.equal(a, p) for a, p in zip(weights_before, model.parameters()))
    assert changed
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_step_never_syncs(dtype):
    plain_steps_without_sync(torch.device("cuda"), dtype, use_scaler=False)


def test_plain_step_with_grad_scaler_never_syncs():
    plain_steps_without_sync(torch.device("cuda"), torch.float32, use_scaler=True)


def test_search_step_launches_on_cuda():
    from salsa_fused.backends import triton_backend
    device = torch.device("cuda")
    model, groups, loss_fn = two_group_mlp(device, torch.float32)
    opt = FusedSaLSa(groups, backend="triton")
    before = triton_backend.LAUNCH_COUNTER.copy()
    opt.step(loss_fn)
    launched = triton_backend.LAUNCH_COUNTER - before
    trials = opt.last_search_trials
    assert launched["_slope_kernel"] == len(groups)
    assert launched["_first_trial_kernel"] == len(groups)
    assert launched["_retrial_kernel"] == len(groups) * (trials - 1)
    assert launched["_restore_kernel"] == 0


@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_triton_matches_torch_backend_on_cuda(restore):
    device = torch.device("cuda")
    runs = {}
    for backend in ("torch", "triton"):
        model, groups, loss_fn = two_group_mlp(device, torch.float32, seed=3)
        opt = FusedSaLSa(groups, backend=backend, restore=restore)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            losses.append(float(opt.step(loss_fn)))
        runs[backend] = (losses, [p.detach().clone() for p in model.parameters()], opt.num_searches)
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(runs["triton"][1], runs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert runs["triton"][2] == runs["torch"][2]


def test_the_presets_frozen_steps_never_sync_and_still_report_nan():
    """After the preset's search phase no search reads the NaN/inf counts: they travel to pinned
    host memory without a sync and are read once landed; a NaN batch is still reported."""
    import warnings

    from salsa_fused import NonFiniteError, presets
    device = torch.device("cuda")
    model, groups, loss_fn = two_group_mlp(device, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = presets.recommended(groups, total_steps=20, backend="triton")
    for _ in range(5):  # the search phase (20% of 20 steps) and the first frozen step
        opt.zero_grad(set_to_none=False)
        opt.step(loss_fn)
    for _ in range(25):  # frozen: counts copied every 10 steps and read later, never a sync
        opt.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        with sync_debug_error(device):
            opt.step(loss_fn, loss=loss.detach())
    raised = None
    for k in range(40):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn() * float("nan")
        loss.backward()
        try:
            opt.step(loss_fn, loss=loss.detach())
        except NonFiniteError as error:
            raised = (k, str(error))
            break
    assert raised is not None and "no search came to report them" in raised[1]
