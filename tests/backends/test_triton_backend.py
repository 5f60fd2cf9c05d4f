"""The Triton backend against the torch reference backend, pass by pass.

Every test runs the same call on two copies of a bucket, one through each backend,
and compares all streams. fp32 must agree to a few ulp (rtol 1e-6). For bf16/fp16
weights both backends compute in fp32 and round once, so the test measures each
backend's error against an fp32 run of the reference on the exactly upcast inputs
(fp32 is ~2^16 times finer than bf16, so it stands in for an exact result) and
requires the kernel's error to be at most twice the reference's own.

On a machine without CUDA these run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from salsa_fused.backends import torch_backend, triton_backend
from salsa_fused.backends.base import GRADIENT, MOMENTUM, RAW, Bucket, Hyper, Move, PassArgs

pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="triton cannot run here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + LOW_PRECISION
# Odd sizes: a single element, a masked-only block, one full block plus a 1-element
# tail, several blocks, a matrix and a 0-dim tensor.
SIZES = [(1,), (7,), (4097,), (9000,), (3, 5), ()]


def make_hyper(weight_decay: float = 0.0, k: int = 3) -> Hyper:
    beta1, beta2 = 0.9, 0.999
    return Hyper(beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay,
                 bias_correction1=1 - beta1 ** (k + 1), bias_correction2=1 - beta2 ** (k + 1), lr=1.0)


def _storage(shape, dtype, misaligned: bool) -> torch.Tensor:
    """An empty tensor; with ``misaligned`` a view one element into its storage (not 16-byte aligned)."""
    if not misaligned:
        return torch.empty(shape, dtype=dtype, device=DEVICE)
    numel = int(torch.Size(shape).numel())
    return torch.empty(numel + 1, dtype=dtype, device=DEVICE)[1:].view(shape)


def make_bucket(sizes=SIZES, dtype=torch.float32, saved: bool = True, seed: int = 0,
                misaligned: bool = False) -> Bucket:
    """A bucket mid-training: m correlated with g, v positive, weights O(1)."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avg, exp_avg_sq = [], [], [], []
    for shape in sizes:
        w = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        params.append(_storage(shape, dtype, misaligned).copy_(w))
        grads.append(_storage(shape, dtype, misaligned).copy_(g))
        exp_avg.append(_storage(shape, torch.float32, misaligned)
                       .copy_(0.1 * g + 0.05 * torch.randn(shape, generator=gen)))
        exp_avg_sq.append(_storage(shape, torch.float32, misaligned)
                          .copy_(0.002 * g * g + 1e-3 * torch.rand(shape, generator=gen)))
    copies = [_storage(p.shape, dtype, misaligned).fill_(float("nan")) for p in params] if saved else None
    return Bucket(params, grads, exp_avg, exp_avg_sq, copies, DEVICE, dtype, group_index=0)


def clone_bucket(bucket: Bucket, dtype: torch.dtype = None) -> Bucket:
    """A deep copy (fresh cache); with ``dtype`` the weight-like streams converted to it."""
    def copy_of(t: torch.Tensor, to_dtype: torch.dtype) -> torch.Tensor:
        if t.data_ptr() % 16 == 0:
            return t.clone() if to_dtype == t.dtype else t.to(to_dtype)
        return _storage(t.shape, to_dtype, misaligned=True).copy_(t)  # keep the misalignment

    def convert(tensors, keep_dtype=False):
        if tensors is None:
            return None
        return [copy_of(t, t.dtype if dtype is None or keep_dtype else dtype) for t in tensors]

    return Bucket(convert(bucket.params), convert(bucket.grads), convert(bucket.exp_avg, True),
                  convert(bucket.exp_avg_sq, True), convert(bucket.saved), bucket.device,
                  dtype or bucket.dtype, bucket.group_index)


def streams(bucket: Bucket):
    named = {"params": bucket.params, "exp_avg": bucket.exp_avg, "exp_avg_sq": bucket.exp_avg_sq}
    if bucket.saved is not None:
        named["saved"] = bucket.saved
    return named


