"""torch.compile inside the loss function, and host reads on plain steps.

Trial forwards run under ``torch.no_grad()``, which dynamo guards on: the compiled model
gets one graph for the training forward and one for trial forwards, after which no
step compiles anything (``error_on_recompile`` turns any recompilation into an error).

Plain steps: every method that reads a tensor's value on the host (``item``, ``tolist``,
``bool``, ``float``, ``int``, ``numpy``...) is patched to record its caller. The
optimizer itself never reads; the triton backend never reads (its kernels guard on the
device); the torch reference backend reads its two documented finiteness flags per
bucket (``torch_backend.plain_step``) and nothing else.
"""

import importlib.util
import os
import sys

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from salsa_fused import FusedSaLSa
from salsa_fused.backends.torch_backend import cpu_step_units
from salsa_fused.line_search import plan_step


PACKAGE_DIR = os.path.dirname(os.path.abspath(sys.modules["salsa_fused"].__file__))
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))


def batch(k):
    g = torch.Generator().manual_seed(k % 5)
    x = torch.randn(32, 8, generator=g)
    return x, x[:, :1].sin()


def warmed_optimizer(model, **kwargs):
    """Past its first searches (equal fast/slow eta averages): searches every 3 steps."""
    opt = FusedSaLSa(model.parameters(), init_step_size=0.05, always_search_steps=1,
                     max_search_interval=3, **kwargs)
    search = opt.search_state
    search.step_size_fast = search.step_size_slow = 0.05
    opt._commit(search)
    return opt


