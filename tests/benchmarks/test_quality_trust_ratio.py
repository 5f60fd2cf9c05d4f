"""Per-tensor trust ratios on the searched step (benchmarks/quality/trust_ratio.py, NOTES.md section 95): the
groups it needs, the first step's ratio from the first direction's size, each later ratio from the moments the
step before wrote, the normalized form, and that the split into groups alone changes nothing."""

import math

import pytest
import torch

from benchmarks.quality import optimizers as O
from benchmarks.quality.trust_ratio import TrustRatio, per_tensor_groups
from benchmarks.quality.zoo import runner
from salsa_fused import FusedSaLSa


def _rms(t):
    return float(t.detach().float().pow(2).mean().sqrt())


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _optimizer(model, **kwargs):
    return FusedSaLSa(per_tensor_groups([{"params": list(model.parameters()), "weight_decay": 0.1}]),
                      search_direction="momentum", backend="torch", **kwargs)


def test_every_tensor_gets_a_group_of_its_own_keeping_its_group_keys():
    a, b, c = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    groups = per_tensor_groups([{"params": [a, b], "weight_decay": 0.1}, {"params": [c], "weight_decay": 0.0}])
    assert [g["params"] for g in groups] == [[a], [b], [c]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]


def test_a_group_of_several_tensors_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="one tensor per param group"):
        TrustRatio(FusedSaLSa(model.parameters(), backend="torch"))


def test_the_first_ratio_is_the_weights_rms_over_the_first_directions_size_and_vectors_get_one():
    model = _model()
    opt = _optimizer(model)
    trust = TrustRatio(opt)
    beta1, beta2 = opt.param_groups[0]["betas"]
    bc1, bc2 = 1 - beta1 ** 2, 1 - beta2 ** 2  # 0.1.0's correction at the first step (k + 1)
    size = ((1 - beta1) / bc1) / (math.sqrt((1 - beta2) / bc2) + opt.param_groups[0]["eps"])
    expected = [_rms(p) / size if p.dim() >= 2 else 1.0 for p in model.parameters()]
    assert trust.ratios == pytest.approx(expected)
    assert [g["search_lr"] for g in opt.param_groups] == [g["lr"] for g in opt.param_groups] == trust.ratios
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt.zero_grad()
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    for group in opt.param_groups:  # a dense gradient's first direction is size * sign(g)
        assert trust._direction_rms(group) == pytest.approx(size, rel=1e-4)


def test_each_later_ratio_reads_the_direction_the_step_before_wrote():
    model = _model()
    opt = _optimizer(model)
    trust = TrustRatio(opt)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(4):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        step = opt.search_state.step
        for p, group, ratio in zip(model.parameters(), opt.param_groups, trust.ratios):
            state = opt.state[p]
            beta1, beta2 = group["betas"]
            m_hat = state["exp_avg"] / (1 - beta1 ** (step + 1))
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** (step + 1))
            d = m_hat / (v_hat.sqrt() + group["eps"])
            assert ratio == pytest.approx(_rms(p) / _rms(d) if p.dim() >= 2 else 1.0, rel=1e-5)
            assert group["search_lr"] == group["lr"] == ratio


def test_normalized_ratios_of_the_matrices_have_geometric_mean_one():
    model = _model()
    opt = _optimizer(model)
    trust = TrustRatio(opt, normalized=True)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        matrices = [r for p, r in zip(model.parameters(), trust.ratios) if p.dim() >= 2]
        assert math.exp(sum(map(math.log, matrices)) / len(matrices)) == pytest.approx(1.0)
        assert len(set(matrices)) == 2  # the allocation still differs between the layers
        assert [r for p, r in zip(model.parameters(), trust.ratios) if p.dim() < 2] == [1.0, 1.0]


def test_the_split_alone_ends_where_the_shipped_preset_ends_and_the_candidates_move_elsewhere():
    unit = ("mlp_relu_teacher", None, 0, "short", 30)
    rows = {name: runner.run_unit((unit[0], name) + unit[2:], {})
            for name in ("pretrain_hold_decayfromhold", "pretrain_pertensor", "pretrain_trust", "pretrain_trust_norm")}
    assert rows["pretrain_pertensor"]["final_train_loss"] == rows["pretrain_hold_decayfromhold"]["final_train_loss"]
    for name in ("pretrain_trust", "pretrain_trust_norm"):
        assert rows[name]["diverged"] is None
        assert rows[name]["final_train_loss"] != rows["pretrain_hold_decayfromhold"]["final_train_loss"]


def test_the_zoo_configurations_build_the_shipped_preset_with_trust_ratios():
    from benchmarks.quality.zoo import tasks as Z
    task = Z.make("mlp_gelu_sin", 0, steps=40)
    model = task.model(0)
    built = O.build("pretrain_trust_norm", task, model, 40)
    assert built.trust.normalized and len(built.optimizer.param_groups) == len(list(model.parameters()))
    assert built.optimizer.schedule.decay_from_hold and built.optimizer.schedule.hold_scale_on_loss_rise
    assert O.build("pretrain_pertensor", task, task.model(0), 40).trust is None


def test_a_tensor_that_sits_a_step_out_keeps_its_ratio():
    """Its moments do not move while it has no gradient; read then, they were bias-corrected as if the steps it sat
    out had been taken (a review)."""
    model = _model()
    opt = _optimizer(model)
    trust = TrustRatio(opt)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    first = model[0].weight
    for k in range(6):
        opt.zero_grad()
        if 2 <= k <= 4:  # the first layer frozen for three steps: no gradient
            first.requires_grad_(False)
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        first.requires_grad_(True)
        if k == 1:
            kept = trust.ratios[0]
        if 2 <= k <= 4:
            assert trust.ratios[0] == kept
    assert trust.ratios[0] != kept  # it moves again once the tensor takes part
