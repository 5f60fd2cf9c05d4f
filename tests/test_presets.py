"""Named FusedSaLSa configurations: they construct, say what they set, and train a tiny model."""

from dataclasses import replace

import pytest
import torch

from salsa_fused import FusedSaLSa, presets
from salsa_fused.line_search import ArmijoSearch
from salsa_fused.step_size import WarmupStableDecay


def tiny_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.GELU(), torch.nn.Linear(24, 3))
    x = torch.randn(96, 6)
    y = (x[:, :3] * x[:, 3:]).argmax(1)
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_trains_a_tiny_model(name):
    model, closure = tiny_problem()
    opt = presets.from_preset(model.parameters(), name, total_steps=40, backend="torch")
    assert isinstance(opt, FusedSaLSa)
    first = float(closure().detach())
    for _ in range(40):
        opt.zero_grad()
        opt.step(closure)
    assert float(closure().detach()) < 0.7 * first


def test_faithful_preset_is_the_default_configuration():
    w = torch.nn.Parameter(torch.ones(2))
    default, faithful = FusedSaLSa([w]), presets.from_preset([w], "faithful")
    assert faithful.search_config == default.search_config
    assert faithful.search_rule is ArmijoSearch and faithful.schedule is None
    assert faithful.search_direction == default.search_direction == "gradient"
    assert faithful.defaults == default.defaults


def test_author_and_recommended_presets_set_what_they_document():
    w = torch.nn.Parameter(torch.ones(2, 2))
    author = presets.from_preset([w], "author_gpt")
    assert author.search_config.beta3 == 0.99 and author.search_direction == "momentum"
    assert author.param_groups[0]["weight_decay"] == 0.1
    rec = presets.recommended([w], total_steps=1000)
    assert rec.search_rule is ArmijoSearch and rec.search_config.beta3 == 0.95
    assert rec.search_direction == "momentum" and rec.param_groups[0]["weight_decay"] == 0.1
    assert rec.schedule == WarmupStableDecay(1000, warmup=0.2, decay=0.8, final=0.0, peak=2.0, freeze_below=1 / 16,
                                             backoff_on_loss_rise=True, hold_scale_on_loss_rise=True,
                                             decay_from_hold=True)
    assert rec.schedule.scale(200) == 2.0 and rec.schedule.searches(200) and not rec.schedule.searches(201)
    assert presets.preset_kwargs(presets.RECOMMENDED, 1000)["search_direction"] == rec.search_direction


def test_plain_tensors_are_split_as_the_quality_measurements_split_them():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    opt = presets.recommended(model.parameters(), total_steps=10)  # a generator, as users pass it
    matrices = [model[0].weight, model[2].weight]
    vectors = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in matrices],
                                                                        [id(p) for p in vectors]]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["weight_decay"] for g in presets.recommended(model.parameters(), total_steps=10,
                                                           weight_decay=0.3).param_groups] == [0.3, 0.0]
    only_vectors = presets.recommended([model[0].bias], total_steps=10)  # no empty group
    assert [g["weight_decay"] for g in only_vectors.param_groups] == [0.0]
    everything = presets.recommended([{"params": list(model.parameters())}], total_steps=10)
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):  # a bare tensor, as torch.optim
        presets.recommended(model[0].weight, total_steps=10)
    author = presets.from_preset(model.parameters(), "author_gpt")  # the author's settings: decays all
    assert len(author.param_groups) == 1 and author.param_groups[0]["weight_decay"] == 0.1