class HostReadLog:
    """Patches the host-read methods of torch.Tensor; records (file, function) of each caller."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.active = False
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        log = self

        def wrapper(tensor, *args, **kwargs):
            if log.active:
                caller = sys._getframe(1)
                log.calls.append((name, caller.f_code.co_filename, caller.f_code.co_name))
            return original(tensor, *args, **kwargs)
        return wrapper

    def ours(self):
        return [c for c in self.calls if c[1].startswith(PACKAGE_DIR)]


def run_steps(opt, loss_of, steps, log=None, set_to_none=True):
    kinds = []
    for k in range(steps):
        is_search = plan_step(opt.search_state, opt.search_config).is_search
        x, y = batch(k)
        opt.zero_grad(set_to_none=set_to_none)
        if log is not None:
            log.active = not is_search
        opt.step(lambda: loss_of(x, y))
        if log is not None:
            log.active = False
        kinds.append(is_search)
    return kinds


def test_compiled_model_no_recompilation_after_warmup(monkeypatch):
    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, backend="inductor")
    opt = warmed_optimizer(model, backend="torch")
    loss_of = lambda x, y: F.mse_loss(compiled(x), y)  # noqa: E731
    run_steps(opt, loss_of, 2)  # step 1 searches: grad and no-grad graphs
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2
    log = HostReadLog(monkeypatch)
    # the config's own patch: monkeypatch's undo cannot restore a dynamo config entry
    with torch._dynamo.config.patch(error_on_recompile=True):
        kinds = run_steps(opt, loss_of, 10, log)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert any(kinds) and not all(kinds)  # searches (trial forwards) and plain steps both ran
    assert opt.num_forward_evals > 12
    # plain steps with a compiled model: only the reference backend's documented flag reads
    plain_steps = kinds.count(False)
    ours = log.ours()
    # (one loss flag per bucket in plain_step, one gradient flag per block or group of the blocked CPU pass)
    assert all(f.endswith(os.path.join("backends", "torch_backend.py"))
               and fn in ("plain_step", "_plain_step_blocked", "_foreach_plain_step") for _, f, fn in ours), ours
    assert sum(fn == "plain_step" for _, _, fn in ours) == plain_steps
    units = cpu_step_units([p.numel() for p in model.parameters() if p.requires_grad])
    assert sum(fn in ("_plain_step_blocked", "_foreach_plain_step") for _, _, fn in ours) == plain_steps * len(units)
    # the compiled model trains like the eager one (same decisions, weights to rounding)
    eager_model = make_model()
    eager_opt = warmed_optimizer(eager_model, backend="torch")
    eager_loss = lambda x, y: F.mse_loss(eager_model(x), y)  # noqa: E731
    run_steps(eager_opt, eager_loss, 2)
    run_steps(eager_opt, eager_loss, 10)
    assert eager_opt.num_searches == opt.num_searches
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_optimizer_and_triton_plain_steps_read_nothing_on_the_host(monkeypatch):
    from salsa_fused.backends import triton_usable
    if not triton_usable(torch.device("cpu")) and not torch.cuda.is_available():
        if importlib.util.find_spec("triton") is None:
            pytest.fail('Triton is not installed: pip install -e ".[test]"')
        from salsa_fused.backends import triton_backend
        try:
            triton_backend.check(torch.device("cpu"))
        except RuntimeError as error:
            pytest.fail(f"triton backend unusable on the CPU: {error}")
    model = make_model()
    opt = warmed_optimizer(model, backend="triton")
    loss_of = lambda x, y: F.mse_loss(model(x), y)  # noqa: E731
    # Gradients kept in place (zero_grad(set_to_none=False)), so the kernels' pointer tables,
    # built on the host from Python lists when the tensors change, are built once here.
    run_steps(opt, loss_of, 2, set_to_none=False)
    log = HostReadLog(monkeypatch)
    kinds = run_steps(opt, loss_of, 6, log, set_to_none=False)
    assert kinds.count(False) >= 3
    assert log.ours() == []


def test_compiling_the_step_itself_runs_it_eagerly_bitwise_with_no_graph():
    """``torch.compile(opt.step)``, as AdamW users do: the step is host-side search logic around
    fused passes (``torch.compiler.disable``), so it runs eagerly, bitwise the uncompiled step,
    while the model the closure calls keeps its own graphs."""
    torch._dynamo.reset()
    runs = []
    for compile_step in (False, True):
        model = make_model()
        compiled_model = torch.compile(model, backend="eager")
        opt = warmed_optimizer(model)
        step = torch.compile(opt.step, backend="eager") if compile_step else opt.step
        with torch._dynamo.config.patch(error_on_recompile=compile_step):
            for k in range(12):
                x, y = batch(k)
                opt.zero_grad()
                step(lambda: F.mse_loss(compiled_model(x), y))
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state))
    (eager_weights, eager_search), (weights, search) = runs
    assert all(torch.equal(a, b) for a, b in zip(eager_weights, weights))
    assert search == eager_search and search.num_searches < 12  # plain steps ran too


@pytest.mark.parametrize("compile_step", [False, True])
def test_a_warning_from_the_step_names_the_callers_line_through_any_wrapper(compile_step):
    """torch wraps ``step`` (its hooks, ``torch.compiler.disable``): a fixed stacklevel pointed
    into torch once the disable wrapper was added."""
    import warnings
    model = make_model()
    opt = FusedSaLSa(model.parameters(), lr=0.01)  # an AdamW-like lr: warned at the first step
    step = torch.compile(opt.step, backend="eager") if compile_step else opt.step
    x, y = batch(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step(lambda: F.mse_loss(model(x), y))
    (found,) = [w for w in record if "multiplier on the level" in str(w.message)]
    assert found.filename == __file__


@pytest.mark.parametrize("form", ["one-phase", "two-phase"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_compiled_training_step_around_zero_grad_and_step_is_the_eager_one_and_never_recompiles(form, backend):
    """docs/integrations.md: ``torch.compile`` of a whole training step (zero_grad, the caller's forward
    and backward, step) breaks the graph at the step, runs it eagerly, and recompiles nothing after
    its first steps: bitwise the uncompiled loop, searches and plain steps alike."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = make_model()
        opt = warmed_optimizer(model, backend=backend)

        def train_step(x, y):
            opt.zero_grad()
            if form == "one-phase":
                return opt.step(lambda: F.mse_loss(model(x), y))
            opt.mark_forward()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return opt.step(lambda: F.mse_loss(model(x), y), loss=loss)

        step = torch.compile(train_step, backend="eager") if compiled else train_step
        for k in range(3):
            step(*batch(k))
        with torch._dynamo.config.patch(error_on_recompile=compiled):
            for k in range(3, 12):
                step(*batch(k))
        runs.append(([p.detach().clone() for p in model.parameters()], opt.search_state))
    (eager_weights, eager_search), (weights, search) = runs
    assert all(torch.equal(a, b) for a, b in zip(eager_weights, weights))
    assert search == eager_search and 1 < search.num_searches < 12  # plain steps ran too
