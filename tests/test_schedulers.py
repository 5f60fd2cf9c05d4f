"""``lr`` is a per-group multiplier on the searched step size: torch.optim.lr_scheduler works unchanged.

Where the multiplier enters (README "Learning-rate schedulers"), checked against the
formulas written out here in float64 rather than against another run of the optimizer:
a plain step moves group g by ``lr_g * eta * growth * m_hat / (sqrt(v_hat) + eps)``, a
search tries ``w0 - lr_g * eta * d`` and sums ``q = sum_g lr_g * sum(g * d)``.
"""

import math

from dataclasses import replace

import pytest
import torch
from torch.optim import lr_scheduler

from salsa_fused import FusedSaLSa


BETA1, BETA2, EPS, GROWTH = 0.9, 0.999, 1e-8, 1.1


def two_group_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.5}]
    return model, groups


def batch(k):
    g = torch.Generator().manual_seed(k % 4)
    x = torch.randn(16, 5, generator=g)
    return x, x[:, :1].cos()


class Expected:
    """The SPEC's Adam/SaLSa update in float64, from the state before a step."""

    def __init__(self, opt):
        self.weights = [[p.detach().double().clone() for p in g["params"]] for g in opt.param_groups]
        self.m = [[opt.state[p]["exp_avg"].double().clone() for p in g["params"]] for g in opt.param_groups]
        self.v = [[opt.state[p]["exp_avg_sq"].double().clone() for p in g["params"]] for g in opt.param_groups]
        self.eta = opt.step_size
        self.k = opt.search_state.step + 1
        self.lrs = [g["lr"] for g in opt.param_groups]

    def after(self, opt, searched):
        """Expected weights after the step, given which kind of step ran."""
        bc1, bc2 = 1 - BETA1 ** (self.k + 1), 1 - BETA2 ** (self.k + 1)
        out = []
        for gi, group in enumerate(opt.param_groups):
            lr = self.lrs[gi]
            for w, m, v, p in zip(self.weights[gi], self.m[gi], self.v[gi], group["params"]):
                g = p.grad.double()
                m_new, v_new = BETA1 * m + (1 - BETA1) * g, BETA2 * v + (1 - BETA2) * g * g
                precond = 1 / ((v_new / bc2).sqrt() + EPS)
                if searched:  # the accepted trial, gradient direction
                    out.append(w - lr * opt.step_size * g * precond)
                else:
                    out.append(w - lr * self.eta * GROWTH * (m_new / bc1) * precond)
        return out


def run(make_scheduler, steps, metric_step=False):
    model, groups = two_group_model()
    opt = FusedSaLSa(groups, backend="torch", init_step_size=0.1, always_search_steps=2,
                     max_search_interval=3)
    # A run past its first searches: equal fast and slow eta averages, so L = max_search_interval.
    opt._commit(replace(opt.search_state, step_size_fast=0.1, step_size_slow=0.1))
    scheduler = make_scheduler(opt)
    history = []
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        expected = Expected(opt)
        searches = opt.num_searches
        loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        searched = opt.num_searches > searches
        for got, want in zip([p for g in opt.param_groups for p in g["params"]], expected.after(opt, searched)):
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
        history.append(([g["lr"] for g in opt.param_groups], searched))
        scheduler.step(loss.item()) if metric_step else scheduler.step()
        eta = opt.step_size * GROWTH
        assert opt.effective_step_sizes == [g["lr"] * eta for g in opt.param_groups]
    assert any(s for _, s in history) and not all(s for _, s in history)  # both kinds of step ran
    return opt, history


def test_lambda_warmup_scales_every_step():
    warmup = 5
    opt, history = run(lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / warmup)), 16)
    for t, (lrs, _) in enumerate(history):
        factor = min(1.0, (t + 1) / warmup)
        assert lrs == pytest.approx([factor, 0.5 * factor])


def test_cosine_annealing():
    opt, history = run(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=16, eta_min=0.1), 16)
    for t, (lrs, _) in enumerate(history):
        cos = (1 + math.cos(math.pi * t / 16)) / 2
        assert lrs == pytest.approx([0.1 + (1.0 - 0.1) * cos, 0.1 + (0.5 - 0.1) * cos])


def test_sequential_warmup_then_cosine():
    def make(o):
        warm = lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4)
        decay = lr_scheduler.CosineAnnealingLR(o, T_max=12)
        return lr_scheduler.SequentialLR(o, [warm, decay], milestones=[4])
    opt, history = run(make, 16)
    assert history[0][0] == pytest.approx([0.25, 0.125])
    assert history[4][0] == pytest.approx([1.0, 0.5])
    assert history[-1][0][0] < 0.1


