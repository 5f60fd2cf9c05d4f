"""Kernel edge cases found by reading (issue 16, item 8), through FusedSaLSa on each backend:
a finite gradient whose square overflows fp32, and parameters on a CUDA device that is not
the current one."""

from __future__ import annotations

import pytest
import torch

from salsa_fused import FusedSaLSa


HUGE = 2e19  # finite in fp32, but HUGE * HUGE = 4e38 > 3.4e38 overflows


def _backend(name):
    if name == "triton":
        pytest.importorskip("triton")
    return name


class _SearchFirstStepOnly:
    """A schedule (the ``schedule=`` protocol) that searches on step 1 only: later steps are plain."""

    def scale(self, step):
        return 1.0

    def searches(self, step):
        return step <= 1


def _state_tensors(opt):
    return [v for state in opt.state_dict()["state"].values() for v in state.values()
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("backend, path", [("torch", "plain"), ("triton", "plain"), ("cpp", "plain"),
                                           ("torch", "search"), ("triton", "search"), ("cpp", "search")])
def test_a_finite_gradient_whose_square_overflows_writes_nothing_infinite(backend, path):
    weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    opt = FusedSaLSa([weight], backend=_backend(backend), nonfinite="skip",
                     schedule=_SearchFirstStepOnly())
    closure = lambda: (weight ** 2).sum()  # noqa: E731
    if path == "plain":  # a searched step first, so the huge gradient meets a plain step
        opt.zero_grad()
        opt.step(closure)
    opt.zero_grad()
    loss = closure()
    loss.backward()
    with torch.no_grad():
        weight.grad[3] = HUGE
    opt.step(closure, loss=loss.detach())
    assert torch.isfinite(weight).all()
    for tensor in _state_tensors(opt):
        assert torch.isfinite(tensor).all(), "a moment became inf"
    opt.zero_grad()  # and the next step is an ordinary one
    opt.step(closure)
    assert torch.isfinite(weight).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameters_on_a_cuda_device_that_is_not_current(backend):
    """Parameters on cuda:1 while cuda:0 is current: the passes must run on cuda:1 and give
    the same weights as the same run on cuda:0."""
    results = []
    for index in (0, 1):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4).to(f"cuda:{index}")
        x = torch.randn(32, 16, device=f"cuda:{index}")
        opt = FusedSaLSa(model.parameters(), backend=_backend(backend))
        with torch.cuda.device(0):
            for _ in range(12):  # searches and plain steps
                opt.zero_grad()
                opt.step(lambda: model(x).pow(2).mean())
            torch.cuda.synchronize(index)
        results.append([p.detach().cpu() for p in model.parameters()])
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("relayout", ["transposed", "strided", "expanded"])
def test_a_gradient_laid_out_otherwise_than_its_weight_steps_as_a_dense_one(backend, relayout):
    """A gradient with a transpose's strides, a non-dense view or an expanded tensor: the step is
    the one its dense copy gives, on every backend, on search and plain steps."""
    def run(odd):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(5, 3))
        opt = FusedSaLSa([{"params": [a]}, {"params": [b]}], backend=_backend(backend),
                         schedule=_SearchFirstStepOnly())
        loss_fn = lambda: ((a - 0.3) ** 2).mean() + (b.sin() ** 2).mean()  # noqa: E731
        for _ in range(3):  # a search, then plain steps
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            g = b.grad
            if relayout == "expanded":  # the same values in both runs: a row repeated
                g = g[:1].expand(5, 3) if odd else g[:1].repeat(5, 1)
            elif odd and relayout == "transposed":
                g = g.t().contiguous().t()
            elif odd:
                g = torch.zeros(5, 6).index_copy_(1, torch.arange(0, 6, 2), g)[:, ::2]
            b.grad = g
            opt.step(loss_fn, loss=loss.detach())
        return a.detach().clone(), b.detach().clone(), opt.search_state

    dense, odd = run(False), run(True)
    assert torch.equal(dense[0], odd[0]) and torch.equal(dense[1], odd[1]) and dense[2] == odd[2]


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("relayout", ["transposed", "strided"])
def test_a_gradient_at_an_address_seen_before_with_another_layout_steps_as_a_dense_one(backend, relayout):
    """A persistent gradient buffer handed in with the weight's layout, then at the same address and
    dtype with a transpose's or a gap's strides: validated again and copied into the weight's layout
    (the layout check was keyed by address and dtype: triton streamed the transpose as if dense,
    cpp refused it)."""
    def run(odd):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, 6))
        target = torch.randn(5, 6)
        opt = FusedSaLSa([w], backend=_backend(backend), schedule=_SearchFirstStepOnly())
        loss_fn = lambda: ((w - target) ** 2).sum() + w.sin().sum()  # noqa: E731
        buffer = torch.zeros(60)
        for step in range(4):  # a search, then plain steps
            opt.zero_grad()
            loss = loss_fn()
            (g,) = torch.autograd.grad(loss, w)
            if odd and step % 2 == 1:
                grad = buffer[:30].view(6, 5).t() if relayout == "transposed" else buffer.view(5, 12)[:, ::2]
            else:
                grad = buffer[:30].view(5, 6)
            with torch.no_grad():
                grad.copy_(g)
            w.grad = grad
            opt.step(loss_fn, loss=loss.detach())
        return w.detach().clone(), opt.state[w]["exp_avg"].clone(), opt.search_state

    dense, odd = run(False), run(True)
    assert torch.equal(dense[0], odd[0]) and torch.equal(dense[1], odd[1]) and dense[2] == odd[2]


