"""state_dict / load_state_dict, param groups, zero_grad and hooks.

Resume: train N steps, save (torch.save to memory), load into a fresh model and
optimizer, and both the original and the resumed run continue M steps to the bit,
searches and plain steps included.
"""

from __future__ import annotations

import io
import warnings
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

from salsa_fused import FusedSaLSa
from salsa_fused.line_search import plan_step
from tests.models import tanh_mlp
from tests.refusals import assert_load_refused


_X = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
_Y = (_X[:, :1] * _X[:, 1:2]).tanh()


def _model(dtype=torch.float32) -> torch.nn.Module:
    return tanh_mlp(6, 16, 1, dtype=dtype)


def _batch(k: int):
    rows = torch.arange(8) + 8 * (k % 4)
    return _X[rows], _Y[rows]


def _train(model, opt, steps, start=0):
    kinds = []
    for k in range(start, start + steps):
        x, y = _batch(k)
        kinds.append(plan_step(opt.search_state, opt.search_config).is_search)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y))
    return kinds


def _groups(model, **second):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}]


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("direction", ["gradient", "momentum"])
@pytest.mark.parametrize("restore", ["copy", "inplace"])
def test_resume_is_bit_identical(direction, restore):
    kwargs = dict(backend="torch", search_direction=direction, restore=restore, weight_decay=0.01)
    model = _model()
    opt = FusedSaLSa(_groups(model, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, lr=0.5), **kwargs)
    _train(model, opt, 40)
    saved_model = _roundtrip(model.state_dict())
    saved_opt = _roundtrip(opt.state_dict())

    resumed_model = _model()
    resumed_model.load_state_dict(saved_model)
    resumed = FusedSaLSa(_groups(resumed_model, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, lr=0.5),
                         **kwargs)
    resumed.load_state_dict(saved_opt)
    assert resumed.search_state == opt.search_state

    kinds = _train(model, opt, 30, start=40)
    resumed_kinds = _train(resumed_model, resumed, 30, start=40)
    assert kinds == resumed_kinds
    assert any(kinds) and not all(kinds), "the continuation must include searches and plain steps"
    assert resumed.search_state == opt.search_state
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], resumed.state[q][key])


def test_a_rollback_past_a_non_finite_plain_step_forgets_it():
    """A plain step's NaN loss is counted on the device and reported at the next search; loading an
    earlier checkpoint replaces that run, so its count goes with it: the search after the load does not
    raise about a step that the loaded run never took."""
    torch.manual_seed(0)
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch", nonfinite="raise")
    _train(model, opt, 12)
    while plan_step(opt.search_state, opt.search_config).is_search:
        _train(model, opt, 1)
    checkpoint = deepcopy((model.state_dict(), opt.state_dict()))
    x, y = _batch(0)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y) * float("nan"))  # counted, not read: a plain step
    model.load_state_dict(checkpoint[0])
    opt.load_state_dict(checkpoint[1])
    kinds = _train(model, opt, 15)
    assert any(kinds) and opt.search_state.num_skipped_steps == 0


def test_search_state_lives_in_the_state_dict():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 12)
    search = opt.state_dict()["param_groups"][0]["search"]
    expected = opt.search_state
    for key, value in [("step", 12), ("step_size", expected.step_size),
                       ("loss_decrease_avg", expected.loss_decrease_avg),
                       ("slope_avg", expected.slope_avg), ("step_size_fast", expected.step_size_fast),
                       ("step_size_slow", expected.step_size_slow),
                       ("steps_since_search", expected.steps_since_search)]:
        assert search[key] == value, key


def test_bf16_moments_stay_fp32_after_load():
    model = _model(torch.bfloat16)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 5)
    fresh_model = _model(torch.bfloat16)
    fresh = FusedSaLSa(fresh_model.parameters(), backend="torch")
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert p.dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[q][key].dtype == torch.float32
            assert torch.equal(fresh.state[q][key], opt.state[p][key])
            assert fresh.state[q][key].data_ptr() != opt.state[p][key].data_ptr()
    _train(fresh_model, fresh, 3)  # and it keeps training


def test_state_dict_search_dict_is_a_snapshot():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 5)
    state_dict = opt.state_dict()
    frozen = deepcopy(state_dict["param_groups"][0]["search"])
    _train(model, opt, 5, start=5)
    assert state_dict["param_groups"][0]["search"] == frozen
    assert opt.search_state.step == 10 and frozen["step"] == 5


