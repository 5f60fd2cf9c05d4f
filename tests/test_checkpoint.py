"""Checkpoints: a run saved at step N and resumed in a fresh model and optimizer takes the
same next steps, bit for bit (torch.save and torch.distributed.checkpoint flows).

The resumed objects are built with a different seed and init_step_size, so everything
that matters must come from the checkpoint. The DDP (new processes) and FSDP2 (sharded
state through torch.distributed.checkpoint) versions are in test_distributed.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings

import pytest
import torch

from examples.gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus
from salsa_fused import FusedSaLSa, presets

SAVE_AT, STOP_AT = 12, 20


@pytest.fixture(scope="module")
def batches():
    return ByteBatches(load_stdlib_corpus(max_bytes=100_000), block_size=16)


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    # dropout on: the resumed run must also replay the random stream
    config = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    return GPT(config).to(dtype)


def _optimizer(model, init_step_size=1.0):
    return FusedSaLSa(model.param_groups(weight_decay=0.1), init_step_size=init_step_size,
                      search_direction="momentum", backend="torch")


def _run(batches, model, opt, generator, steps, on_step=None):
    weights = []
    for step in steps:
        if on_step is not None:
            on_step(step)
        if step == 9:  # fast == slow averages: the interval jumps to 10, plain steps follow
            search = opt.search_state
            search.step_size_fast = search.step_size_slow
            opt._commit(search)
        x, y = batches.get("train", 4, generator)
        opt.zero_grad()
        opt.step(lambda: model(x, y)[1])
        weights.append(torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]))
    return weights


def _resume_check(batches, save, load, dtype=torch.float32):
    """Run SAVE_AT..STOP_AT uninterrupted, then again from the checkpoint; compare."""
    model, generator = _model(0, dtype), torch.Generator().manual_seed(0)
    opt = _optimizer(model)
    checkpoint = {}

    def maybe_save(step):
        if step == SAVE_AT:
            checkpoint.update(save(model, opt))
            checkpoint["rng"] = torch.get_rng_state()
            checkpoint["data_rng"] = generator.get_state()

    expected = _run(batches, model, opt, generator, range(STOP_AT), maybe_save)[SAVE_AT:]
    assert 0 < opt.num_searches < STOP_AT  # both searches and plain steps after the save
    final_state = opt.search_state

    model, generator = _model(1, dtype), torch.Generator()
    opt = _optimizer(model, init_step_size=0.3)
    load(model, opt, checkpoint)
    torch.set_rng_state(checkpoint["rng"])
    generator.set_state(checkpoint["data_rng"])
    for state in opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    resumed = _run(batches, model, opt, generator, range(SAVE_AT, STOP_AT))
    for step, (a, b) in enumerate(zip(resumed, expected), start=SAVE_AT):
        assert torch.equal(a, b), f"resumed run differs at step {step}: max |diff| {(a - b).abs().max():.3e}"
    assert opt.search_state == final_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_save_resume_continues_identically(batches, dtype):
    def save(model, opt):
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
        return {"bytes": buffer.getvalue()}

    def load(model, opt, checkpoint):
        state = torch.load(io.BytesIO(checkpoint["bytes"]), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    _resume_check(batches, save, load, dtype)


def test_distributed_checkpoint_resume_continues_identically(batches, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    def save(model, opt):
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path))
        return {}

    def load(model, opt, checkpoint):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        _resume_check(batches, save, load)


def _labpal_run(model, opt, steps):
    for step in steps:
        opt.zero_grad()

        def closure(i, step=step):
            g = torch.Generator().manual_seed(10_000 * step + i)
            x = torch.randn(16, 8, generator=g)
            return torch.nn.functional.mse_loss(model(x), x[:, :1].sin())

        opt.step(closure)


def test_labpal_resumes_through_distributed_checkpoint_into_a_fresh_optimizer(tmp_path):
    """dcp.load fills only the keys of the fresh optimizer's state dict: LABPAL's scalars must be
    there before its first step, or they are dropped and the load is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from salsa_fused.labpal import LABPALRule

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        rule = LABPALRule("NSGD", approximation_batches=3, sgd_steps=5)
        return model, FusedSaLSa(model.parameters(), search_rule=rule, backend="torch")

    model, opt = build()
    _labpal_run(model, opt, range(20))
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    _labpal_run(model, opt, range(12))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path))
        model, opt = build()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _labpal_run(model, opt, range(12, 20))
    for a, b in zip(expected, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("missing", ["search.scale_hold", "moments_start_step"])
def test_a_distributed_checkpoint_without_a_later_field_loads_as_docs_training_says(tmp_path, missing):
    """docs/training.md: dcp.load refuses a checkpoint whose search state or groups lack a field added since
    (an earlier version's); with allow_partial_load the field keeps its starting value, as a
    torch.save checkpoint of that version gets."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    saved = get_optimizer_state_dict(model, opt)
    if missing == "moments_start_step":  # as a version before state_dict() wrote it in every group
        del saved["param_groups"][0]["moments_start_step"]
    else:  # as a version before that field
        del saved["param_groups"][0]["search"]["scale_hold"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"optim": saved}, checkpoint_id=str(tmp_path))
        fresh = FusedSaLSa(model.parameters(), backend="torch")
        state = {"optim": get_optimizer_state_dict(model, fresh)}
        with pytest.raises((RuntimeError, dcp.api.CheckpointException),  # the latter wraps it in one process
                           match=f"Missing key in checkpoint state_dict: optim.param_groups.0.{missing}"):
            dcp.load(state, checkpoint_id=str(tmp_path))
        state = {"optim": get_optimizer_state_dict(model, fresh)}
        dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, fresh, state["optim"])
    assert fresh.search_state == dataclasses.replace(opt.search_state, scale_hold=fresh.search_state.scale_hold)
    assert fresh.search_state.scale_hold == type(opt.search_state)().scale_hold
    assert "moments_start_step" not in fresh.param_groups[0]


def test_a_distributed_checkpoint_loaded_into_groups_in_another_order_keeps_its_search_state(tmp_path):
    """torch.distributed.checkpoint matches groups by parameter name, so the checkpoint's first group
    (the one with the search state) may become this optimizer's second: it was dropped there, the
    level back at init_step_size and the step counter at 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build(reverse):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        named = list(model.named_parameters())
        groups = [{"params": [p for name, p in named if name.endswith("weight")], "weight_decay": 0.1},
                  {"params": [p for name, p in named if name.endswith("bias")]}]
        return model, FusedSaLSa(groups[::-1] if reverse else groups, backend="torch")

    def run(model, opt, steps):
        for step in steps:
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].sin()))

    model, opt = build(reverse=False)
    run(model, opt, range(20))
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = build(reverse=False)
    run(model, opt, range(12))
    saved_search = opt.search_state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        resumed_model, resumed = build(reverse=True)
        resumed_model.load_state_dict(model.state_dict())
        state = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(resumed_model, resumed, state["optim"])
    assert resumed.search_state == saved_search
    assert [group["weight_decay"] for group in resumed.param_groups] == [0.0, 0.1]
    run(resumed_model, resumed, range(12, 20))
    for a, b in zip(expected, resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("preset", [None, "pretrain"])
def test_a_distributed_checkpoint_keeps_the_step_a_group_was_added_at(tmp_path, preset):
    """A group added at step 5 counts its bias corrections from there (moments_start_step). The resume adds it
    again at step 0, so the fresh optimizer's state dict had no such key, and dcp.load fills only the keys
    it finds there: the group counted from step 0, and six steps on the weights were 0.014 (the preset:
    0.033) from the uninterrupted run's, with no warning (an audit's check)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        body = model[0].parameters()
        opt = (FusedSaLSa(body, backend="torch") if preset is None else
               presets.from_preset(body, preset, total_steps=40, backend="torch"))
        return model, opt

    def run(model, opt, steps):
        for step in steps:
            if step == 5 and not any(p is model[2].weight for group in opt.param_groups for p in group["params"]):
                opt.add_param_group({"params": list(model[2].parameters())})
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].sin()))

    model, opt = build()
    run(model, opt, range(14))
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    run(model, opt, range(8))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        resumed_model, resumed = build()
        resumed.add_param_group({"params": list(resumed_model[2].parameters())})  # as docs/training.md says
        resumed_model.load_state_dict(model.state_dict())
        state = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(resumed_model, resumed, state["optim"])
    assert [group.get("moments_start_step") for group in resumed.param_groups][-1] == 5
    assert all("moments_start_step" not in group for group in resumed.param_groups[:-1])
    run(resumed_model, resumed, range(8, 14))
    for a, b in zip(expected, resumed_model.parameters()):
        assert torch.equal(a, b)


def test_distributed_checkpoint_creates_the_state_of_an_optimizer_built_while_its_parameters_were_frozen(tmp_path):
    """torch.distributed.checkpoint's state-dict API creates an empty optimizer's state by a step with no
    closure, zero gradients and lr 0 (_init_optim_state). That step raised "step() needs closure", and left
    every group at lr 0 and every parameter with a zero gradient (an audit's check)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        model.requires_grad_(False)
        opt = FusedSaLSa(model.parameters(), backend="torch")
        model.requires_grad_(True)  # unfrozen after the optimizer was built: it has no state yet
        return model, opt

    def run(model, opt, steps):
        for step in steps:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].cos()))

    model, opt = build()
    assert not opt.state
    run(model, opt, range(10))
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        state = get_optimizer_state_dict(model, opt)
        assert [group["lr"] for group in opt.param_groups] == [1.0]
        assert all(p.grad is None for p in model.parameters())
        assert opt.search_state.step == 0 and opt.num_forward_evals == 0
        assert all(not entry["exp_avg"].any() and not entry["exp_avg_sq"].any() for entry in state["state"].values())
        run(model, opt, range(6))
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        weights = model.state_dict()
        model, opt = build()
        model.load_state_dict(weights)
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model, opt, state["optim"])
    run(model, opt, range(6, 10))
    for a, b in zip(expected, model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="needs closure"):  # a step without closure is refused as before
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    model, opt = build()  # the user's own such step, in a warm-up at lr 0 (a review's check): refused
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs closure"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_parameter_unfrozen_after_the_build_is_in_the_state_dict_and_resumes_through_dcp(tmp_path, backend):
    """A layer frozen when the optimizer was built has no moments until its first gradient. Unfrozen, then saved
    before that, the checkpoint did not name it, and a resume through torch.distributed.checkpoint into an optimizer
    built so refused: 'Missing optimizer state for parameter 0.weight' (a review's check). state_dict() now writes
    zero moments for it, counted as sitting out since its group began, as its first gradient would count them,
    and leaves the optimizer's own state as it is: the resume steps as the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if backend == "cpp":
        pytest.importorskip("salsa_fused._C", reason="the C++ extension is not built")

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        model[0].requires_grad_(False)
        return model, FusedSaLSa(model.parameters(), backend=backend)

    def run(model, opt, steps):
        for step in steps:
            if step == 4:
                model[0].requires_grad_(True)
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].cos()))

    model, opt = build()
    run(model, opt, range(10))
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    run(model, opt, range(4))
    model[0].requires_grad_(True)  # unfrozen, no gradient yet
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        saved = get_optimizer_state_dict(model, opt)
        assert [saved["state"]["0.weight"][key] for key in ("steps_sat_out", "sat_out_since")] == [0, 0]
        assert model[0].weight not in opt.state  # written into the state dict only
        dcp.save({"optim": saved}, checkpoint_id=str(tmp_path))
        weights = copy.deepcopy(model.state_dict())
        run(model, opt, range(4, 10))
        assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters()))  # the save changed nothing
        model, opt = build()
        model.load_state_dict(weights)
        model[0].requires_grad_(True)
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model, opt, state["optim"])
    run(model, opt, range(4, 10))
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters()))


def test_a_state_dict_names_every_groups_start_and_a_load_keeps_none_for_a_group_that_began_with_the_run():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = FusedSaLSa(model[0].parameters(), backend="torch")
    x = torch.randn(8, 4)
    for step in range(3):
        if step == 2:
            opt.add_param_group({"params": list(model[1].parameters())})
        opt.zero_grad()
        opt.step(lambda: model(x).square().mean())
    saved = opt.state_dict()
    assert [group["moments_start_step"] for group in saved["param_groups"]] == [0, 2]
    assert "moments_start_step" not in opt.param_groups[0]  # the live groups are as they were
    opt.load_state_dict(copy.deepcopy(saved))
    assert [group.get("moments_start_step") for group in opt.param_groups] == [None, 2]
    assert saved["param_groups"][0]["moments_start_step"] == 0  # the caller's dict is not edited


@pytest.mark.parametrize("scheduler", ["lambda", "one_cycle"])
def test_a_checkpoint_saved_before_search_lr_mid_warm_up_takes_the_lr_the_group_was_built_with(scheduler):
    """Saved at step 6 of a 20-step LambdaLR warm-up, lr was 0.35: it became search_lr, and searches tested 0.35
    eta while the warm-up went on to apply up to 1.0 eta, 2.9x what they accepted (an audit's check of a
    checkpoint from 7ec43f0). A scheduler's initial_lr is the lr the group was built with; OneCycleLR's is not
    (max_lr / div_factor), and the group built for the load says it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = FusedSaLSa(model.parameters(), backend="torch")
    make = {"lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: min(1.0, (k + 1) / 20)),
            "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=20)}[scheduler]
    sched = make(opt)
    x = torch.randn(16, 4)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: model(x).pow(2).mean())
        sched.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["lr"] < 0.9 and saved["param_groups"][0]["search_lr"] == 1.0
    del saved["param_groups"][0]["search_lr"]  # as an earlier version saved it
    resumed = FusedSaLSa(torch.nn.Linear(4, 1).parameters(), backend="torch")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["search_lr"] == 1.0


