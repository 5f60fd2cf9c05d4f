"""torch.distributed.checkpoint.state_dict round trips of FusedSaLSa (single process, no process group).

``get_optimizer_state_dict`` keys the state by parameter name and, if ``optimizer.state``
is empty, calls ``step(closure=None)`` with zero gradients to create it; FusedSaLSa creates
its fp32 moments at construction, so a created-but-never-stepped optimizer is already
complete. The search scalars travel in ``state_dict()["param_groups"][0]["search"]``.
"""

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from salsa_fused import FusedSaLSa


def make(dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 0.5}]
    return model, FusedSaLSa(groups, backend="torch", init_step_size=0.05)


def train(model, opt, steps, start=0):
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(16, 6, generator=g).to(torch.bfloat16)
        opt.zero_grad()
        opt.step(lambda: model(x).float().pow(2).mean())


def assert_same_optimizer(a, b):
    assert a.search_state == b.search_state
    assert [{k: v for k, v in g.items() if k != "params"} for g in a.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups]
    for pa, pb in zip([p for g in a.param_groups for p in g["params"]],
                      [p for g in b.param_groups for p in g["params"]]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert b.state[pb][key].dtype == torch.float32  # fp32 moments of bf16 params stay fp32
            assert torch.equal(a.state[pa][key], b.state[pb][key])


def test_round_trip_before_the_first_step():
    model, opt = make()
    state = get_optimizer_state_dict(model, opt)
    assert set(state["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(p.grad is None for p in model.parameters())  # no step was needed to create state
    assert opt.search_state.step == 0
    model2, opt2 = make()
    set_optimizer_state_dict(model2, opt2, state)
    assert_same_optimizer(opt, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_round_trip_after_steps_resumes_identically():
    model, opt = make()
    train(model, opt, 4)
    state = get_optimizer_state_dict(model, opt)
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    opt2.param_groups[1]["lr"] = 0.9  # overwritten by the load
    set_optimizer_state_dict(model2, opt2, state)
    assert_same_optimizer(opt, opt2)
    train(model, opt, 3, start=4)
    train(model2, opt2, 3, start=4)
    assert_same_optimizer(opt, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt.search_state.step == 7


def test_step_without_loss_or_gradients_is_harmless():
    model, opt = make()
    before = opt.state_dict()
    assert opt.step() is None
    assert opt.state_dict()["param_groups"][0]["search"] == before["param_groups"][0]["search"]
