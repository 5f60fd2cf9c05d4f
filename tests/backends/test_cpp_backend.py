"""The C++ CPU backend against the torch reference backend, pass by pass.

Every test runs the same call on two copies of a bucket, one through each backend, and
compares all streams. The kernels use the reference's operation forms with its roundings
(salsa_math.h), with one exception: their square root is IEEE (correctly rounded), while
torch's CPU ``sqrt`` is off by one ulp on ~17% of fp32 elements, at any tensor size (torch 2.13.0
on AVX2; a property of the torch build). So the bitwise tests run
the reference with an IEEE square root (the ``ieee_sqrt_reference`` fixture): then
weights, moments and saved copies must agree to the bit for fp32, bf16 and fp16 weights
alike; against the unmodified reference the difference is bounded by that one ulp.
q is compared to rounding: the reference sums per tensor in torch's reduction order, the
kernel in fixed-size chunks (and is checked to give the same bits with any thread count).

The optimizer on this backend against salsa-optimizer 0.1.0: tests/test_reference_parity.py.
Skipped (a failure under tests/conftest.py) when the extension is not built.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from salsa_fused import _compat, _ext
from salsa_fused.backends import cpp_backend, torch_backend
from salsa_fused.backends.base import GRADIENT, MOMENTUM, RAW, Bucket, Hyper, Move, PassArgs

pytestmark = pytest.mark.skipif(not cpp_backend.is_available(),
                                reason=f"the C++ extension is not built; {_ext.build_hint()}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 1 << 15  # csrc/cpu/salsa_cpu.cpp: elements per chunk
# Odd sizes: one element, a 0-dim tensor, not a multiple of the vector width or of the q
# lanes, a chunk +- 1, a matrix, an empty tensor.
SIZES = [(1,), (), (7,), (4097,), (CHUNK - 1,), (CHUNK + 1,), (3, 5), (0,)]


def make_hyper(weight_decay: float = 0.0, k: int = 3) -> Hyper:
    beta1, beta2 = 0.9, 0.999
    return Hyper(beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay,
                 bias_correction1=1 - beta1 ** (k + 1), bias_correction2=1 - beta2 ** (k + 1), lr=1.0)


def make_bucket(sizes=SIZES, dtype=torch.float32, saved: bool = True, seed: int = 0,
                grad_dtype: torch.dtype = None) -> Bucket:
    """A bucket mid-training: m correlated with g, v positive, weights O(1)."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, exp_avg, exp_avg_sq = [], [], [], []
    for shape in sizes:
        g = torch.randn(shape, generator=gen)
        params.append(torch.randn(shape, generator=gen).to(dtype))
        grads.append(g.to(grad_dtype or dtype))
        exp_avg.append(0.1 * g + 0.05 * torch.randn(shape, generator=gen))
        exp_avg_sq.append(0.002 * g * g + 1e-3 * torch.rand(shape, generator=gen))
    copies = [torch.full_like(p, float("nan")) for p in params] if saved else None
    return Bucket(params, grads, exp_avg, exp_avg_sq, copies, torch.device("cpu"), dtype, group_index=0)


def clone_bucket(bucket: Bucket) -> Bucket:
    def copy(tensors):
        return None if tensors is None else [t.clone() for t in tensors]
    return Bucket(copy(bucket.params), copy(bucket.grads), copy(bucket.exp_avg), copy(bucket.exp_avg_sq),
                  copy(bucket.saved), bucket.device, bucket.dtype, bucket.group_index)


def assert_buckets_equal(ours: Bucket, reference: Bucket, what: str) -> None:
    streams = ("params", "exp_avg", "exp_avg_sq") + (("saved",) if reference.saved is not None else ())
    for stream in streams:
        for i, (a, b) in enumerate(zip(getattr(ours, stream), getattr(reference, stream))):
            same = (a.view(-1).view(torch.int16 if a.element_size() == 2 else torch.int32)
                    == b.view(-1).view(torch.int16 if b.element_size() == 2 else torch.int32))
            if not bool(same.all()):
                where = (~same).nonzero().view(-1)[:5].tolist()
                diff = (a.float() - b.float()).abs().max().item()
                raise AssertionError(f"{what}: {stream}[{i}] (shape {tuple(a.shape)}) differs at flat indices "
                                     f"{where} (max |diff| {diff:.3e}, {int((~same).sum())} elements)")


def both(fn_name: str, bucket: Bucket, *args, **kwargs):
    """Run one pass through both backends on copies of ``bucket``; (ours, reference, results)."""
    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    with torch.no_grad():
        result_ours = getattr(cpp_backend, fn_name)(ours, *args, **kwargs)
        result_ref = getattr(torch_backend, fn_name)(reference, *args, **kwargs)
    return ours, reference, result_ours, result_ref