def test_loading_does_not_alias_the_loaded_dict():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 5)
    state_dict = _roundtrip(opt.state_dict())
    frozen = deepcopy(state_dict)
    fresh_model = _model()
    fresh = FusedSaLSa(fresh_model.parameters(), backend="torch")
    fresh.load_state_dict(state_dict)
    _train(fresh_model, fresh, 5, start=5)
    assert state_dict["param_groups"][0]["search"] == frozen["param_groups"][0]["search"]
    for key, value in state_dict["state"].items():
        assert value.keys() == frozen["state"][key].keys()
        for name, loaded in value.items():  # moments, and the counts of steps sat out
            was = frozen["state"][key][name]
            assert torch.equal(loaded, was) if isinstance(was, torch.Tensor) else loaded == was


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd["param_groups"][0]["search"].update(mystery=1.0), "unknown search state keys"),
    (lambda sd: sd["param_groups"][0]["search"].update(step_size=-1.0), "step_size"),
    (lambda sd: sd["param_groups"][0]["search"].update(step_size=float("nan")), "step_size"),
    (lambda sd: sd["param_groups"][1].update(betas=(0.9, 1.5)), r"betas\[1\]"),
    (lambda sd: sd["param_groups"].pop(), "parameter group\\(s\\) and this optimizer"),
    (lambda sd: sd["param_groups"][1]["params"].pop(), "group 1 has 1 parameters"),
    (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)), "exp_avg of parameter 0 is \\(3,\\), but that parameter here is"),
    (lambda sd: sd["state"][1].update(exp_avg_sq=1.0), "exp_avg_sq of parameter 1 is float"),
    (lambda sd: sd["state"][2]["exp_avg"].view(-1)[0].fill_(float("inf")), "exp_avg of parameter 2 hold NaN"),
    (lambda sd: sd["state"][0]["exp_avg_sq"].view(-1)[1].fill_(-1.0), "exp_avg_sq of parameter 0 hold NaN/inf \\(or a negative"),
    (lambda sd: sd["state"][3]["exp_avg_sq"].fill_(float("nan")), "exp_avg_sq of parameter 3"),
    (lambda sd: sd["state"][1].pop("exp_avg_sq"), "state of parameter 1 has exp_avg but no exp_avg_sq"),
    (lambda sd: sd["param_groups"][0]["search"].pop("step_size"), "search state has no step_size"),
    (lambda sd: sd["param_groups"][0].update(search="corrupt"), "search state .* is a str, not a dict"),
    # float64 values beyond float32 would load as inf: the moments are kept in float32
    (lambda sd: sd["state"][0].update(exp_avg_sq=sd["state"][0]["exp_avg_sq"].double().fill_(1e300)),
     "exp_avg_sq of parameter 0 hold finite values beyond float32.s range"),
    (lambda sd: sd["param_groups"][0]["search"].update(last_loss_decrease=float("nan")), "last_loss_decrease"),
    # L = min(L_max, 1 / (r - 1 + 1e-8)) is positive at every step: 0 or below is a hand's or a corruption's
    (lambda sd: sd["param_groups"][0]["search"].update(search_interval=-1), "search_interval must be .* > 0"),
    (lambda sd: sd["param_groups"][0]["search"].update(search_interval=0.0), "search_interval must be .* > 0"),
    (lambda sd: sd["param_groups"][0]["search"].update(step_size=True), "step_size must be a finite number"),
    # every step would then refuse the move: the passes take the level in float32
    (lambda sd: sd["param_groups"][0]["search"].update(step_size=1e300), "step_size must be .* float32 holds"),
    (lambda sd: sd["param_groups"][0]["search"].update(step_size_slow=1e39), "step_size_slow must be"),
    (lambda sd: sd["param_groups"][0]["search"].update(rule_state=None), "rule_state must be a dict"),
    (lambda sd: sd["param_groups"][1].pop("betas"), "group 1 has no 'betas': every step reads it"),
    (lambda sd: sd["param_groups"][0].pop("lr"), "group 0 has no 'lr'"),
    (lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"].to_sparse()),
     "exp_avg of parameter 0 is a torch.sparse_coo tensor"),
    (lambda sd: sd["state"][1].update(exp_avg_sq=sd["state"][1]["exp_avg_sq"].to("meta")),
     "exp_avg_sq of parameter 1 is a meta tensor"),
])
def test_loading_a_bad_state_dict_raises_before_changing_anything(edit, message):
    model = _model()
    opt = FusedSaLSa(_groups(model), backend="torch")
    _train(model, opt, 3)
    other_model = _model()
    other = FusedSaLSa(_groups(other_model), backend="torch")
    _train(other_model, other, 7)
    state_dict = _roundtrip(other.state_dict())
    edit(state_dict)
    assert_load_refused(opt, state_dict, message)


def test_a_step_bound_before_load_state_dict_runs_after_it():
    """A callback restoring the optimizer between a trainer's backward (and bind_closure) and its
    step() leaves the bound step and its mark_forward() for that step, as an uninterrupted run has them."""
    runs = []
    for reload in (False, True):
        model = _model()
        opt = FusedSaLSa(model.parameters(), backend="torch")
        _train(model, opt, 3)
        x, y = _batch(3)
        opt.zero_grad()
        opt.mark_forward()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.bind_closure(lambda: F.mse_loss(model(x), y), loss=loss)
        if reload:
            opt.load_state_dict(_roundtrip(opt.state_dict()))
        opt.step()
        runs.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.search_state))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_param_groups_with_their_own_hyperparameters():
    """Group 2 has other betas, eps and weight decay: its moments follow its own betas."""
    model = _model()
    opt = FusedSaLSa(_groups(model, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1), backend="torch")
    x, y = _batch(0)
    opt.step(lambda: F.mse_loss(model(x), y))
    for p in model[2].parameters():
        g = p.grad
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * g, rtol=1e-6, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.1 * g * g, rtol=1e-5, atol=0)
    for p in model[0].parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * p.grad, rtol=1e-5, atol=0)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.999), (0.5, 0.9)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]


