"""FusedSaLSa through the real wrappers of the training stacks (issue 16): Lightning's
``LightningOptimizer`` (a real ``Trainer.fit``), accelerate's ``AcceleratedOptimizer`` (a real
``Accelerator().prepare``) and Hugging Face ``Trainer``, on models with dropout and BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


class RecordingDropout(torch.nn.Module):
    """Dropout that keeps every mask it draws (in order), to see which forwards share masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.masks = []

    def forward(self, x):
        if not self.training:
            return x
        mask = (torch.rand_like(x) >= self.p).to(x.dtype)
        self.masks.append(mask)
        return x * mask / (1 - self.p)


def _dropout_net(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), RecordingDropout(0.3),
                               torch.nn.Linear(64, 1))


def _batches(steps: int, rows: int = 32):
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        x = torch.randn(rows, 16, generator=generator)
        out.append((x, x[:, :1].sin() + 0.1 * torch.randn(rows, 1, generator=generator)))
    return out


def _trials_replayed_the_training_masks(masks_per_step):
    """Each step: the training forward's mask first, then one per trial forward; every trial
    must have drawn the training forward's mask. Returns the number of trial forwards checked."""
    checked = 0
    for masks in masks_per_step:
        training, trials = masks[0], masks[1:]
        for trial in trials:
            assert torch.equal(trial, training), "a trial forward drew another dropout mask"
            checked += 1
    return checked


# ---------------------------------------------------------------- Lightning (items 1, 2)

L = pytest.importorskip("lightning")


class DropoutModule(L.LightningModule):
    """The README's Lightning pattern (manual optimization, the two-phase step) on a dropout net;
    ``call`` picks how the step is handed its loss function: ``"mark"`` (mark_forward() then
    step(closure, loss=...)), ``"bind"`` (mark_forward(), bind_closure, then a bare step()),
    ``"plain"`` (the README snippet as written, no mark), or ``"unbound"`` (a bare step() with nothing bound)."""

    def __init__(self, call: str, preset_steps: int = 0):
        super().__init__()
        self.preset_steps = preset_steps  # > 0: the pretrain preset for a run of that many steps
        self.automatic_optimization = False
        self.net = _dropout_net()
        self.call = call
        self.masks_per_step = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.net[2].masks = []
        if self.call in ("mark", "bind"):
            opt.mark_forward()
        loss = F.mse_loss(self.net(x), y)
        self.manual_backward(loss)
        closure = lambda: F.mse_loss(self.net(x), y)  # noqa: E731
        if self.call == "bind":
            opt.bind_closure(closure, loss=loss.detach())
            opt.step()
        elif self.call == "unbound":  # the binding forgotten
            opt.step()
        else:
            opt.step(closure=closure, loss=loss.detach())
        self.masks_per_step.append(self.net[2].masks)

    def configure_optimizers(self):
        from salsa_fused import FusedSaLSa, presets
        if self.preset_steps:
            return presets.recommended(self.net.parameters(), total_steps=self.preset_steps, backend="torch")
        return FusedSaLSa(self.net.parameters(), backend="torch")


def _fit(call: str, steps: int = 12, preset: bool = False):
    module = DropoutModule(call, preset_steps=steps if preset else 0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(7)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(steps), batch_size=None))
    return module, trainer.optimizers[0]


@pytest.mark.parametrize("call", ["mark", "bind"])
def test_lightning_wrapper_passes_mark_forward_and_bind_closure_on(call):
    """``self.optimizers()`` is a LightningOptimizer: the mark and the binding must reach the step."""
    module, salsa = _fit(call)
    assert salsa.search_state.step == 12
    assert _trials_replayed_the_training_masks(module.masks_per_step) >= 12  # the mark reached the step
    assert 1e-4 < salsa.step_size < 10


def test_lightning_manual_optimization_with_nothing_bound_is_refused_naming_bind_closure():
    """``manual_backward(loss); opt.step()`` without ``bind_closure``: Lightning hands step() a closure of
    its own that runs no forward, after a backward. The error named automatic optimization, which this
    module had already turned off; it now names the binding, and nothing is written."""
    module = DropoutModule("unbound")
    weights = [p.detach().clone() for p in module.net.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"nothing bound.*opt\.bind_closure\(lambda: .*loss=loss\.detach\(\)\)"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(2), batch_size=None))
    assert all(torch.equal(a, b) for a, b in zip(weights, module.net.parameters()))


