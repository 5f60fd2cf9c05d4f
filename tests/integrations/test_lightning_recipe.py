"""examples/lightning_salsa.py: manual optimization under 32-true, bf16-mixed and 16-mixed with a
GradScaler, against a plain loop."""

import pytest
import torch

L = pytest.importorskip("lightning")

from examples.lightning_salsa import SaLSaModule  # noqa: E402
from salsa_fused import FusedSaLSa  # noqa: E402

STEPS = 4


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 1))


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y)


def batches():
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator))
            for _ in range(STEPS)]


def fit(precision, plugins=None, model=None):
    model = make_model() if model is None else model
    module = SaLSaModule(model, mse, salsa_kwargs={"backend": "torch", "init_step_size": 0.1},
                         schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.1 * t))
    precision_flag = {} if plugins else {"precision": precision}
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, plugins=plugins, **precision_flag,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(7)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(), batch_size=None))
    return model, trainer.optimizers[0]


def plain_loop(autocast):
    """Two-phase steps written out by hand, on the same batches and schedule."""
    model = make_model()
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.1 * t)
    torch.manual_seed(7)
    model.train()

    def loss_of(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return mse(model, batch)

    for batch in batches():
        opt.zero_grad()
        loss = loss_of(batch)
        loss.backward()
        opt.step(lambda: loss_of(batch), loss=loss.detach())
        schedule.step()
    return model, opt


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_manual_optimization_matches_plain_loop(precision):
    model, salsa = fit(precision)
    reference, opt = plain_loop(autocast=precision == "bf16-mixed")
    assert salsa.search_state.step == STEPS
    assert salsa.num_forward_evals > STEPS  # searches ran trial forwards
    assert salsa.param_groups[0]["lr"] == pytest.approx(1.0 - 0.1 * STEPS)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert got.dtype == torch.float32
        if precision == "32-true":
            assert torch.equal(got, want)
        else:  # Lightning's and the loop's autocast regions differ: rounding differs
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert salsa.search_state.num_searches == opt.search_state.num_searches


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_example_script_runs(precision, capsys):
    """``--precision 16-mixed`` was refused by the script's flag, though the module supports it: on a GPU
    Lightning adds a GradScaler (the test below), on the CPU it autocasts to fp16 without one."""
    from examples.lightning_salsa import main
    main(["--steps", "2", "--block", "16", "--batch", "2", "--precision", precision])
    assert "steps 2" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--batch", "0"], "--batch must be >= 1"),
                                            (["--block", "100000"], "--block must be >= 1 and <= 4096"),
                                            (["--steps", "-1"], "--steps must be >= 1")])
def test_the_example_refuses_bad_flags_by_name(flags, message, capsys):
    from examples.lightning_salsa import main

    with pytest.raises(SystemExit):
        main(flags)
    assert message in capsys.readouterr().err


def test_16_mixed_with_a_grad_scaler_steps_with_the_bound_closure():
    """What ``precision="16-mixed"`` builds on a GPU, forced onto the CPU, on a model with BatchNorm
    and dropout: Lightning's plugin runs the closure it is handed and calls ``scaler.step(optimizer)``
    without it, where ``step(closure=..., loss=...)`` raised "needs closure"; the example binds the
    closure first."""
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))  # no overflow
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm1d(32)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), norm, torch.nn.GELU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    model, salsa = fit(None, plugins=[plugin], model=model)
    assert salsa.search_state.step == STEPS
    assert salsa.num_forward_evals > STEPS  # searches ran trial forwards
    assert int(norm.num_batches_tracked) == STEPS  # model=: the trials left BatchNorm's statistics alone
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_accumulation_recipe_of_the_docs_clips_unscaled_gradients_under_16_mixed(monkeypatch):
    """docs/integrations.md's accumulation module, under 16-mixed with a GradScaler: its
    ``self.clip_gradients`` raised Lightning's "does not allow for gradient clipping" there, and clipping the
    gradients as they came clipped them scaled (norms of 640-990 against 2.5-3.3 unscaled: no clip at all).
    The recipe unscales through the plugin's scaler first; every norm clipped is the unscaled one."""
    from lightning.pytorch.plugins import MixedPrecision
    from tests.test_readme import python_blocks

    blocks = [code for heading, code in python_blocks("docs/integrations.md") if heading == "PyTorch Lightning"]
    recipe = next(code for code in blocks if "AccumulatedLoss" in code)
    trainer_call = 'L.Trainer(max_epochs=1, accelerator="cpu",'
    assert trainer_call in recipe
    recipe = recipe.replace(trainer_call, trainer_call + " plugins=[plugin],")
    scale = 2.0 ** 12
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, **kw: norms.append(float(clip(params, **kw))) or norms[-1])
    torch.manual_seed(0)
    namespace = {"plugin": plugin}
    exec(compile(recipe, "docs/integrations.md", "exec"), namespace)
    assert namespace["trainer"].optimizers[0].search_state.step == 4
    assert len(norms) == 4 and all(0 < n < 100 for n in norms), norms  # scaled by 4096 they would be far above