def _ieee_sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt: the double sqrt of an fp32 value rounds to the fp32 one."""
    return t.double().sqrt().to(t.dtype)


@pytest.fixture
def ieee_sqrt_reference(monkeypatch):
    """The torch backend with an IEEE square root, both where it calls one (foreach and blocked)."""
    def foreach_sqrt_(tensors):
        for t in tensors:
            t.copy_(_ieee_sqrt(t))

    original_sqrt_ = torch.Tensor.sqrt_
    monkeypatch.setattr(_compat, "foreach_sqrt_", foreach_sqrt_)
    monkeypatch.setattr(torch.Tensor, "sqrt_", lambda t: t.copy_(_ieee_sqrt(t)) if t.dtype == torch.float32
                        else original_sqrt_(t))


GRAD_SCALE = torch.tensor(1024.0)
CASES = list(itertools.product(DTYPES, (GRADIENT, MOMENTUM, RAW), (0.0, 0.1), (None, GRAD_SCALE)))
CASE_IDS = [f"{str(d).split('.')[-1]}-{direction}-wd{wd}-{'scaled' if s is not None else 'unscaled'}"
            for d, direction, wd, s in CASES]


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype,direction,weight_decay,grad_scale", CASES, ids=CASE_IDS)
def test_first_trial_retrial_restore_bitwise(dtype, direction, weight_decay, grad_scale):
    check_search_passes(dtype, direction, weight_decay, grad_scale)


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
@pytest.mark.parametrize("grad_scale", [None, GRAD_SCALE], ids=["unscaled", "scaled"])
def test_search_passes_with_fp32_gradients_on_16_bit_weights_bitwise(dtype, direction, grad_scale):
    """16-bit weights with fp32 gradients (an fp32 master gradient, autocast) take their own kernels: fp16
    ones read the gradients in place, 8 a vector beside the converted weights, where fp16 gradients are
    converted too. Only the plain step was compared for these."""
    check_search_passes(dtype, direction, 0.1, grad_scale, grad_dtype=torch.float32)


def check_search_passes(dtype, direction, weight_decay, grad_scale, grad_dtype=None):
    """first_trial, retrial and restore, with the saved copy and in place, bitwise to the reference."""
    hyper = make_hyper(weight_decay)
    grads_scale = 1.0 if grad_scale is None else float(grad_scale)
    for saved in (True, False):
        bucket = make_bucket(dtype=dtype, saved=saved, grad_dtype=grad_dtype)
        bucket.grads = [(g.float() * grads_scale).to(g.dtype) for g in bucket.grads]
        what = f"{dtype} {direction} wd={weight_decay} saved={saved} grads {grad_dtype or dtype}"
        ours, reference, _, _ = both("first_trial", bucket,
                                     PassArgs(hyper, Move(0.3, decay=0.3), direction, grad_scale))
        assert_buckets_equal(ours, reference, "first_trial " + what)
        with torch.no_grad():
            for trial_bucket, backend in ((ours, cpp_backend), (reference, torch_backend)):
                backend.retrial(trial_bucket, PassArgs(hyper, Move(0.24, 0.3, 0.3), direction, grad_scale))
        assert_buckets_equal(ours, reference, "retrial " + what)
        with torch.no_grad():
            for trial_bucket, backend in ((ours, cpp_backend), (reference, torch_backend)):
                backend.restore(trial_bucket, PassArgs(hyper, Move(0.0, 0.24, 0.3), direction, grad_scale))
        assert_buckets_equal(ours, reference, "restore " + what)


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype,direction,weight_decay,grad_scale", CASES, ids=CASE_IDS)
def test_slope_matches_reference(dtype, direction, weight_decay, grad_scale):
    bucket = make_bucket(dtype=dtype, saved=False)
    ours, reference, q_ours, q_ref = both("slope", bucket, PassArgs(make_hyper(weight_decay), direction=direction,
                                                                grad_scale=grad_scale))
    assert q_ours.dtype == torch.float32 and q_ours.dim() == 0
    # Along raw every term g*g is positive and of one size, so the kernel's fp32 lanes (2048
    # terms each per chunk) drift most: measured 3.7e-6 from the float64 sum with bf16 gradients
    # (the reference: 5e-8).
    torch.testing.assert_close(q_ours, q_ref, rtol=1e-5 if direction == RAW else 2e-6, atol=0)
    assert_buckets_equal(ours, reference, "slope writes nothing")


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.float16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "fp16-fp32-grads"])
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
@pytest.mark.parametrize("grad_scale", [None, GRAD_SCALE], ids=["unscaled", "scaled"])
def test_each_slope_term_bitwise(dtype, grad_dtype, direction, grad_scale):
    """q of a tensor whose gradient is zero but at one element is that element's term alone, so it must equal
    the reference's bit for bit; the sums above round a term's last bits away (a term computed as g * (g * p)
    instead of (g * g) * p passed them). Every position of a 16-lane block, of the next one and of the tail."""
    n = 2 * 16 + 9
    scale = 1.0 if grad_scale is None else float(grad_scale)
    args = PassArgs(make_hyper(), direction=direction, grad_scale=grad_scale)
    bucket = make_bucket(sizes=[(n,)], dtype=dtype, saved=False, grad_dtype=grad_dtype)
    gen = torch.Generator().manual_seed(1)
    for round_ in range(4):
        values = torch.randn(n, generator=gen) * scale
        for position in range(n):
            grad = torch.zeros(n)
            grad[position] = values[position]
            bucket.grads = [grad.to(grad_dtype)]
            _, _, q_ours, q_ref = both("slope", bucket, args)
            assert q_ref.item() != 0.0
            assert q_ours.view(torch.int32).item() == q_ref.view(torch.int32).item(), (
                f"round {round_}, element {position}: q {q_ours.item()!r}, reference {q_ref.item()!r}")


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
def test_views_at_odd_offsets_bitwise(direction):
    """Every stream a contiguous view one element into its storage (not vector-aligned):
    the kernels' aligned fast paths (AVX2 streaming stores) peel and stay bitwise equal."""
    def offset(tensors):
        return [torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t) for t in tensors]

    bucket = make_bucket(sizes=[(4097,), (CHUNK + 3,), (5,)], saved=True)
    bucket = Bucket(offset(bucket.params), offset(bucket.grads), offset(bucket.exp_avg), offset(bucket.exp_avg_sq),
                    offset(bucket.saved), bucket.device, bucket.dtype, 0)
    hyper = make_hyper(0.1)
    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    with torch.no_grad():
        for b, backend in ((ours, cpp_backend), (reference, torch_backend)):
            b.params = offset(b.params)
            b.saved = offset(b.saved)
            backend.first_trial(b, PassArgs(hyper, Move(0.3, decay=0.3), direction))
            backend.retrial(b, PassArgs(hyper, Move(0.24, 0.3, 0.3), direction))
    assert ours.params[0].data_ptr() % 32 != 0
    assert_buckets_equal(ours, reference, f"offset views {direction}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_the_unmodified_reference_within_one_sqrt_ulp(dtype):
    """With torch's own sqrt the reference's precond differs by at most one ulp, so the
    weights differ by at most step * |d| * 2^-23 plus one rounding of the weights' dtype."""
    bucket = make_bucket(dtype=dtype, saved=True)
    ours, reference, _, _ = both("first_trial", bucket, PassArgs(make_hyper(0.1), Move(0.3, decay=0.3), GRADIENT))
    for a, b, g, v in zip(ours.params, reference.params, ours.grads, ours.exp_avg_sq):
        d = g.float() / ((v / make_hyper().bias_correction2).sqrt() + 1e-8)
        bound = 0.3 * d.abs() * 2.0 ** -22 + b.float().abs() * torch.finfo(dtype).eps
        assert bool(((a.float() - b.float()).abs() <= bound).all())
    for stream in ("exp_avg", "exp_avg_sq", "saved"):
        for a, b in zip(getattr(ours, stream), getattr(reference, stream)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_gradient_and_weight_is_widened_exactly(dtype):
    """All 65536 bit patterns as gradients (raw direction: w + 2g) and as weights (a zero step: w
    kept), the non-finite ones zeroed: bitwise the reference's result, subnormals included (the
    kernels widen fp16 by the bits, branch-free so that GCC vectorizes them)."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    values = torch.where(torch.isfinite(patterns.float()), patterns, torch.zeros_like(patterns))
    for weights, grads, move in ((torch.zeros_like(values), values, Move(step=-2.0)),
                                 (values, torch.ones_like(values), Move(step=0.0))):
        bucket = Bucket([weights], [grads], [torch.zeros(values.shape)], [torch.zeros(values.shape)], None,
                        torch.device("cpu"), dtype, group_index=0)
        ours, reference, _, _ = both("first_trial", bucket, PassArgs(make_hyper(), move, RAW))
        assert_buckets_equal(ours, reference, f"{dtype} widened")


def test_fp32_values_are_narrowed_to_fp16_as_torch_rounds():
    """Each positive finite fp16 value, the fp32 midpoint to the next one (a tie: to even) and the
    fp32 neighbours of that midpoint, with both signs, stored as fp16 weights (w = 0 + g, fp32
    gradients, a first trial): bitwise the reference's result, across subnormals, the normal
    boundary and the overflow bound (a trial's weights may round to inf; the search rejects it)."""
    below = torch.arange(0, 0x7c00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    above = torch.arange(1, 0x7c01, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    above[-1] = 65536.0  # past the largest finite fp16: the midpoint 65520 rounds to inf
    middle = (below + above) / 2
    next_up, next_down = torch.nextafter(middle, above), torch.nextafter(middle, below)
    values = torch.cat([below, middle, next_up, next_down])
    values = torch.cat([values, -values])
    bucket = Bucket([torch.zeros(values.shape, dtype=torch.float16)], [values], [torch.zeros(values.shape)],
                    [torch.zeros(values.shape)], None, torch.device("cpu"), torch.float16, group_index=0)
    ours, reference, _, _ = both("first_trial", bucket, PassArgs(make_hyper(), Move(step=-1.0), RAW))
    assert_buckets_equal(ours, reference, "fp32 narrowed to fp16")
    assert ours.params[0].isinf().sum() == 4 and ours.params[0].isnan().sum() == 0


def test_slope_bits_independent_of_thread_count():
    bucket = make_bucket(sizes=[(3 * CHUNK + 5,), (CHUNK,), (17,)], saved=False)
    threads = torch.get_num_threads()
    values = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            values.append(cpp_backend.slope(bucket, PassArgs(make_hyper(), direction=GRADIENT)).item())
    finally:
        torch.set_num_threads(threads)
    assert values[0] == values[1] == values[2]


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_dtype", ["same", "fp32"])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])  # Adam's m_hat step, or along g
def test_plain_step_bitwise(dtype, weight_decay, grad_dtype, direction):
    bucket = make_bucket(dtype=dtype, saved=False, grad_dtype=torch.float32 if grad_dtype == "fp32" else None)
    for grad_scale in (None, GRAD_SCALE):
        ours, reference, _, _ = both("plain_step", bucket, PassArgs(make_hyper(weight_decay), Move(0.37, decay=0.37),
                                                               direction, grad_scale), torch.tensor(2.5))
        assert_buckets_equal(ours, reference, f"plain_step {direction} {dtype} grads {grad_dtype} scale {grad_scale}")
        if direction == RAW:
            assert_buckets_equal(Bucket(bucket.params, ours.grads, ours.exp_avg, ours.exp_avg_sq, None,
                                        bucket.device, dtype, 0), bucket, "raw leaves the moments alone")


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_per_element_guard_and_count(dtype, direction):
    bucket = make_bucket(dtype=dtype, saved=False)
    bucket.grads[3][[0, 100, 4096]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    bucket.grads[5][CHUNK] = float("nan")  # the element past the first chunk
    bucket.grads[0][0] = float("inf")
    counts = [torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)]
    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    with torch.no_grad():
        cpp_backend.plain_step(ours, PassArgs(make_hyper(0.1), Move(0.37, decay=0.37), direction), torch.tensor(1.0),
                               nonfinite_count=counts[0])
        torch_backend.plain_step(reference, PassArgs(make_hyper(0.1), Move(0.37, decay=0.37), direction),
                                 torch.tensor(1.0), nonfinite_count=counts[1])
    assert_buckets_equal(ours, reference, f"guarded plain_step {direction} {dtype}")
    assert int(counts[0]) == int(counts[1]) == 5
    assert torch.equal(ours.params[3][:1], bucket.params[3][:1])  # the NaN element kept its weight
    for stream in (ours.params, ours.exp_avg, ours.exp_avg_sq):
        assert all(bool(torch.isfinite(t).all()) for t in stream)


@pytest.mark.usefixtures("ieee_sqrt_reference")
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_keeps_fp16_weights_that_would_overflow_in_every_lane(direction, grad_dtype):
    """The fp16 plain step moves 8 elements a vector, the last n % 8 one by one: in every lane of
    both, an element whose new weight would round to inf keeps its weight and is counted, and one
    just inside the range moves. Along raw the move lands on the edge itself (65504 + 16 = 65520
    rounds to inf; 65504 + 15.984375 rounds to 65504). The small-tensor tests of
    tests/backends/test_kernel_edges.py reach only the one-by-one loop."""
    n = 8 * 4 + 7  # element i: past the edge where i % 3 == 0, just inside where i % 3 == 1, else O(1)
    kind = torch.arange(n) % 3
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    gen = torch.Generator().manual_seed(5)
    if direction == RAW:  # w - step * g, step 1
        weights = torch.where(kind < 2, 65504.0, torch.randn(n, generator=gen)) * sign
        grads = torch.where(kind == 0, -16.0, torch.where(kind == 1, -15.984375, torch.randn(n, generator=gen)))
        grads = grads * torch.where(kind < 2, sign, 1.0)
        step = 1.0
    else:  # m = v = 0, bias corrections 1 - beta: d = sign(g) to an ulp or two
        weights = torch.where(kind == 0, 65000.0, torch.where(kind == 1, 60000.0, 1.0)) * sign
        grads = -sign * torch.where(kind < 2, 1.0, 0.5 + torch.rand(n, generator=gen))
        step = 2000.0
    bucket = Bucket([weights.to(torch.float16)], [grads.to(grad_dtype)], [torch.zeros(n)], [torch.zeros(n)],
                    None, torch.device("cpu"), torch.float16, group_index=0)
    hyper = Hyper(beta1=0.9, beta2=0.999, eps=1e-20, weight_decay=0.0, bias_correction1=0.1, bias_correction2=0.001,
                  lr=1.0)
    counts = [torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64)]
    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    with torch.no_grad():
        for module, target, count in ((cpp_backend, ours, counts[0]), (torch_backend, reference, counts[1])):
            module.plain_step(target, PassArgs(hyper, Move(step), direction), torch.tensor(1.0),
                              nonfinite_count=count)
    assert_buckets_equal(ours, reference, f"fp16 plain_step at the edge, {direction}, grads {grad_dtype}")
    edge = kind == 0
    assert int(counts[0]) == int(counts[1]) == int(edge.sum())
    assert torch.equal(ours.params[0][edge], bucket.params[0][edge])
    assert torch.isfinite(ours.params[0]).all()
    if direction == RAW:
        assert torch.equal(ours.params[0][kind == 1], bucket.params[0][kind == 1])  # 65519.98 rounds to 65504
    else:
        assert bool((ours.params[0][~edge] != bucket.params[0][~edge]).all())
        assert bool((ours.exp_avg[0] != 0).all())  # the kept elements' moments take their finite gradients


@pytest.mark.parametrize("loss,found_inf", [(float("nan"), None), (float("inf"), None), (1e39, None),
                                            (1.0, torch.tensor(1.0)), (1.0, torch.tensor(float("inf")))])
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_plain_step_whole_step_guards_change_nothing(loss, found_inf, direction):
    bucket = make_bucket(saved=False)
    count = torch.zeros((), dtype=torch.int64)
    ours = clone_bucket(bucket)
    with torch.no_grad():
        cpp_backend.plain_step(ours, PassArgs(make_hyper(), Move(0.37, decay=0.37), direction),
                               torch.tensor(loss, dtype=torch.float64), found_inf=found_inf, nonfinite_count=count)
    assert_buckets_equal(ours, bucket, "guarded step")
    assert int(count) == 0


@pytest.mark.usefixtures("ieee_sqrt_reference")
def test_plain_step_found_inf_zero_steps():
    bucket = make_bucket(saved=False)
    ours, reference, _, _ = both("plain_step", bucket, PassArgs(make_hyper(), Move(0.37, decay=0.37)),
                                 torch.tensor(1.0), found_inf=torch.tensor(0.0))
    assert_buckets_equal(ours, reference, "found_inf = 0")


def test_one_op_call_per_pass_and_no_allocation_on_plain_step():
    """Each pass is exactly one call of its op for the whole bucket (148 tensors here); a plain
    step dispatches nothing else (no aten::empty, no copies)."""
    sizes = [(64,)] * 100 + [(7, 9)] * 48
    bucket = make_bucket(sizes=sizes, saved=True)
    hyper = make_hyper(0.1)
    loss = torch.tensor(1.0)
    step, retry, back = (PassArgs(hyper, move, GRADIENT) for move in (Move(0.1, decay=0.1), Move(0.08, 0.1, 0.1),
                                                                        Move(0.0, 0.08, 0.1)))
    passes = {
        "salsa_fused::plain_step_": lambda: cpp_backend.plain_step(bucket, step, loss),
        "salsa_fused::slope": lambda: cpp_backend.slope(bucket, step),
        "salsa_fused::first_trial_": lambda: cpp_backend.first_trial(bucket, step),
        "salsa_fused::retrial_": lambda: cpp_backend.retrial(bucket, retry),
        "salsa_fused::restore_": lambda: cpp_backend.restore(bucket, back),
    }
    for op_name, run in passes.items():
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        names = [event.name for event in prof.events()]
        assert names.count(op_name) == 1, (op_name, names)
        if op_name == "salsa_fused::plain_step_":
            assert names == [op_name], names  # nothing allocated, nothing else dispatched


def test_plain_step_allocates_no_memory():
    bucket = make_bucket(sizes=[(4097,), (CHUNK + 1,)], saved=False)
    loss = torch.tensor(1.0)
    with torch.no_grad():
        cpp_backend.plain_step(bucket, PassArgs(make_hyper(), Move(0.1, decay=0.1)), loss)  # warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            cpp_backend.plain_step(bucket, PassArgs(make_hyper(), Move(0.1, decay=0.1)), loss)
    assert sum(event.cpu_memory_usage for event in prof.events()) == 0
    assert all(event.cpu_memory_usage == 0 for event in prof.events())


def test_bad_input_raises_and_writes_nothing():
    bucket = make_bucket(saved=True)
    bad = clone_bucket(bucket)
    bad.exp_avg[-1] = bad.exp_avg[-1].double()
    before = clone_bucket(bad)
    with torch.no_grad(), pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq must be fp32"):
        cpp_backend.first_trial(bad, PassArgs(make_hyper(), Move(0.1), GRADIENT))
    bad.exp_avg[-1] = bad.exp_avg[-1].float()
    assert_buckets_equal(bad, before, "a rejected call")
    mixed = clone_bucket(bucket)
    mixed.params[0] = mixed.params[0].to(torch.bfloat16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="share one dtype"):
        cpp_backend.plain_step(mixed, PassArgs(make_hyper(), Move(0.1)), torch.tensor(1.0))
    strided = clone_bucket(bucket)
    strided.grads[6] = torch.randn(5, 3).t()  # (3, 5) transposed: not the weight's layout
    with torch.no_grad(), pytest.raises(RuntimeError, match="memory layout"):
        cpp_backend.retrial(strided, PassArgs(make_hyper(), Move(0.1, 0.2), GRADIENT))
    with pytest.raises(ValueError, match="unknown direction"):
        cpp_backend.first_trial(bucket, PassArgs(make_hyper(), Move(0.1), "sideways"))
    with torch.no_grad(), pytest.raises(RuntimeError, match="direction must be 0 .gradient., 1 .momentum. or 2 .raw."):
        torch.ops.salsa_fused.slope(bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, 0.9, 0.999, 0.1, 0.01, 1e-8, 3,
                                    None)


def test_a_pass_that_writes_weights_refuses_an_empty_weight_list():
    """Only the slope reads no weights; the others wrote through a null pointer (SIGSEGV) when handed none."""
    bucket = make_bucket(saved=True)
    before = clone_bucket(bucket)
    ops, hyper = torch.ops.salsa_fused, (0.9, 0.999, 0.1, 0.001, 1e-8, 1.0, 0.1)
    lists = (bucket.grads, bucket.exp_avg, bucket.exp_avg_sq)
    calls = {
        "first_trial_": lambda: ops.first_trial_([], *lists, bucket.saved, *hyper, 0, None),
        "plain_step_": lambda: ops.plain_step_([], *lists, *hyper, 1, torch.tensor(1.0), None, None, None),
        "restore_": lambda: ops.restore_([], *lists, bucket.saved, 0.1, 0.001, 1e-8, 1.0, 0.1, 0, None),
        "retrial_": lambda: ops.retrial_([], *lists, [], 0.1, 0.001, 1e-8, 1.0, 0.1, 0.2, 0, None),
    }
    for name, call in calls.items():
        with torch.no_grad(), pytest.raises(RuntimeError, match="one entry per parameter"):
            call()
        assert_buckets_equal(bucket, before, name)


def test_params_the_kernels_cannot_take_send_auto_to_torch_and_are_refused_by_name():
    """float64 (or a strided view with gaps) with the extension built: ``"auto"`` runs the torch
    backend for every parameter and trains, saying so once, with the tensor and its reason (a new user
    found one float64 scalar beside a float32 model slow the whole step 3x, silently); ``backend="cpp"`` and
    ``fused=True`` refuse at construction, naming it."""
    import copy
    import warnings

    from salsa_fused import FusedSaLSa

    double = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    gappy = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    for param, reason in ((double, r"torch.float64 \(the kernels take"), (gappy, "not dense")):
        before = param.detach().clone()
        dense = torch.nn.Parameter(torch.randn(3))
        with pytest.warns(RuntimeWarning, match=r"backend='auto' runs every parameter on the torch backend .*"
                                                rf"param_groups\[1\]\['params'\]\[0\] is {reason}.*keep the cpp backend"):
            opt = FusedSaLSa([{"params": [dense]}, {"params": [param]}], init_step_size=0.1)
        assert opt.backend.name == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: not again for a copy or another group
            copy.deepcopy(opt)
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]})
            opt = FusedSaLSa([param], init_step_size=0.1, backend="torch")  # chosen: no warning
        assert opt.backend.name == "torch"
        opt.step(lambda: (param.float() ** 2).sum())
        assert not torch.equal(param, before) and torch.isfinite(param).all()
        for options in ({"backend": "cpp"}, {"fused": True}):
            with pytest.raises(ValueError, match="float64|not dense"):
                FusedSaLSa([param], **options)
    assert cpp_backend.unsupported(torch.zeros(3, dtype=torch.bfloat16)) is None
    assert cpp_backend.unsupported(torch.zeros(5, 3).t()) is None  # dense in another order


def test_a_model_the_kernels_cannot_take_at_all_is_not_told_to_keep_its_others_on_them():
    """Every parameter float64 (a model.double()): there are no others to keep on the kernels, so the warning
    says none suits them instead of advising an optimizer of its own for the first tensor (an audit)."""
    from salsa_fused import FusedSaLSa

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    with pytest.warns(RuntimeWarning, match=r"backend='auto' runs every parameter on the torch backend .*"
                                            r"torch.float64.*none of its 4 parameters suits those kernels") as seen:
        opt = FusedSaLSa(model.parameters())
    assert not any("optimizer of its own" in str(w.message) for w in seen)
    assert opt.backend.name == "torch"


def test_weights_cast_after_construction_choose_the_backend_again():
    """``model.double()`` after construction: ``"auto"`` moves to the torch reference and back to
    cpp after ``model.float()``; ``backend="cpp"`` refuses by name (the kernel's own message
    was all there was), with the weights and moments unchanged, and again on a retry."""
    from salsa_fused import FusedSaLSa

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for backend in ("auto", "cpp"):
        model = torch.nn.Linear(4, 1)
        opt = FusedSaLSa(model.parameters(), backend=backend)
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        model.double()
        closure = lambda: torch.nn.functional.mse_loss(model(x.double()), y.double())  # noqa: E731
        opt.zero_grad()
        if backend == "auto":
            opt.step(closure)
            assert opt.backend.name == "torch" and torch.isfinite(model.weight).all()
            model.float()
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
            assert opt.backend.name == "cpp"
            continue
        before = ([p.detach().clone() for p in model.parameters()],
                  [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()], opt.search_state.step)
        for _ in range(2):
            opt.zero_grad()
            with pytest.raises(ValueError, match=r"backend='cpp' cannot take param_groups\[0\]\['params'\]\[0\]: "
                                                 r"it is torch.float64"):
                opt.step(closure)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))
        assert all(torch.equal(opt.state[p][k], v) for p, s in zip(model.parameters(), before[1]) for k, v in s.items())
        assert opt.search_state.step == before[2]


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", ImportError("No module named 'salsa_fused._C'"))
    assert not cpp_backend.is_available()
    with pytest.raises(RuntimeError, match="build_ext --inplace.*SALSA_FUSED_JIT=1"):
        cpp_backend.plain_step(make_bucket(saved=False), PassArgs(make_hyper(), Move(0.1)), torch.tensor(1.0))