def test_lightning_wrapper_runs_the_preset_on_its_split_groups():
    """The preset handed ``self.parameters()`` inside ``configure_optimizers``: its two groups (matrices
    decaying, vectors not) go through LightningOptimizer, the mark reaches the step, and its schedule runs."""
    module, salsa = _fit("mark", steps=12, preset=True)
    net = module.net
    assert [[id(p) for p in g["params"]] for g in salsa.param_groups] == [
        [id(net[0].weight), id(net[3].weight)], [id(net[0].bias), id(net[3].bias)]]
    assert [g["weight_decay"] for g in salsa.param_groups] == [0.1, 0.0]
    assert salsa.search_state.step == 12 and salsa.schedule.total_steps == 12
    assert _trials_replayed_the_training_masks(module.masks_per_step) >= 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_the_schedule_read_and_set_through_lightnings_wrapper_is_the_optimizers():
    """``self.optimizers().schedule`` read None under a preset, and a Cooldown assigned through it (presets.py's way
    to end a run of unknown length) stayed on the wrapper: the optimizer that steps never had it (a review's find)."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from salsa_fused import presets
    from salsa_fused.step_size import Cooldown

    salsa = presets.recommended(_dropout_net().parameters(), total_steps=40, backend="torch")
    wrapper = LightningOptimizer(salsa)
    assert wrapper.schedule is salsa.schedule and wrapper.applied_steps == salsa.applied_steps
    cooldown = Cooldown(1, 5)
    wrapper.schedule = cooldown
    assert salsa.schedule is cooldown and wrapper.schedule is cooldown
    assert "_schedule" not in vars(wrapper)
    assert repr(wrapper) == repr(salsa)  # it read "LightningFusedSaLSa (not built)"


def test_lightning_readme_pattern_with_dropout_does_not_collapse():
    """The README snippet as written (no mark) on a dropout net: 495 backtracks and eta 6e-48
    in the issue's 20-step run."""
    module, salsa = _fit("plain", steps=20)
    assert salsa.search_state.step == 20
    assert 1e-4 < salsa.step_size < 10
    assert salsa.num_backtracks <= 20 * 20


# ---------------------------------------------------------------- accelerate (item 2)


def test_accelerated_optimizer_passes_mark_forward_and_bind_closure_on():
    accelerate = pytest.importorskip("accelerate")
    import salsa_fused.integrations.accelerate  # noqa: F401  (the integration FusedSaLSa ships)
    from salsa_fused import FusedSaLSa

    accelerator = accelerate.Accelerator(cpu=True)
    net = _dropout_net()
    data = torch.utils.data.DataLoader(_batches(12), batch_size=None)
    net, optimizer, data = accelerator.prepare(net, FusedSaLSa(net.parameters(), backend="torch"), data)
    dropout = net[2]
    masks_per_step = []
    torch.manual_seed(7)
    for x, y in data:
        optimizer.zero_grad()
        dropout.masks = []
        optimizer.mark_forward()
        loss = F.mse_loss(net(x), y)
        accelerator.backward(loss)
        optimizer.bind_closure(lambda: F.mse_loss(net(x), y), loss=loss.detach())
        optimizer.step()
        masks_per_step.append(dropout.masks)
    salsa = optimizer.optimizer
    assert salsa.search_state.step == 12
    assert _trials_replayed_the_training_masks(masks_per_step) >= 12
    assert 1e-4 < salsa.step_size < 10


def test_accelerated_optimizer_runs_the_preset_on_a_batchnorm_dropout_model():
    """The preset handed ``model.parameters()`` of a BatchNorm + dropout net, through a real
    ``Accelerator().prepare``: its split groups (BatchNorm's scale and shift and the biases do not
    decay), its schedule over the run, and BatchNorm's statistics counting only training forwards."""
    accelerate = pytest.importorskip("accelerate")
    import salsa_fused.integrations.accelerate  # noqa: F401
    from salsa_fused import presets

    model = _BatchNormRegressor().body
    bn = model[1]
    opt = presets.recommended(model.parameters(), total_steps=12, backend="torch", model=model)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(model[0].weight), id(model[4].weight)], [id(model[0].bias), id(bn.weight), id(bn.bias), id(model[4].bias)]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    accelerator = accelerate.Accelerator(cpu=True)
    data = torch.utils.data.DataLoader(_batches(12), batch_size=None)
    model, optimizer, data = accelerator.prepare(model, opt, data)
    torch.manual_seed(7)
    for x, y in data:
        optimizer.zero_grad()
        optimizer.mark_forward()
        loss = F.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.bind_closure(lambda: F.mse_loss(model(x), y), loss=loss.detach())
        optimizer.step()
    salsa = optimizer.optimizer
    assert salsa.search_state.step == 12 and salsa.num_forward_evals > 12  # trials ran
    assert int(bn.num_batches_tracked) == 12  # the trials' forwards left no count behind
    assert salsa.applied_steps[0] < salsa.step_size  # the cooldown's end: the scale is near 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- Hugging Face Trainer (items 3, 4)