def test_add_param_group_then_train_and_resume():
    model = _model()
    opt = FusedSaLSa(model[0].parameters(), backend="torch")
    frozen = [p.detach().clone() for p in model[2].parameters()]
    _train(model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))  # not optimized yet
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.5})
    assert all(p in opt.state and opt.state[p]["exp_avg"].dtype == torch.float32 for p in model[2].parameters())
    _train(model, opt, 3, start=3)
    assert not any(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))
    assert opt.effective_step_sizes[1] == pytest.approx(0.5 * opt.effective_step_sizes[0])
    assert opt.search_state.step == 6


@pytest.mark.parametrize("start", [10 ** 6, 7, 3.5, "20", None, True])
def test_a_checkpoint_with_a_moments_start_step_it_cannot_have_is_refused(start):
    """After 6 steps a group was added at step 6 at most; below 0 is a load's carry of AdamW's steps."""
    model = _model()
    opt = FusedSaLSa(model[0].parameters(), backend="torch")
    _train(model, opt, 3)
    opt.add_param_group({"params": list(model[2].parameters())})
    _train(model, opt, 3, start=3)
    saved = deepcopy(opt.state_dict())
    assert saved["param_groups"][1]["moments_start_step"] == 3
    saved["param_groups"][1]["moments_start_step"] = start
    assert_load_refused(opt, saved, rf"group 1 has moments_start_step={start!r}: the step count at which the "
                                    r"group was added \(an int up to the checkpoint's 6 steps; below 0 for moments "
                                    r"that came with another optimizer's steps\); nothing was loaded")


def test_a_checkpoint_with_groups_added_during_its_run_names_add_param_group_when_the_count_differs():
    model = _model()
    opt = FusedSaLSa(model[0].parameters(), backend="torch")
    _train(model, opt, 3)
    opt.add_param_group({"params": list(model[2].parameters())})
    saved = opt.state_dict()
    fresh = FusedSaLSa(_model()[0].parameters(), backend="torch")
    assert_load_refused(fresh, saved, r"checkpoint has 2 parameter group\(s\) and this optimizer 1: build it with the "
                                      r"groups the checkpoint was saved with \(groups added with add_param_group during "
                                      r"the run: add them again before loading;")


def test_zero_grad():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 1)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _train(model, opt, 1, start=1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_step_hooks_fire_once_per_step():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.search_state.step)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.search_state.step)))
    _train(model, opt, 12)  # 9 searches, then plain steps and searches
    assert calls == [(kind, k + (kind == "post")) for k in range(12) for kind in ("pre", "post")]
    pre.remove()
    post.remove()
    _train(model, opt, 1, start=12)
    assert len(calls) == 24


def test_pickling_keeps_the_search_state():
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 4)
    copy = _roundtrip(opt)  # the whole optimizer, pickled (``__setstate__`` fills in caches)
    assert copy.search_state == opt.search_state


def test_state_dict_hooks_see_the_whole_state_dict_and_may_replace_it():
    """As torch.optim: state_dict post hooks get the finished dict (search state included) and may
    return another; load pre hooks get the dict as saved, moments and search state included, and
    what they return is loaded; load post hooks run once the moments are in place."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 4)
    seen = {}
    opt.register_state_dict_pre_hook(lambda o: seen.setdefault("pre", o.search_state.step))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "seen": "search" in sd["param_groups"][0]})
    saved = _roundtrip(opt.state_dict())
    assert seen["pre"] == 4 and saved["seen"] is True

    def migrate(o, state_dict):
        seen["moments"] = sorted(next(iter(state_dict["state"].values())))
        seen["search"] = state_dict["param_groups"][0]["search"]["step"]
        edited = deepcopy(state_dict)
        for value in edited["state"].values():
            value["exp_avg"].fill_(7.0)
        edited["param_groups"][0]["search"]["step_size"] = 0.125
        return edited

    other_model = _model()
    other = FusedSaLSa(other_model.parameters(), backend="torch")
    other.register_load_state_dict_pre_hook(migrate)
    other.register_load_state_dict_post_hook(
        lambda o: seen.setdefault("loaded", [bool((o.state[p]["exp_avg"] == 7).all()) for p in other_model.parameters()]))
    other.load_state_dict(saved)
    assert seen["moments"] == ["exp_avg", "exp_avg_sq", "sat_out_since", "steps_sat_out"] and seen["search"] == 4
    assert seen["loaded"] == [True] * 4 and other.step_size == 0.125


def test_state_of_no_parameter_is_kept_as_torch_keeps_it():
    """A saved state entry that matches no parameter here (a parameter dropped from the model) loads,
    as in torch.optim.AdamW, and the parameters' own state is the checkpoint's."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 3)
    saved = _roundtrip(opt.state_dict())
    saved["state"][99] = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    _train(model, opt, 3, start=3)
    opt.load_state_dict(saved)
    assert opt.search_state.step == 3 and opt.state[99]["exp_avg"].shape == (2,)
    for index, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], saved["state"][index]["exp_avg"])