def test_the_build_hint_offers_the_jit_build_only_where_it_can_run(monkeypatch):
    """An installed wheel has no csrc/ to JIT-compile, and with SALSA_FUSED_JIT=1 set the hint
    repeated the variable whose failure was the reason."""
    monkeypatch.delenv("SALSA_FUSED_JIT", raising=False)
    assert "SALSA_FUSED_JIT=1" in _ext.build_hint() and "build_ext --inplace" in _ext.build_hint()
    monkeypatch.setenv("SALSA_FUSED_JIT", "1")
    assert "SALSA_FUSED_JIT" not in _ext.build_hint()
    monkeypatch.setattr(_ext, "_in_a_checkout", lambda: False)
    monkeypatch.setattr(_ext, "_compiled_in", lambda directory: False)
    hint = _ext.build_hint()
    assert "SALSA_FUSED_JIT" not in hint and "build_ext" not in hint
    assert "reinstall from a source checkout or the sdist" in hint


def test_the_build_hint_names_a_compiled_extension_that_is_there_but_not_loaded(monkeypatch, tmp_path):
    """An audit's two installs: SALSA_FUSED_JIT=1 in a regular install ignored its compiled _C and said to
    reinstall; Python started in the checkout after `pip install .` imported the checkout's package, without
    _C, and the hint said to run the `pip install .` just run."""
    monkeypatch.setenv("SALSA_FUSED_JIT", "1")
    monkeypatch.setattr(_ext, "_in_a_checkout", lambda: False)
    monkeypatch.setattr(_ext, "_compiled_in", lambda directory: True)
    assert _ext.build_hint() == ("SALSA_FUSED_JIT=1 compiles the csrc/ sources of a source checkout, which an "
                                 "installed package has not; unset it to load the extension compiled into this "
                                 "installation")
    monkeypatch.delenv("SALSA_FUSED_JIT")
    monkeypatch.undo()
    site = tmp_path / "salsa_fused"
    site.mkdir()
    (site / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")

    class Installed:
        metadata = {"Name": "salsa_fused"}

        def __init__(self, root):
            self.root = root

        def locate_file(self, name):
            return self.root / name

    import importlib.metadata
    monkeypatch.delenv("SALSA_FUSED_JIT", raising=False)
    # the checkout's own salsa_fused.egg-info, which `pip install .` leaves and the checkout finds first, names
    # the checkout's package: the installed copy is the next one (the hint never fired with the egg-info there)
    checkout = Installed(Path(_ext.__file__).resolve().parents[1])
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter([checkout, Installed(tmp_path)]))
    monkeypatch.setattr(_ext, "_in_a_checkout", lambda: True)
    hint = _ext.build_hint()
    assert f"ahead of the installed copy that has one ({site}): run from outside the checkout" in hint
    assert "build it here too with `python setup.py build_ext --inplace`" in hint