def test_reduce_on_plateau_reads_and_writes_lr():
    opt, history = run(lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0),
                       12, metric_step=True)
    firsts = [lrs[0] for lrs, _ in history]
    assert firsts[0] == 1.0 and firsts[-1] < firsts[0]
    assert all(b in (a, a * 0.5) for a, b in zip(firsts, firsts[1:]))


def test_search_tries_lr_times_eta_and_sums_lr_weighted_q():
    model, groups = two_group_model()
    groups[0]["lr"], groups[1]["lr"] = 0.8, 0.3  # the lr at construction is what trials probe at
    opt = FusedSaLSa(groups, backend="torch", init_step_size=0.1)
    opt.zero_grad()  # nothing draws random numbers from here on: trials compare with the caller's loss
    x, y = batch(0)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    w0 = [p.detach().double().clone() for p in params]
    grads = [p.grad.double() for p in params]
    lrs = [0.8] * 2 + [0.3] * 2
    precond = [1 / (((1 - BETA2) * g * g / (1 - BETA2 ** 2)).sqrt() + EPS) for g in grads]
    trials = []

    def closure():
        trials.append([p.detach().double().clone() for p in params])
        return torch.nn.functional.mse_loss(model(x), y)

    opt.step(closure, loss=loss.detach())
    # the first call is the check that loss= is the closure's loss, at w0 (once per optimizer)
    assert all(torch.equal(w, w_0) for w, w_0 in zip(trials[0], w0))
    first_trial_eta = 0.1 * GROWTH
    for w, w_0, g, pc, lr in zip(trials[1], w0, grads, precond, lrs):
        torch.testing.assert_close(w, w_0 - lr * first_trial_eta * g * pc, rtol=1e-5, atol=1e-8)
    q = sum(lr * (g * g * pc).sum().item() for g, pc, lr in zip(grads, precond, lrs))
    assert opt.search_state.slope_avg == pytest.approx((1 - 0.9) * q, rel=1e-5)


def test_lr_zero_freezes_a_group_and_bad_lr_is_rejected():
    """run() checks every step against the formula: lr=0 must leave group 2 where it was."""
    opt, history = run(lambda o: lr_scheduler.LambdaLR(o, [lambda t: 1.0, lambda t: 0.0]), 6)
    assert all(lrs[1] == 0.0 for lrs, _ in history)
    with pytest.raises(ValueError, match="lr"):
        FusedSaLSa([torch.nn.Parameter(torch.ones(2))], lr=-1.0)


STEPS_0_1_0 = 60


def test_constant_schedule_keeps_the_published_steps():
    """lr=1.0 and a scheduler attached: still 0.1.0's weights, to the bit, step for step."""
    from salsa.SaLSA import SaLSA  # test dependency salsa-optimizer==0.1.0
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    our_model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    our_model.load_state_dict(ref_model.state_dict())
    reference = SaLSA(ref_model.parameters())
    ours = FusedSaLSa(our_model.parameters(), backend="torch")
    scheduler = lr_scheduler.LambdaLR(ours, lambda t: 1.0)
    for k in range(STEPS_0_1_0):
        x, y = batch(k)

        def reference_closure(backwards=False):
            loss = torch.nn.functional.mse_loss(ref_model(x), y)
            if backwards:
                loss.backward()
            return loss

        reference.zero_grad()
        reference.step(reference_closure)
        ours.zero_grad()
        ours.step(lambda: torch.nn.functional.mse_loss(our_model(x), y))
        scheduler.step()
        assert ours.step_size == reference.step_size, f"step {k}"
        for a, b in zip(ref_model.parameters(), our_model.parameters()):
            assert torch.equal(a, b), f"step {k}"
    assert ours.num_searches < STEPS_0_1_0  # plain steps ran too


def _train_with_scheduler(model, opt, scheduler, steps):
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        scheduler.step()