def test_checkpoint_with_the_old_slope_key_loads():
    """Checkpoints written before the rename carry ``grad_norm_avg``; it loads as ``slope_avg``."""
    params = [torch.nn.Parameter(torch.randn(4))]
    opt = FusedSaLSa(params)
    params[0].grad = torch.randn(4)
    opt.step(lambda: (params[0] ** 2).sum(), loss=(params[0] ** 2).sum().detach())
    state = opt.state_dict()
    search = state["param_groups"][0]["search"]
    search["grad_norm_avg"] = search.pop("slope_avg")
    assert opt.search_state.slope_avg != 0.0
    fresh = FusedSaLSa([torch.nn.Parameter(params[0].detach().clone())])
    fresh.load_state_dict(state)
    assert fresh.search_state.slope_avg == opt.search_state.slope_avg


def test_a_checkpoint_with_moments_but_no_search_state_warns_that_the_search_starts_over():
    """As torch.distributed.checkpoint's flatten_optimizer_state_dict=True leaves it (it rebuilds
    param_groups from the live groups, which have no search key)."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 3)
    saved = _roundtrip(opt.state_dict())
    del saved["param_groups"][0]["search"]
    fresh = FusedSaLSa(_model().parameters(), backend="torch", init_step_size=0.5)
    with pytest.warns(UserWarning, match="no search state.*flatten_optimizer_state_dict"):
        fresh.load_state_dict(saved)
    assert fresh.step_size == 0.5 and fresh.search_state.step == 0


def _by_param_names(opt, state_dict):
    """A load_state_dict pre hook as torch's documentation suggests for groups built in another order:
    the checkpoint's groups and state laid out as this optimizer's groups, matched by param_names."""
    where = {name: (saved, index) for saved in state_dict["param_groups"]
             for name, index in zip(saved["param_names"], saved["params"])}
    groups, state, next_index = [], {}, 0
    for group in opt.param_groups:
        saved = where[group["param_names"][0]][0]
        groups.append({**saved, "params": [], "param_names": list(group["param_names"])})
        for name in group["param_names"]:
            if where[name][1] in state_dict["state"]:
                state[next_index] = state_dict["state"][where[name][1]]
            groups[-1]["params"].append(next_index)
            next_index += 1
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_checkpoint_whose_groups_were_reordered_keeps_its_search_state(backend):
    """The search state travels in the group the checkpoint saved first. Laid out again in this
    optimizer's group order (a pre hook matching param_names, or torch.distributed.checkpoint, which
    matches groups by parameter name), it sat in group 1 and was dropped: the level went back to 1.0
    and the step counter to 0, with a warning that the checkpoint had no search state."""
    def groups(model, reverse):
        named = list(model.named_parameters())
        built = [{"params": [p for p in named if p[0].endswith("weight")], "weight_decay": 0.1},
                 {"params": [p for p in named if p[0].endswith("bias")]}]
        return built[::-1] if reverse else built

    model = _model()
    opt = FusedSaLSa(groups(model, reverse=False), backend=backend)
    _train(model, opt, 10)
    other_model = _model()
    other_model.load_state_dict(model.state_dict())
    other = FusedSaLSa(groups(other_model, reverse=True), backend=backend)
    other.register_load_state_dict_pre_hook(_by_param_names)
    other.load_state_dict(_roundtrip(opt.state_dict()))
    assert other.search_state == opt.search_state
    assert [g["weight_decay"] for g in other.param_groups] == [0.0, 0.1]
    _train(model, opt, 8, start=10)
    _train(other_model, other, 8, start=10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters()))


def test_a_checkpoint_with_a_search_state_in_two_groups_is_refused():
    model = _model()
    opt = FusedSaLSa(_groups(model), backend="torch")
    _train(model, opt, 3)
    saved = _roundtrip(opt.state_dict())
    saved["param_groups"][1]["search"] = deepcopy(saved["param_groups"][0]["search"])
    assert_load_refused(opt, saved, r"search state in param_groups\[0\] and param_groups\[1\]")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_a_checkpoint_loaded_under_inference_mode_trains_on(backend):
    """A resume function run under torch.inference_mode() (AdamW's load keeps the checkpoint's own
    tensors and trains on): the copies of the moments were inference tensors, and the torch backend's
    next step raised "Inplace update to inference tensor outside InferenceMode is not allowed"."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend=backend)
    _train(model, opt, 4)
    saved = _roundtrip(opt.state_dict())
    resumed_model = _model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = FusedSaLSa(resumed_model.parameters(), backend=backend)
    with torch.inference_mode():
        resumed.load_state_dict(saved)
    assert not any(t.is_inference() for state in resumed.state.values() for t in state.values())
    _train(model, opt, 6, start=4)
    _train(resumed_model, resumed, 6, start=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize("source", ["live", "saved"])
def test_the_documented_hand_over_to_adamw_continues_its_moments(source):
    """docs/training.md's recipe for going on with AdamW (its load_state_dict cannot read this optimizer's
    checkpoint): AdamW takes the moments and each parameter's step count (a group added late, a parameter
    that sat out a stretch, one that sits out now) and continues them, not from zero; read from
    ``opt.state`` or from a checkpoint's entries (whose ``sat_out_since`` is -1 while a parameter takes part:
    the recipe's earlier form read it as a count and gave AdamW step -1, a ZeroDivisionError)."""
    model = tanh_mlp(4, 8, 1)
    opt = FusedSaLSa(model[0].parameters(), backend="torch")
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = x[:, :1].sin()
    for step in range(6):
        if step == 2:  # a group added mid-run counts its own steps (moments_start_step = 2)
            opt.add_param_group({"params": model[2].parameters()})
        model[0].bias.requires_grad_(step not in (1, 2))  # sits out 2 steps (steps_sat_out = 2)
        model[2].bias.requires_grad_(step < 4)  # sits out the last 2 (sat_out_since = 2 of its group's 4)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
    assert opt.state[model[0].bias]["steps_sat_out"] == 2 and opt.state[model[2].bias]["sat_out_since"] == 2
    saved = opt.state_dict()["state"]  # -1 for sat_out_since where a parameter takes part
    index = {p: i for i, p in enumerate(p for group in opt.param_groups for p in group["params"])}
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=opt.param_groups[0]["betas"])
    for group in opt.param_groups:
        group_steps = opt.search_state.step - group.get("moments_start_step", 0)
        for p in group["params"]:
            s = opt.state[p] if source == "live" else saved[index[p]]
            since = s.get("sat_out_since", -1)
            steps = (since if since >= 0 else group_steps) - s.get("steps_sat_out", 0)
            adamw.state[p] = {"step": torch.tensor(float(steps)),
                              "exp_avg": s["exp_avg"].clone(), "exp_avg_sq": s["exp_avg_sq"].clone()}
    handed = {p: (s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for p, s in opt.state.items()}
    model[2].bias.requires_grad_(True)
    adamw.zero_grad()
    F.mse_loss(model(x), y).backward()
    adamw.step()
    (beta1, beta2) = opt.param_groups[0]["betas"]
    taken = {model[0].weight: 6, model[0].bias: 4, model[2].weight: 4, model[2].bias: 2}
    for p, (m, v) in handed.items():
        assert adamw.state[p]["step"].item() == taken[p] + 1
        torch.testing.assert_close(adamw.state[p]["exp_avg"], beta1 * m + (1 - beta1) * p.grad)
        torch.testing.assert_close(adamw.state[p]["exp_avg_sq"], beta2 * v + (1 - beta2) * p.grad * p.grad)


def test_every_parameter_with_moments_saves_both_counts_of_steps_sat_out():
    """state_dict() writes ``steps_sat_out`` (0 if none) and ``sat_out_since`` (-1 while it takes part) for
    every parameter with moments, without adding them to the live state; a load keeps the live state as
    sparse as the saving run's."""
    model = tanh_mlp(4, 8, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        model[0].bias.requires_grad_(step not in (1, 2))
        model[2].bias.requires_grad_(step < 4)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), x[:, :1].sin()))
    live = {p: dict(opt.state[p]) for p in model.parameters()}
    saved = _roundtrip(opt.state_dict())
    counts = [(entry["steps_sat_out"], entry["sat_out_since"]) for entry in saved["state"].values()]
    assert counts == [(0, -1), (2, -1), (0, -1), (0, 4)]
    assert {p: dict(opt.state[p]) for p in model.parameters()}.keys() == live.keys()
    assert all(opt.state[p].keys() == live[p].keys() for p in model.parameters())
    fresh_model = tanh_mlp(4, 8, 1)
    fresh = FusedSaLSa(fresh_model.parameters(), backend="torch")
    fresh.load_state_dict(saved)
    assert [sorted(k for k in fresh.state[p] if "sat_out" in k) for p in fresh_model.parameters()] == [
        [], ["steps_sat_out"], [], ["sat_out_since"]]
    assert fresh.state[fresh_model[0].bias]["steps_sat_out"] == 2
    assert fresh.state[fresh_model[2].bias]["sat_out_since"] == 4


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_adamw_checkpoint_keeps_this_optimizers_multipliers_and_trains(backend):
    """docs/training.md: an AdamW checkpoint brings its moments, not its rate. Its ``lr`` of 1e-3 became
    ``search_lr``, the probe's multiplier, and the documented reset of ``lr`` to 1.0 left it there: each
    search tested a step 1000 times smaller than the one applied, and the loss went from 0.48 to 7000."""
    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = x[:, :1].sin()
    torch.manual_seed(0)
    source = tanh_mlp(4, 16, 1)
    adamw = torch.optim.AdamW(source.parameters(), lr=1e-3)
    adamw_schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: 1.0)  # records initial_lr=1e-3
    for _ in range(3):
        adamw.zero_grad()
        F.mse_loss(source(x), y).backward()
        adamw.step()
        adamw_schedule.step()
    model = tanh_mlp(4, 16, 1)
    model.load_state_dict(source.state_dict())
    opt = FusedSaLSa(model.parameters(), backend=backend)
    with pytest.warns(UserWarning, match="no search state.*each group keeps its own lr and search_lr"):
        opt.load_state_dict(adamw.state_dict())
    assert [(g["lr"], g["search_lr"]) for g in opt.param_groups] == [(1.0, 1.0)]
    assert "initial_lr" not in opt.param_groups[0]  # a scheduler built now would set AdamW's rate back
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    assert opt.param_groups[0]["lr"] == 1.0
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], adamw.state[source[0].weight]["exp_avg"])
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(float(opt.step(lambda: F.mse_loss(model(x), y))))
    assert max(losses) <= losses[0] and losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("resume", ["load_state_dict", "deepcopy", "pickle"])