def assert_buckets_match(actual: Bucket, expected: Bucket, reference: Bucket = None) -> None:
    """fp32 streams to rtol 1e-6; low-precision weights by their error against ``reference``."""
    for stream, tensors in streams(actual).items():
        for index, (a, e) in enumerate(zip(tensors, streams(expected)[stream])):
            where = f"{stream}[{index}] shape {tuple(a.shape)}"
            if a.dtype == torch.float32:
                atol = 1e-6 if stream in ("params", "saved") else 1e-9
                torch.testing.assert_close(a, e, rtol=1e-6, atol=atol, equal_nan=True, msg=lambda m: f"{where}: {m}")
                continue
            assert reference is not None, "low-precision weights need a high-precision reference"
            exact = streams(reference)[stream][index]
            kernel_error = (a.double() - exact.double()).abs().max().item() if a.numel() else 0.0
            torch_error = (e.double() - exact.double()).abs().max().item() if a.numel() else 0.0
            assert kernel_error <= 2 * torch_error + 1e-12, (
                f"{where}: triton error {kernel_error:.3g} vs torch backend error {torch_error:.3g}")


def run_both(bucket: Bucket, call):
    """``call(backend, bucket)`` on a triton copy, a torch copy and (low precision) an fp32 torch copy."""
    on_triton, on_torch = clone_bucket(bucket), clone_bucket(bucket)
    reference = clone_bucket(bucket, torch.float32) if bucket.dtype in LOW_PRECISION else None
    out_triton = call(triton_backend, on_triton)
    out_torch = call(torch_backend, on_torch)
    if reference is not None:
        call(torch_backend, reference)
    return on_triton, on_torch, reference, out_triton, out_torch


def _grad_scale(use: bool):
    return torch.tensor(1024.0, device=DEVICE) if use else None


def scale_grads(bucket: Bucket, grad_scale) -> None:
    """Multiply the gradients by the scale, as GradScaler's backward leaves them."""
    if grad_scale is not None:
        for g in bucket.grads:
            g.mul_(grad_scale.to(g.dtype))


# --- reduction pass ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
@pytest.mark.parametrize("use_scale", [False, True])
def test_slope_matches_torch(dtype, direction, use_scale):
    bucket = make_bucket(dtype=dtype)
    grad_scale = _grad_scale(use_scale)
    scale_grads(bucket, grad_scale)
    hyper = make_hyper()
    _, _, _, q_triton, q_torch = run_both(
        bucket, lambda be, b: be.slope(b, PassArgs(hyper, direction=direction, grad_scale=grad_scale)))
    assert q_triton.shape == () and q_triton.dtype == torch.float32 and q_triton.device == bucket.params[0].device
    torch.testing.assert_close(q_triton, q_torch, rtol=1e-5, atol=0)
    # Deterministic: the same inputs give the same bits.
    assert torch.equal(q_triton, triton_backend.slope(bucket, PassArgs(hyper, direction=direction, grad_scale=grad_scale)))


def test_slope_writes_nothing():
    bucket = make_bucket()
    before = clone_bucket(bucket)
    triton_backend.slope(bucket, PassArgs(make_hyper(), direction=GRADIENT))
    for stream, tensors in streams(bucket).items():
        for a, b in zip(tensors, streams(before)[stream]):
            assert torch.equal(a, b) or stream == "saved"


def test_slope_non_finite_gradient_gives_non_finite_q():
    bucket = make_bucket()
    bucket.grads[2][100] = float("inf")
    assert not torch.isfinite(triton_backend.slope(bucket, PassArgs(make_hyper(), direction=GRADIENT)))


# --- pass A and pass B of a search step --------------------------------------------------

SEARCH_CASES = list(itertools.product(DTYPES, [True, False], [0.0, 0.1], [GRADIENT, MOMENTUM, RAW]))


def _case_id(case):
    dtype, saved, weight_decay, direction = case
    return f"{str(dtype)[6:]}-{'copy' if saved else 'inplace'}-wd{weight_decay}-{direction}"


@pytest.mark.parametrize("case", SEARCH_CASES, ids=_case_id)
def test_first_trial_matches_torch(case):
    dtype, saved, weight_decay, direction = case
    bucket = make_bucket(dtype=dtype, saved=saved, seed=1)
    hyper = make_hyper(weight_decay)
    on_triton, on_torch, reference, _, _ = run_both(
        bucket, lambda be, b: be.first_trial(b, PassArgs(hyper, Move(0.5, decay=0.4), direction)))
    assert_buckets_match(on_triton, on_torch, reference)
    if saved:  # the copy is w before the step, bit for bit
        for copy_, w in zip(on_triton.saved, bucket.params):
            assert torch.equal(copy_, w)