class _SearchFirstThenScaled:
    """Searches on step 1 only; later (plain) steps apply the searched level times ``plain_scale``."""

    def __init__(self):
        self.plain_scale = 1.0

    def scale(self, step):
        return 1.0 if step <= 1 else self.plain_scale

    def searches(self, step):
        return step <= 1


# Per 16-bit dtype: weights (two at the dtype's edge) and the plain step's move, which takes the
# edge ones past the largest finite value (float16: 65520 rounds to inf; bf16: 0x7F7F8000 does, an
# fp32 value that is finite) and leaves the others finite.
EDGES = {torch.float16: ([65000.0, -65000.0, 60000.0, 0.0, 1.0, -100.0], 2000.0),
         torch.bfloat16: ([3.3895e38, -3.3895e38, 1e38, 0.0, 1.0, -100.0], 1e36)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_plain_step_that_would_overflow_16_bit_weights_keeps_those_elements(backend, dtype):
    """An element whose new 16-bit weight would round to inf keeps its weight (its moments take the
    finite gradient) and is counted with the non-finite elements; every other element takes the step."""
    values, move = EDGES[dtype]
    weight = torch.nn.Parameter(torch.tensor(values, dtype=dtype))
    # |g| = 0.01 keeps the loss inside fp32 at bf16's edge; eps far below it keeps |d| at 1
    outward = torch.tensor([-0.01 if v >= 0 else 0.01 for v in values], dtype=torch.float64)
    schedule = _SearchFirstThenScaled()
    opt = FusedSaLSa([weight], backend=_backend(backend), nonfinite="skip", schedule=schedule, eps=1e-20)
    closure = lambda: (weight.double() * outward).sum()  # noqa: E731  d = sign(g): w moves outward
    opt.zero_grad()
    opt.step(closure)
    schedule.plain_scale = move / opt.applied_steps[0]  # the next step moves about `move` (|d| is 1)
    before_w = weight.detach().clone()
    before_m = [t.clone() for t in _state_tensors(opt) if t.numel() == len(values)]
    opt.zero_grad()
    opt.step(closure)
    edge = torch.tensor([True, True] + [False] * (len(values) - 2))
    assert torch.isfinite(weight).all()
    assert torch.equal(weight.detach()[edge], before_w[edge])
    assert bool((weight.detach()[~edge] != before_w[~edge]).all())
    after_m = [t for t in _state_tensors(opt) if t.numel() == len(values)]
    assert len(after_m) == 2
    for m0, m1 in zip(before_m, after_m):
        assert bool((m1 != m0).all()) and torch.isfinite(m1).all()
    assert opt.report_nonfinite() == (2, 0)
    assert opt.search_state.num_nonfinite_elements == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_raw_plain_step_that_would_overflow_16_bit_weights_keeps_those_weights(backend, dtype):
    """Along raw (``w - step * g``, seed 001's rules), the same check: the edge weights stay, the
    others move by exactly ``step * g``, and the kept ones are counted."""
    from salsa_fused.backends import cpp_backend, torch_backend, triton_backend
    from salsa_fused.backends.base import RAW, Bucket, Hyper, Move, PassArgs

    module = {"torch": torch_backend, "cpp": cpp_backend, "triton": triton_backend}[_backend(backend)]
    values, step = EDGES[dtype]
    weights = torch.tensor(values, dtype=dtype)
    grads = torch.tensor([-1.0 if v >= 0 else 1.0 for v in values], dtype=dtype)  # w - step * g: outward
    bucket = Bucket(params=[weights.clone()], grads=[grads], exp_avg=[torch.zeros(len(values))],
                    exp_avg_sq=[torch.zeros(len(values))], saved=None, device=torch.device("cpu"), dtype=dtype,
                    group_index=0)
    hyper = Hyper(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=0.1,
                  bias_correction2=0.001, lr=1.0)
    count = torch.zeros((), dtype=torch.int64)
    module.plain_step(bucket, PassArgs(hyper, Move(step, decay=0.0), RAW), torch.tensor(1.0), nonfinite_count=count)
    edge = torch.tensor([True, True] + [False] * (len(values) - 2))
    moved = bucket.params[0]
    assert torch.isfinite(moved).all() and int(count) == 2
    assert torch.equal(moved[edge], weights[edge])
    expected = (weights.double() - step * grads.double()).to(dtype)
    assert torch.equal(moved[~edge], expected[~edge])


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_every_write_of_a_step_bumps_the_version_of_what_it_wrote(backend):
    """The kernels write through raw pointers: they bump the weights' and moments' version counters as torch's
    in-place ops do (the cpp and Triton passes bumped nothing, so a cache keyed on ``_version`` read every
    trial and every later step at stale weights)."""
    weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))
    opt = FusedSaLSa([weight], backend=_backend(backend), schedule=_SearchFirstStepOnly())
    seen = []

    def closure():
        seen.append(weight._version)
        return (weight ** 2).sum()

    for _ in range(3):  # a search step, then plain steps
        before = weight._version
        moments = [opt.state[weight][key]._version for key in ("exp_avg", "exp_avg_sq")] if opt.state else None
        opt.zero_grad()
        opt.step(closure)
        assert weight._version > before
        if moments is not None:
            assert [opt.state[weight][key]._version for key in ("exp_avg", "exp_avg_sq")] > moments
    first_step = seen[:opt.search_state.last_trials + 1]  # the step's own forward, then one per trial
    assert len(first_step) >= 2 and len(set(first_step)) == len(first_step), seen


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("searches", [True, False])
def test_a_graph_that_saved_a_weight_before_the_step_refuses_its_backward_after_it(backend, searches):
    """A GAN's generator loss whose graph saved the discriminator's weight, its backward run after the
    discriminator's step: autograd refuses it under AdamW; under the cpp and Triton backends it ran silently on
    the new weights (a generator bias gradient of -1.55 for 0.0037)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))
    opt = FusedSaLSa([weight], backend=_backend(backend), schedule=_SearchFirstStepOnly())
    x = torch.randn(4)
    closure = lambda: (weight * x).pow(2).sum()  # noqa: E731
    if not searches:  # step 1 searches: the stepped graph meets a plain step 2
        opt.step(closure)
        opt.zero_grad()
    generated = torch.randn(4, requires_grad=True)  # the generator's output
    held = (weight * generated).sum()  # saves weight, for generated's gradient
    opt.step(closure)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        held.backward()
