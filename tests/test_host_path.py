"""The plain step's host path: what it does instead of Python context managers and repeated
lookups leaves the state as they did (grad mode on return and on a raise)."""
import pytest
import torch

from salsa_fused import FusedSaLSa


class NeverSearch:
    def scale(self, step):
        return 1.0

    def searches(self, step):
        return False


def _plain_optimizer(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(3, 4))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedSaLSa(params, backend=backend, schedule=NeverSearch(), init_step_size=1e-3)
    return params, opt


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_plain_step_leaves_grad_mode_as_it_found_it(backend, grad_mode):
    params, opt = _plain_optimizer(backend)
    loss = torch.tensor(1.0)
    before = [p.detach().clone() for p in params]
    with torch.set_grad_enabled(grad_mode):
        for _ in range(3):
            opt.step(lambda: loss, loss=loss)
            assert torch.is_grad_enabled() is grad_mode
    assert all(not torch.equal(b, p) for b, p in zip(before, params))  # the steps moved the weights
    assert all(p.grad_fn is None for p in params)  # written without autograd


def test_plain_step_restores_grad_mode_when_its_pass_raises(monkeypatch):
    params, opt = _plain_optimizer("torch")
    loss = torch.tensor(1.0)
    opt.step(lambda: loss, loss=loss)
    seen = []

    def failing(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        raise RuntimeError("pass failed")

    monkeypatch.setattr(opt.backend, "plain_step", failing)
    with pytest.raises(RuntimeError, match="pass failed"):
        opt.step(lambda: loss, loss=loss)
    assert seen == [False]  # the pass ran without grad
    assert torch.is_grad_enabled()  # and the step gave it back


def test_cpp_ops_still_refuse_when_the_extension_is_not_loaded(monkeypatch):
    """``_ops()`` skips ``require()`` once the extension is loaded; not loaded, it raises as before."""
    from salsa_fused import _ext
    from salsa_fused.backends import cpp_backend
    assert cpp_backend._ops() is torch.ops.salsa_fused
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", ImportError("No module named 'salsa_fused._C'"))
    with pytest.raises(RuntimeError, match="C\\+\\+ extension is not available"):
        cpp_backend._ops()


def test_host_overhead_counts_python_calls_per_plain_step_deterministically():
    from benchmarks import host_overhead as H
    counts = {H.python_calls(4, torch.device("cpu"), "torch", grad, steps=20, warmup=2) for grad in (False, False)}
    assert len(counts) == 1 and 20 < counts.pop() < 1000
