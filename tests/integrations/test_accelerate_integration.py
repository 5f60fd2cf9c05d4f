"""FusedSaLSa through accelerate: prepare(), accumulate(), and no search on steps that do not update. The
scripts that need a fresh interpreter run in a background job (tests/background.py)."""

import contextlib
import os
import sys

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import GradientAccumulationPlugin  # noqa: E402

from salsa_fused import FusedSaLSa  # noqa: E402
from salsa_fused.integrations.accelerate import SaLSaAccumulation  # noqa: E402
from tests import background  # noqa: E402
from tests.models import tanh_mlp  # noqa: E402

ACCUMULATE, UPDATES = 3, 4


def make_model():
    return tanh_mlp(6, 16, 1)


def batches():
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 6, generator=generator), torch.randn(4, 1, generator=generator))
            for _ in range(ACCUMULATE * UPDATES)]


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def reference_weights(start):
    """Plain two-phase loop with hand-written accumulation (the README form)."""
    model = make_model()
    model.load_state_dict(start)
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=0.1)
    data = batches()
    after = []
    for update in range(UPDATES):
        window = data[update * ACCUMULATE:(update + 1) * ACCUMULATE]
        total = 0.0
        opt.mark_forward()  # as the integration marks: its closure replays the window's forwards
        for batch in window:
            loss = mse(model, batch) / ACCUMULATE
            loss.backward()
            total = total + loss.detach()
        opt.step(lambda: sum(mse(model, b) / ACCUMULATE for b in window), loss=total)
        opt.zero_grad()
        after.append([p.detach().clone() for p in model.parameters()])
    return after, opt


def test_prepare_and_accumulate_match_plain_loop():
    model = make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=ACCUMULATE, sync_with_dataloader=False))
    data = batches()
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch",
                                                              init_step_size=0.1))
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    calls = []

    def loss_of(batch):
        calls.append(torch.is_grad_enabled())
        return mse(model, batch)

    search = SaLSaAccumulation(accelerator, optimizer, loss_of)
    salsa = search.salsa
    after, counts = [], []
    for index, batch in enumerate(data):
        before = [p.detach().clone() for p in model.parameters()]
        with accelerator.accumulate(model):
            search.backward(batch)
            updates = accelerator.sync_gradients
            optimizer.step()
            optimizer.zero_grad()
        counts.append(salsa.search_state.step)
        if updates:
            after.append([p.detach().clone() for p in model.parameters()])
        else:  # accumulation micro-step: no search, no forward beyond the training one, no change
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert salsa._handoff.bound_step is None
            assert all(p.grad is not None for p in model.parameters())  # still accumulating
    assert counts == [(i + 1) // ACCUMULATE for i in range(len(data))]  # one step per update
    want, reference = reference_weights(start)
    for update, (got_params, want_params) in enumerate(zip(after, want)):
        for got, expected in zip(got_params, want_params):
            assert torch.equal(got, expected), f"update {update} differs"
    assert salsa.search_state == reference.search_state
    trial_forwards = salsa.num_forward_evals - UPDATES  # each trial: one forward per micro-batch
    assert calls.count(False) == trial_forwards * ACCUMULATE
    assert calls.count(True) == len(data)


def test_bf16_autocast_prepared_model_steps():
    model = make_model()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
    search = SaLSaAccumulation(accelerator, optimizer, lambda batch: mse(model, batch))
    dtypes = []
    model[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    for batch in batches()[:4]:
        with accelerator.accumulate(model):
            search.backward(batch)
            optimizer.step()
            optimizer.zero_grad()
    assert search.salsa.search_state.step == 2
    assert set(dtypes) == {torch.bfloat16}  # every forward, trial ones included, ran under autocast
    assert len(dtypes) > 4
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _dropout_batch_norm_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


def _bf16_run(autocast_around_the_step, make=make_model):
    model = make()
    torch.manual_seed(0)  # the dropout masks: the same in both runs
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), model=model, backend="torch"))
    search = SaLSaAccumulation(accelerator, optimizer, lambda batch: mse(model, batch).float())
    for batch in batches():
        with accelerator.accumulate(model):
            region = accelerator.autocast() if autocast_around_the_step else contextlib.nullcontext()
            with region:
                search.backward(batch)
                optimizer.step()
                optimizer.zero_grad()
    return model, search.salsa


@pytest.mark.parametrize("make", [make_model, _dropout_batch_norm_model], ids=["tanh_mlp", "dropout_batchnorm"])
def test_accelerator_autocast_around_the_step_is_the_run_without_it(make):
    """``with accelerator.autocast():`` around the loop body: the trials ran in the region of the window's
    forwards and read autocast's cached bf16 weights of w0, so every trial was accepted: after 6 updates the
    level was 1.77 against 0.032 and the weights 10.6 apart, before the step dropped that cache. With dropout
    and BatchNorm (``model=``) too: the same masks replayed, the running statistics as in the run without."""
    plain, plain_salsa = _bf16_run(False, make)
    around, around_salsa = _bf16_run(True, make)
    assert around_salsa.num_backtracks > 0
    assert around_salsa.search_state == plain_salsa.search_state
    for a, b in zip(plain.state_dict().values(), around.state_dict().values()):
        assert torch.equal(a, b)