def test_ops_compose_with_torch_compile():
    """The ops trace under torch.compile (fake tensors, functionalized in-place writes)."""
    bucket = make_bucket(sizes=[(33,), (4, 5)], saved=False)
    eager = clone_bucket(bucket)
    plain = PassArgs(make_hyper(0.1), Move(0.2, decay=0.2))  # built outside: dynamo does not trace Move()
    along_momentum = PassArgs(make_hyper(0.1), direction=MOMENTUM)

    def step(params, grads, exp_avg, exp_avg_sq, loss):
        b = Bucket(params, grads, exp_avg, exp_avg_sq, None, torch.device("cpu"), torch.float32, 0)
        cpp_backend.plain_step(b, plain, loss)
        return cpp_backend.slope(b, along_momentum)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        q_compiled = compiled(bucket.params, bucket.grads, bucket.exp_avg, bucket.exp_avg_sq, torch.tensor(1.0))
        q_eager = step(eager.params, eager.grads, eager.exp_avg, eager.exp_avg_sq, torch.tensor(1.0))
    assert torch.equal(q_compiled, q_eager)
    assert_buckets_equal(bucket, eager, "compiled plain step")


# --- CUDA kernels (csrc/cuda/): run only where the extension was built with them -----------

cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and cpp_backend.supports("cuda")),
                                  reason="the extension was built without CUDA kernels, or no GPU")