def test_a_group_added_after_a_resume_has_the_keys_of_one_added_without(resume):
    """torch's __setstate__ (load_state_dict runs it too) adds defaults['differentiable']: a group added
    after a resume carried a key the same group added in an uninterrupted run has not."""
    def trained():
        model = _model()
        opt = FusedSaLSa(model[0].parameters(), backend="torch")
        _train(model, opt, 2)
        return model, opt

    model, opt = trained()
    if resume == "load_state_dict":
        opt.load_state_dict(deepcopy(opt.state_dict()))
    elif resume == "deepcopy":
        model, opt = deepcopy((model, opt))
    else:
        model, opt = _roundtrip((model, opt))
    opt.add_param_group({"params": list(model[2].parameters())})
    other_model, uninterrupted = trained()
    uninterrupted.add_param_group({"params": list(other_model[2].parameters())})
    assert opt.param_groups[1].keys() == uninterrupted.param_groups[1].keys()
    assert opt.defaults == uninterrupted.defaults


class _NeverSearch:
    """A schedule that never searches: every step applies ``init_step_size``, so two runs from the same
    weights and moments take the same steps exactly when their bias corrections count the same."""

    def scale(self, step: int) -> float:
        return 1.0

    def searches(self, step: int) -> bool:
        return False


def _sat_out_run(backend: str):
    """A model, an optimizer that never searches, and its batch, after 7 steps in which the last bias sat
    out steps 3 and 4 (its ``steps_sat_out`` is 2)."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = x[:, :1].sin()
    torch.manual_seed(0)
    model = tanh_mlp(4, 8, 1)
    opt = FusedSaLSa(model.parameters(), backend=backend, schedule=_NeverSearch(), init_step_size=1e-2)
    for step in range(7):
        model[2].bias.requires_grad_(step not in (2, 3))
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
    model[2].bias.requires_grad_(True)
    return model, opt, (x, y)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_adamw_checkpoint_carries_each_parameters_step_into_the_bias_corrections(backend):
    """AdamW's per-parameter ``step`` used to be dropped at load: Adam's bias corrections started over on
    moments already averaged (the first direction 0.32x at betas (0.9, 0.999)). Handed to AdamW by
    docs/training.md's recipe and loaded back, a run's moments and counts (one parameter 2 steps behind)
    now take the next step bitwise as the run itself does, with the same level, and the counts go on."""
    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built")
    model, opt, (x, y) = _sat_out_run(backend)
    group = opt.param_groups[0]
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=group["betas"], eps=group["eps"],
                              weight_decay=group["weight_decay"])
    for p in model.parameters():  # the recipe, for a run of one group that no parameter sits out now
        s = opt.state[p]
        adamw.state[p] = {"step": torch.tensor(float(opt.search_state.step - s.get("steps_sat_out", 0))),
                          "exp_avg": s["exp_avg"].clone(), "exp_avg_sq": s["exp_avg_sq"].clone()}
    assert [float(adamw.state[p]["step"]) for p in model.parameters()] == [7.0, 7.0, 7.0, 5.0]
    switched = tanh_mlp(4, 8, 1)
    switched.load_state_dict(model.state_dict())
    loaded = FusedSaLSa(switched.parameters(), backend=backend, schedule=_NeverSearch(), init_step_size=1e-2)
    with pytest.warns(UserWarning, match="bias corrections go on from each parameter's 'step'"):
        loaded.load_state_dict(adamw.state_dict())
    assert loaded.param_groups[0]["moments_start_step"] == -7
    assert [loaded.state[p].get("steps_sat_out", 0) for p in switched.parameters()] == [0, 0, 0, 2]
    assert all("step" not in loaded.state[p] for p in switched.parameters())  # carried, not kept stale
    for run, optimizer in ((model, opt), (switched, loaded)):
        optimizer.zero_grad()
        optimizer.step(lambda: F.mse_loss(run(x), y))
    for p, q in zip(model.parameters(), switched.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], loaded.state[q]["exp_avg_sq"])
    resumed = FusedSaLSa(tanh_mlp(4, 8, 1).parameters(), backend=backend)
    resumed.load_state_dict(_roundtrip(loaded.state_dict()))  # a negative moments_start_step is a checkpoint's
    assert resumed.param_groups[0]["moments_start_step"] == -7


@pytest.mark.parametrize("step, shown", [(-1.0, "-1.0"), (2.5, "2.5"), (torch.ones(2), "a torch.float32 tensor")])
def test_an_adamw_checkpoint_with_a_bad_step_is_refused(step, shown):
    """A ``step`` that counts no steps (negative, fractional, not one number) is named, nothing loaded."""
    model, opt, _ = _sat_out_run("torch")
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for i, p in enumerate(model.parameters())}
    state[1]["step"] = step
    saved = {"state": state, "param_groups": [{**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                                               "params": [0, 1, 2, 3]}]}
    saved["param_groups"][0].pop("moments_start_step", None)
    assert_load_refused(opt, saved, rf"parameter 1 has 'step'={shown}.*a whole number >= 0")


def _named_run():
    model = tanh_mlp(8, 8, 8, 1)
    opt = FusedSaLSa(model.named_parameters(), backend="torch")
    _train(model, opt, 0)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), x[:, :1]))
    return model, opt


def test_a_checkpoint_of_the_same_named_parameters_in_another_order_is_refused():
    """torch loads by position: two layers of one shape swapped took each other's moments, silently (a
    helper's finding), and the live group's param_names became the checkpoint's. Named on both sides,
    the same names in another order are refused, nothing loaded; the pre hook of docs/training.md loads it."""
    model, opt = _named_run()
    saved = _roundtrip(opt.state_dict())
    other_model = tanh_mlp(8, 8, 8, 1)
    named = dict(other_model.named_parameters())
    order = ["2.weight", "2.bias", "0.weight", "0.bias", "4.weight", "4.bias"]
    other = FusedSaLSa([(name, named[name]) for name in order], backend="torch")
    assert_load_refused(other, saved, r"the checkpoint's parameters are this optimizer's in another order: its "
                                      r"parameter 0 is '0.weight', and this optimizer's '2.weight'")
    other.register_load_state_dict_pre_hook(_by_param_names)
    other.load_state_dict(saved)
    assert other.param_groups[0]["param_names"] == order
    sources = dict(model.named_parameters())
    assert all(torch.equal(other.state[named[name]]["exp_avg"], opt.state[sources[name]]["exp_avg"])
               for name in order)


def test_param_names_that_differ_otherwise_load_by_position_and_keep_this_optimizers_names():
    """A wrapper's prefix (``_orig_mod.`` of torch.compile, ``module.`` of DDP) cannot be matched: the
    checkpoint loads by position, as in torch, and the groups keep the names of their own tensors."""
    model, opt = _named_run()
    saved = _roundtrip(opt.state_dict())
    other_model = tanh_mlp(8, 8, 8, 1)
    other = FusedSaLSa([(f"module.{name}", p) for name, p in other_model.named_parameters()], backend="torch")
    other.load_state_dict(saved)
    assert other.param_groups[0]["param_names"] == [f"module.{name}" for name, _ in model.named_parameters()]
    assert all(torch.equal(other.state[q]["exp_avg"], opt.state[p]["exp_avg"])
               for p, q in zip(model.parameters(), other_model.parameters()))


def test_saved_counts_copied_into_the_live_state_past_load_state_dict_read_as_taking_part():
    """ZeroRedundancyOptimizer.load_state_dict writes each saved entry into the inner optimizer's state as
    it is: ``sat_out_since=-1`` (taking part, as state_dict() writes it) was read as a stretch sat out since
    step -1, and every parameter's bias corrections lost group_steps + 1 steps at the next rebuild."""
    runs = []
    for copied in (False, True):
        model, opt = _named_run()
        if copied:
            saved = opt.state_dict()["state"]
            for index, p in enumerate(model.parameters()):
                opt.state[p].update(saved[index])
            opt._buckets.clear()  # a rebuild reads the counts
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(4):
            opt.zero_grad()
            opt.step(lambda: F.mse_loss(model(x), x[:, :1]))
        runs.append([p.detach().clone() for p in model.parameters()])
        assert all(opt.state[p].get("steps_sat_out", 0) == 0 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_an_sgd_checkpoint_is_refused_as_another_optimizers_not_as_corrupt():
    """SGD's checkpoint (a momentum buffer, no betas or eps) was refused as 'corrupt'; it is another optimizer's."""
    import warnings

    model = torch.nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    sgd.step()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"has no 'betas', 'eps': every step reads it; it "
                                                                    r"was saved by another optimizer"):
        warnings.simplefilter("ignore")
        opt.load_state_dict(sgd.state_dict())