def test_a_checkpoint_saved_before_counts_of_steps_sat_out_reads_zero_moments_as_never_stepped():
    """Versions before the counts kept zero moments for a layer with no gradient yet, and no count: loaded, the
    layer was taken as taking part until the resume, then counted as sitting out from there (2 of its 8 steps
    sat out; an audit's check of c89a350's checkpoints). Its zero moments now say it sat out from the start, as
    this version counts such a layer, and the run resumes as this version's own uninterrupted run."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"early": torch.nn.Linear(4, 4), "late": torch.nn.Linear(4, 1)})
        return model, FusedSaLSa(model.parameters(), backend="torch")

    x = torch.randn(16, 4)

    def run(model, opt, steps):
        for k in steps:
            opt.zero_grad()
            if k < 4:  # the late layer has no gradient yet
                opt.step(lambda: model["early"](x).pow(2).mean())
            else:
                opt.step(lambda: (model["late"](torch.tanh(model["early"](x))) - 1).pow(2).mean())

    model, opt = build()
    run(model, opt, range(3))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    run(model, opt, range(3, 8))
    expected = [p.detach().clone() for p in model.parameters()]
    old = saved["optimizer"]
    late = old["state"][2], old["state"][3]  # the late layer's weight and bias: zero moments, sat out since 0
    assert all(e["sat_out_since"] == 0 and not e["exp_avg_sq"].any() for e in late)
    for entry in old["state"].values():
        for name in ("steps_sat_out", "sat_out_since"):
            del entry[name]  # as an earlier version saved it
    resumed_model, resumed = build()
    resumed_model.load_state_dict(saved["model"])
    with pytest.warns(UserWarning, match=r"saved before the counts of steps sat out, and parameter\(s\) 2, 3 have "
                                         "moments of zeros"):
        resumed.load_state_dict(old)
    run(resumed_model, resumed, range(3, 8))
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed_model.parameters()))


def test_a_labpal_checkpoint_saved_before_the_counts_is_not_read_as_parameters_that_never_stepped():
    """LABPAL moves along the raw gradient and never writes Adam's moments, so every parameter's are zeros: a
    checkpoint saved before the counts of steps sat out warned that parameters 0-3 had no gradient yet, and
    counted all of them as sitting out since step 0 (steps_sat_out 15 five steps on; an audit's check)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = FusedSaLSa(model.parameters(), search_rule="labpal", backend="torch")
    _labpal_run(model, opt, range(6))
    old = copy.deepcopy(opt.state_dict())
    for entry in old["state"].values():
        for name in ("steps_sat_out", "sat_out_since"):
            del entry[name]  # as an earlier version saved it
    resumed = FusedSaLSa(model.parameters(), search_rule="labpal", backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(old)
    _labpal_run(model, resumed, range(6, 11))
    counts = [(entry["steps_sat_out"], entry["sat_out_since"]) for entry in resumed.state_dict()["state"].values()]
    assert counts == [(0, -1)] * 4


def _without_first_group(saved: dict, keep_search: bool) -> dict:
    """``saved`` with its param_groups[0] removed as torch users remove a group (docs/training.md), the search
    state moved to the new first group when ``keep_search``."""
    saved = copy.deepcopy(saved)
    first, rest = saved["param_groups"][0], saved["param_groups"][1:]
    gone = set(first["params"])
    renumber = {old: new for new, old in enumerate(i for group in rest for i in group["params"])}
    state = {renumber[key]: entry for key, entry in saved["state"].items() if key not in gone}
    groups = [{**group, "params": [renumber[i] for i in group["params"]]} for group in rest]
    if keep_search:
        groups[0]["search"] = first["search"]
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("added_mid_run", [False, True])
def test_removing_the_first_param_group_names_where_the_search_state_went(added_mid_run):
    """Filtering param_groups[0] out lost the search state with it: a warning blamed another optimizer, or (the
    kept group added mid-run) a refusal read like a corrupt checkpoint (an audit's check). Both now name the
    removed group; moving its 'search' entry, as docs/training.md says, resumes as the uninterrupted run."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    x = torch.randn(16, 4)
    closure = lambda: (second(torch.tanh(first(x))) - 1).pow(2).mean()  # noqa: E731
    if added_mid_run:
        opt = FusedSaLSa(first.parameters(), backend="torch")
        for _ in range(3):
            opt.zero_grad()
            opt.step(closure)
        opt.add_param_group({"params": list(second.parameters())})
    else:
        opt = FusedSaLSa([{"params": list(first.parameters())}, {"params": list(second.parameters())}],
                         backend="torch")
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    saved = opt.state_dict()
    first.requires_grad_(False)
    kept = FusedSaLSa([{"params": list(second.parameters())}], backend="torch")
    if added_mid_run:
        with pytest.raises(ValueError, match=r"moments_start_step=3: .*no param group has 'search', the search state "
                                             r"and its step count, .*was that group removed from the checkpoint"):
            kept.load_state_dict(_without_first_group(saved, keep_search=False))
    else:
        with pytest.warns(UserWarning, match=r"saved by this optimizer, and then its param_groups\[0\], where "
                                             r"state_dict\(\) keeps the search state, was removed"):
            kept.load_state_dict(_without_first_group(saved, keep_search=False))
    kept = FusedSaLSa([{"params": list(second.parameters())}], backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept.load_state_dict(_without_first_group(saved, keep_search=True))
    assert kept.search_state == opt.search_state


def test_a_checkpoint_saved_before_groups_had_search_lr_takes_it_from_the_groups_lr():
    """A checkpoint of an earlier salsa_fused has no 'search_lr' in its param groups: the group's saved lr
    stands in for it (the lr it was built at, what search_lr keeps), not 1 and not the loading optimizer's own,
    and the run resumes as the uninterrupted one."""
    def build(lr):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        return model, FusedSaLSa(model.parameters(), lr=lr, backend="torch")

    def run(model, opt, steps):
        for step in steps:
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].sin()))

    model, opt = build(lr=0.5)
    run(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    run(model, opt, range(3, 6))
    expected = [p.detach().clone() for p in model.parameters()]

    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        assert group["search_lr"] == 0.5
        del group["search_lr"]  # as an earlier version saved it
    resumed_model, resumed = build(lr=0.25)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    assert [(group["lr"], group["search_lr"]) for group in resumed.param_groups] == [(0.5, 0.5)]
    run(resumed_model, resumed, range(3, 6))
    for a, b in zip(expected, resumed_model.parameters()):
        assert torch.equal(a, b)


def _sitting_out_run(model, opt, steps):
    """The first bias sits out steps 1-2; the last one sits out steps 4-7 (across a save at 6)."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for step in steps:
        model[0].bias.requires_grad_(step not in (1, 2))
        model[2].bias.requires_grad_(not 4 <= step < 8)
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), x[:, :1].sin()))


