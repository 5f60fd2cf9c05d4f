"""The ``torch.optim`` contract where FusedSaLSa broke it (issue 16, item 9): copies and
pickles, a step with no gradient, named parameters, what a backend cannot take, a tensor lr."""

from __future__ import annotations

import collections.abc
import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from salsa_fused import FusedSaLSa


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


_X = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
_Y = _X[:, :1].cos()


def _train(model, opt, steps):
    torch.manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(_X), _Y))


def _torch_save_round_trip(pair):
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_as_the_original(how):
    """Copy model and optimizer together (their parameters stay shared), train both on."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", search_direction="momentum",
                     restore="inplace", beta3=0.95, max_search_interval=4)
    _train(model, opt, 3)
    copier = {"deepcopy": copy.deepcopy, "pickle": lambda pair: pickle.loads(pickle.dumps(pair)),
              "torch.save": _torch_save_round_trip}[how]
    model_copy, opt_copy = copier((model, opt))
    _train(model, opt, 4)
    _train(model_copy, opt_copy, 4)
    for got, want in zip(model_copy.parameters(), model.parameters()):
        assert torch.equal(got, want)
    assert opt_copy.search_state == opt.search_state


def test_a_shallow_copy_is_refused_by_name():
    """copy.copy shares ``state`` (the moments) but not the search's count, which every step replaces: two
    shallow copies stepped in turn would each correct moments for steps they did not count."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 2)
    with pytest.raises(TypeError, match=r"copy\.copy\(\) of FusedSaLSa is refused.*copy\.deepcopy\(opt\)"):
        copy.copy(opt)
    assert opt.search_state.step == 2


def test_an_optimizer_pickled_whole_before_getstate_is_refused_naming_what_to_do():
    """The first version pickled torch's three attributes alone: unpickled, it loaded, and its first zero_grad()
    raised AttributeError: '_device' (an audit's check of 7ec43f0's pickles)."""
    opt = FusedSaLSa(_model().parameters(), backend="torch")
    early = {key: opt.__dict__[key] for key in ("defaults", "param_groups", "state")}  # what it kept
    revived = FusedSaLSa.__new__(FusedSaLSa)
    with pytest.raises(TypeError, match=r"pickled whole by a salsa_fused from before 2026-11-30 .*Unpickle it with "
                                         r"the version that wrote it and save opt\.state_dict\(\)"):
        revived.__setstate__(early)
    opt.load_state_dict(opt.state_dict())  # torch's load_state_dict calls __setstate__ on a built optimizer


def test_a_numpy_scalar_loss_is_taken_as_a_python_float():
    """loss= from a metrics pipeline (np.mean over float32 values) steps as the same value as a float."""
    runs = []
    for convert in (float, np.float32, np.float64):
        model = _model()
        opt = FusedSaLSa(model.parameters(), backend="torch")
        for _ in range(3):
            opt.zero_grad()
            loss = F.mse_loss(model(_X), _Y)
            loss.backward()
            opt.step(lambda: F.mse_loss(model(_X), _Y), loss=convert(np.float32(loss.item())))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    with pytest.raises(TypeError, match=r"loss= must be the loss as a scalar tensor or a real number, got bool"):
        opt.step(lambda: F.mse_loss(model(_X), _Y), loss=np.bool_(True))


def test_step_with_a_closure_when_no_parameter_gets_a_gradient_is_a_no_op():
    """Alternating training: this optimizer's sub-model does not enter this loss."""
    generator, discriminator = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    opt = FusedSaLSa(discriminator.parameters(), backend="torch")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    before = [p.detach().clone() for p in discriminator.parameters()]
    loss = opt.step(lambda: generator(_X).pow(2).mean())
    assert loss is not None and float(loss) == pytest.approx(float(generator(_X).pow(2).mean()))
    assert all(torch.equal(p, b) for p, b in zip(discriminator.parameters(), before))
    assert calls == ["pre", "post"]
    assert opt.search_state.step == 0


def test_bare_step_without_gradients_stays_a_no_op_with_hooks():
    opt = FusedSaLSa(torch.nn.Linear(8, 1).parameters(), backend="torch")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    assert opt.step() is None
    assert calls == ["pre", "post"]


def test_named_parameters_are_accepted_and_their_names_saved():
    model = _model()
    opt = FusedSaLSa(model.named_parameters(), backend="torch")
    _train(model, opt, 2)
    names = [name for name, _ in model.named_parameters()]
    saved = opt.state_dict()["param_groups"][0]
    assert saved["param_names"] == names
    reference = torch.optim.AdamW(model.named_parameters())
    assert reference.state_dict()["param_groups"][0]["param_names"] == saved["param_names"]


def test_named_parameters_on_a_torch_that_keeps_no_names_are_refused_naming_the_release(monkeypatch):
    """torch.optim takes named_parameters() from torch 2.6 on; before it FusedSaLSa says so and what to pass (torch's
    own message there, "can only optimize Tensors, but one of the params is tuple", named neither)."""
    import salsa_fused.optimizer as optimizer_module
    monkeypatch.setattr(optimizer_module, "OPTIMIZER_KEEPS_PARAMETER_NAMES", False)
    model = _model()
    with pytest.raises(TypeError, match=r"named_parameters\(\) where torch.optim keeps the names, from torch 2\.6"):
        FusedSaLSa(model.named_parameters(), backend="torch")
    with pytest.raises(TypeError, match="from torch 2.6"):
        FusedSaLSa([{"params": list(model.named_parameters())}], backend="torch")
    FusedSaLSa(model.parameters(), backend="torch")  # tensors alone still build


def _odd_parameters():
    fp64 = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    strided = torch.randn(4, 8)[:, ::2].detach().requires_grad_()  # a leaf with a gap in its storage
    assert not strided.is_contiguous()
    return {"float64": fp64, "strided": strided}