class _ModelOutput(dict):
    """What a Hugging Face model returns: the loss is a field of it."""

    @property
    def loss(self):
        return self["loss"]


@pytest.mark.parametrize("loss_of, named", [
    (lambda model, batch: _ModelOutput(loss=mse(model, batch)),
     r"got _ModelOutput \(a model output: return its .loss\)"),
    (lambda model, batch: (model(batch[0]) - batch[1]).pow(2), r"got a tensor of shape \(4, 1\)"),
])
def test_a_loss_of_that_returns_no_scalar_loss_is_named_before_accelerate_divides_it(loss_of, named):
    """Before, accelerate's division raised ``unsupported operand type(s) for /: '...Output' and 'int'``, or
    torch's backward ``grad can be implicitly created only for scalar outputs``."""
    model = make_model()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
    search = SaLSaAccumulation(accelerator, optimizer, lambda batch: loss_of(model, batch))
    with accelerator.accumulate(model):
        with pytest.raises(TypeError, match="SaLSaAccumulation's loss_of\\(batch\\) needs the micro-batch's scalar "
                                            "loss tensor, " + named):
            search.backward(batches()[0])
    assert all(p.grad is None for p in model.parameters()) and len(search.window) == 0


@pytest.mark.parametrize("form", ["one_phase", "two_phase"])
def test_a_closure_handed_to_a_step_that_accelerate_skips_is_refused(form):
    """``optimizer.step(closure)`` in ``accelerator.accumulate``: accelerate skipped the step and its closure on
    the micro-batches that do not sync, so only every ``gradient_accumulation_steps``-th batch was trained
    (measured: 4 backward passes over 16 micro-batches at 4), without a word."""
    model = make_model()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
    batch = batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    with accelerator.accumulate(model):
        assert not accelerator.sync_gradients
        args = {}
        if form == "two_phase":
            loss = mse(model, batch)
            accelerator.backward(loss)
            args = {"loss": loss.detach()}
        with pytest.raises(RuntimeError, match=r"does not sync gradients \(gradient_accumulation_steps=3\).*"
                                               "never be trained.*Use SaLSaAccumulation"):
            optimizer.step(lambda: mse(model, batch), **args)
    salsa = optimizer.optimizer
    assert salsa.search_state.step == 0 and salsa._handoff.bound_step is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_binding_on_a_micro_batch_that_does_not_sync_is_refused():
    """``bind_closure`` then ``step()`` on every micro-batch (a hand-written form of what SaLSaAccumulation does):
    accelerate skipped the step, the binding waited and the next micro-batch's replaced it, so the step that
    synced judged its trials on the last micro-batch alone while it stepped on the window's gradients (an
    audit's run: the weights 0.18 away from SaLSaAccumulation's, without a word). Refused; the syncing
    micro-batch binds as before."""
    model = make_model()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
    salsa = optimizer.optimizer
    for index, batch in enumerate(batches()[:ACCUMULATE]):
        with accelerator.accumulate(model):
            loss = mse(model, batch) / ACCUMULATE
            accelerator.backward(loss)
            bind = lambda: optimizer.bind_closure(lambda: mse(model, batch) / ACCUMULATE,  # noqa: E731
                                                  loss=loss.detach())
            if index < ACCUMULATE - 1:
                with pytest.raises(RuntimeError, match=r"bind_closure\(\) on a micro-batch that does not sync "
                                                       r"gradients \(gradient_accumulation_steps=3\).*judge its "
                                                       r"trials on the last micro-batch only.*Nothing was bound"):
                    bind()
                assert salsa._handoff.bound_step is None
            else:
                bind()
                assert salsa._handoff.bound_step is not None


_WITHOUT_THE_INTEGRATION_IMPORT = """
import sys
import torch
from salsa_fused import FusedSaLSa
FusedSaLSa([torch.nn.Parameter(torch.zeros(2))])
assert "accelerate" not in sys.modules, "building the optimizer imported accelerate"
from accelerate import Accelerator
model = torch.nn.Linear(3, 1)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
x, y = torch.randn(4, 3), torch.randn(4, 1)
with accelerator.accumulate(model):
    try:
        optimizer.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    except RuntimeError as error:
        assert "does not sync gradients" in str(error), error
        print("refused")
"""