@pytest.mark.parametrize("case", SEARCH_CASES, ids=_case_id)
def test_retrial_matches_torch(case):
    dtype, saved, weight_decay, direction = case
    bucket = make_bucket(dtype=dtype, saved=saved, seed=2)
    hyper = make_hyper(weight_decay)

    def search(backend, b):
        backend.first_trial(b, PassArgs(hyper, Move(1.1, decay=1.0), direction))
        backend.retrial(b, PassArgs(hyper, Move(1.1 * 0.8, 1.1, 1.0), direction))
        backend.retrial(b, PassArgs(hyper, Move(1.1 * 0.8 ** 2, 1.1 * 0.8, 1.0), direction))

    assert_buckets_match(*run_both(bucket, search)[:3])


@pytest.mark.parametrize("case", SEARCH_CASES, ids=_case_id)
def test_restore_matches_torch(case):
    dtype, saved, weight_decay, direction = case
    bucket = make_bucket(dtype=dtype, saved=saved, seed=3)
    hyper = make_hyper(weight_decay)

    def search_and_restore(backend, b):
        backend.first_trial(b, PassArgs(hyper, Move(0.7, decay=1.0), direction))
        backend.retrial(b, PassArgs(hyper, Move(0.7 * 0.8, 0.7, 1.0), direction))
        backend.restore(b, PassArgs(hyper, Move(0.0, 0.7 * 0.8, 1.0), direction))

    on_triton, on_torch, reference, _, _ = run_both(bucket, search_and_restore)
    assert_buckets_match(on_triton, on_torch, reference)
    if saved:  # restoring from the copy is exact
        for w, w0 in zip(on_triton.params, bucket.params):
            assert torch.equal(w, w0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a CUDA device: this compares runs on the CPU with the C++ CPU "
                                                   "backend")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
def test_in_place_restore_is_bitwise_the_cpp_backends(dtype, weight_decay, direction):
    """Without a saved copy the restore recomputes ``w0`` from the weights (to rounding, not exactly): the
    Triton kernels and the C++ loops round alike, so after a first trial, a retrial and the restore every
    stream agrees to the bit (the C++ backend is bitwise the reference with a correctly rounded sqrt:
    tests/backends/test_cpp_backend.py). The comparison with the reference above is to tolerance."""
    from salsa_fused.backends import cpp_backend

    if not cpp_backend.is_available():
        pytest.skip("the C++ extension is not built: pip install --no-build-isolation -e .")
    bucket = make_bucket(dtype=dtype, saved=False, seed=6)
    hyper = make_hyper(weight_decay)
    streams = []
    for backend in (triton_backend, cpp_backend):
        b = clone_bucket(bucket)
        with torch.no_grad():
            backend.first_trial(b, PassArgs(hyper, Move(0.7, decay=1.0), direction))
            backend.retrial(b, PassArgs(hyper, Move(0.7 * 0.8, 0.7, 1.0), direction))
            backend.restore(b, PassArgs(hyper, Move(0.0, 0.7 * 0.8, 1.0), direction))
        streams.append([t.clone() for t in (*b.params, *b.exp_avg, *b.exp_avg_sq)])
    for i, (a, c) in enumerate(zip(*streams)):
        assert torch.equal(a, c), f"stream tensor {i}: max |diff| {(a.float() - c.float()).abs().max().item():.3e}"
    assert any(not torch.equal(w, w0) for w, w0 in zip(streams[0], bucket.params))  # not a trivial restore


@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
@pytest.mark.parametrize("saved", [True, False])
def test_search_passes_with_grad_scale(direction, saved):
    bucket = make_bucket(saved=saved, seed=4)
    grad_scale = _grad_scale(True)
    scale_grads(bucket, grad_scale)
    hyper = make_hyper(0.1)

    def search(backend, b):
        backend.first_trial(b, PassArgs(hyper, Move(0.5, decay=1.0), direction, grad_scale))
        backend.retrial(b, PassArgs(hyper, Move(0.4, 0.5, 1.0), direction, grad_scale))

    assert_buckets_match(*run_both(bucket, search)[:3])
    restored = run_both(bucket, lambda be, b: (search(be, b), be.restore(b, PassArgs(hyper, Move(0.0, 0.4, 1.0), direction, grad_scale))))
    assert_buckets_match(*restored[:3])