class _BatchNormRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                        torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))

    def forward(self, x, labels=None):
        out = self.body(x)
        loss = None if labels is None else F.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def _hf_data(rows: int = 64):
    return [{"x": x, "labels": y} for x, y in zip(*_batches(1, rows)[0])]


def _hf_train(tmp_path, model, **args):
    transformers = pytest.importorskip("transformers")
    from salsa_fused.integrations.transformers import SaLSaTrainer

    settings = dict(learning_rate=1.0, lr_scheduler_type="constant", per_device_train_batch_size=16,
                    max_steps=6, report_to=[], save_strategy="no", use_cpu=True, logging_steps=100,
                    disable_tqdm=True, dataloader_num_workers=0, seed=0, remove_unused_columns=False)
    settings.update(args)
    training_args = transformers.TrainingArguments(str(tmp_path), **settings)
    trainer = SaLSaTrainer(model=model, args=training_args, train_dataset=_hf_data(),
                           salsa_kwargs={"backend": "torch"})
    trainer.train()
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer_trials_leave_batchnorm_statistics_as_the_training_forwards_leave_them(tmp_path, accumulation):
    """The integration hands the model to the optimizer: BatchNorm's running statistics end as the
    last training forward (the one with grad) left them, and count only training forwards."""
    model = _BatchNormRegressor()
    bn = model.body[1]
    seen = {"grad_forwards": 0, "after": None}

    def record(module, inputs, output):
        if torch.is_grad_enabled():
            seen["grad_forwards"] += 1
            seen["after"] = {name: b.clone() for name, b in module.named_buffers()}

    bn.register_forward_hook(record)
    trainer = _hf_train(tmp_path, model, gradient_accumulation_steps=accumulation)
    assert trainer.salsa_optimizer.num_forward_evals > 6 * accumulation  # trials ran
    assert int(bn.num_batches_tracked) == seen["grad_forwards"] == 6 * accumulation
    for name, buffer in bn.named_buffers():
        assert torch.equal(buffer, seen["after"][name]), name


def _hf_move(tmp_path, warmup_steps: int) -> float:
    model = _BatchNormRegressor()
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    _hf_train(tmp_path, model, max_steps=10, warmup_steps=warmup_steps,
              lr_scheduler_type="constant_with_warmup" if warmup_steps else "constant")
    return float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start).norm())


def test_hf_trainer_warmup_moves_the_weights_less_than_no_warmup(tmp_path):
    """Trainer's warmup starts at lr=0 and rises linearly: over it the weights must move less than
    with the constant schedule."""
    assert _hf_move(tmp_path / "warm", warmup_steps=10) < _hf_move(tmp_path / "flat", warmup_steps=0)


class LabpalModule(L.LightningModule):
    """LABPAL (a rule reading several batches per step) in Lightning's manual optimization: each
    training batch holds this step's batches; the closure ``closure(i)`` is bound and the bare
    ``step()`` goes through LightningOptimizer, whose own closure takes no index."""

    def __init__(self, bind: bool):
        super().__init__()
        self.automatic_optimization = False
        self.net = _dropout_net()
        self.bind = bind
        self.masks_per_step = []

    def training_step(self, batch, batch_idx):
        xs, ys = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.net[2].masks = []
        closure = lambda i: F.mse_loss(self.net(xs[i]), ys[i])  # noqa: E731
        if self.bind:
            opt.bind_closure(closure)
            opt.step()
        else:
            opt.step(closure=closure)
        self.masks_per_step.append(self.net[2].masks)

    def configure_optimizers(self):
        from salsa_fused import FusedSaLSa
        from salsa_fused.labpal import LABPALRule
        return FusedSaLSa(self.net.parameters(), backend="torch",
                          search_rule=LABPALRule("NSGD", approximation_batches=4, sgd_steps=4))


def _fit_labpal(module, steps: int):
    """``steps`` training steps of ``module``, each batch holding 4 batches of 16 rows."""
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    batches = _batches(4, 16)
    data = [(torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches]))] * steps
    torch.manual_seed(7)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer.optimizers[0]