@pytest.mark.parametrize("kind", ["cosine", "warmup_from_zero", "constant"])
def test_a_scheduler_that_moves_lr_on_a_preset_warns_once(kind):
    """A torch scheduler on an optimizer with a schedule of its own (a preset) multiplies the two: the
    applied step is shaped twice. Once it has moved lr off its initial_lr, the next search step warns,
    once; a constant scheduler (Trainer's "constant") never moves lr and never warns."""
    import warnings

    from salsa_fused import presets
    model, _ = two_group_model()
    opt = presets.recommended(model.parameters(), total_steps=40)
    scheduler = {"cosine": lambda: lr_scheduler.CosineAnnealingLR(opt, T_max=40),
                 "warmup_from_zero": lambda: lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 5)),
                 "constant": lambda: lr_scheduler.LambdaLR(opt, lambda t: 1.0)}[kind]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_with_scheduler(model, opt, scheduler, 12)
    stacked = [w for w in caught if "shaped twice" in str(w.message)]
    assert len(stacked) == (0 if kind == "constant" else 1), [str(w.message) for w in caught]
    if stacked:
        assert stacked[0].filename == __file__ and "WarmupStableDecay" in str(stacked[0].message)


def test_reduce_lr_on_plateau_on_a_preset_warns_once():
    """ReduceLROnPlateau writes no initial_lr: its cut is read against the lr the group was built at."""
    import warnings

    from salsa_fused import presets
    model, _ = two_group_model()
    opt = presets.recommended(model.parameters(), total_steps=40)
    scheduler = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(6):  # a flat metric: halved from the second call on, inside the search phase (8 steps)
            x, y = batch(k)
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
            scheduler.step(1.0)
    stacked = [str(w.message) for w in caught if "shaped twice" in str(w.message)]
    assert len(stacked) == 1 and "moved param_groups[0]'s lr from 1 to 0.5" in stacked[0], stacked


def test_the_warning_tells_the_two_rates_apart_when_they_differ_below_six_digits():
    """OneCycleLR(max_lr=1.0) on a preset built at lr 0.04 starts lr at 0.040000000000000036: the warning read
    "moved ... from 0.04 to 0.04" (found by a new-user audit)."""
    import warnings

    from salsa_fused import presets
    model, _ = two_group_model()
    opt = presets.recommended(model.parameters(), total_steps=40, lr=0.04)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_with_scheduler(model, opt, scheduler, 2)
    stacked = [str(w.message) for w in caught if "shaped twice" in str(w.message)]
    assert len(stacked) == 1, [str(w.message) for w in caught]
    moved = stacked[0].split("lr from ", 1)[1].split(", and", 1)[0]
    was, now = moved.split(" to ")
    assert was != now and float(was) == opt.param_groups[0]["initial_lr"], stacked[0]


def test_a_group_built_at_zero_raised_by_hand_on_a_preset_is_not_taken_for_a_scheduler():
    """api.md's way to hold a layer still (a group at lr=0, raised later) is no scheduler: raising it warned
    that the schedule is shaped twice, and used up the one warning a scheduler attached later should get."""
    import warnings

    from salsa_fused import presets
    model, _ = two_group_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}]
    opt = presets.recommended(groups, total_steps=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(12):
            if k == 4:
                opt.param_groups[1]["lr"] = 1.0
            x, y = batch(k)
            opt.zero_grad()
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        scheduler = lr_scheduler.CosineAnnealingLR(opt, T_max=40)
        _train_with_scheduler(model, opt, scheduler, 6)
    assert opt.param_groups[1]["search_lr"] == 1.0
    stacked = [str(w.message) for w in caught if "shaped twice" in str(w.message)]
    assert len(stacked) == 1 and "CosineAnnealingLR" not in stacked[0] and "from 1 to" in stacked[0], stacked


def test_a_scheduler_without_a_schedule_of_the_optimizers_own_does_not_warn():
    import warnings

    model, _ = two_group_model()
    opt = FusedSaLSa(model.parameters())
    scheduler = lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_with_scheduler(model, opt, scheduler, 12)


def test_a_warmup_from_zero_that_is_never_stepped_is_warned_of_after_100_steps():
    """LambdaLR from 0 under Lightning's manual optimization, which does not step it: lr stayed 0.0, no search ran
    and the weights never moved, with no word (an integration audit's find). A warning at the 100th step in a row
    at lr 0, once; a warm-up that is stepped never sees it."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for stepped in (False, True):
        opt = FusedSaLSa(model.parameters(), backend="torch")
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 150))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(120):
                opt.zero_grad()
                opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
                if stepped:
                    scheduler.step()
        ours = [w for w in caught if "lr has been 0 for the last 100 steps" in str(w.message)]
        assert len(ours) == (0 if stepped else 1)
        if not stepped:
            assert "self.lr_schedulers().step()" in str(ours[0].message) and opt.search_state.num_searches == 0