def _sitting_out_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, FusedSaLSa(model.parameters(), backend="torch", init_step_size=0.5 + seed)


def test_a_distributed_checkpoint_keeps_each_parameters_count_of_steps_sat_out(tmp_path):
    """dcp.load fills only the keys of the fresh optimizer's state dict, which has both counts for every
    parameter: the resumed run's bias corrections count the steps sat out before the save and the
    stretch that goes on across it, and it continues bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _sitting_out_model(0)
    _sitting_out_run(model, opt, range(6))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        resumed_model, resumed = _sitting_out_model(1)
        resumed_model.load_state_dict(model.state_dict())
        state = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(resumed_model, resumed, state["optim"])
    assert resumed.state[resumed_model[0].bias]["steps_sat_out"] == 2
    assert resumed.state[resumed_model[2].bias]["sat_out_since"] == 4
    _sitting_out_run(model, opt, range(6, 10))
    _sitting_out_run(resumed_model, resumed, range(6, 10))
    assert resumed.state[resumed_model[2].bias]["steps_sat_out"] == opt.state[model[2].bias]["steps_sat_out"] == 4
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_a_flattened_distributed_state_dict_loads_without_the_counts_it_cannot_place():
    """With flatten_optimizer_state_dict=True the search state is dropped (docs/training.md), and with it
    the step count the counts of steps sat out are counted in: the load warns and keeps no count, where
    it refused the checkpoint as corrupt (their counts exceeded the lost step count of 0)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model, opt = _sitting_out_model(0)
    _sitting_out_run(model, opt, range(6))
    flat = get_optimizer_state_dict(model, opt, options=options)
    assert flat["state.0.bias.steps_sat_out"] == 2 and flat["state.2.bias.sat_out_since"] == 4
    resumed_model, resumed = _sitting_out_model(1)
    with pytest.warns(UserWarning, match=r"no parameter's count of steps sat out"):
        set_optimizer_state_dict(resumed_model, resumed, flat, options=options)
    assert not any("sat_out" in key for state in resumed.state.values() for key in state)
    assert resumed.search_state.step == 0