# On CUDA, torch divides by a Python scalar as a multiplication by its reciprocal (one more
# rounding than the kernels' IEEE division), so the reference differs there: about one element
# in 25,000 lands an ulp or two away at the scale of the operands, which, where w and eta*d
# nearly cancel, is far from the result's own ulp (measured on an H200: 1.1e-7 on an fp32
# weight of 2e-3; 2 bf16 ulps on a weight of 0.48). So: the dtype's relative tolerance plus
# two ulps at the tensor's largest magnitude.
CUDA_RTOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _cuda_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> dict:
    magnitudes = torch.nan_to_num(reference.detach().float().abs(), nan=0.0, posinf=0.0)
    scale = float(magnitudes.max()) if reference.numel() else 0.0
    return dict(rtol=CUDA_RTOL[dtype], atol=2 * torch.finfo(dtype).eps * scale + 1e-30)


def _to_cuda(bucket: Bucket) -> Bucket:
    def move(tensors):
        return None if tensors is None else [t.cuda() for t in tensors]
    return Bucket(move(bucket.params), move(bucket.grads), move(bucket.exp_avg), move(bucket.exp_avg_sq),
                  move(bucket.saved), torch.device("cuda"), bucket.dtype, bucket.group_index)


def _assert_buckets_close(ours: Bucket, reference: Bucket, dtype: torch.dtype, what: str) -> None:
    streams = ("params", "exp_avg", "exp_avg_sq") + (("saved",) if reference.saved is not None else ())
    for stream in streams:
        for i, (a, b) in enumerate(zip(getattr(ours, stream), getattr(reference, stream))):
            tolerance = _cuda_tolerance(b, dtype if stream in ("params", "saved") else torch.float32)
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{what}: {stream}[{i}]: {m}")


@cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
def test_cuda_passes_match_reference(dtype, direction):
    hyper = make_hyper(0.1)
    for saved in (True, False):
        bucket = _to_cuda(make_bucket(sizes=SIZES + [(3 * 8192 + 5,)], dtype=dtype, saved=saved))
        ours, reference = clone_bucket(bucket), clone_bucket(bucket)
        with torch.no_grad():
            q = [backend.slope(b, PassArgs(hyper, direction=direction))
                 for b, backend in ((ours, cpp_backend), (reference, torch_backend))]
            torch.testing.assert_close(q[0], q[1], rtol=1e-5, atol=0)
            for b, backend in ((ours, cpp_backend), (reference, torch_backend)):
                backend.first_trial(b, PassArgs(hyper, Move(0.3, decay=0.3), direction))
            _assert_buckets_close(ours, reference, dtype, f"first_trial saved={saved}")
            for b, backend in ((ours, cpp_backend), (reference, torch_backend)):
                backend.retrial(b, PassArgs(hyper, Move(0.24, 0.3, 0.3), direction))
            _assert_buckets_close(ours, reference, dtype, f"retrial saved={saved}")
            for b, backend in ((ours, cpp_backend), (reference, torch_backend)):
                backend.restore(b, PassArgs(hyper, Move(0.0, 0.24, 0.3), direction))
            _assert_buckets_close(ours, reference, dtype, f"restore saved={saved}")


@cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", [GRADIENT, RAW])
def test_cuda_plain_step_guards(dtype, direction):
    bucket = _to_cuda(make_bucket(dtype=dtype, saved=False))
    bucket.grads[3][[0, 100, 4096]] = float("nan")
    ours, reference = clone_bucket(bucket), clone_bucket(bucket)
    counts = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(2)]
    plain = PassArgs(make_hyper(), Move(0.37, decay=0.37), direction)
    with torch.no_grad():
        cpp_backend.plain_step(ours, plain, torch.tensor(1.0, device="cuda"), nonfinite_count=counts[0])
        torch_backend.plain_step(reference, plain, torch.tensor(1.0, device="cuda"), nonfinite_count=counts[1])
    _assert_buckets_close(ours, reference, dtype, f"guarded plain step {direction}")
    assert int(counts[0]) == int(counts[1]) == 3
    if direction == RAW:
        assert all(torch.equal(a, b) for a, b in zip(ours.exp_avg + ours.exp_avg_sq, bucket.exp_avg + bucket.exp_avg_sq))
    untouched = clone_bucket(bucket)
    with torch.no_grad():
        cpp_backend.plain_step(untouched, plain, torch.tensor(float("nan"), device="cuda"))
        cpp_backend.plain_step(untouched, plain, torch.tensor(1.0, device="cuda"),
                               found_inf=torch.ones((), device="cuda"))
    assert_buckets_equal(untouched, bucket, "skipped CUDA steps")