@pytest.mark.parametrize("kind", ["float64", "strided"])
def test_triton_backend_routes_or_refuses_what_it_cannot_take_at_construction(kind):
    pytest.importorskip("triton")
    odd = _odd_parameters()[kind]
    plain = torch.nn.Parameter(torch.randn(4))
    try:
        opt = FusedSaLSa([{"params": [plain]}, {"params": [odd]}], backend="triton")
    except ValueError as error:  # refused: the message says which parameter and why
        message = str(error)
        assert "param_groups[1]" in message or "group 1" in message, message
        assert (kind in message) or ("contiguous" in message) or ("dense" in message), message
        return
    def closure():  # routed: the step works and moves the odd parameter too
        return (odd.float() ** 2).sum() + (plain ** 2).sum()
    before = odd.detach().clone()
    opt.step(closure)
    assert not torch.equal(odd.detach(), before)


def test_a_tensor_lr_is_supported_or_refused_with_a_value_error():
    model = torch.nn.Linear(8, 1)
    try:
        opt = FusedSaLSa(model.parameters(), lr=torch.tensor(0.5), backend="torch")
    except ValueError as error:
        assert "tensor" in str(error) and "lr" in str(error)
        return
    opt.step(lambda: F.mse_loss(model(_X), _Y))
    assert 0 < opt.step_size


def test_repr_names_the_search_configuration_before_the_groups_as_torch_lists_them():
    """torch's repr lists only the groups: a preset's optimizer printed as a hand-built one but for weight_decay
    (an audit's check). The search's configuration comes first; the groups as torch lists them."""
    from salsa_fused import presets

    model = torch.nn.Linear(4, 2)
    preset = repr(presets.from_preset(model.parameters(), "pretrain", total_steps=100, backend="torch"))
    plain = repr(FusedSaLSa(model.parameters(), backend="torch"))
    assert preset.startswith("FusedSaLSa (\nSearch\n    backend: 'torch' (torch)\n")
    assert "search_direction: 'momentum'" in preset and "search_direction: 'gradient'" in plain
    assert "beta3: 0.95" in preset and "beta3: 0.9\n" in plain
    assert "schedule: WarmupStableDecay(total_steps=100" in preset and "schedule: None" in plain
    torch_listing = torch.optim.Optimizer.__repr__(FusedSaLSa(model.parameters(), backend="torch"))
    assert plain.endswith(torch_listing.partition("\n")[2])
    labpal = repr(FusedSaLSa(model.parameters(), search_rule="labpal", backend="torch"))
    assert "search_rule: LABPALRule(mode='NSGD'" in labpal
    # the placeholder level decides the first search's decay: given or not, the runs differ (a review's check)
    assert "init_step_size: 1.0 (none given: a placeholder)\n" in plain
    assert "init_step_size: 1.0\n" in repr(FusedSaLSa(model.parameters(), init_step_size=1.0, backend="torch"))
    bound = repr(FusedSaLSa(model.parameters(), model=model, foreach=True))
    assert "foreach: True\n" in bound and "model: Linear\n" in bound
    unbuilt = FusedSaLSa.__new__(FusedSaLSa)  # a construction that raised before torch's __init__
    assert repr(unbuilt) == "FusedSaLSa (not built)"


class _ListConfigLike(collections.abc.Sequence):
    """A sequence that is not a list, as Hydra's ``omegaconf.ListConfig`` (a config's ``betas: [0.9, 0.95]``)."""

    def __init__(self, *values):
        self.values = list(values)

    def __getitem__(self, index):
        return self.values[index]

    def __len__(self):
        return len(self.values)

    def __repr__(self):
        return repr(self.values)


@pytest.mark.parametrize("betas", [_ListConfigLike(0.9, 0.95), np.array([0.9, 0.95])], ids=["ListConfig", "numpy"])
def test_betas_as_a_sequence_of_two_train_as_adamw_takes_them(betas):
    """AdamW takes any two betas; FusedSaLSa refused a ListConfig or a numpy array with "betas must be a pair,
    got [0.9, 0.95]". The constructor and add_param_group turn them into a tuple; set by hand, the refusal
    names the type and the conversion."""
    model = torch.nn.Linear(4, 1)
    opt = FusedSaLSa([model.weight], betas=betas, backend="torch")
    opt.add_param_group({"params": [model.bias], "betas": betas})
    assert [group["betas"] for group in opt.param_groups] == [(0.9, 0.95)] * 2
    assert all(type(beta) is float for group in opt.param_groups for beta in group["betas"])
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y))
    assert opt.num_searches == 1
    opt.param_groups[0]["betas"] = betas
    with pytest.raises(ValueError, match=r"betas must be a pair .* got (_ListConfigLike|ndarray) .*tuple\(betas\)"):
        opt.step(lambda: F.mse_loss(model(x), y))


def test_tensor_hyperparameters_are_refused_saying_why():
    model = torch.nn.Linear(4, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    opt.param_groups[0]["betas"] = (torch.tensor(0.9), 0.999)
    with pytest.raises(TypeError, match=r"betas\[0\] must be a number, got Tensor \(not a tensor: the step's scalars "
                                        r"are host arithmetic"):
        opt.step(lambda: model(torch.ones(1, 4)).sum())
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["eps"] = torch.tensor(1e-8)
    with pytest.raises(TypeError, match=r"eps must be a number, got Tensor \(not a tensor"):
        opt.step(lambda: model(torch.ones(1, 4)).sum())
    opt.param_groups[0]["eps"] = "1e-8"  # not a tensor: the reason for tensors is not given
    with pytest.raises(TypeError, match=r"eps must be a number, got str$"):
        opt.step(lambda: model(torch.ones(1, 4)).sum())