def test_a_checkpoint_with_numpy_scalars_in_its_search_state_loads_as_python_numbers():
    """np.int64(3) for the step count was refused as 'must be an integer >= 0, got np.int64(3)' (an audit)."""
    import numpy as np

    model = torch.nn.Linear(3, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    closure = lambda: model(torch.ones(4, 3)).pow(2).mean()  # noqa: E731
    opt.step(closure)
    saved = opt.state_dict()
    search = saved["param_groups"][0]["search"]
    as_numpy = deepcopy(saved)
    as_numpy["param_groups"][0]["search"].update(step=np.int64(search["step"]),
                                                 step_size=np.float32(search["step_size"]),
                                                 slope_avg=np.float64(search["slope_avg"]))
    twin = FusedSaLSa(model.parameters(), backend="torch")
    twin.load_state_dict(as_numpy)
    loaded = twin.state_dict()["param_groups"][0]["search"]
    assert type(loaded["step"]) is int and type(loaded["step_size"]) is float
    assert loaded["step"] == search["step"] and loaded["step_size"] == float(np.float32(search["step_size"]))


def test_a_checkpoint_names_its_format_and_one_of_a_newer_format_is_refused_with_nothing_changed():
    """Checkpoints carried no format: a reader older than its writer misread what it could not know, or refused it
    by listing keys it did not know (an audit's check across seven earlier versions)."""
    model = _model()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    _train(model, opt, 4)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["search"]["format"] == 1
    newer = deepcopy(saved)
    newer["param_groups"][0]["search"]["format"] = 2
    newer["param_groups"][0]["search"]["a_later_field"] = 0.5
    assert_load_refused(opt, newer, r"written by a newer salsa_fused, in checkpoint format 2; this version "
                                    r"\(salsa_fused [^)]*\) reads formats up to 1: upgrade salsa_fused")
    for corrupt in ("1", -1, True, 1.5):
        edited = deepcopy(saved)
        edited["param_groups"][0]["search"]["format"] = corrupt
        assert_load_refused(opt, edited, r"the checkpoint's format \(search\['format'\]\) is .*not a count")
    unnamed = deepcopy(saved)  # as written before the format was
    del unnamed["param_groups"][0]["search"]["format"], unnamed["param_groups"][0]["search"]["configuration"]
    resumed = FusedSaLSa(model.parameters(), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(unnamed)
        resumed.load_state_dict(deepcopy(saved))
    assert resumed.search_state == opt.search_state
    assert "format" in saved["param_groups"][0]["search"]  # the caller's dict is as it was


def test_a_checkpoint_loaded_into_an_optimizer_configured_otherwise_warns_naming_what_differs():
    """A checkpoint kept no configuration: resumed with another total_steps, preset or constant, or under a version
    whose preset changed (decay_from_hold, 2026-12-05), the run went on otherwise without a word (an audit's check)."""
    from salsa_fused import presets

    model = _model()
    opt = presets.from_preset(model.parameters(), "pretrain", total_steps=40, backend="torch")
    _train(model, opt, 6)
    saved = opt.state_dict()
    same = presets.from_preset(model.parameters(), "pretrain", total_steps=40, backend="cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another backend takes the same steps: not a configuration
        same.load_state_dict(deepcopy(saved))
    longer = presets.from_preset(model.parameters(), "pretrain", total_steps=80, backend="torch")
    with pytest.warns(UserWarning, match=r"configured otherwise, and the run goes on as this one is: schedule "
                                         r"total_steps=40 there, 80 here\. A run extended on purpose") as caught:
        longer.load_state_dict(deepcopy(saved))
    assert caught[0].filename == __file__
    plain = FusedSaLSa([{"params": group["params"]} for group in opt.param_groups], backend="torch")
    with pytest.warns(UserWarning, match=r"search_direction 'momentum' there, 'gradient' here; schedule "
                                         r"WarmupStableDecay\(total_steps=40, .*\) there, None here; beta3 0.95 "
                                         r"there, 0.9 here\."):
        plain.load_state_dict(deepcopy(saved))
    assert plain.search_state == opt.search_state  # loaded: the run goes on as configured here


def test_the_configuration_compares_what_decides_the_steps_not_addresses_or_wrappers():
    """A dataclass schedule holding a function printed its address, so every resume warned; a StepSizeBeam's or
    LRFactorSearch's wrapper recorded only its own name, so a wrapped schedule's change went unseen and a wrapper
    installed after the load warned; a load refused after the warning had already said the run goes on (a
    review's check). And a checkpoint's count of untested searches past float64 raised OverflowError at a step."""
    import dataclasses as dc

    from salsa_fused import LRFactorSearch, StepSizeBeam, presets, step_size

    @dc.dataclass(frozen=True)
    class Shaped:
        shape: object = lambda k: 1.0

        def scale(self, step):
            return self.shape(step)

        def searches(self, step):
            return True

    model = _model()

    def built(schedule):
        return FusedSaLSa(model.parameters(), schedule=schedule, backend="torch")

    saved = built(Shaped(lambda k: 1.0)).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built(Shaped(lambda k: 1.0)).load_state_dict(deepcopy(saved))  # another function, at another address
    preset = presets.from_preset(model.parameters(), "pretrain", total_steps=40, backend="torch")
    StepSizeBeam(preset, 40)
    _train(model, preset, 2)
    saved = preset.state_dict()
    assert "ScaledSchedule" not in str(saved["param_groups"][0]["search"]["configuration"])
    resumed = presets.from_preset(model.parameters(), "pretrain", total_steps=40, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(deepcopy(saved))  # the beam installed after the load: the same schedule
    resumed = presets.from_preset(model.parameters(), "pretrain", total_steps=400, backend="torch")
    LRFactorSearch(resumed, 10)
    with pytest.warns(UserWarning, match="schedule total_steps=40 there, 400 here"):
        resumed.load_state_dict(deepcopy(saved))
    other = FusedSaLSa(_groups(_model()), schedule=step_size.Cooldown(0, 10), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused for its model, with no word of a configuration first
        with pytest.raises(ValueError, match="nothing was loaded"):
            other.load_state_dict(deepcopy(saved))
    counted = built(None).state_dict()
    counted["param_groups"][0]["search"]["untested_searches"] = 100_000
    opt = FusedSaLSa(model.parameters(), growth=2.0, backend="torch")
    with pytest.warns(UserWarning, match="growth 1.1 there, 2.0 here"):
        opt.load_state_dict(counted)
    _train(model, opt, 1)