def test_named_parameters_split_as_tensors_do_with_their_names_kept():
    """model.named_parameters(), which torch.optim and FusedSaLSa take, decays the matrices only too
    (it once landed whole in the no-decay group)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    named = presets.recommended(model.named_parameters(), total_steps=10)
    plain = presets.recommended(model.parameters(), total_steps=10)
    assert [g["param_names"] for g in named.param_groups] == [["0.weight", "2.weight"],
                                                             ["0.bias", "1.weight", "1.bias", "2.bias"]]
    assert [g["weight_decay"] for g in named.param_groups] == [0.1, 0.0]
    assert [[id(p) for p in g["params"]] for g in named.param_groups] == \
        [[id(p) for p in g["params"]] for g in plain.param_groups]


def test_a_checkpoint_of_the_single_group_layout_loads_into_that_layout_and_not_the_split_one():
    model, closure = tiny_problem()
    old = presets.recommended([{"params": list(model.parameters())}], total_steps=20)
    old.zero_grad()
    old.step(closure)
    saved = old.state_dict()
    split = presets.recommended(model.parameters(), total_steps=20)
    before = split.search_state
    with pytest.raises(ValueError, match=r"checkpoint has 1 parameter group\(s\) and this optimizer 2"):
        split.load_state_dict(saved)
    assert split.search_state == before
    again = presets.recommended([{"params": list(model.parameters())}], total_steps=20)
    again.load_state_dict(saved)
    assert again.search_state == old.search_state


def test_groups_keep_their_own_weight_decay_and_overrides_win():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = presets.recommended([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], total_steps=10,
                              restore="inplace")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.restore_strategy == "inplace"


@pytest.mark.parametrize("call, error, match", [
    (lambda p: presets.from_preset(p, "nope"), ValueError, "unknown preset"),
    (lambda p: presets.from_preset(p, ["pretrain"], total_steps=100), ValueError, r"unknown preset \['pretrain'\]"),
    (lambda p: presets.from_preset(p, "pretrain"), TypeError, "total_steps"),
    (lambda p: presets.from_preset(p, "pretrain", total_steps=-1), ValueError, "total_steps"),
    (lambda p: presets.recommended(p, total_steps=0), ValueError, "total_steps"),
    (lambda p: presets.recommended(p, total_steps=2.5), ValueError, "total_steps"),
    # the name where the parameters go (a new user's first guess): said so, not "can only optimize Tensors"
    (lambda p: presets.recommended("pretrain", total_steps=100), TypeError,
     r"takes the parameters, got the string 'pretrain': recommended\(model.parameters\(\), total_steps=N\)"),
    (lambda p: presets.from_preset("pretrain", p, total_steps=100), TypeError,
     r"takes the parameters first, got the string 'pretrain'"),
])
def test_bad_preset_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call([torch.nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize("total_steps", [1, 2])
def test_a_run_too_short_to_search_is_refused_before_the_parameters_are_read(total_steps):
    """The preset's cooldown is its last 80%: under 3 steps no step searches. The refusal names the
    preset and the shortest length, not the schedule's own ``decay=``, which preset users never set,
    and comes before a generator of parameters is consumed (a retry with a longer run still has them)."""
    model = torch.nn.Linear(3, 2)
    params = model.parameters()
    with pytest.raises(ValueError, match=r"too short for the 'pretrain' preset.*total_steps >= 3") as raised:
        presets.recommended(params, total_steps=total_steps)
    assert "decay=" not in str(raised.value)
    opt = presets.recommended(params, total_steps=3)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_batches_after_the_search_phase_are_reported_though_no_search_comes(policy):
    """The preset searches only in its first 20%: NaN/inf on later plain steps is still reported,
    max_search_interval steps apart (copied to the host without waiting, read one step later)."""
    import warnings

    from salsa_fused import NonFiniteError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = presets.recommended(model.parameters(), total_steps=20, nonfinite=policy)
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator)) for _ in range(40)]
    for x, _ in data[5:]:
        x[0, 0] = float("nan")  # every batch from step 6 on
    weights, raised = None, None
    for k, (x, y) in enumerate(data):
        if k == 5:
            weights = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # past total_steps
                opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        except NonFiniteError as error:
            raised = (k + 1, str(error))
            break
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    if policy == "raise":
        step, message = raised
        assert step <= 6 + opt.search_config.max_search_interval + 1
        assert "where no search came to report them: the loss was NaN/inf on" in message
        assert opt.search_state.step == step - 1  # the reporting step was not applied
    else:
        assert raised is None and opt.num_skipped_steps >= 40 - 5 - opt.search_config.max_search_interval - 1


def test_a_rule_that_reads_none_of_the_presets_arguments_is_refused_saying_the_preset_set_them():
    with pytest.raises(ValueError, match="does not read beta3, search_direction.*the 'pretrain' preset sets them"):
        presets.recommended([torch.nn.Parameter(torch.randn(3))], total_steps=100, search_rule="sls")


@pytest.mark.parametrize("nan_step_offset", range(0, 11))
def test_a_nan_batch_of_the_frozen_phase_is_reported_within_max_search_interval_steps(nan_step_offset):
    """One NaN batch at any step of the frozen phase, the copy points included (a NaN there went
    with the next copy: 11 steps later), is counted within max_search_interval steps."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = presets.recommended(model.parameters(), total_steps=60, nonfinite="skip", backend="torch")
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator)
    interval = opt.search_config.max_search_interval
    nan_step, counted_at = 13 + nan_step_offset, None  # the search phase is steps 1-12
    for k in range(1, nan_step + interval + 2):
        batch = x.clone()
        if k == nan_step:
            batch[0, 0] = float("nan")
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(batch), y))
        if counted_at is None and opt.num_skipped_steps:
            counted_at = k
    assert opt.num_searches > 0 and counted_at is not None
    assert counted_at - nan_step <= interval, (nan_step, counted_at)


def test_docs_api_recipe_runs_the_preset_without_the_hold_and_half_of_it_is_refused_by_name():
    """docs/api.md's ``schedule`` row: both hold options off gives the preset without the hold; turning
    the hold off alone leaves ``decay_from_hold`` without its hold, refused naming it."""
    from dataclasses import replace

    w = torch.nn.Parameter(torch.ones(2, 2))
    kw = presets.preset_kwargs("pretrain", 100)
    schedule = replace(kw["schedule"], hold_scale_on_loss_rise=False, decay_from_hold=False)
    opt = presets.recommended([w], total_steps=100, schedule=schedule)
    assert opt.schedule == schedule and opt.schedule.backoff_on_loss_rise
    with pytest.raises(ValueError, match="decay_from_hold=True decays the cooldown"):
        replace(kw["schedule"], hold_scale_on_loss_rise=False)