# --- pass A of a plain step --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])  # Adam's m_hat step, or along g
def test_plain_step_matches_torch(dtype, weight_decay, use_scale, direction):
    bucket = make_bucket(dtype=dtype, saved=False, seed=5)
    grad_scale = _grad_scale(use_scale)
    scale_grads(bucket, grad_scale)
    hyper = make_hyper(weight_decay)
    loss = torch.tensor(2.5, device=DEVICE)
    counts = {}

    def step(backend, b):
        counts[backend.name] = torch.zeros((), dtype=torch.int64, device=DEVICE)
        backend.plain_step(b, PassArgs(hyper, Move(0.3, decay=0.3), direction, grad_scale), loss,
                           found_inf=torch.zeros((), device=DEVICE), nonfinite_count=counts[backend.name])

    on_triton, on_torch, reference, _, _ = run_both(bucket, step)
    assert_buckets_match(on_triton, on_torch, reference)
    assert int(counts["triton"]) == 0
    if direction == RAW:  # the moments are neither read nor written
        assert all(torch.equal(a, b) for a, b in zip(on_triton.exp_avg + on_triton.exp_avg_sq,
                                                     bucket.exp_avg + bucket.exp_avg_sq))


@pytest.mark.parametrize("bad_loss", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_non_finite_loss_writes_nothing(bad_loss, direction):
    bucket = make_bucket(saved=False)
    before = clone_bucket(bucket)
    count = torch.zeros((), dtype=torch.int64, device=DEVICE)
    triton_backend.plain_step(bucket, PassArgs(make_hyper(0.1), Move(0.3, decay=0.3), direction),
                              torch.tensor(bad_loss, device=DEVICE), nonfinite_count=count)
    for stream, tensors in streams(bucket).items():
        for a, b in zip(tensors, streams(before)[stream]):
            assert torch.equal(a, b), stream
    assert int(count) == 0


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_found_inf(loss_dtype, direction):
    bucket = make_bucket(saved=False)
    before = clone_bucket(bucket)
    loss = torch.tensor(1.0, dtype=loss_dtype, device=DEVICE)
    args = PassArgs(make_hyper(), Move(0.3, decay=0.0), direction)
    triton_backend.plain_step(bucket, args, loss, found_inf=torch.ones((), device=DEVICE))
    for a, b in zip(bucket.params + bucket.exp_avg, before.params + before.exp_avg):
        assert torch.equal(a, b)
    # found_inf == 0: the step happens, as in the reference.
    triton_backend.plain_step(bucket, args, loss, found_inf=torch.zeros((), device=DEVICE))
    torch_backend.plain_step(before, args, loss, found_inf=torch.zeros((), device=DEVICE))
    assert_buckets_match(bucket, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_step_non_finite_grad_elements(dtype):
    bucket = make_bucket(dtype=dtype, saved=False, seed=6)
    bad = {0: [0], 2: [5, 4096], 3: [8999, 17], 5: [0]}  # tensor index -> flat element indices
    # Finite gradients whose square overflows fp32 (|g| > ~1.8e19) would write v = inf: also kept.
    values = [float("nan"), float("inf"), float("-inf"), 1e20, -3e19]
    n_bad = 0
    for index, elements in bad.items():
        for element in elements:
            bucket.grads[index].view(-1)[element] = values[n_bad % len(values)]
            n_bad += 1
    before = clone_bucket(bucket)
    hyper = make_hyper(0.1)
    loss = torch.tensor(1.0, device=DEVICE)
    counts = {}

    def step(backend, b):
        counts[backend.name] = torch.full((), 5, dtype=torch.int64, device=DEVICE)
        backend.plain_step(b, PassArgs(hyper, Move(0.3, decay=0.3)), loss, nonfinite_count=counts[backend.name])

    on_triton, on_torch, reference, _, _ = run_both(bucket, step)
    assert_buckets_match(on_triton, on_torch, reference)
    assert int(counts["triton"]) == 5 + n_bad == int(counts["torch"])
    for index, elements in bad.items():
        for stream, tensors in streams(on_triton).items():
            kept = tensors[index].view(-1)[elements]
            assert torch.equal(kept, streams(before)[stream][index].view(-1)[elements]), (stream, index)
    # The rest of the step applied.
    assert not torch.equal(on_triton.params[2], before.params[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_plain_step_non_finite_grad_elements(dtype):
    """Along raw an element is kept when g is NaN/inf; a finite g whose square overflows moves."""
    bucket = make_bucket(dtype=dtype, saved=False, seed=6)
    bad = {0: [0], 2: [5, 4096], 5: [0]}  # tensor index -> flat element indices
    values = iter([float("nan"), float("inf"), float("-inf"), float("nan")])
    for index, elements in bad.items():
        for element in elements:
            bucket.grads[index].view(-1)[element] = next(values)
    bucket.grads[3].view(-1)[17] = 1e20
    before = clone_bucket(bucket)
    hyper = make_hyper(0.1)
    counts = {}

    def step(backend, b):
        counts[backend.name] = torch.full((), 5, dtype=torch.int64, device=DEVICE)
        backend.plain_step(b, PassArgs(hyper, Move(1e-30, decay=0.3), RAW), torch.tensor(1.0, device=DEVICE),
                           nonfinite_count=counts[backend.name])

    on_triton, on_torch, reference, _, _ = run_both(bucket, step)
    assert_buckets_match(on_triton, on_torch, reference)
    assert int(counts["triton"]) == 5 + 4 == int(counts["torch"])
    for index, elements in bad.items():
        kept = on_triton.params[index].view(-1)[elements]
        assert torch.equal(kept, before.params[index].view(-1)[elements]), index
    assert not torch.equal(on_triton.params[3].view(-1)[17], before.params[3].view(-1)[17])
    assert all(bool(torch.isfinite(p).all()) for p in on_triton.params)


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_keeps_fp16_weights_that_would_overflow_in_full_and_masked_blocks(direction, grad_dtype):
    """The fp16 plain step computes the new weight in fp32 and keeps it where it would round to inf
    (|w| >= 65520), counted, in a full block and in the masked tail alike; one just inside the edge
    moves. Along raw the move lands on the edge itself: 65504 + 16 = 65520 rounds to inf (kept),
    65440 + 79.9375 = 65519.9375 rounds to 65504 (moved there, not counted): the port of
    tests/backends/test_cpp_backend.py's test for the C++ kernel's lanes."""
    n = 4096 + 7  # element i: past the edge where i % 3 == 0, just inside where i % 3 == 1, else O(1)
    kind = torch.arange(n) % 3
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    gen = torch.Generator().manual_seed(5)
    if direction == RAW:  # w - step * g, step 1
        weights = torch.where(kind == 0, 65504.0, torch.where(kind == 1, 65440.0, torch.randn(n, generator=gen)))
        grads = torch.where(kind == 0, -16.0, torch.where(kind == 1, -79.9375, torch.randn(n, generator=gen)))
        weights, grads = weights * sign, grads * torch.where(kind < 2, sign, 1.0)
        step = 1.0
    else:  # m = v = 0, bias corrections 1 - beta: d = sign(g) to an ulp or two
        weights = torch.where(kind == 0, 65000.0, torch.where(kind == 1, 60000.0, 1.0)) * sign
        grads = -sign * torch.where(kind < 2, 1.0, 0.5 + torch.rand(n, generator=gen))
        step = 2000.0
    bucket = Bucket([weights.to(torch.float16).to(DEVICE)], [grads.to(grad_dtype).to(DEVICE)],
                    [torch.zeros(n, device=DEVICE)], [torch.zeros(n, device=DEVICE)], None, DEVICE, torch.float16,
                    group_index=0)
    hyper = Hyper(beta1=0.9, beta2=0.999, eps=1e-20, weight_decay=0.0, bias_correction1=0.1, bias_correction2=0.001,
                  lr=1.0)
    counts = {}

    def plain_step(backend, b):
        counts[backend.name] = torch.zeros((), dtype=torch.int64, device=DEVICE)
        backend.plain_step(b, PassArgs(hyper, Move(step), direction), torch.tensor(1.0, device=DEVICE),
                           nonfinite_count=counts[backend.name])

    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    with torch.no_grad():
        plain_step(triton_backend, ours)
        plain_step(torch_backend, reference)
    edge, kind = (kind == 0).to(DEVICE), kind.to(DEVICE)
    assert int(counts["triton"]) == int(counts["torch"]) == int(edge.sum())
    assert torch.equal(ours.params[0][edge], bucket.params[0][edge])
    assert torch.isfinite(ours.params[0]).all()
    if direction == RAW:
        assert torch.equal(ours.params[0], reference.params[0])  # one rounding of an exact fp32 value
        inside = kind == 1
        assert torch.equal(ours.params[0][inside].abs(), torch.full_like(ours.params[0][inside], 65504.0))
    else:
        assert bool((ours.params[0][~edge] != bucket.params[0][~edge]).all())
        assert bool((ours.exp_avg[0] != 0).all())  # the kept elements' moments take their finite gradients


# --- bucket shapes, alignment, tables ----------------------------------------------------


def _all_passes(backend, b, hyper, direction=GRADIENT):
    q = backend.slope(b, PassArgs(hyper, direction=direction))
    backend.first_trial(b, PassArgs(hyper, Move(0.5, decay=0.5), direction))
    backend.retrial(b, PassArgs(hyper, Move(0.4, 0.5, 0.5), direction))
    backend.plain_step(b, PassArgs(hyper, Move(0.2, decay=0.2), direction), torch.tensor(1.0, device=DEVICE))
    return q


def test_many_small_tensors_one_launch():
    gen = torch.Generator().manual_seed(7)
    sizes = [(int(n),) for n in torch.randint(1, 300, (60,), generator=gen)]
    bucket = make_bucket(sizes=sizes, seed=7)
    hyper = make_hyper(0.1)
    before = sum(triton_backend.LAUNCH_COUNTER.values())
    on_triton, on_torch, _, q_triton, q_torch = run_both(bucket, lambda be, b: _all_passes(be, b, hyper))
    assert sum(triton_backend.LAUNCH_COUNTER.values()) - before == 4
    torch.testing.assert_close(q_triton, q_torch, rtol=1e-5, atol=0)
    assert_buckets_match(on_triton, on_torch)


def test_zero_dim_and_empty_tensors():
    bucket = make_bucket(sizes=[(), (0,), (5,), (0, 3), ()], seed=8)
    hyper = make_hyper(0.1)
    on_triton, on_torch, _, q_triton, q_torch = run_both(
        bucket, lambda be, b: _all_passes(be, b, hyper, MOMENTUM))
    torch.testing.assert_close(q_triton, q_torch, rtol=1e-5, atol=0)
    assert_buckets_match(on_triton, on_torch)


@pytest.mark.parametrize("saved", [True, False])
def test_empty_bucket_is_a_no_op(saved):
    bucket = Bucket([], [], [], [], [] if saved else None, DEVICE, torch.float32, 0)
    hyper = make_hyper(0.1)
    before = sum(triton_backend.LAUNCH_COUNTER.values())
    q = triton_backend.slope(bucket, PassArgs(hyper, direction=GRADIENT))
    assert q.shape == () and q.dtype == torch.float32 and float(q) == 0.0
    triton_backend.first_trial(bucket, PassArgs(hyper, Move(0.5, decay=0.5), GRADIENT))
    triton_backend.retrial(bucket, PassArgs(hyper, Move(0.4, 0.5, 0.5), GRADIENT))
    triton_backend.restore(bucket, PassArgs(hyper, Move(0.0, 0.4, 0.5), GRADIENT))
    triton_backend.plain_step(bucket, PassArgs(hyper, Move(0.2, decay=0.2)), torch.tensor(1.0, device=DEVICE))
    assert sum(triton_backend.LAUNCH_COUNTER.values()) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", [MOMENTUM, RAW])
def test_misaligned_views(dtype, direction):
    """Views one element into their storage take the unhinted launch and compute the same."""
    bucket = make_bucket(sizes=[(4097,), (33,)], dtype=dtype, seed=9, misaligned=True)
    assert all(t.data_ptr() % 16 != 0 for t in bucket.params + bucket.exp_avg_sq)
    aligned = make_bucket(sizes=[(5000,)], dtype=dtype, seed=10)
    mixed = Bucket(bucket.params + aligned.params, bucket.grads + aligned.grads,
                   bucket.exp_avg + aligned.exp_avg, bucket.exp_avg_sq + aligned.exp_avg_sq,
                   bucket.saved + aligned.saved, DEVICE, dtype, 0)
    hyper = make_hyper(0.1)

    def passes(backend, b):
        q = _all_passes(backend, b, hyper, direction)
        backend.restore(b, PassArgs(hyper, Move(0.0, 0.4, 0.5), direction))
        return q

    on_triton, on_torch, reference, q_triton, q_torch = run_both(mixed, passes)
    torch.testing.assert_close(q_triton, q_torch, rtol=1e-5, atol=0)
    assert_buckets_match(on_triton, on_torch, reference)
    (tables,) = on_triton.cache["triton"].values()
    assert [launch.aligned for launch in tables.launches] == [True, False]


def test_table_cache_reused_and_rebuilt_after_replacement():
    bucket = make_bucket(seed=11, saved=False)
    hyper = make_hyper()
    triton_backend.slope(bucket, PassArgs(hyper, direction=GRADIENT))
    cache = bucket.cache["triton"]
    (tables,) = cache.values()
    triton_backend.first_trial(bucket, PassArgs(hyper, Move(0.5, decay=0.0), GRADIENT))
    assert list(cache.values()) == [tables]  # reused, not rebuilt
    # Replace one weight tensor (as `p.data = ...` would): the old storage must not be touched.
    old = bucket.params[2]
    old_values = old.clone()
    bucket.params[2] = old.clone()
    reference = clone_bucket(bucket)
    triton_backend.retrial(bucket, PassArgs(hyper, Move(0.4, 0.5, 0.0), GRADIENT))
    torch_backend.retrial(reference, PassArgs(hyper, Move(0.4, 0.5, 0.0), GRADIENT))
    assert len(cache) == 2 and tables in cache.values()
    assert torch.equal(old, old_values)
    assert_buckets_match(bucket, reference)
    # Back to the first layout: its cached table is found again.
    bucket.params[2] = old
    triton_backend.retrial(bucket, PassArgs(hyper, Move(0.3, 0.4, 0.0), GRADIENT))
    assert len(cache) == 2


def test_unknown_direction_raises():
    with pytest.raises(ValueError, match="direction"):
        triton_backend.first_trial(make_bucket(), PassArgs(make_hyper(), Move(0.5, decay=0.5), "sideways"))


def test_layouts_are_checked():
    bucket = make_bucket(sizes=[(4, 6)], saved=False)
    bucket.grads[0] = bucket.grads[0].t().contiguous().t()  # same shape, other memory order
    with pytest.raises(ValueError, match="layout"):
        triton_backend.first_trial(bucket, PassArgs(make_hyper(), Move(0.5, decay=0.5), GRADIENT))
    transposed = make_bucket(sizes=[(6, 4)], saved=False, seed=12)
    for stream in (transposed.params, transposed.grads, transposed.exp_avg, transposed.exp_avg_sq):
        stream[0] = stream[0].t()  # all streams transposed alike: dense, one layout, accepted
    on_triton, on_torch, _, _, _ = run_both(
        transposed, lambda be, b: be.first_trial(b, PassArgs(make_hyper(), Move(0.5, decay=0.5), GRADIENT)))
    assert_buckets_match(on_triton, on_torch)


@pytest.mark.parametrize("loss_value", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("found_inf_value", [None, 0.0, 1.0])
@pytest.mark.parametrize("misaligned", [False, True])
def test_plain_step_counts_the_step_once_as_the_reference(loss_value, found_inf_value, misaligned):
    """step_counts gets [loss non-finite and found_inf not set, found_inf set] once per call, from
    the kernel, as base.count_step counts it; a misaligned view adds a launch, not a count."""
    counts = {}
    for backend in (torch_backend, triton_backend):
        bucket = make_bucket(saved=False)
        if misaligned:
            storage = torch.randn(9, device=DEVICE)
            bucket.params[0] = storage[1:8]
            bucket.grads[0] = torch.randn(9, device=DEVICE)[1:8]
            bucket.exp_avg[0] = torch.zeros(7, device=DEVICE)
            bucket.exp_avg_sq[0] = torch.zeros(7, device=DEVICE)
        step_counts = torch.tensor([3, 5], dtype=torch.int64, device=DEVICE)  # counts accumulate
        found_inf = None if found_inf_value is None else torch.tensor(found_inf_value, device=DEVICE)
        backend.plain_step(bucket, PassArgs(make_hyper(), Move(0.3, decay=0.3)), torch.tensor(loss_value, device=DEVICE),
                           found_inf=found_inf, nonfinite_count=torch.zeros((), dtype=torch.int64, device=DEVICE),
                           step_counts=step_counts)
        counts[backend.name] = step_counts.tolist()
    expected = [3 + int(loss_value != 1.0 and found_inf_value != 1.0), 5 + int(found_inf_value == 1.0)]
    assert counts["torch"] == expected
    assert counts["triton"] == expected


def test_plain_step_rejects_malformed_step_counts():
    bucket = make_bucket(saved=False)
    with pytest.raises(TypeError, match="step_counts must be an int64 tensor of 2 elements"):
        triton_backend.plain_step(bucket, PassArgs(make_hyper(), Move(0.3, decay=0.3)), torch.tensor(1.0, device=DEVICE),
                                  step_counts=torch.zeros(2, device=DEVICE))


def test_every_bf16_gradient_and_weight_is_widened_exactly():
    """All 65536 bf16 bit patterns as gradients (raw direction: w - 2g) and as weights (a zero
    step: w kept): bitwise torch's result, subnormals included (the interpreter's own bf16 -> fp32
    cast flushed or misplaced values below 1.18e-38; the kernels widen by the bits, as the GPU does)."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(patterns.float())
    values = torch.where(finite, patterns, torch.zeros_like(patterns))
    for weights, grads, move in ((torch.zeros_like(values), values, Move(step=-2.0)),
                                 (values, torch.ones_like(values), Move(step=0.0))):
        bucket = Bucket([weights.clone()], [grads.clone()], [torch.zeros(values.shape)], [torch.zeros(values.shape)],
                        None, DEVICE, torch.bfloat16, group_index=0)
        on_triton, on_torch = clone_bucket(bucket), clone_bucket(bucket)
        triton_backend.first_trial(on_triton, PassArgs(make_hyper(), move, RAW))
        torch_backend.first_trial(on_torch, PassArgs(make_hyper(), move, RAW))
        assert torch.equal(on_triton.params[0].view(torch.int16), on_torch.params[0].view(torch.int16))


def test_a_bucket_beyond_the_launch_grid_is_refused_by_name():
    """Block indices are int32 and CUDA's grid holds 2^31 - 1 programs: a table that large is refused,
    not wrapped (about 4.4e12 elements at the aligned block size; checked on the counts alone)."""
    from salsa_fused.backends.triton_backend import _MAX_BLOCKS, _block_table

    with pytest.raises(ValueError, match="needs 2147483648 blocks, more than 2147483647"):
        _block_table(torch.tensor([_MAX_BLOCKS, 1]))
    assert _block_table(torch.tensor([2, 0, 1])).tolist() == [[0, 0], [0, 1], [2, 0]]


@pytest.mark.parametrize("direction", [MOMENTUM, RAW])
@pytest.mark.parametrize("scale", [0.0, float("nan")])
def test_plain_step_counts_no_padding_lane_of_a_partial_block(direction, scale):
    """A GradScaler scale of 0 (or NaN) makes every gradient non-finite, and the padding lanes of a tensor's
    last block too (their g is 0 / scale): they are not elements, and the count is the reference's (the Triton
    kernels counted every lane of each tensor's last block; an audit's 3000 elements read 4096)."""
    bucket = make_bucket(dtype=torch.float32, saved=False, seed=6)
    counts = {}

    def step(backend, b):
        counts[backend.name] = torch.zeros((), dtype=torch.int64, device=DEVICE)
        backend.plain_step(b, PassArgs(make_hyper(), Move(1e-3), direction, torch.tensor(scale, device=DEVICE)),
                           torch.tensor(1.0, device=DEVICE), nonfinite_count=counts[backend.name])

    run_both(bucket, step)
    assert int(counts["torch"]) == sum(p.numel() for p in bucket.params)
    assert int(counts["triton"]) == int(counts["torch"])
