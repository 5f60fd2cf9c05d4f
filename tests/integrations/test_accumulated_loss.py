"""The pieces every integration uses: FusedSaLSa.bind_closure and AccumulatedLoss."""

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused.integrations import AccumulatedLoss, unwrap_salsa


class MaskRecorder(torch.nn.Module):
    """Dropout that records the mask it draws (1 kept, 0 dropped)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x):
        out = torch.nn.functional.dropout(x, 0.5, training=True)
        self.masks.append((out != 0).clone())
        return out


def test_trials_replay_each_micro_batch_random_state():
    torch.manual_seed(0)
    recorder = MaskRecorder()
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), recorder, torch.nn.Linear(64, 1))
    opt = FusedSaLSa(model.parameters(), backend="torch")
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
    window = AccumulatedLoss()

    def loss_of(batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1]) / len(data)

    for batch in data:
        window.forward(loss_of, batch).backward()
        torch.rand(5)  # other code draws between micro-batches
    total = window.total
    training_masks = list(recorder.masks)
    rng_at_step = torch.get_rng_state()
    window.bind(opt, loss_of)
    assert len(window) == 0 and window.total is None  # a new window starts
    assert opt.step() is total  # the bound two-phase step returns the window's loss
    assert opt.num_searches == 1 and opt.last_search_trials >= 1
    trial_masks = recorder.masks[len(data):]  # the check of loss= at w0 (once per optimizer), then the trials
    assert len(trial_masks) == (1 + opt.last_search_trials) * len(data)
    for index, mask in enumerate(trial_masks):
        assert torch.equal(mask, training_masks[index % len(data)]), f"trial forward {index}"
    assert torch.equal(torch.get_rng_state(), rng_at_step)  # as if no trial had run


def test_binding_is_used_once_and_replaced_by_a_newer_one():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    x = torch.randn(5, 3)
    calls = []

    def closure(tag):
        def fn():
            calls.append(tag)
            return model(x).pow(2).mean()
        return fn

    loss = model(x).pow(2).mean()
    loss.backward()
    opt.bind_closure(closure("old"), loss=loss.detach())
    opt.bind_closure(closure("new"), loss=loss.detach())
    opt.step()
    assert set(calls) == {"new"}
    opt.zero_grad()
    assert opt.step() is None  # binding consumed, no gradients: nothing to do
    model(x).pow(2).mean().backward()
    with pytest.raises(TypeError, match="needs closure"):
        opt.step()
    with pytest.raises(TypeError, match="callable"):
        opt.bind_closure(3.0)


def test_a_step_given_its_loss_clears_a_binding_it_did_not_use():
    """bind_closure(cl, loss=l) and then step(cl, loss=l) (the explicit form, as a GradScaler passes it
    on): a later step() without a new binding must not search the old batch's closure from its loss."""
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    old_x, new_x = torch.randn(5, 3), torch.randn(5, 3)

    def closure_on(x):
        return lambda: model(x).pow(2).mean()

    loss = closure_on(old_x)()
    loss.backward()
    opt.bind_closure(closure_on(old_x), loss=loss)
    opt.step(closure_on(old_x), loss=loss)
    opt.zero_grad()
    closure_on(new_x)().backward()
    with pytest.raises(TypeError, match="needs closure"):
        opt.step()


def test_unwrap_and_empty_window_errors():
    opt = FusedSaLSa([torch.nn.Parameter(torch.ones(2))], backend="torch")

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_salsa(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="FusedSaLSa"):
        unwrap_salsa(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(RuntimeError, match="no micro-batch"):
        AccumulatedLoss().closure(lambda b: b)
    with pytest.raises(TypeError, match="scalar loss"):
        AccumulatedLoss().add("batch", torch.ones(2))


def test_grad_scaler_steps_a_bound_closure_like_the_unscaled_loop():
    """The fp16 path of Trainer/accelerate: scaled backward, bind, scaler.step(opt, None)."""
    def setup():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model, FusedSaLSa(model.parameters(), backend="torch", init_step_size=0.05)

    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(6)]
    scaled_model, scaled_opt = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    plain_model, plain_opt = setup()
    for x, y in data:
        loss = torch.nn.functional.mse_loss(scaled_model(x), y)
        scaler.scale(loss).backward()
        scaled_opt.bind_closure(lambda: torch.nn.functional.mse_loss(scaled_model(x), y), loss=loss.detach())
        scaler.step(scaled_opt, None)  # what AcceleratedOptimizer.step() does under fp16
        scaler.update()
        scaled_opt.zero_grad()
        loss = torch.nn.functional.mse_loss(plain_model(x), y)
        loss.backward()
        plain_opt.step(lambda: torch.nn.functional.mse_loss(plain_model(x), y), loss=loss.detach())
        plain_opt.zero_grad()
    # both runs spend one forward, once, checking that loss= is the closure's loss (under the scaler the
    # same forward checks that it is not scaler.scale(loss)): the counts agree too
    assert scaled_opt.search_state == plain_opt.search_state
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # unscaling by 2**12 is exact up to g/s rounding