def test_lightning_wrapper_runs_a_several_batch_rule_through_bind_closure():
    module = LabpalModule(bind=True)
    salsa = _fit_labpal(module, steps=9)
    assert salsa.search_state.step == 9
    labpal = salsa.search_state.rule_state
    assert labpal["num_approximations"] == 2 and labpal["num_failed_fits"] == 0  # steps 1 and 6
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    # an approximation step: batch 0 for the gradient, batches 1-3 for the point at w0, then
    # batches 0-3 at each of the 2 trials; a batch's later forwards replay its first mask (dropout)
    first = module.masks_per_step[0]
    assert len(first) == 1 + 3 + 4 + 4
    assert all(torch.equal(first[i], first[4 + i]) and torch.equal(first[i], first[8 + i]) for i in range(4))
    assert not torch.equal(first[0], first[1])  # the batches draw masks of their own
    assert [len(m) for m in module.masks_per_step[1:5]] == [1] * 4  # NSGD updates: one forward each
    assert len(module.masks_per_step[5]) == 12  # the second approximation


def test_lightning_wrapper_refuses_a_one_phase_closure_it_cannot_index():
    """``step(closure=...)`` through LightningOptimizer hands the optimizer Lightning's own
    closure, which takes no batch index: a TypeError naming the contract, nothing written."""
    module = LabpalModule(bind=False)
    before = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(TypeError, match="closure takes the batch index"):
        _fit_labpal(module, steps=2)
    assert all(torch.equal(p, b) for p, b in zip(module.net.parameters(), before))


class _Automatic(L.LightningModule):
    """Lightning's automatic optimization: training_step returns the loss, Lightning steps."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        from salsa_fused import FusedSaLSa
        return FusedSaLSa(self.parameters(), backend="torch")


class _ManualMisuse(L.LightningModule):
    """Manual optimization, stepped wrongly: ``"closure_without_loss"`` passes a closure to step() after a
    backward, with no loss=; ``"no_backward"`` calls a bare step() with neither a backward nor a binding."""

    def __init__(self, form: str):
        super().__init__()
        self.automatic_optimization = False
        self.net, self.form = torch.nn.Linear(4, 1), form

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        if self.form == "closure_without_loss":
            self.manual_backward(F.mse_loss(self.net(x), y))
            opt.step(closure=lambda: F.mse_loss(self.net(x), y))
        else:
            opt.step()

    def configure_optimizers(self):
        from salsa_fused import FusedSaLSa
        return FusedSaLSa(self.parameters(), backend="torch")


@pytest.mark.parametrize("form, error, match", [
    # said "Lightning called step() with its own closure", though the user had passed one
    ("closure_without_loss", RuntimeError, r"a closure passed to step\(\) is inside it\) with no loss= and nothing "
                                           r"bound.*opt\.bind_closure"),
    # said "closure() must return the loss as a scalar tensor, got NoneType"
    ("no_backward", TypeError, r"Lightning's closure, which returns None in manual optimization, with nothing bound.*"
                               r"opt\.bind_closure"),
])
def test_lightning_manual_steps_taken_wrongly_are_named_with_the_binding(form, error, match):
    module = _ManualMisuse(form)
    weights = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = [(torch.randn(8, 4), torch.randn(8, 1))]
    with pytest.raises(error, match=match):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert all(torch.equal(a, b) for a, b in zip(weights, module.parameters()))


def test_lightning_automatic_optimization_under_a_grad_scaler_is_refused_naming_the_fix():
    """Under 16-mixed with a GradScaler Lightning runs its closure itself and steps without one: the error
    said "needs closure" and named SaLSaTrainer, SaLSaAccumulation and bind_closure, none of which an
    automatic-optimization module can use; it names ``self.automatic_optimization = False``."""
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    module = _Automatic()
    weights = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = [(torch.randn(8, 4), torch.randn(8, 1))]
    with pytest.raises(TypeError, match=r"Lightning stepped without one.*self\.automatic_optimization = False"):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert all(torch.equal(a, b) for a, b in zip(weights, module.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_automatic_optimization_is_refused_naming_the_fix(accumulate):
    """Lightning's automatic optimization hands step() a closure that runs the backward; with
    accumulate_grad_batches the earlier micro-batches' backward has already left gradients. Both
    ways the error names ``self.automatic_optimization = False`` (with accumulation it only
    said that gradients were there)."""
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"self\.automatic_optimization = False"):
        trainer.fit(_Automatic(), torch.utils.data.DataLoader(data, batch_size=None))