def _dropout_run(steps, save_at=None, state=None, mark_after_load=True):
    """A two-phase loop that clears gradients with ``model.zero_grad()`` (no ``opt.zero_grad()`` before the
    forward: the trials replay the state the last step ended at), saved at ``save_at`` or resumed from ``state``
    as docs/training.md's recipe does. Returns (weights, search state, the checkpoint if saved)."""
    torch.manual_seed(0 if state is None else 5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1))
    opt = FusedSaLSa(model.parameters(), backend="torch", init_step_size=1.0 if state is None else 0.1)
    first, saved = 0, None
    if state is not None:
        state = torch.load(io.BytesIO(state), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if mark_after_load:
            opt.mark_forward()
        first = state["step"]
    else:
        torch.manual_seed(1)
    for k in range(first, steps):
        x = torch.linspace(-1, 1, 96).reshape(16, 6) * (1 + k % 3)
        y = torch.sin(x.sum(1, keepdim=True))
        closure = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        model.zero_grad()
        loss = closure()
        loss.backward()
        opt.step(closure, loss=loss.detach())
        if k + 1 == save_at:
            opt.report_nonfinite()
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                        "step": k + 1}, buffer)
            saved = buffer.getvalue()
    return [p.detach().clone() for p in model.parameters()], opt.search_state, saved


def test_the_recipe_resumes_a_two_phase_loop_without_opt_zero_grad_bitwise():
    """docs/training.md's recipe, in a two-phase loop with dropout whose forward no ``opt.zero_grad()`` precedes:
    the replay point such a loop's searches use is not in the state dict, and ``opt.mark_forward()`` after the
    load gives it back. Without it the first search after the resume drew other masks (weights 0.04-0.19
    apart over a helper's resume points)."""
    straight, straight_state, _ = _dropout_run(14)
    _, _, checkpoint = _dropout_run(14, save_at=5)
    resumed, resumed_state, _ = _dropout_run(14, state=checkpoint)
    assert straight_state.num_searches > 3
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert dataclasses.asdict(straight_state) == dataclasses.asdict(resumed_state)
    unmarked, unmarked_state, _ = _dropout_run(14, state=checkpoint, mark_after_load=False)
    assert dataclasses.asdict(unmarked_state) != dataclasses.asdict(straight_state)  # why the recipe marks it