@pytest.mark.parametrize("direction", [GRADIENT, MOMENTUM, RAW])
@pytest.mark.parametrize("grad_scale", [None, 4.0])
def test_fp16_gradients_sum_q_in_the_order_of_fp32_ones(direction, grad_scale):
    """fp16 gradients go through fp32 blocks (F16C) while fp32 ones are read in place; both sums of q
    must keep one order (lanes, then the tail), so the same values give the same bits."""
    bucket = make_bucket(dtype=torch.float16, saved=False)
    as_fp32 = Bucket(bucket.params, [g.float() for g in bucket.grads], bucket.exp_avg, bucket.exp_avg_sq, None,
                     bucket.device, bucket.dtype, group_index=0)
    scale = None if grad_scale is None else torch.tensor([grad_scale])
    args = PassArgs(make_hyper(), direction=direction, grad_scale=scale)
    assert cpp_backend.slope(bucket, args).item() == cpp_backend.slope(as_fp32, args).item()


_LOSSES = [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("-inf")),
           torch.tensor(1e39, dtype=torch.float64), torch.tensor(3e38, dtype=torch.float64),
           torch.tensor(float("inf"), dtype=torch.float16), torch.tensor([float("nan")], dtype=torch.bfloat16)]
_FOUND_INF = [None, torch.tensor(0.0), torch.tensor([1.0]), torch.tensor(float("nan")),
              torch.tensor(1e-50, dtype=torch.float64)]


@pytest.mark.parametrize("loss", _LOSSES, ids=lambda t: f"{t.dtype}-{t.item()}")
@pytest.mark.parametrize("found_inf", _FOUND_INF, ids=lambda t: "none" if t is None else f"{t.dtype}-{t.item()}")
def test_plain_step_counts_on_the_host_as_the_torch_form(loss, found_inf):
    """The plain step's count of CPU tensors is read and written on the host (seven dispatched ops
    in the torch form: about 12 us a step); the same counts, and one in-place add each as there."""
    from salsa_fused.backends import base
    counted = torch.tensor([3, 5], dtype=torch.int64)
    expected = counted.clone()
    base.count_step(expected, loss, found_inf)
    version = counted._version
    assert _ext.module().count_plain_step(counted, loss, found_inf) is True
    assert counted.tolist() == expected.tolist()
    assert counted._version - version == (1 if found_inf is None else 2)


def test_plain_step_counts_with_torch_ops_what_the_host_count_does_not_take():
    """Other shapes, dtypes or a subclass go to the torch form, which names what is wrong."""
    from salsa_fused.backends import base
    count = _ext.module().count_plain_step
    counts = torch.zeros(2, dtype=torch.int64)
    assert count(counts, torch.tensor([1.0, 2.0]), None) is False  # not one loss
    assert count(counts, torch.tensor(1), None) is False  # an integer loss
    assert count(torch.zeros(2), torch.tensor(1.0), None) is False  # float counters
    assert count(torch.zeros(3, dtype=torch.int64), torch.tensor(1.0), None) is False
    assert count(counts, torch.tensor(1.0), torch.tensor([0.0, 0.0])) is False
    assert counts.tolist() == [0, 0]
    bucket = Bucket([torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], None,
                    torch.device("cpu"), torch.float32, 0)
    with pytest.raises(RuntimeError):  # the torch form's reshape of a two-element loss
        cpp_backend.plain_step(bucket, PassArgs(make_hyper(), Move(0.1)), torch.tensor([1.0, 2.0]), step_counts=counts)
    with pytest.raises(RuntimeError):
        base.count_step(counts, torch.tensor([1.0, 2.0]), None)


@pytest.mark.parametrize("with_scaler", [False, True])
def test_optimizer_plain_step_counts_on_the_host(with_scaler, monkeypatch):
    """The optimizer's plain steps on CPU tensors count without the torch form, the skip taken back alike."""
    from salsa_fused import FusedSaLSa

    class NeverSearch:
        def scale(self, step):
            return 1.0

        def searches(self, step):
            return False

    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 7)]
    opt = FusedSaLSa(params, backend="cpp", schedule=NeverSearch(), init_step_size=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    if with_scaler:
        opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    monkeypatch.setattr(cpp_backend, "count_step", lambda *args: pytest.fail("counted with torch ops"))
    weights = [p.detach().clone() for p in params]
    nan = torch.tensor(float("nan"))
    opt.step(lambda: nan, loss=nan)
    assert opt._counts.step_counts.tolist() == [int(not with_scaler), 0]
    assert opt.search_state.step == int(not with_scaler)
    assert all(torch.equal(w, p) for w, p in zip(weights, params))