def test_a_script_that_never_imports_the_integration_gets_the_refusal_too():
    """A user of accelerate who builds FusedSaLSa and never imports ``salsa_fused.integrations.accelerate``: the
    optimizer imports it where accelerate is imported (never otherwise), so the closure that accelerate would
    skip is refused there too (a fresh interpreter: this one has imported the integration already)."""
    done = FRESH.result()["never imported"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.split() == ["refused"], done.stdout


_BUILT_BEFORE_ACCELERATE_IS_IMPORTED = """
import sys
import torch
from salsa_fused import FusedSaLSa
model = torch.nn.Linear(3, 1)
salsa = FusedSaLSa(model.parameters(), backend="torch")
assert "accelerate" not in sys.modules, "building the optimizer imported accelerate"
from accelerate import Accelerator
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3, device_placement=PLACEMENT)
model, optimizer = accelerator.prepare(model, salsa)
x, y = torch.randn(4, 3), torch.randn(4, 1)
closure = lambda: torch.nn.functional.mse_loss(model(x), y)
for micro_batch in range(6):
    with accelerator.accumulate(model):
        try:
            optimizer.step(closure)
            print("stepped" if accelerator.sync_gradients else "skipped")
        except RuntimeError as error:
            assert "does not sync gradients" in str(error), error
            print("refused")
        optimizer.zero_grad()
"""


def _fresh_interpreters(_tmp) -> dict:
    """The scripts above, each in a fresh interpreter (this one has imported the integration already), one after
    another: keyed "never imported" and the ``device_placement`` of the built-before script."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    scripts = {"never imported": _WITHOUT_THE_INTEGRATION_IMPORT,
               **{placement: _BUILT_BEFORE_ACCELERATE_IS_IMPORTED.replace("PLACEMENT", str(placement))
                  for placement in (True, False)}}
    return {key: background.run_process([sys.executable, "-c", script], cwd=root, env=env, timeout=300)
            for key, script in scripts.items()}


FRESH = background.job("accelerate in fresh interpreters", _fresh_interpreters, seconds_hint=16)


@pytest.mark.parametrize("placement, printed", [
    (True, ["refused", "refused", "stepped"] * 2),
    (False, ["skipped", "skipped", "stepped", "refused", "refused", "stepped"]),
])
def test_an_optimizer_built_before_accelerate_is_imported_gets_the_refusal(placement, printed):
    """FusedSaLSa built before ``import accelerate``: ``prepare`` reads its ``state_dict()`` to place the state,
    which imports the integration, so every skipped micro-batch is refused. With ``device_placement=False``
    nothing reaches the optimizer until its first step that syncs: the first window's micro-batches go by
    unrefused (accelerate never calls the optimizer on them), and the refusal holds from there on."""
    done = FRESH.result()[placement]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.split() == printed, done.stdout


def test_the_two_phase_form_through_the_prepared_optimizer_is_the_plain_step():
    """``step(closure, loss=loss)`` on the prepared optimizer: accelerate's own step takes no ``loss=`` (a
    TypeError before); the binding hands both to FusedSaLSa's step."""
    data = batches()
    runs = []
    for prepared in (False, True):
        model = make_model()
        optimizer = FusedSaLSa(model.parameters(), backend="torch")
        accelerator = Accelerator(cpu=True)
        if prepared:
            model, optimizer = accelerator.prepare(model, optimizer)
        for batch in data:
            optimizer.zero_grad()
            loss = mse(model, batch)
            accelerator.backward(loss)
            assert optimizer.step(lambda: mse(model, batch), loss=loss) is loss
        runs.append((model, optimizer))
    (plain, plain_opt), (prepared, prepared_opt) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), prepared.parameters()))
    assert prepared_opt.optimizer.search_state == plain_opt.search_state
    sgd = Accelerator(cpu=True).prepare(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="loss"):  # another optimizer: accelerate's step as it was
        sgd.step(lambda: torch.zeros(()), loss=torch.zeros(()))


def test_a_two_phase_step_through_the_prepared_optimizer_that_raises_leaves_nothing_bound():
    """``step(closure, loss=loss)`` on the prepared optimizer binds the pair for accelerate's step: where that step
    raises (here the closure, at the first trial), nothing may stay bound, as after the plain FusedSaLSa step (the
    binding stayed: a later ``step()`` searched the batch that raised, a later ``step(closure)`` was refused)."""
    model = make_model()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, FusedSaLSa(model.parameters(), backend="torch"))
    batch = batches()[0]
    loss = mse(model, batch)
    accelerator.backward(loss)

    def failing():
        raise ValueError("the closure failed")
    with pytest.raises(ValueError, match="the closure failed"):
        optimizer.step(failing, loss=loss.detach())
    salsa = optimizer.optimizer
    assert salsa._handoff.bound_step is None and salsa.search_state.step == 0
    optimizer.zero_grad()
    optimizer.step(lambda: mse(model, batch))  # the one-phase form runs on
    assert salsa.search_state.step == 1


def test_rejects_other_optimizers():
    model = make_model()
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="FusedSaLSa"):
        SaLSaAccumulation(accelerator, optimizer, lambda batch: mse(model, batch))


def test_rejects_a_rule_that_reads_several_batches_per_step():
    model = make_model()
    accelerator = Accelerator(cpu=True)
    optimizer = FusedSaLSa(model.parameters(), backend="torch", search_rule="labpal")
    with pytest.raises(ValueError, match="SaLSaAccumulation binds a closure over one update's batches"):
        SaLSaAccumulation(accelerator, optimizer, loss_of=lambda batch: mse(model, batch))
