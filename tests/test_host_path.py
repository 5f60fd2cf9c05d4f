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


_COUNT_IN_A_CLEAN_PROCESS = """
import json, os, sys, torch, salsa_fused
from benchmarks import host_overhead as H
print(json.dumps(H.calls_by_function(148, torch.device("cpu"), "cpp", False, steps=20, warmup=3,
                                     made_in=os.path.dirname(salsa_fused.__file__))))
"""


def test_the_plain_step_makes_no_more_python_calls_of_its_own_than_it_did():
    """The host path's budget, counted where it is spent: the calls the package's own code makes in a plain
    step at GPT-2 small's 148 tensors (launches stubbed; ``benchmarks.host_overhead --calls 148`` prints the
    total, 152.5 with torch's wrapper). 136.7 on torch 2.13 / Python 3.11; a check added to the plain step
    costs calls here, and belongs on the search steps or where the buckets are built (9e183bc added 2, a146d78
    took them back; the version counters the kernels bump, a correctness fix, added 4 a bucket; letting go of the
    gradients when the step ends, which held a gradient set through the caller's next backward, 2). Counted in a new interpreter with a bare environment, so that no earlier test's state and
    no variable of the caller's shell enters the count. The project's CI once read 131.7 at fbc84ea, where
    every run here (alone, in the whole suite, from a fresh clone, at its path) read 130.7; the cause was not
    found, so the bound leaves that one call of slack and a failure lists the calls by callee."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _COUNT_IN_A_CLEAN_PROCESS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    by_function = json.loads(done.stdout.strip().splitlines()[-1])
    calls = sum(by_function.values()) / 20
    assert calls <= 136.7 + 1, (f"the plain step's own Python calls rose to {calls} (136.7); per step, by callee: "
                                + ", ".join(f"{name} {count / 20:g}" for name, count in sorted(by_function.items())))


def _steps_through_torchs_wrapper(opt, monkeypatch, **step_kwargs) -> int:
    """How many of three plain steps ran torch's step wrapper (it calls ``_optimizer_step_code`` after the step)."""
    calls = []
    monkeypatch.setattr(opt, "_optimizer_step_code", lambda: calls.append(1))
    loss = torch.tensor(1.0)
    for _ in range(3):
        opt.step(lambda: loss, loss=loss, **step_kwargs)
    return len(calls)


def test_torchs_step_wrapper_runs_only_while_a_hook_or_a_profiler_is_there(monkeypatch):
    """The wrapper (hooks, the profiler's range) cost a third of a plain step's host time: skipped when
    nothing would see it, run as torch runs it once a hook is registered mid-run or a profiler records."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    _, opt = _plain_optimizer("torch")
    assert _steps_through_torchs_wrapper(opt, monkeypatch) == 0
    seen = []
    handle = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", args[1:], kwargs)))
    assert _steps_through_torchs_wrapper(opt, monkeypatch) == 3
    assert [kind for kind, *_ in seen] == ["post"] * 3 and set(seen[0][2]) == {"loss"}
    handle.remove()
    assert _steps_through_torchs_wrapper(opt, monkeypatch) == 0
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("global", args[1:], kwargs)))
    try:
        assert _steps_through_torchs_wrapper(opt, monkeypatch) == 3
    finally:
        handle.remove()
    assert [kind for kind, *_ in seen[3:]] == ["global"] * 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        assert _steps_through_torchs_wrapper(opt, monkeypatch) == 3
    ranges = [e for e in profiler.events() if e.name == "Optimizer.step#FusedSaLSa.step"]
    assert len(ranges) == 3
    assert _steps_through_torchs_wrapper(opt, monkeypatch) == 0


def test_a_pre_hook_sees_the_arguments_as_called_and_may_replace_them():
    params, opt = _plain_optimizer("torch")
    loss, other = torch.tensor(1.0), torch.tensor(float("nan"))  # a NaN loss: the plain step changes nothing
    seen = []

    def pre_hook(o, args, kwargs):
        seen.append((len(args), sorted(kwargs)))
        return args, {**kwargs, "loss": other}

    opt.register_step_pre_hook(pre_hook)
    before = [p.detach().clone() for p in params]
    assert opt.step(closure=lambda: loss, loss=loss) is other
    assert seen == [(1, ["closure", "loss"])]
    assert all(torch.equal(b, p) for b, p in zip(before, params))


def test_a_subclass_with_a_step_of_its_own_runs_the_hooks_once_per_step():
    """torch wraps the subclass's ``step`` in its hooks; its ``super().step()`` runs none again."""
    class Logged(FusedSaLSa):
        def step(self, closure=None, *, loss=None):
            return super().step(closure, loss=loss)

    _plain_optimizer("torch")  # a FusedSaLSa built first: torch wrapped its step once, it ran the hooks twice
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8))]
    params[0].grad = torch.randn(8)
    opt = Logged(params, backend="torch", schedule=NeverSearch(), init_step_size=1e-3)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    loss = torch.tensor(1.0)
    for _ in range(2):
        opt.step(lambda: loss, loss=loss)
    assert calls == ["pre", "post"] * 2


def test_step_keeps_its_signature_and_torchs_mark():
    import inspect
    _, opt = _plain_optimizer("torch")
    assert str(inspect.signature(opt.step)) == "(closure: 'Optional[LossClosure]' = None, *, loss=None)"
    assert type(opt).step.hooked and "One SaLSa step" in type(opt).step.__doc__


@pytest.mark.parametrize("loss", [torch.tensor(2.5), torch.tensor([2.5]), torch.tensor(2.5, dtype=torch.float64),
                                  torch.tensor([[2.5]], dtype=torch.bfloat16), torch.tensor(2.5, requires_grad=True) * 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_steps_loss_scalar_is_the_detached_reshaped_cast_loss(loss, dtype):
    """``loss_scalar`` skips reshape and cast when they change nothing (about 2 us a plain step)."""
    from salsa_fused.closures import loss_scalar
    for device in (None, torch.device("cpu")):
        got, want = loss_scalar(loss, device, dtype), loss.detach().reshape(()).to(device=device, dtype=dtype)
        assert (got.shape, got.dtype, got.device, got.requires_grad) == (want.shape, want.dtype, want.device, False)
        assert torch.equal(got, want)
        assert (got.data_ptr() == loss.data_ptr()) == (want.data_ptr() == loss.data_ptr())  # a view where it was one
