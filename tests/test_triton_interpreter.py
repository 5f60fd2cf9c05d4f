"""tests/triton_interpreter.py: a launch patches ``triton.language`` once, device-function calls inside it
do not patch it again, and the kernels compute exactly what they compute under Triton's own patching."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from salsa_fused import FusedSaLSa  # noqa: E402
from tests import triton_interpreter  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the CUDA device runs Triton's kernels compiled; no interpreter to patch")


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _shifted(x):
    return tl.where(x > 0, x + 1.0, x - 1.0)


@triton.jit
def _two_device_calls_per_element_block(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    for _ in range(3):
        x = _shifted(_scaled(x, 0.5))
    tl.store(out_ptr + offsets, x, mask=mask)


def _language_attributes():
    return {(namespace.__name__, name): value for namespace in (tl, tl.core, tl.math, tl.tensor)
            for name, value in vars(namespace).items()}


def _run_kernel():
    x = torch.linspace(-3, 3, 37)
    out = torch.empty_like(x)
    _two_device_calls_per_element_block[(3,)](x, out, x.numel(), BLOCK=16)
    return out


@pytest.fixture
def count_full_patches():
    """Names of the functions Triton's own ``_patch_lang`` runs for, with the wrapper installed over it."""
    assert triton_interpreter.installed()
    calls = []
    triton_interpreter.uninstall()
    triton_own = interpreter._patch_lang

    def counted(fn):
        calls.append(fn.__name__)
        return triton_own(fn)

    interpreter._patch_lang = counted
    triton_interpreter.install()
    yield calls
    triton_interpreter.uninstall()
    interpreter._patch_lang = triton_own
    triton_interpreter.install()


def test_conftest_installs_it():
    assert triton_interpreter.installed()


def test_a_launch_patches_once_and_its_device_calls_not_again(count_full_patches):
    _run_kernel()
    assert count_full_patches == ["_two_device_calls_per_element_block"]


def test_without_it_every_device_call_patches_again(count_full_patches):
    """What it saves: Triton's own interpreter repatches at each of the 3 blocks x 3 x 2 device calls."""
    triton_interpreter.uninstall()
    try:
        _run_kernel()
    finally:
        triton_interpreter.install()
    assert len(count_full_patches) == 1 + 3 * 3 * 2


def test_a_device_function_that_sees_no_language_module_meets_triton_s_own_check():
    """Skipping is only for functions whose language modules the launch patched: one that sees none is
    refused by Triton as it is without the wrapper, inside a launch too."""
    namespace = {}
    exec("def helper(x):\n    return x\n", namespace)
    state = triton_interpreter._STATE
    outer = (state.in_launch, state.patched)
    state.in_launch, state.patched = True, frozenset({id(tl), id(tl.core)})
    try:
        with pytest.raises(AssertionError, match="triton.language must be visible"):
            interpreter._patch_lang(namespace["helper"])
    finally:
        state.in_launch, state.patched = outer


def test_the_language_is_triton_s_own_after_a_launch():
    before = _language_attributes()
    _run_kernel()
    after = _language_attributes()
    changed = sorted(key for key in before if after.get(key) is not before[key])
    assert not changed and after.keys() == before.keys()


def test_kernels_compute_bitwise_what_they_compute_under_triton_s_own_patching():
    fast = _run_kernel()
    triton_interpreter.uninstall()
    try:
        own = _run_kernel()
        expected_weights = _train_with_the_triton_backend()
    finally:
        triton_interpreter.install()
    assert torch.equal(fast, own)
    x = torch.linspace(-3, 3, 37)
    for _ in range(3):
        x = x * 0.5
        x = torch.where(x > 0, x + 1.0, x - 1.0)
    assert torch.equal(own, x)
    for got, want in zip(_train_with_the_triton_backend(), expected_weights):
        assert torch.equal(got, want)


def _train_with_the_triton_backend():
    """Four steps of the Triton backend, two with a search (bf16 and fp32 weights)."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(11, dtype=torch.bfloat16, requires_grad=True)]
    opt = FusedSaLSa(params, backend="triton", init_step_size=1e-2)

    def closure():
        return sum((p.float() ** 2).sum() for p in params)

    for _ in range(4):
        opt.zero_grad()
        opt.step(closure)
    return [p.detach().clone() for p in params]
