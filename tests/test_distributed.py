"""FusedSaLSa on torch.distributed (gloo, 2 CPU processes): DDP and FSDP2.

Each spawned job runs several checks in one process group (spawning costs seconds).
The reference is single-process training on the concatenated batch, with no reduction:
with equal per-rank batches, the mean loss over the global batch is the average of the
per-rank means, and DDP's averaged gradient is the global batch's gradient, so the two
runs take the same decisions and agree to rounding. Across ranks the weights must be
bitwise identical.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from salsa_fused import FusedSaLSa
from salsa_fused._compat import TORCH_RELEASE, fsdp2
from salsa_fused.distributed import SearchReduction, default_reduction, fsdp_closure, fsdp_modules
from tests.gloo_group import spawn_in_gloo_group

WORLD = 2
# FSDP2 before torch 2.6 (torch.distributed._composable.fsdp) creates CUDA streams at its first forward
fsdp2_forwards = pytest.mark.skipif(TORCH_RELEASE < (2, 6), reason="FSDP2 before torch 2.6 runs forwards on CUDA only")
BATCH_PER_RANK = 8
IN_FEATURES = 6


def _make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step: int, rank: int, size: int = BATCH_PER_RANK):
    """The batch of ``rank`` at ``step``: deterministic, different on every rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, IN_FEATURES, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(size, 1, generator=generator)
    return x, y


def _global_batch(step: int):
    parts = [_batch(step, r) for r in range(WORLD)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _skip_interval_warmup(opt: FusedSaLSa) -> None:
    """Set the fast and slow step-size averages equal, so the interval jumps to its bound
    (it otherwise stays near 1 for ~150 steps) and plain steps come within a short test."""
    search = opt.search_state
    search.step_size_fast = search.step_size_slow
    opt._commit(search)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def _assert_same_on_all_ranks(tensor: torch.Tensor, what: str) -> None:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            diff = (other - gathered[0]).abs().max().item()
            raise AssertionError(f"{what} differs between rank 0 and rank {rank} (max |diff| {diff:.3e})")


def _search_record(opt: FusedSaLSa):
    """Searches, trials and forwards; the forwards less the one that checks loss= at w0, once per optimizer
    at its first two-phase search (a one-phase reference runs none)."""
    checked = int(opt.__dict__.get("_loss_checked", False))
    return (opt.num_searches, opt.last_search_trials, opt.num_forward_evals - checked)


def _assert_trajectories_agree(records, ref_records, etas, ref_etas, what):
    assert records == ref_records, f"{what}: searches/trials differ from single-process training"
    for step, (eta, ref_eta) in enumerate(zip(etas, ref_etas)):
        assert abs(eta - ref_eta) <= 1e-4 * abs(ref_eta), f"{what}: step size at step {step}: {eta} vs {ref_eta}"


# ----------------------------------------------------------------------------- DDP
def _ddp_steps(rank, ddp, opt, ref, ref_opt, steps, micro_batches, first_step=0):
    """Train DDP (rank's data) and the reference (global batch) side by side; check each step."""
    records, ref_records, etas, ref_etas = [], [], [], []
    for step in range(first_step, first_step + steps):
        if step == first_step + 9:  # after the always-search steps
            _skip_interval_warmup(opt)
            _skip_interval_warmup(ref_opt)
        x, y = _batch(step, rank)
        opt.zero_grad()
        if micro_batches == 1:
            opt.step(lambda: F.mse_loss(ddp(x), y))
        else:  # accumulation: backward per micro-batch, one all-reduce on the last
            micro = [(x[i::micro_batches], y[i::micro_batches]) for i in range(micro_batches)]
            total = torch.zeros(())
            for i, (xb, yb) in enumerate(micro):
                sync = contextlib.nullcontext() if i == micro_batches - 1 else ddp.no_sync()
                with sync:
                    loss = F.mse_loss(ddp(xb), yb) / micro_batches
                    loss.backward()
                total += loss.detach()
            opt.step(lambda: sum(F.mse_loss(ddp(xb), yb) for xb, yb in micro) / micro_batches,
                     loss=total)
        gx, gy = _global_batch(step)
        ref_opt.zero_grad()
        ref_opt.step(lambda: F.mse_loss(ref(gx), gy))
        _assert_same_on_all_ranks(_flat(ddp.parameters()), f"weights after step {step}")
        _assert_same_on_all_ranks(torch.tensor([opt.step_size, opt.num_forward_evals], dtype=torch.float64),
                                  f"step size / forward count after step {step}")
        torch.testing.assert_close(_flat(ddp.parameters()), _flat(ref.parameters()), rtol=1e-5, atol=1e-6)
        records.append(_search_record(opt))
        ref_records.append(_search_record(ref_opt))
        etas.append(opt.step_size)
        ref_etas.append(ref_opt.step_size)
    return records, ref_records, etas, ref_etas


def _ddp_job(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from salsa_fused import NonFiniteError
    for micro_batches in (1, 2):
        base = _make_model(0)
        ddp = DDP(copy.deepcopy(base))
        opt = FusedSaLSa(ddp.parameters())
        assert opt.reduction.loss_group is dist.group.WORLD and opt.reduction.shard_group is None
        ref = copy.deepcopy(base)
        ref_opt = FusedSaLSa(ref.parameters(), reduction=SearchReduction())
        result = _ddp_steps(rank, ddp, opt, ref, ref_opt, steps=22, micro_batches=micro_batches)
        records = result[0]
        searches = records[-1][0]
        assert 0 < searches < len(records), f"want searches and plain steps, got {searches} of {len(records)}"
        _assert_trajectories_agree(*result, what=f"DDP with {micro_batches} micro-batches")

    # A NaN loss on one rank at a plain step: every rank skips it alike (the plain step
    # judges the averaged loss) and the next search reports it alike.
    ddp = DDP(_make_model(0))
    opt = FusedSaLSa(ddp.parameters(), nonfinite="skip")
    for step in range(13):
        if step == 9:
            _skip_interval_warmup(opt)
        if step == 11:
            opt._search.steps_since_search = 100  # search now
        poison = float("nan") if (step == 10 and rank == 1) else 1.0
        x, y = _batch(step, rank)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(ddp(x), y) * poison)
    state = opt.search_state
    assert state.num_skipped_steps == 1 and state.num_searches == 10, state
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights after a NaN loss on rank 1")
    _assert_same_on_all_ranks(torch.tensor([float(v) for v in vars(state).values() if isinstance(v, (int, float))],
                                           dtype=torch.float64),
                              "search state after a NaN loss on rank 1")

    # The same at a search under "raise": every rank raises, and the message says whose loss it read.
    ddp = DDP(_make_model(0))
    opt = FusedSaLSa(ddp.parameters())
    x, y = _batch(0, rank)
    poison = float("nan") if rank == 1 else 1.0
    before = _flat(ddp.parameters())
    try:
        opt.step(lambda: F.mse_loss(ddp(x), y) * poison)
        raise AssertionError(f"a NaN loss on rank 1 did not raise on rank {rank}")
    except NonFiniteError as error:
        assert "loss (averaged over the 2 data-parallel ranks: NaN/inf on any rank's batch) nan" in str(error), error
    assert torch.equal(_flat(ddp.parameters()), before) and opt.search_state.step == 0

    # The run that the resume job continues: checkpoint at step 12, record steps 12..19.
    ddp = DDP(_make_model(0))
    opt = FusedSaLSa(ddp.parameters())
    for step in range(20):
        if step == 12 and rank == 0:
            torch.save({"model": ddp.module.state_dict(), "optimizer": opt.state_dict()},
                       os.path.join(out_dir, "checkpoint.pt"))
        if step == 9:
            _skip_interval_warmup(opt)
        x, y = _batch(step, rank)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(ddp(x), y))
    if rank == 0:
        torch.save({"weights": _flat(ddp.parameters()), "search": opt.search_state},
                   os.path.join(out_dir, "uninterrupted.pt"))


def _ddp_resume_job(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    checkpoint = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=False)
    model = _make_model(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    ddp = DDP(model)
    opt = FusedSaLSa(ddp.parameters(), init_step_size=0.5)
    opt.load_state_dict(checkpoint["optimizer"])
    for step in range(12, 20):
        x, y = _batch(step, rank)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(ddp(x), y))
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights after resume")
    if rank == 0:
        torch.save({"weights": _flat(ddp.parameters()), "search": opt.search_state},
                   os.path.join(out_dir, "resumed.pt"))


def test_ddp_matches_global_batch_accumulation_and_resume(tmp_path):
    """DDP: identical weights on both ranks, the same trajectory as one process on the
    concatenated batch (also with 2 accumulated micro-batches per rank), and a run killed
    at step 12 and resumed in new processes continues bitwise identically."""
    spawn_in_gloo_group(_ddp_job, str(tmp_path), WORLD)
    spawn_in_gloo_group(_ddp_resume_job, str(tmp_path), WORLD)
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert torch.equal(resumed["weights"], uninterrupted["weights"])
    assert resumed["search"] == uninterrupted["search"]


# ----------------------------------------------------------------------------- FSDP2
def _fsdp_model(seed, mesh):
    fully_shard = fsdp2().fully_shard
    model = _make_model(seed)
    fully_shard(model[0], mesh=mesh)  # a sub-module with its own all-gather
    fully_shard(model, mesh=mesh)     # the root keeps the other layers (unsharded after forward)
    return model


def _fsdp_step(model, opt, step, rank):
    x, y = _batch(step, rank)
    opt.zero_grad()
    opt.step(fsdp_closure(model, lambda: F.mse_loss(model(x), y)))


def _full_weights(model) -> torch.Tensor:
    FSDPModule = fsdp2().FSDPModule
    for module in model.modules():  # after a forward the root holds unsharded plain tensors
        if isinstance(module, FSDPModule):
            module.reshard()
    return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])


def _fsdp_modules_job(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    model = _fsdp_model(0, init_device_mesh("cpu", (WORLD,)))
    assert fsdp_modules(model) == [model, model[0]]
    assert FusedSaLSa(model.parameters(), model=model)._fsdp_modules() == [model, model[0]]


def test_the_fsdp2_modules_to_reshard_are_found_on_every_torch_with_fsdp2(tmp_path):
    """torch 2.4 and 2.5 keep FSDP2 under torch.distributed._composable.fsdp: the optimizer built with model=
    found no module there to reshard before its trials, so each trial after the first would read the root's stale
    unsharded weights, without the warning it gives when it has no model."""
    spawn_in_gloo_group(_fsdp_modules_job, str(tmp_path), WORLD, timeout_s=60)


def _fsdp_job(rank, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(0, mesh)
    opt = FusedSaLSa(model.parameters())
    assert opt.reduction.shard_group is not None, "sharded DTensor params must set the shard group"
    assert opt.reduction.loss_group is dist.group.WORLD
    with pytest.raises(ValueError, match="not sharded DTensors"):  # replicated would count twice in q
        FusedSaLSa([*model.parameters(), torch.nn.Parameter(torch.zeros(3))])
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    assert type(exp_avg).__name__ == "DTensor" and exp_avg._local_tensor.shape[0] == 16 // WORLD

    ref = _make_model(0)
    ref_opt = FusedSaLSa(ref.parameters(), reduction=SearchReduction())
    records, ref_records, etas, ref_etas = [], [], [], []
    checkpoint_dir = os.path.join(out_dir, "dcp")
    saved_after = None
    for step in range(20):
        if step == 9:
            _skip_interval_warmup(opt)
            _skip_interval_warmup(ref_opt)
        if step == 14:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=checkpoint_dir)
            saved_after = []
        _fsdp_step(model, opt, step, rank)
        gx, gy = _global_batch(step)
        ref_opt.zero_grad()
        ref_opt.step(lambda: F.mse_loss(ref(gx), gy))
        full = _full_weights(model)
        _assert_same_on_all_ranks(torch.tensor([opt.step_size, opt.num_forward_evals], dtype=torch.float64),
                                  f"step size / forward count after step {step}")
        torch.testing.assert_close(full, _flat(ref.parameters()), rtol=1e-5, atol=1e-6)
        records.append(_search_record(opt))
        ref_records.append(_search_record(ref_opt))
        etas.append(opt.step_size)
        ref_etas.append(ref_opt.step_size)
        if saved_after is not None:
            saved_after.append(full)
    assert 0 < records[-1][0] < len(records)
    _assert_trajectories_agree(records, ref_records, etas, ref_etas, "FSDP2")
    final_search = opt.search_state

    # Resume from the sharded checkpoint into a fresh model and optimizer.
    model = _fsdp_model(seed=7, mesh=mesh)
    opt = FusedSaLSa(model.parameters(), init_step_size=0.25)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32
    for step, expected in zip(range(14, 20), saved_after):
        _fsdp_step(model, opt, step, rank)
        assert torch.equal(_full_weights(model), expected), f"resumed FSDP2 run differs at step {step}"
    assert opt.search_state == final_search


def _fsdp_zeroed_outside_job(rank, out_dir):
    """FSDP2, the sharded gradients zeroed in place outside the optimizer (a loop's own zeroing): the
    one-phase form reads the zeros once (summed over the shard group) and steps as after
    opt.zero_grad(). (model.zero_grad() is not such a zeroing here: after a search's no-grad trial
    forwards the root module holds its unsharded parameters, so it does not reach the sharded
    gradients, and the step refuses them, as before.)"""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    runs = []
    for outside in (False, True):
        model = _fsdp_model(0, mesh)
        opt = FusedSaLSa(model.parameters())
        for step in range(4):
            x, y = _batch(step, rank)
            if outside:
                for p in opt.param_groups[0]["params"]:
                    if p.grad is not None:
                        p.grad.zero_()
            else:
                opt.zero_grad()
            opt.step(fsdp_closure(model, lambda: F.mse_loss(model(x), y)))
        runs.append((_full_weights(model), opt.search_state))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@fsdp2_forwards
def test_fsdp2_steps_after_sharded_gradients_zeroed_in_place_outside_the_optimizer(tmp_path):
    spawn_in_gloo_group(_fsdp_zeroed_outside_job, str(tmp_path), WORLD)


def _fsdp_zeroed_in_a_trial_job(rank, out_dir):
    """FSDP2: a closure that zeroes the sharded gradients in place during a trial forward is refused
    on every rank alike (the check reads each DTensor gradient's local version counter), with the
    weights, moments and search state as before the step, and the step can then be taken."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(0, mesh)
    opt = FusedSaLSa(model.parameters())
    _fsdp_step(model, opt, 0, rank)
    x, y = _batch(1, rank)
    calls = []

    def zeroing():
        calls.append(1)
        if len(calls) == 2:  # the first trial forward
            for p in opt.param_groups[0]["params"]:
                p.grad.zero_()
        return F.mse_loss(model(x), y)

    opt.zero_grad()
    weights, search = _full_weights(model), opt.search_state
    moments = [v.full_tensor().clone() for p in model.parameters() for v in opt.state[p].values()
               if isinstance(v, torch.Tensor) and v.dim()]
    with pytest.raises(RuntimeError, match="changed the step's gradients in place during a trial forward"):
        opt.step(fsdp_closure(model, zeroing))
    assert torch.equal(_full_weights(model), weights) and opt.search_state == search
    after = [v.full_tensor() for p in model.parameters() for v in opt.state[p].values()
             if isinstance(v, torch.Tensor) and v.dim()]
    assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(after, moments))
    _fsdp_step(model, opt, 1, rank)
    assert opt.search_state.step == search.step + 1
    _assert_same_on_all_ranks(_full_weights(model), "weights after the refused step and its retry")


@fsdp2_forwards
def test_fsdp2_a_closure_zeroing_sharded_gradients_in_a_trial_is_refused_on_every_rank(tmp_path):
    spawn_in_gloo_group(_fsdp_zeroed_in_a_trial_job, str(tmp_path), WORLD, timeout_s=120)


@fsdp2_forwards
def test_fsdp2_matches_single_process_and_resumes_from_dcp(tmp_path):
    """FSDP2 on CPU/gloo: kernels on local shards, q summed over the shard group, the same
    trajectory as one process on the concatenated batch; a torch.distributed.checkpoint
    save/load of the sharded optimizer state continues bitwise identically."""
    spawn_in_gloo_group(_fsdp_job, str(tmp_path), WORLD)


def _bucket_view_job(rank: int, out_dir: str) -> None:
    """DDP with gradient_as_bucket_view and gradients zeroed as tensors (by the optimizer or through
    the model): DDP rebuilds its buckets in its second forward, inside closure(), and swaps .grad for
    bucket views of zeros; the one-phase form must not take that for a closure's own backward."""
    for zero_through_model in (False, True):
        model = _make_model(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        opt = FusedSaLSa(ddp.parameters(), backend="torch")
        for step in range(4):
            x, y = _batch(step, rank)
            (ddp if zero_through_model else opt).zero_grad(set_to_none=False)
            opt.step(lambda: F.mse_loss(ddp(x), y))
        assert opt.search_state.step == 4


def test_ddp_with_gradient_bucket_views_and_zeroed_tensor_gradients_steps(tmp_path):
    spawn_in_gloo_group(_bucket_view_job, str(tmp_path), WORLD)


def _rng_on_one_rank_job(rank: int, out_dir: str) -> None:
    """Two-phase form without mark_forward() under DDP with BatchNorm (every DDP forward broadcasts
    the buffers: a collective): only rank 0 draws from the generator between zero_grad() and step().
    Whether a search adds a reference forward must be decided alike on every rank, or their
    collectives fall out of step and the run hangs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = FusedSaLSa(ddp.parameters(), model=ddp, backend="torch")
    for step in range(3):
        x, y = _batch(step, rank)
        opt.zero_grad()
        if rank == 0:
            torch.rand(1)  # say, a sample picked for logging
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        opt.step(lambda: F.mse_loss(ddp(x), y), loss=loss)
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")
    _assert_same_on_all_ranks(torch.tensor([float(opt.num_forward_evals)]), "forwards")


def test_ddp_ranks_agree_on_the_reference_forward_when_only_one_rank_drew_random_numbers(tmp_path):
    spawn_in_gloo_group(_rng_on_one_rank_job, str(tmp_path), WORLD, timeout_s=60)


def _zero_redundancy_job(rank: int, out_dir: str) -> None:
    """ZeroRedundancyOptimizer builds each rank's optimizer on its shard of the parameters: the trials would
    move only that shard, and its state_dict() drops the search state (a resume started the search over: the
    step count at 0, the weights 0.015 off in four steps). It was accepted without a word (an audit's check)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class Subclass(FusedSaLSa):
        pass

    model = _make_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    for optimizer_class in (FusedSaLSa, Subclass):
        with pytest.raises(RuntimeError, match=r"ZeroRedundancyOptimizer\(optimizer_class=FusedSaLSa\) is not "
                                               r"supported.*FSDP2 \(fully_shard\), or use DDP"):
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    FusedSaLSa(model.parameters(), backend="torch")  # built by the user, beside a ZeRO import: as before

    class ShardedBodyWithAHead(ZeroRedundancyOptimizer):  # a user's own FusedSaLSa, built inside a ZeRO's method
        def __init__(self, body, head):
            super().__init__(body, optimizer_class=torch.optim.AdamW, lr=1e-3)
            self.head_optimizer = FusedSaLSa(head, backend="torch")

    ShardedBodyWithAHead(list(model[0].parameters()), list(model[2].parameters()))

    def build_then_free(self):  # a ZeRO as some caller's `self`, and a large object freed after the build
        big = torch.zeros(1000)
        freed = weakref.ref(big)
        FusedSaLSa(model.parameters(), backend="torch")
        del big
        assert freed() is None  # the check read no frame's locals: on Python 3.11 that kept them alive

    build_then_free(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3))


def test_zero_redundancy_optimizer_around_it_is_refused(tmp_path):
    spawn_in_gloo_group(_zero_redundancy_job, str(tmp_path), 1, timeout_s=60)


def test_single_process_reduction_is_inactive():
    params = list(_make_model(0).parameters())
    assert not default_reduction(params).active
    assert not FusedSaLSa(params).reduction.active


def _fsdp_plain_closure_job(rank: int, out_dir: str) -> None:
    """FSDP2 with the DDP habit, a plain closure: with model= the optimizer reshards before each
    trial and after the search, and the run is single-process training on the global batch, under
    a scheduler too (lr 0.5 != search_lr: the applied move is not the last trial, which the root
    would otherwise keep unsharded for the next forward); fsdp_closure the same; without either
    the first search warns."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    ref = _make_model(0)
    ref_opt = FusedSaLSa(ref.parameters(), reduction=SearchReduction())
    ref_lr = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda k: 0.5)
    for step in range(6):
        gx, gy = _global_batch(step)
        ref_opt.zero_grad()
        ref_opt.step(lambda: F.mse_loss(ref(gx), gy))
        ref_lr.step()
    for form in ("fsdp_closure", "model="):
        model = _fsdp_model(0, mesh)
        opt = FusedSaLSa(model.parameters(), model=model if form == "model=" else None)
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither form warns
            for step in range(6):
                x, y = _batch(step, rank)
                opt.zero_grad()
                closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
                opt.step(fsdp_closure(model, closure) if form == "fsdp_closure" else closure)
                lr.step()
        torch.testing.assert_close(_full_weights(model), _flat(ref.parameters()), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{form}: {m}")
        assert opt.num_forward_evals == ref_opt.num_forward_evals and opt.step_size == pytest.approx(ref_opt.step_size)
    model = _fsdp_model(0, mesh)
    opt = FusedSaLSa(model.parameters())
    x, y = _batch(0, rank)
    with pytest.warns(UserWarning, match="stale weights"):
        opt.step(lambda: F.mse_loss(model(x), y))


@fsdp2_forwards
def test_fsdp2_with_a_plain_closure_reshards_through_model_or_warns(tmp_path):
    spawn_in_gloo_group(_fsdp_plain_closure_job, str(tmp_path), WORLD, timeout_s=120)


def _fsdp_overflow_job(rank: int, out_dir: str) -> None:
    """FSDP2 with one rank's shard empty: a search that gives up at weights that overflowed is
    refused (here skipped) on every rank alike, the finiteness read summed over the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    fully_shard = fsdp2().fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)  # weight (1, 6) and bias (1,): rank 1 holds empty shards
    fully_shard(model, mesh=mesh)
    opt = FusedSaLSa(model.parameters(), model=model, init_step_size=3e38, max_trials=1, nonfinite="skip")
    x, y = _batch(0, rank)
    opt.step(lambda: F.mse_loss(model(x), y))
    _assert_same_on_all_ranks(torch.tensor([float(opt.num_skipped_steps), opt.step_size, float(opt.search_state.step)],
                                           dtype=torch.float64), "skips, level and step")
    assert opt.num_skipped_steps == 1
    assert torch.isfinite(_full_weights(model)).all()


@fsdp2_forwards
def test_fsdp2_ranks_refuse_alike_a_search_whose_weights_overflowed(tmp_path):
    spawn_in_gloo_group(_fsdp_overflow_job, str(tmp_path), WORLD, timeout_s=60)


def _fsdp_plain_group_added_job(rank: int, out_dir: str) -> None:
    """FSDP2: a plain parameter added with add_param_group (a learned temperature outside fully_shard) took no
    averaged gradient and its share of q counted once per rank; the ranks' copies parted (0.878 against 0.936 at
    step 1) with every check passing (an FSDP2 audit's find). Refused, as the constructor refuses such a mix, with
    nothing added. And an optimizer built before fully_shard (which replaces every parameter) with model= refuses
    its first step by name: each step did nothing, silently."""
    from torch.distributed.device_mesh import init_device_mesh
    fully_shard = fsdp2().fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    fully_shard(model, mesh=mesh)
    opt = FusedSaLSa(model.parameters(), model=model)
    temperature = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"1 of 5 parameters are not sharded DTensors.*\(a group added to an "
                                         r"optimizer of FSDP2-sharded parameters\); the group was not added"):
        opt.add_param_group({"params": [temperature]})
    assert len(opt.param_groups) == 1
    torch.manual_seed(0)
    early = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = FusedSaLSa(early.parameters(), model=early)
    fully_shard(early, mesh=mesh)
    x, y = _batch(0, rank)
    with pytest.raises(ValueError, match=r"none of the 4 parameters of the FSDPSequential given is one this "
                                         r"optimizer steps.*fully_shard.*build the optimizer after it"):
        opt.step(lambda: F.mse_loss(early(x), y))
    assert opt.search_state.step == 0


@fsdp2_forwards
def test_fsdp2_a_plain_group_added_or_a_model_sharded_after_the_build_is_refused(tmp_path):
    spawn_in_gloo_group(_fsdp_plain_group_added_job, str(tmp_path), WORLD, timeout_s=60)


def _fsdp_nan_plain_loss_job(rank: int, out_dir: str) -> None:
    """FSDP2: one plain step whose loss is NaN (on every rank: the losses are averaged) is one
    skipped step when the next search reads the counts, not one per rank of the shard group."""
    from torch.distributed.device_mesh import init_device_mesh
    fully_shard = fsdp2().fully_shard

    from salsa_fused import NonFiniteError
    mesh = init_device_mesh("cpu", (WORLD,))
    reports = {}
    for policy in ("skip", "raise"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        fully_shard(model, mesh=mesh)
        opt = FusedSaLSa(model.parameters(), model=model, nonfinite=policy, backend="torch", always_search_steps=1)
        message, searched_at_nan = None, None
        for step in range(1, 21):
            x, y = _batch(step, rank)
            if step == 2:  # a settled level: the interval grows to 10 steps, so plain steps follow
                search = opt.search_state
                search.step_size_fast = search.step_size_slow
                opt._commit(search)
            factor = float("nan") if step == 5 else 1.0
            searches = opt.num_searches
            opt.zero_grad()
            try:
                opt.step(lambda: F.mse_loss(model(x), y) * factor)
            except NonFiniteError as error:
                message = str(error)
                break
            if step == 5:
                searched_at_nan = opt.num_searches > searches
        assert searched_at_nan is False  # step 5 was a plain step
        reports[policy] = (opt.num_skipped_steps, message)
    assert reports["skip"][0] == 1, reports
    assert "on 1 plain step(s)" in reports["raise"][1], reports


@fsdp2_forwards
def test_fsdp2_counts_a_nan_loss_of_a_plain_step_once(tmp_path):
    spawn_in_gloo_group(_fsdp_nan_plain_loss_job, str(tmp_path), WORLD, timeout_s=60)


def _fsdp_nan_gradient_on_one_shard_job(rank: int, out_dir: str) -> None:
    """FSDP2: a NaN gradient element in rank 0's shard only, at a plain step, is counted on every rank: the
    plain steps' counts of NaN/inf gradient elements are per shard, and are summed over the shard group where
    they are read (report_nonfinite() here, before any search reads them). Rank 1, whose shard held none,
    reports the element as rank 0 does under "skip", and raises with it under "raise"."""
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_fused import NonFiniteError
    mesh = init_device_mesh("cpu", (WORLD,))
    for policy in ("skip", "raise"):
        model = _fsdp_model(0, mesh)
        opt = FusedSaLSa(model.parameters(), model=model, backend="torch", always_search_steps=1, nonfinite=policy)
        for step in (1, 2):
            if step == 2:
                _skip_interval_warmup(opt)  # the interval at its bound: step 2 is a plain step
                assert _next_step_is_plain(opt)
            x, y = _batch(step, rank)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            if step == 2 and rank == 0:
                model[0].weight.grad._local_tensor.view(-1)[0] = float("nan")
            opt.step(fsdp_closure(model, lambda: F.mse_loss(model(x), y)), loss=loss.detach())
        assert opt.num_searches == 1 and opt.search_state.step == 2
        if policy == "skip":
            reported = opt.report_nonfinite()
            _assert_same_on_all_ranks(torch.tensor(reported, dtype=torch.float64), "the counts reported")
            assert reported == (1, 0), reported
            assert opt.search_state.num_nonfinite_elements == 1
        else:
            with pytest.raises(NonFiniteError, match=r"read by report_nonfinite\(\): 1 gradient elements were NaN/inf"):
                opt.report_nonfinite()


@fsdp2_forwards
def test_fsdp2_sums_the_nan_gradient_elements_of_a_plain_step_over_the_shards(tmp_path):
    spawn_in_gloo_group(_fsdp_nan_gradient_on_one_shard_job, str(tmp_path), WORLD, timeout_s=60)


def _ddp_beam_job(rank: int, out_dir: str) -> None:
    """DDP with a StepSizeBeam, each rank on its own data (rank 1's targets noisier, so the ranks'
    own losses would rank the factors differently): every rank keeps the same factors, and the
    weights stay bitwise equal. A NaN loss on rank 0 alone, in one branch under ``skip``, scores that
    branch inf on every rank (rank 0 alone leaving it put the collectives out of step)."""
    from torch.nn.parallel import DistributedDataParallel

    from salsa_fused import StepSizeBeam, presets
    steps = 40
    for poisoned in (False, True):
        model = _make_model(0)
        ddp = DistributedDataParallel(model)
        opt = presets.recommended(ddp.parameters(), total_steps=steps, backend="torch", nonfinite="skip")
        beam = StepSizeBeam(opt, total_steps=steps, points=(0.1, 0.2), horizon=0.1)
        data = []
        for k in range(steps + 10):
            x, y = _batch(k, rank)
            data.append((x, y if rank == 0 else 3 * torch.randn_like(y)))
        seen = []
        for k in range(steps):
            def closure(i, k=k):
                loss = F.mse_loss(ddp(data[k + i][0]), data[k + i][1])
                if poisoned and rank == 0 and k == 4 and i == 1:
                    seen.append(i)
                    if len(seen) == 1:  # the first branch's second step, on rank 0 only
                        return loss * float("nan")
                return loss
            beam.step(closure)
        kept = torch.tensor([beam.multiplier] + [d["factor"] for d in beam.decisions], dtype=torch.float64)
        assert len(beam.decisions) == 2
        _assert_same_on_all_ranks(kept, "the beam's multiplier and kept factors")
        _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")
        if poisoned:
            assert math.inf in beam.decisions[0]["losses"], beam.decisions[0]
        del ddp


def test_ddp_ranks_keep_the_same_beam_factors(tmp_path):
    spawn_in_gloo_group(_ddp_beam_job, str(tmp_path), WORLD, timeout_s=60)


def _explicit_reduction_job(rank: int, out_dir: str) -> None:
    """A reduction passed by hand: one without a shard group is refused for FSDP2's sharded
    parameters, by name; one with a shard group of 2 ranks but no loss group is refused when built (it left the
    ranks deciding on their own losses: a collective mismatch at the first search on their own batches, k and t
    parted by a GradScaler's skip on one rank at a plain step on the same batch), one of a single rank is not;
    one for DDP deep-copies with its groups shared, and pickling it says why not."""
    import io

    from torch.distributed.device_mesh import init_device_mesh
    fully_shard = fsdp2().fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    with pytest.raises(ValueError, match="got a shard_group \\(of 2 ranks\\) without a loss_group.*Pass loss_group="):
        SearchReduction(shard_group=mesh.get_group())
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    assert SearchReduction(shard_group=singles[rank]).shard_group is singles[rank]
    model = _make_model(0)
    fully_shard(model, mesh=mesh)
    with pytest.raises(ValueError, match="sharded over 2 ranks .* has no shard_group"):
        FusedSaLSa(model.parameters(), model=model, reduction=SearchReduction(loss_group=dist.group.WORLD))
    given = SearchReduction(loss_group=dist.group.WORLD, shard_group=dist.group.WORLD)
    FusedSaLSa(model.parameters(), model=model, reduction=given)  # with one: taken as given

    replicated = _make_model(1)
    opt = FusedSaLSa(replicated.parameters(), reduction=SearchReduction(loss_group=dist.group.WORLD))
    twin = copy.deepcopy(opt)
    assert twin.reduction.loss_group is dist.group.WORLD and twin.reduction is not opt.reduction
    with pytest.raises(TypeError, match="cannot be pickled .* save optimizer.state_dict"):
        torch.save(opt, io.BytesIO())


def test_an_explicit_reduction_is_checked_against_the_parameters_and_copies(tmp_path):
    spawn_in_gloo_group(_explicit_reduction_job, str(tmp_path), WORLD, timeout_s=60)


def _frozen_nan_job(rank: int, out_dir: str) -> None:
    """DDP, the preset after its search phase (no search reads the counts): NaN batches on rank 0
    only are reported at the same step on every rank, which leaves weights as they were."""
    from salsa_fused import NonFiniteError, presets
    import warnings

    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = presets.recommended(ddp.parameters(), total_steps=20, backend="torch")
    raised_at = -1.0
    for step in range(40):
        x, y = _batch(step, rank)
        if step >= 6 and rank == 0:
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad()
        try:
            opt.step(lambda: F.mse_loss(ddp(x), y))
        except NonFiniteError as error:
            assert "no search came to report them" in str(error)
            raised_at = float(step)
            break
    assert raised_at > 0
    _assert_same_on_all_ranks(torch.tensor([raised_at]), "the step that reported the NaN batches")
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_ranks_report_nan_batches_after_the_search_phase_at_the_same_step(tmp_path):
    spawn_in_gloo_group(_frozen_nan_job, str(tmp_path), WORLD, timeout_s=60)


def _uneven_inputs_job(rank: int, out_dir: str) -> None:
    """Uneven inputs under torch's Join with throw_on_early_termination=True (docs/training.md):
    every rank raises at the step after one runs out, the weights the same on all. (With Join's
    default a joined rank shadows DDP's all-reduces, not the optimizer's: a collective mismatch.)"""
    from torch.distributed.algorithms.join import Join

    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FusedSaLSa(ddp.parameters(), backend="torch")
    steps = 6 if rank == 0 else 4
    done = 0
    with pytest.raises(RuntimeError, match="exhausted"):
        with Join([ddp], throw_on_early_termination=True):
            for step in range(steps):
                x, y = _batch(step, rank)
                opt.zero_grad()
                opt.step(lambda: F.mse_loss(ddp(x), y))
                done += 1
    assert done == 4 and opt.search_state.step == 4
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_uneven_inputs_under_join_that_throws_stop_every_rank_alike(tmp_path):
    spawn_in_gloo_group(_uneven_inputs_job, str(tmp_path), WORLD, timeout_s=60)


def _join_steps(ddp, opt, form: str, batches: int, rank: int) -> int:
    """``batches`` steps of ``form`` (``"one"``: step(closure); ``"two"``: the caller's backward, then
    step(closure, loss=)); returns how many returned."""
    done = 0
    for step in range(batches):
        x, y = _batch(step, rank)
        opt.zero_grad()
        if form == "one":
            opt.step(lambda: F.mse_loss(ddp(x), y))
        else:
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step(lambda: F.mse_loss(ddp(x), y), loss=loss.detach())
        done += 1
    return done


def _join_with_the_optimizer_job(rank: int, out_dir: str) -> None:
    """FusedSaLSa in torch's Join (a Joinable), uneven inputs (6 batches on rank 0, 4 on rank 1), both forms. With
    Join's default a joined rank cannot shadow the search's collectives (Join([ddp]) aborted gloo with a collective
    mismatch, "8 vs 4"; Join([ddp, opt]) raised AttributeError: no join_hook): every rank refuses its first step,
    naming Join, nothing written, and steps outside the Join run on. A rank with no input raises in the join hook
    as its peer refuses its step. With throw_on_early_termination=True, the model listed first, every rank raises
    at the step after one runs out (Join's own errors), the weights alike; the optimizer listed first (which aborted
    gloo, "260 vs 4") is refused at the first step."""
    from torch.distributed.algorithms.join import Join

    from salsa_fused.optimizer import JOIN_OPTIMIZER_FIRST, JOIN_UNSHADOWED
    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FusedSaLSa(ddp.parameters(), backend="torch")
    uneven = 6 if rank == 0 else 4
    for form in ("one", "two"):
        before, state_before = _flat(ddp.parameters()), _state_of(opt)
        with pytest.raises(RuntimeError, match="cannot step under torch.distributed.algorithms.Join with "
                                               "throw_on_early_termination=False") as refused:
            with Join([ddp, opt]):
                _join_steps(ddp, opt, form, uneven, rank)
        assert str(refused.value) == JOIN_UNSHADOWED
        assert torch.equal(_flat(ddp.parameters()), before)
        _assert_same_state(_state_of(opt), state_before, f"a step refused under Join ({form}-phase)")
        assert _join_steps(ddp, opt, form, 1, rank) == 1  # outside the Join
    with pytest.raises(RuntimeError, match="cannot step under torch.distributed.algorithms.Join"):
        with Join([ddp, opt]):
            _join_steps(ddp, opt, "two", 1 if rank == 0 else 0, rank)  # rank 1's join hook raises
    steps = opt.search_state.step
    with pytest.raises(RuntimeError, match=JOIN_OPTIMIZER_FIRST[:40]):
        with Join([opt, ddp], throw_on_early_termination=True):
            _join_steps(ddp, opt, "two", uneven, rank)
    assert opt.search_state.step == steps
    for form in ("one", "two"):
        done = [0]
        with pytest.raises(RuntimeError, match="exhausted"):
            with Join([ddp, opt], throw_on_early_termination=True):
                for step in range(uneven):
                    done[0] += _join_steps(ddp, opt, form, 1, rank)
        assert done[0] == 4
        steps += 4
        assert opt.search_state.step == steps
        _assert_same_on_all_ranks(_flat(ddp.parameters()), f"weights after Join ({form}-phase)")


def test_ddp_uneven_inputs_under_join_with_the_optimizer_fail_alike_or_stop_alike(tmp_path):
    spawn_in_gloo_group(_join_with_the_optimizer_job, str(tmp_path), WORLD, timeout_s=10)


@dataclasses.dataclass
class _ScheduleHoldingAnObject:
    """A schedule whose repr names an object's address, which differs on every rank."""
    marker: object = dataclasses.field(default_factory=object)

    def scale(self, step):
        return 1.0

    def searches(self, step):
        return True


def _has_cpp_extension() -> bool:
    try:
        import salsa_fused._C  # noqa: F401
    except ImportError:
        return False
    return True


def _ranks_that_differ_job(rank: int, out_dir: str) -> None:
    """Ranks built otherwise search otherwise: their weights parted and the job stalled at a later
    collective with gloo's timeout, naming nothing. Refused on every rank at the first step, a checkpoint
    loaded on one rank only before it included; ranks built alike step on, a load on one rank after the first
    step included (not compared: no collective of its own follows)."""
    cases = {
        "init_step_size": (lambda params: FusedSaLSa(params, backend="torch", init_step_size=0.5 if rank else 1.0),
                           "search state.step_size"),
        "a group": (lambda params: FusedSaLSa(params if rank else [{"params": params[:2]}, {"params": params[2:]}],
                                              backend="torch"), "param_groups"),
        "the preset": (lambda params: FusedSaLSa(params, backend="torch", beta3=0.95 if rank else 0.9),
                       "search constants.beta3"),
        # the default level given by name on one rank: its first search decays the weights and the other's does
        # not (weights 4e-2 apart from step 0, every later check passing; a DDP audit's find)
        "init_step_size=1.0 given on one rank": (
            lambda params: FusedSaLSa(params, backend="torch", weight_decay=0.1,
                                      **({"init_step_size": 1.0} if rank == 0 else {})), "init_step_size given"),
        # model= on one rank only: its trial forwards skip DDP's buffer broadcast that the other joins (a hang)
        "model= on one rank": (lambda params: FusedSaLSa(params, backend="torch",
                                                         model=params_model if rank == 0 else None), "model given"),
    }
    if _has_cpp_extension():  # ulp apart from the first step: the weights were no longer bitwise the same, silently
        cases["a backend"] = (lambda params: FusedSaLSa(params, backend="cpp" if rank else "torch"), "backend")
    for what, (build, named) in cases.items():
        model = _make_model(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        params_model = ddp  # for the model= case
        opt = build(list(ddp.parameters()))
        before = _flat(ddp.parameters()).clone()
        x, y = _batch(0, rank)
        with pytest.raises(ValueError, match=f"not the same on the 2 data-parallel ranks: {named} differ"):
            opt.step(lambda: F.mse_loss(ddp(x), y))
        assert torch.equal(_flat(ddp.parameters()), before) and opt.search_state.step == 0, what
    # a resume that loaded the checkpoint on one rank only: gloo aborted the process at the first step
    # (a collective of another size; NCCL may hang) where the step counter now names it
    trained = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    source = FusedSaLSa(trained.parameters(), backend="torch")
    for step in range(2):
        x, y = _batch(step, rank)
        source.zero_grad()
        source.step(lambda: F.mse_loss(trained(x), y))
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = FusedSaLSa(ddp.parameters(), backend="torch")
    if rank == 0:
        opt.load_state_dict(source.state_dict())
    before, x, y = _flat(ddp.parameters()).clone(), *_batch(2, rank)
    with pytest.raises(ValueError, match="The step counters differ: was a checkpoint loaded on some ranks only"):
        opt.step(lambda: F.mse_loss(ddp(x), y))
    assert torch.equal(_flat(ddp.parameters()), before)
    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    objects = [object() for _ in range(10 * (rank + 1))]  # the schedules' markers at other addresses
    opt = FusedSaLSa(ddp.parameters(), backend="torch", schedule=_ScheduleHoldingAnObject(objects[-1]))
    for step in range(3):  # built alike (an address apart): compared at the first step, then steps as before
        x, y = _batch(step, rank)
        if step == 1 and rank == 0:
            opt.load_state_dict(opt.state_dict())  # on one rank only: no collective of its own follows
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(ddp(x), y))
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_ranks_built_otherwise_are_refused_alike_at_the_first_step(tmp_path):
    spawn_in_gloo_group(_ranks_that_differ_job, str(tmp_path), WORLD, timeout_s=60)


def _built_before_the_process_group_job(rank: int, out_dir: str) -> None:
    """``FusedSaLSa(model.parameters())`` built before ``init_process_group`` (is_distributed() False then, as
    it is before the call): the default reduction was decided at the build, never again, so each rank searched
    on its own loss and the weights parted, silently (step sizes 3.5e-7 and 0.094 at the first step; a DDP
    audit's find). The first step finds the process group and averages over it."""
    from unittest import mock

    import salsa_fused.optimizer as optimizer_module
    model = _make_model(0)
    with mock.patch.object(optimizer_module, "default_reduction",
                           wraps=lambda params=None: optimizer_module.SearchReduction()):
        opt = FusedSaLSa(model.parameters(), backend="torch")  # the reduction of a process before the group
    assert opt.reduction.loss_group is None
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for step in range(6):
        x, y = _batch(step, rank)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(ddp(x), y))
    assert opt.reduction.loss_group is not None
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights of an optimizer built before the process group")
    _assert_same_on_all_ranks(torch.tensor([opt.step_size], dtype=torch.float64), "its level")


def test_ddp_an_optimizer_built_before_the_process_group_averages_from_its_first_step(tmp_path):
    spawn_in_gloo_group(_built_before_the_process_group_job, str(tmp_path), WORLD, timeout_s=60)


def _state_of(opt: FusedSaLSa) -> dict:
    return copy.deepcopy(opt.state_dict())


def _gradients_not_averaged_job(rank: int, out_dir: str) -> None:
    """Three ways a DDP user's gradients miss the all-reduce: the module inside DDP called in the closure,
    no_sync() around the micro-batch that steps, no DDP at all. Each rank stepped on its own gradients and
    the weights parted from the first step, silently; now every rank raises alike at the first search,
    with the weights and the optimizer's state as they were. The DDP-wrapped model steps on alike."""
    def closure_of(forward, x, y):
        return lambda: F.mse_loss(forward(x), y)

    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = FusedSaLSa(ddp.parameters(), backend="torch")
    for step in range(3):  # alike at first: the search steps and compares its q
        x, y = _batch(step, rank)
        opt.zero_grad()
        opt.step(closure_of(ddp, x, y))
    cases = {
        "the module inside DDP": lambda x, y: opt.step(closure_of(ddp.module, x, y)),
        "no_sync() on the stepping micro-batch": None,
    }
    for what, run in cases.items():
        x, y = _batch(7, rank)
        opt.zero_grad()
        before, state = _flat(ddp.parameters()).clone(), _state_of(opt)  # the 4th step searches (the first 9 do)
        with pytest.raises(ValueError, match="data-parallel ranks stepped on different gradients at step 4"):
            if run is not None:
                run(x, y)
            else:
                with ddp.no_sync():
                    loss = F.mse_loss(ddp(x), y)
                    loss.backward()
                opt.step(closure_of(ddp, x, y), loss=loss)
        assert torch.equal(_flat(ddp.parameters()), before), what
        _assert_same_state(_state_of(opt), state, what)
    plain = _make_model(0)
    alone = FusedSaLSa(plain.parameters(), backend="torch")
    x, y = _batch(0, rank)
    with pytest.raises(ValueError, match="stepped on different gradients at step 1 "):
        alone.step(closure_of(plain, x, y))  # no DDP: each rank's own gradients
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_gradients_not_averaged_are_refused_on_every_rank(tmp_path):
    spawn_in_gloo_group(_gradients_not_averaged_job, str(tmp_path), WORLD, timeout_s=60)


def _gradients_a_little_apart_job(rank: int, out_dir: str) -> None:
    """Where the refusal of gradients not averaged draws its line (GRADIENT_SPREAD, 1e-4 of q): at the first
    step q = g.d scales with the gradient, so rank 1's averaged gradients scaled by 1 + r put the ranks' q a
    relative spread of about r / 2 apart. Scaled by 1.001 (5e-4) they are refused on every rank, nothing
    stepped; scaled by 1.00002 (1e-5, far from what a rank's own batch gives) the step is taken on both."""
    for factor, refused in ((1.001, True), (1.00002, False)):
        ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
        opt = FusedSaLSa(ddp.parameters(), backend="torch")
        x, y = _batch(0, rank)
        loss = F.mse_loss(ddp(x), y)
        loss.backward()  # averaged over the ranks
        if rank == 1:
            with torch.no_grad():
                for p in ddp.parameters():
                    p.grad.mul_(factor)
        before, state = _flat(ddp.parameters()).clone(), _state_of(opt)
        closure = lambda: F.mse_loss(ddp(x), y)  # noqa: E731
        if refused:
            with pytest.raises(ValueError, match="the 2 data-parallel ranks stepped on different gradients at step 1 "):
                opt.step(closure, loss=loss.detach())
            assert torch.equal(_flat(ddp.parameters()), before)
            _assert_same_state(_state_of(opt), state, f"gradients {factor} apart")
        else:
            opt.step(closure, loss=loss.detach())
            assert opt.search_state.step == 1 and opt.num_searches == 1
            assert not torch.equal(_flat(ddp.parameters()), before)
        del ddp


class _SearchOnOddSteps:
    """Searches at steps 1, 3, 5, ...; the steps between are plain."""

    def scale(self, step: int) -> float:
        return 1.0

    def searches(self, step: int) -> bool:
        return step % 2 == 1


def _weights_parted_at_a_plain_step_job(rank: int, out_dir: str) -> None:
    """A plain step compares nothing across the ranks. Where one rank stepped on gradients its peers did not
    have there (a parameter's .grad None on rank 1 only; the last micro-batch's backward under no_sync()), the
    ranks parted for good: the first, silently to the end of the run; the second, refused at the next search as
    that search's gradients, and at every search after it. The next search now names the weights that
    differ, on every rank, before it moves anything."""
    for how in ("a .grad None on one rank", "no_sync() on the last micro-batch"):
        ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
        opt = FusedSaLSa(ddp.parameters(), backend="torch", schedule=_SearchOnOddSteps())
        for step in range(2):  # the second is plain
            x, y = _batch(step, rank)
            opt.zero_grad()
            if step == 1 and how.startswith("no_sync"):
                with ddp.no_sync():
                    loss = F.mse_loss(ddp(x), y)
                    loss.backward()
            else:
                loss = F.mse_loss(ddp(x), y)
                loss.backward()
            if step == 1 and how.startswith("a .grad") and rank == 1:
                ddp.module[0].bias.grad = None
            opt.step(lambda: F.mse_loss(ddp(x), y), loss=loss.detach())
        assert opt.search_state.num_searches == 1
        x, y = _batch(2, rank)
        opt.zero_grad()
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        before, state = _flat(ddp.parameters()).clone(), _state_of(opt)
        with pytest.raises(ValueError, match="the 2 data-parallel ranks' weights differ at step 3, before it moved "
                                             "them: they parted at an earlier step without a search"):
            opt.step(lambda: F.mse_loss(ddp(x), y), loss=loss.detach())
        assert torch.equal(_flat(ddp.parameters()), before), how
        _assert_same_state(_state_of(opt), state, how)
        del ddp


def test_ddp_ranks_whose_weights_parted_at_a_plain_step_are_named_at_the_next_search(tmp_path):
    spawn_in_gloo_group(_weights_parted_at_a_plain_step_job, str(tmp_path), WORLD, timeout_s=60)


def test_ddp_gradients_apart_by_more_than_the_spread_are_refused_and_by_less_are_not(tmp_path):
    spawn_in_gloo_group(_gradients_a_little_apart_job, str(tmp_path), WORLD, timeout_s=60)


def _assert_same_state(state: dict, before: dict, what: str) -> None:
    assert state["param_groups"] == before["param_groups"], what
    assert state["state"].keys() == before["state"].keys(), what
    for key, moments in state["state"].items():
        for name, value in moments.items():
            same = torch.equal(value, before["state"][key][name]) if torch.is_tensor(value) else \
                value == before["state"][key][name]
            assert same, f"{what}: state {key} {name} changed"


def _refused_as_mixed_forms(rank: int, opt, closure, own_forward, given_loss=None) -> None:
    """Rank 0 steps in the one-phase form, ``step(closure)``, rank 1 in the two-phase form (``own_forward()``
    and its backward, then ``step(closure, loss=given_loss(loss))``, the loss itself by default): refused with
    the mixed-forms ValueError on both ranks, naming rank 1's form."""
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"mix the one-phase step\(closure\) and the two-phase .*"
                                         r"1 of the 2 data-parallel ranks passed loss="):
        if rank == 0:
            opt.step(closure)
        else:
            loss = own_forward()
            loss.backward()
            opt.step(closure, loss=loss if given_loss is None else given_loss(loss))


def _mixed_forms_job(rank: int, out_dir: str) -> None:
    """Rank 0 steps in the one-phase form, rank 1 in the two-phase form at a search step. The two forms
    run different collectives (the two-phase form decides first, in an all-reduce of its own, whether
    it needs a reference forward), so their all-reduces paired up unnoticed: rank 0 read rank 1's flag
    as half its loss, and the ranks fell out of step until a collective timed out. Refused on every
    rank, weights and state as before; the ranks stay in step and train on alike. At the first step too: the
    one-phase form compared the ranks' optimizers before its own backward, the two-phase form after the
    caller's, so that comparison met DDP's gradient all-reduce and gloo aborted the process (SIGABRT)."""
    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FusedSaLSa(ddp.parameters(), backend="torch")
    for step in range(5):
        x, y = _batch(step, rank)

        def closure():
            return F.mse_loss(ddp(x), y)

        if step in (0, 1, 3):  # every early step searches (the interval starts near 1)
            before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
            _refused_as_mixed_forms(rank, opt, closure, closure)
            assert torch.equal(_flat(ddp.parameters()), before)
            _assert_same_state(_state_of(opt), state_before, f"step {step}")
        opt.zero_grad()
        opt.step(closure)
    assert opt.search_state.step == 5 and opt.num_searches == 5
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_ranks_that_mix_the_one_and_two_phase_forms_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_mixed_forms_job, str(tmp_path), WORLD, timeout_s=20)



def _accumulated_two_phase(ddp, opt, step, rank, parts, summed):
    """Gradient accumulation over ``parts`` micro-batches in the two-phase form, one gradient all-reduce (on
    the last); ``summed``: loss= is the sum of the micro-batches' means (``parts`` x the closure's mean).
    Under LABPAL (``opt.next_batches()``) the closure takes the micro-batch index: the first ``parts`` give
    the gradient, an approximation's points read more."""
    batches = opt.next_batches()
    count = parts if batches is None else max(batches.gradient, batches.points)
    assert batches is None or batches.gradient == parts
    x, y = _batch(step, rank, size=4 * count)
    micro = [(x[i::count], y[i::count]) for i in range(count)]
    opt.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for i, (xb, yb) in enumerate(micro[:parts]):
        with contextlib.nullcontext() if i == parts - 1 else ddp.no_sync():
            loss = F.mse_loss(ddp(xb), yb)
            (loss / parts).backward()
        total += loss.detach().double() if summed else loss.detach().double() / parts
    if batches is not None:
        return opt.step(lambda i: F.mse_loss(ddp(micro[i][0]), micro[i][1]), loss=total)
    return opt.step(lambda: sum(F.mse_loss(ddp(xb), yb) for xb, yb in micro) / parts, loss=total)


def _loss_mismatch_on_one_rank_job(rank: int, out_dir: str) -> None:
    """Rank 1 passes a summed loss= (2 micro-batch means: 2x the closure's mean), rank 0 the right one, at
    the first two-phase search (the check of loss= at w0, once per optimizer), under the default rule and
    under LABPAL (its first approximation). The refusal rides the check's all-reduce: both ranks raise
    ValueError (rank 1 naming the ratio, rank 0 naming another rank), the weights, optimizer state and
    generator as before on each; the corrected retry steps alike on both ranks, bitwise as a twin run that
    passed the right loss= from the start."""
    from salsa_fused import LABPAL
    cases = {"default rule": lambda params: FusedSaLSa(params, backend="torch"),
             "LABPAL": lambda params: LABPAL(params, backend="torch", approximation_batches=2, sgd_steps=2,
                                             accumulation=2)}
    for what, build in cases.items():
        runs = []
        for refused in (True, False):
            ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
            opt = build(ddp.parameters())
            for step in range(4):
                if step == 0 and refused:
                    before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
                    rng = torch.get_rng_state()
                    expected = r"loss= is 2x the closure's loss at the same weights" if rank == 1 else \
                        r"loss= is not the closure's loss at the same weights on another data-parallel rank"
                    with pytest.raises(ValueError, match=expected):
                        _accumulated_two_phase(ddp, opt, step, rank, 2, summed=rank == 1)
                    assert torch.equal(_flat(ddp.parameters()), before), what
                    _assert_same_state(_state_of(opt), state_before, what)
                    assert torch.equal(torch.get_rng_state(), rng), what
                _accumulated_two_phase(ddp, opt, step, rank, 2, summed=False)
            assert opt.search_state.step == 4 and opt.num_searches >= 2, what
            runs.append((_flat(ddp.parameters()).clone(), opt.search_state))
            _assert_same_on_all_ranks(runs[-1][0], f"weights ({what})")
            _assert_same_on_all_ranks(torch.tensor([opt.step_size, opt.num_forward_evals], dtype=torch.float64),
                                      f"step size / forward count ({what})")
        (weights, state), (twin_weights, twin_state) = runs
        assert torch.equal(weights, twin_weights) and state == twin_state, what


def test_ddp_a_loss_that_is_not_the_closures_on_one_rank_is_refused_on_every_rank(tmp_path):
    spawn_in_gloo_group(_loss_mismatch_on_one_rank_job, str(tmp_path), WORLD, timeout_s=30)


class _Boom(RuntimeError):
    pass


def _closure_raises_on_one_rank_job(rank: int, out_dir: str) -> None:
    """Rank 1's closure raises in a trial forward (say, out of memory), rank 0's does not. Rank 1's
    exception went up while rank 0 waited in the trial's all-reduce until gloo's timeout. Now rank 1
    joins that all-reduce flagged as failed and raises its own exception, rank 0 raises an error naming
    rank 1; on both the weights and the state are as before the step, and a retry steps alike."""
    cases = {  # the form, and whether the generators move between zero_grad() and step()
        "one-phase": (False, False),
        "two-phase": (True, False),
        "two-phase, reference forward": (True, True),  # the forward at w0 raises, before the search
    }
    for what, (two_phase, draws) in cases.items():
        model = _make_model(0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = FusedSaLSa(ddp.parameters(), backend="torch")
        for step in range(3):
            x, y = _batch(step, rank)
            fail = step == 1 and rank == 1

            def closure():
                if fail and not torch.is_grad_enabled():  # a trial's forward, not the step's own
                    raise _Boom("out of memory, say")
                return F.mse_loss(ddp(x), y)

            def step_once():
                opt.zero_grad()
                if draws:
                    torch.rand(1)
                if not two_phase:
                    return opt.step(closure)
                with torch.enable_grad():
                    loss = closure()
                loss.backward()
                return opt.step(closure, loss=loss)

            if step == 1:
                before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
                expected = (_Boom, "out of memory") if rank == 1 else \
                    (RuntimeError, r"the closure raised on rank 1 \(1 of the 2 data-parallel ranks\)")
                with pytest.raises(expected[0], match=expected[1]):
                    step_once()
                assert torch.equal(_flat(ddp.parameters()), before), what
                _assert_same_state(_state_of(opt), state_before, what)
                fail = False
            step_once()
        assert opt.search_state.step == 3, what
        _assert_same_on_all_ranks(_flat(ddp.parameters()), f"weights ({what})")


def test_ddp_a_closure_that_raises_on_one_rank_raises_on_every_rank(tmp_path):
    spawn_in_gloo_group(_closure_raises_on_one_rank_job, str(tmp_path), WORLD, timeout_s=20)


def test_the_ranks_status_sums_stay_exact_with_a_bf16_loss_on_many_ranks(monkeypatch):
    """The form and failure counts ride in the loss's all-reduce: with a bf16 loss they must still count
    257 ranks exactly (in bf16, 256 + 1 rounds to 256 and every rank would be refused as mixing forms).
    257 ranks simulated: an all-reduce that sums 257 copies of the payload, in its dtype."""
    import salsa_fused.distributed as distributed
    ranks = 257

    def all_reduce(tensor, op=None, group=None):
        total = torch.zeros_like(tensor)
        for _ in range(ranks):
            total += tensor
        tensor.copy_(total)

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: ranks)
    reduction = SearchReduction(loss_group=object())
    out = reduction.exchange(torch.tensor([2.5], dtype=torch.bfloat16), two_phase=True)
    value, *status = out.tolist()
    assert status == [ranks, 0, 0, 0]
    reduction.check(status, True, None, step=3)  # all two-phase alike: nothing raised
    assert value == pytest.approx(2.5, rel=1e-3)


def _fsdp_moments(model, opt) -> list:
    """Every moment of ``opt``, gathered (a collective: every rank calls it alike)."""
    return [v.full_tensor().clone() for p in model.parameters() for v in opt.state[p].values()
            if isinstance(v, torch.Tensor) and v.dim()]


def _fsdp_closure_raises_on_one_rank_job(rank: int, out_dir: str) -> None:
    """FSDP2 (a shard group, and one more host read before the shard group's sum): rank 1's closure raises
    in a search forward, after the model's forward (its all-gathers done). Every rank raises, rank 1 its
    own exception, rank 0 ClosureFailedOnAnotherRank naming rank 1; on both the full weights, moments and
    search state are as before the step, and a retry on both ranks runs on to the weights, bitwise, of a
    run in which nothing raised. Before, rank 0 waited in the trial's all-reduce until the timeout."""
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_fused import ClosureFailedOnAnotherRank
    mesh = init_device_mesh("cpu", (WORLD,))
    cases = {  # the form, and whether the generators move between zero_grad() and step()
        "one-phase": (False, False),
        "two-phase": (True, False),
        "two-phase, reference forward": (True, True),  # the forward at w0 raises, before the search
    }
    for what, (two_phase, draws) in cases.items():
        runs = []
        for interrupted in (False, True):
            model = _fsdp_model(0, mesh)
            opt = FusedSaLSa(model.parameters(), model=model, backend="torch")
            for step in range(4):
                x, y = _batch(step, rank)
                fail = interrupted and step == 2 and rank == 1

                def closure():
                    loss = F.mse_loss(model(x), y)
                    if fail and not torch.is_grad_enabled():  # a search forward, not the step's own
                        raise _Boom("out of memory, say")
                    return loss

                def step_once():
                    opt.zero_grad()
                    if draws:
                        torch.rand(1)
                    if not two_phase:
                        return opt.step(closure)
                    with torch.enable_grad():
                        loss = closure()
                    loss.backward()
                    return opt.step(closure, loss=loss)

                if fail or (interrupted and step == 2):
                    weights, moments = _full_weights(model), _fsdp_moments(model, opt)
                    search, forwards = opt.search_state, opt.num_forward_evals
                    expected = (_Boom, "out of memory") if rank == 1 else \
                        (ClosureFailedOnAnotherRank, r"the closure raised on rank 1 \(1 of the 2 data-parallel ranks\)")
                    with pytest.raises(expected[0], match=expected[1]):
                        step_once()
                    assert torch.equal(_full_weights(model), weights), what
                    after = _fsdp_moments(model, opt)
                    assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(after, moments)), what
                    assert opt.search_state == search and opt.num_forward_evals == forwards, what
                    fail = False
                step_once()
            assert opt.search_state.step == 4 and opt.num_searches == 4, what
            runs.append((_full_weights(model), opt.search_state))
        _assert_same_on_all_ranks(runs[1][0], f"weights ({what})")
        assert torch.equal(runs[1][0], runs[0][0]), f"{what}: the retried run differs from the uninterrupted one"
        assert runs[1][1] == runs[0][1], what


@fsdp2_forwards
def test_fsdp2_a_closure_that_raises_on_one_rank_raises_on_every_rank(tmp_path):
    spawn_in_gloo_group(_fsdp_closure_raises_on_one_rank_job, str(tmp_path), WORLD, timeout_s=30)


def _fsdp_mixed_forms_job(rank: int, out_dir: str) -> None:
    """FSDP2: rank 0 steps in the one-phase form, rank 1 in the two-phase form at a search step. The
    one-phase rank reads the forms before the shard group's sum, the two-phase rank in its opening
    all-reduce: ValueError on both, full weights, moments and search state as before, and the run goes
    on to the weights, bitwise, of a run without the mixed steps."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    runs = []
    for mixed in (False, True):
        model = _fsdp_model(0, mesh)
        opt = FusedSaLSa(model.parameters(), model=model, backend="torch")
        for step in range(5):
            x, y = _batch(step, rank)

            def closure():
                return F.mse_loss(model(x), y)

            if mixed and step in (1, 3):  # every early step searches
                weights, moments, search = _full_weights(model), _fsdp_moments(model, opt), opt.search_state
                _refused_as_mixed_forms(rank, opt, closure, closure)
                assert torch.equal(_full_weights(model), weights)
                after = _fsdp_moments(model, opt)
                assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(after, moments))
                assert opt.search_state == search
            opt.zero_grad()
            opt.step(closure)
        assert opt.search_state.step == 5 and opt.num_searches == 5
        runs.append((_full_weights(model), opt.search_state))
    _assert_same_on_all_ranks(runs[1][0], "weights")
    assert torch.equal(runs[1][0], runs[0][0]) and runs[1][1] == runs[0][1]


@fsdp2_forwards
def test_fsdp2_ranks_that_mix_the_one_and_two_phase_forms_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_fsdp_mixed_forms_job, str(tmp_path), WORLD, timeout_s=30)


def _mixed_forms_opening_dtype_job(rank: int, out_dir: str) -> None:
    """The two-phase form's opening all-reduce pairs with the one-phase form's all-reduce of its loss at
    w0 when the ranks mix forms: both must send the same dtype. Under LABPAL (a search step with points)
    that loss is float64 and the opening was float32; with torch's default dtype float64 the opening was
    float64 against the float32 loss of the default rule; a float64 model's loss met a float32 opening. The
    buffers' sizes differed: gloo aborted the process (NCCL hangs or misreads) instead of the ValueError on
    every rank, state as before."""
    from salsa_fused import LABPAL
    cases = {"LABPAL": (lambda params: LABPAL(params, backend="torch", approximation_batches=2, sgd_steps=1),
                        torch.float32, torch.float32),
             "default dtype float64": (lambda params: FusedSaLSa(params, backend="torch"), torch.float64,
                                       torch.float32),
             "float64 model": (lambda params: FusedSaLSa(params, backend="torch"), torch.float32, torch.float64)}
    for what, (build, default_dtype, model_dtype) in cases.items():
        model = _make_model(0).to(model_dtype)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = build(ddp.parameters())
        indexed = opt.next_batches() is not None
        for step in range(4):
            def closure(i=0, step=step):
                x, y = _batch(10 * step + i, rank)
                return F.mse_loss(ddp(x.to(model_dtype)), y.to(model_dtype))  # drawn in the default dtype

            if step == 2:  # LABPAL with sgd_steps=1: steps 0 and 2 fit a parabola (search, points > 0)
                assert opt.next_batches() is None or opt.next_batches().points > 0, what
                before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
                previous = torch.get_default_dtype()
                torch.set_default_dtype(default_dtype)
                try:
                    _refused_as_mixed_forms(rank, opt, closure, lambda: closure(0),
                                            (lambda loss: loss.detach().double()) if indexed else None)
                finally:
                    torch.set_default_dtype(previous)
                assert torch.equal(_flat(ddp.parameters()), before), what
                _assert_same_state(_state_of(opt), state_before, what)
            opt.zero_grad()
            opt.step(closure)
        _assert_same_on_all_ranks(_flat(ddp.parameters()), f"weights ({what})")


def test_ddp_a_mix_of_forms_sends_one_dtype_in_the_opening_all_reduce(tmp_path):
    spawn_in_gloo_group(_mixed_forms_opening_dtype_job, str(tmp_path), WORLD, timeout_s=20)


def _dropout_batch_norm_model(seed: int) -> torch.nn.Module:
    """A model whose forwards move what the beam and the factor search must put back: BatchNorm's running
    statistics and the random generators (dropout)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


def _lr_factor_closure_raises_on_one_rank_job(rank: int, out_dir: str) -> None:
    """LRFactorSearch under DDP: rank 1's scoring closure raises at the second factor's forward (after the
    model's forward). Rank 1 left with its exception while rank 0 waited in the trial losses' all-reduce until
    the collective timeout (or paired it with the next step's). Now every rank raises, rank 1 its own
    exception, rank 0 ClosureFailedOnAnotherRank naming rank 1, with the weights, BatchNorm buffers,
    generators, optimizer state and the search's scale where the optimizer's step left them; the run goes
    on bitwise as one whose call there took the optimizer's step alone (the decision skipped), for a
    FusedSaLSa (target "schedule") and for AdamW (target "lr")."""
    from torch.nn.parallel import DistributedDataParallel

    from salsa_fused import ClosureFailedOnAnotherRank, LRFactorSearch
    for target in ("schedule", "lr"):
        runs = []
        for interrupted in (False, True):
            model = _dropout_batch_norm_model(0)
            ddp = DistributedDataParallel(model)
            opt = FusedSaLSa(ddp.parameters(), model=model, backend="torch") if target == "schedule" else \
                torch.optim.AdamW(ddp.parameters(), lr=0.02)
            search = LRFactorSearch(opt, interval=3, buffers=None if target == "schedule" else model.buffers())
            torch.manual_seed(10 + rank)
            at_failure = None
            for call in range(8):
                x, y = _batch(call, rank)
                forwards = []

                def score():
                    loss = F.mse_loss(ddp(x), y)
                    forwards.append(loss)
                    if interrupted and call == 2 and rank == 1 and len(forwards) == 2:
                        raise _Boom("out of memory, say")
                    return loss

                def optimizer_step():
                    opt.zero_grad()
                    if target == "schedule":
                        return opt.step(lambda: F.mse_loss(ddp(x), y))
                    F.mse_loss(ddp(x), y).backward()
                    return opt.step()

                if call == 2 and not interrupted:  # the call as the failure leaves it: the step alone
                    optimizer_step()
                    search.calls += 1
                elif call == 2:
                    expected = (_Boom, "out of memory") if rank == 1 else \
                        (ClosureFailedOnAnotherRank, r"the closure raised on rank 1 \(1 of the 2 data-parallel "
                                                     r"ranks\) in LRFactorSearch's scoring forward \(call 3;")
                    with pytest.raises(expected[0], match=expected[1]):
                        search.step(score, optimizer_step)
                    assert len(forwards) == 2, target  # no rank scored the third factor
                else:
                    search.step(score, optimizer_step)
                if call == 2:
                    at_failure = (_flat(model.state_dict().values()), torch.get_rng_state(), _state_of(opt),
                                  search.state_dict())
            assert search.calls == 8 and search.last_decision["call"] == 6, target
            runs.append((at_failure, _flat(model.state_dict().values()), torch.get_rng_state(), _state_of(opt),
                         search.state_dict()))
        (reference, *ref_end), (failed, *end) = runs
        for what, (ref, got) in {"at the failure": (reference, failed), "at the end": (ref_end, end)}.items():
            assert torch.equal(got[0], ref[0]), f"{target}: weights and buffers {what}"
            assert torch.equal(got[1], ref[1]), f"{target}: generators {what}"
            _assert_same_state(got[2], ref[2], f"{target}: optimizer state {what}")
            ref_search, got_search = dict(ref[3]), dict(got[3])
            ref_forwards, got_forwards = ref_search.pop("scoring_forward_evals"), got_search.pop("scoring_forward_evals")
            assert got_search == ref_search, f"{target}: the search's state {what}"
            assert got_forwards == ref_forwards + 2, f"{target}: the failed call's two forwards are counted ({what})"
        _assert_same_on_all_ranks(_flat(ddp.parameters()), f"weights ({target})")


def test_ddp_a_factor_search_closure_that_raises_on_one_rank_raises_on_every_rank(tmp_path):
    spawn_in_gloo_group(_lr_factor_closure_raises_on_one_rank_job, str(tmp_path), WORLD, timeout_s=20)


def _beam_closure_raises_on_one_rank_job(rank: int, out_dir: str) -> None:
    """StepSizeBeam under DDP: rank 1's closure raises in a search forward of a branch's step (after the
    model's forward). The branch's step tells every rank (FusedSaLSa's search): rank 1 raises its own
    exception, rank 0 ClosureFailedOnAnotherRank, and on both the beam puts back what its branches changed:
    weights, BatchNorm buffers, generators, the optimizer's state, the multiplier and the decisions as before
    the call; a retry of the call on both ranks runs on bitwise as the run in which nothing raised."""
    from torch.nn.parallel import DistributedDataParallel

    from salsa_fused import ClosureFailedOnAnotherRank, StepSizeBeam
    steps, beam_call = 12, 2
    runs = []
    for interrupted in (False, True):
        model = _dropout_batch_norm_model(0)
        ddp = DistributedDataParallel(model)
        opt = FusedSaLSa(ddp.parameters(), model=model, backend="torch")
        beam = StepSizeBeam(opt, total_steps=steps, points=(beam_call / steps,), horizon=0.1)
        assert beam.beam_steps == [beam_call]
        torch.manual_seed(10 + rank)
        fail = interrupted and rank == 1
        for call in range(steps):
            def closure(i, call=call):
                nonlocal fail
                x, y = _batch(call + i, rank)
                loss = F.mse_loss(ddp(x), y)
                if fail and call == beam_call and i == 1 and not torch.is_grad_enabled():
                    fail = False  # once: a trial forward of a branch's second step
                    raise _Boom("out of memory, say")
                return loss

            if interrupted and call == beam_call:
                before = (_flat(model.state_dict().values()), torch.get_rng_state(), _state_of(opt),
                          beam.multiplier, copy.deepcopy(beam.decisions), beam.calls)
                expected = (_Boom, "out of memory") if rank == 1 else \
                    (ClosureFailedOnAnotherRank, r"the closure raised on rank 1 \(1 of the 2 data-parallel ranks\)")
                with pytest.raises(expected[0], match=expected[1]):
                    beam.step(closure)
                assert torch.equal(_flat(model.state_dict().values()), before[0]), "weights and buffers"
                assert torch.equal(torch.get_rng_state(), before[1]), "generators"
                _assert_same_state(_state_of(opt), before[2], "optimizer state")
                assert (beam.multiplier, beam.decisions, beam.calls) == before[3:], "the beam's state"
            beam.step(closure)
        assert len(beam.decisions) == 1
        state = beam.state_dict()
        del state["branch_forward_evals"]  # the failed call's branch forwards ran, and stay counted
        runs.append((_flat(model.state_dict().values()), torch.get_rng_state(), _state_of(opt), state))
    (reference, failed) = runs
    assert torch.equal(failed[0], reference[0]), "weights and buffers: the retried run differs"
    assert torch.equal(failed[1], reference[1]), "generators: the retried run differs"
    _assert_same_state(failed[2], reference[2], "optimizer state: the retried run differs")
    assert failed[3] == reference[3], "the beam's state: the retried run differs"
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_a_beam_closure_that_raises_on_one_rank_raises_on_every_rank(tmp_path):
    spawn_in_gloo_group(_beam_closure_raises_on_one_rank_job, str(tmp_path), WORLD, timeout_s=20)


def _ddp_preset_beam(rank: int, steps: int = 20):
    """DDP, the preset for ``steps`` steps and a StepSizeBeam deciding once, at step 2; this rank's batches."""
    from salsa_fused import StepSizeBeam, presets
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = presets.recommended(ddp.parameters(), total_steps=steps, backend="torch")
    beam = StepSizeBeam(opt, total_steps=steps, points=(0.1,), horizon=0.1)
    return ddp, opt, beam, [_batch(k, rank) for k in range(steps + 10)]


def _beam_closure_nonfinite_on_one_rank_job(rank: int, out_dir: str) -> None:
    """DDP with a StepSizeBeam whose closure raises NonFiniteError itself (its own check) in a trial forward
    of a branch, on rank 1 only. The beam scored that branch inf on rank 1 alone, while rank 0 got
    ClosureFailedOnAnotherRank out of the search: the ranks' collectives parted and gloo aborted (SIGABRT).
    Now rank 1 raises the closure's error and rank 0 ClosureFailedOnAnotherRank, out of beam.step: weights,
    optimizer state and the beam's multiplier as before, and a retry on both ranks decides alike."""
    from salsa_fused import ClosureFailedOnAnotherRank, NonFiniteError
    ddp, opt, beam, data = _ddp_preset_beam(rank)
    raised = []
    for k in range(5):
        def closure(i, k=k):
            if rank == 1 and k == 2 and i == 1 and not torch.is_grad_enabled() and not raised:
                raised.append(i)  # a trial forward of the first branch's second step, on rank 1 only
                raise NonFiniteError("the closure's own check, on rank 1")
            return F.mse_loss(ddp(data[k + i][0]), data[k + i][1])
        if k == 2:
            before = (_flat(ddp.parameters()).clone(), _state_of(opt), beam.multiplier, len(beam.decisions))
            expected = (NonFiniteError, "own check") if rank == 1 else \
                (ClosureFailedOnAnotherRank, r"the closure raised on rank 1 \(1 of the 2 data-parallel ranks\)")
            with pytest.raises(expected[0], match=expected[1]):
                beam.step(closure)
            assert torch.equal(_flat(ddp.parameters()), before[0])
            _assert_same_state(_state_of(opt), before[1], "a beam step refused")
            assert (beam.multiplier, len(beam.decisions)) == before[2:]
        beam.step(closure)
    assert len(raised) == rank and len(beam.decisions) == 1
    kept = torch.tensor([beam.multiplier] + [d["factor"] for d in beam.decisions], dtype=torch.float64)
    _assert_same_on_all_ranks(kept, "the beam's multiplier and kept factors")
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_a_beam_closure_raising_nonfinite_on_one_rank_raises_on_every_rank(tmp_path):
    spawn_in_gloo_group(_beam_closure_nonfinite_on_one_rank_job, str(tmp_path), WORLD, timeout_s=20)


def _beam_closure_nonfinite_on_every_rank_job(rank: int, out_dir: str) -> None:
    """DDP with a StepSizeBeam whose closure raises NonFiniteError itself in a trial forward of a branch, on
    every rank: an agreed divergence. In one process the beam scores that branch as diverged; under DDP each
    rank raised its own error out of beam.step and the run stopped. Now every rank raises NonFiniteOnEveryRank
    from its own out of the branch's step, and the beam scores the branch inf on every rank, as in one process:
    the same decision and weights on both ranks."""
    from salsa_fused import NonFiniteError, NonFiniteOnEveryRank
    from salsa_fused.distributed import SearchReduction
    ddp, opt, beam, data = _ddp_preset_beam(rank)
    raised = []
    for k in range(5):
        def closure(i, k=k):
            if k == 2 and i == 1 and not torch.is_grad_enabled() and not raised:
                raised.append(i)  # a trial forward of the first branch's second step, on every rank
                raise NonFiniteError(f"the closure's own check, on rank {rank}")
            return F.mse_loss(ddp(data[k + i][0]), data[k + i][1])
        beam.step(closure)
    assert raised == [1] and len(beam.decisions) == 1
    assert beam.decisions[0]["losses"][0] == math.inf, beam.decisions[0]
    assert all(math.isfinite(loss) for loss in beam.decisions[0]["losses"][1:]), beam.decisions[0]
    kept = torch.tensor([beam.multiplier] + [d["factor"] for d in beam.decisions], dtype=torch.float64)
    _assert_same_on_all_ranks(kept, "the beam's multiplier and kept factors")
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")
    # the optimizer itself raises NonFiniteOnEveryRank on every rank, from the rank's own error
    reduction = SearchReduction(loss_group=dist.group.WORLD)
    with pytest.raises(NonFiniteOnEveryRank, match=f"every one of the 2 .* on rank {rank}") as refused:
        reduction.shared_loss(lambda: (_ for _ in ()).throw(NonFiniteError(f"on rank {rank}")), torch.float32,
                              None, True, 7)
    assert isinstance(refused.value.__cause__, NonFiniteError)


def test_ddp_a_beam_closure_raising_nonfinite_on_every_rank_scores_the_branch_diverged(tmp_path):
    spawn_in_gloo_group(_beam_closure_nonfinite_on_every_rank_job, str(tmp_path), WORLD, timeout_s=20)


def _labpal_mixed_forms_job(rank: int, out_dir: str) -> None:
    """LABPAL on FSDP2, rank 0 in the one-phase form and rank 1 in the two-phase form at an approximation
    (a search whose points read more batches), the first step and a later one. The one-phase form ran its
    forwards at w0 (FSDP2's all-gathers) where the two-phase form opened its search with an all-reduce: the
    ranks waited on each other until gloo's timeout. Refused on every rank with the mixed-forms error,
    weights and state as before; the ranks step on alike."""
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_fused import LABPAL
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(0, mesh)
    opt = LABPAL(model.parameters(), backend="torch", approximation_batches=3, sgd_steps=2, model=model)
    for step in range(5):
        def closure(i, step=step):
            x, y = _batch(10 * step + i, rank)
            return F.mse_loss(model(x), y)
        if step in (0, 3):
            assert opt.next_batches().points > 0 and opt.next_batches().gradient == 1, step
            before, state_before = _full_weights(model), _state_of(opt)
            _refused_as_mixed_forms(rank, opt, closure, lambda: closure(0), torch.Tensor.detach)
            assert torch.equal(_full_weights(model), before)
            _assert_same_state(_state_of(opt), state_before, f"step {step}")
        opt.zero_grad()
        opt.step(closure)
    assert opt.search_state.step == 5
    _assert_same_on_all_ranks(_full_weights(model), "weights")


@fsdp2_forwards
def test_fsdp2_labpal_ranks_that_mix_the_one_and_two_phase_forms_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_labpal_mixed_forms_job, str(tmp_path), WORLD, timeout_s=20)


def _scaled_steps_refusing_mixed_forms(rank: int, ddp, opt, closure_at, own_forward, steps: int, refused: tuple,
                                       what: str, before_refusal=None) -> None:
    """``steps`` two-phase steps under a GradScaler with ``closure_at(step)``; at the steps in ``refused``
    rank 0 calls ``scaler.step(opt, closure)`` (the one-phase form, refused under a scaler) while rank 1
    steps in the two-phase form: the mixed-forms ValueError on both, weights and state as before. The
    ranks end alike."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for step in range(steps):
        closure = closure_at(step)

        def two_phase():
            opt.zero_grad()
            loss = own_forward(closure)
            scaler.scale(loss).backward()
            scaler.step(opt, closure, loss=loss.detach())
            scaler.update()
        if step in refused:
            if before_refusal is not None:
                before_refusal(step)
            before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
            with pytest.raises(ValueError, match=r"mix the one-phase step\(closure\) and the two-phase .*"
                                                 r"1 of the 2 data-parallel ranks passed loss="):
                if rank == 0:
                    opt.zero_grad()
                    scaler.step(opt, closure)
                else:
                    two_phase()
            assert torch.equal(_flat(ddp.parameters()), before)
            _assert_same_state(_state_of(opt), state_before, what)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)  # its per-step records of the refused step
        two_phase()
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def _grad_scaler_mixed_forms_job(rank: int, out_dir: str) -> None:
    """DDP under torch.amp.GradScaler: at a search step rank 0 calls scaler.step(opt, closure) (the one-phase
    form, refused under a scaler) while rank 1 uses the two-phase form. Rank 0 raised at once, before any
    backward, and rank 1 waited in DDP's gradient all-reduce until gloo's timeout. Now rank 0 refuses after
    its backward, where rank 1 opens its search: the mixed-forms error on both, weights and state as before."""
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = FusedSaLSa(ddp.parameters(), backend="torch")

    def closure_at(step):
        x, y = _batch(step, rank)
        return lambda: F.mse_loss(ddp(x), y)

    _scaled_steps_refusing_mixed_forms(rank, ddp, opt, closure_at, lambda closure: closure(), 3, (1,),
                                       "a refused step under GradScaler")
    assert opt.search_state.step == 3


def test_ddp_grad_scaler_ranks_that_mix_the_forms_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_grad_scaler_mixed_forms_job, str(tmp_path), WORLD, timeout_s=20)


def _next_step_is_plain(opt: FusedSaLSa) -> bool:
    from salsa_fused.rules import plan_step
    return not plan_step(opt.search_rule, opt.search_state, opt.search_config).is_search


def _grad_scaler_mixed_forms_at_a_plain_step_job(rank: int, out_dir: str) -> None:
    """DDP under torch.amp.GradScaler: at a step without a search rank 0 calls scaler.step(opt, closure) (the
    one-phase form, refused under a scaler) while rank 1 uses the two-phase form. Rank 0 raised alone and rank 1
    stepped: its plain step's all-reduce then paired with rank 0's next collective (the ranks' weights parted,
    or gloo timed out). The plain step's all-reduce under a scaler carries the ranks' forms, read with
    found_inf before anything is written: the mixed-forms error on both ranks, weights and state as before, and
    the retry steps alike. Every rank in the one-phase form at a plain step: each raises its own refusal."""
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = FusedSaLSa(ddp.parameters(), backend="torch", always_search_steps=1)

    def closure_at(step):
        x, y = _batch(step, rank)
        return lambda: F.mse_loss(ddp(x), y)

    def refused_at(step):
        if step == 1:
            _skip_interval_warmup(opt)  # the interval at its bound: plain steps from here
        assert _next_step_is_plain(opt), step

    _scaled_steps_refusing_mixed_forms(rank, ddp, opt, closure_at, lambda closure: closure(), 4, (1, 2),
                                       "a refused plain step under GradScaler", refused_at)
    assert opt.search_state.step == 4 and opt.num_searches == 1
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scaler.scale(torch.ones(()))  # the scale a step of this iteration would have made
    assert _next_step_is_plain(opt)
    before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="under torch.amp.GradScaler use the two-phase form"):
        scaler.step(opt, closure_at(4))  # every rank in the one-phase form
    assert torch.equal(_flat(ddp.parameters()), before)
    _assert_same_state(_state_of(opt), state_before, "a refused one-phase plain step on every rank")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    opt.zero_grad()
    closure = closure_at(4)
    loss = closure()
    scaler.scale(loss).backward()
    scaler.step(opt, closure, loss=loss.detach())  # the retry in the two-phase form steps
    scaler.update()
    assert opt.search_state.step == 5
    assert not torch.equal(_flat(ddp.parameters()), before)
    # an overflow on rank 1 at a plain step: the scaler's skip, read with the exchange, alike on both ranks
    assert _next_step_is_plain(opt)
    before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
    opt.zero_grad()
    loss = closure() * (math.inf if rank == 1 else 1.0)
    scaler.scale(loss).backward()
    scaler.step(opt, closure, loss=loss.detach())
    assert torch.equal(_flat(ddp.parameters()), before)
    assert opt.search_state.step == 5 and opt.num_skipped_steps == 0
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_grad_scaler_ranks_that_mix_the_forms_at_a_plain_step_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_grad_scaler_mixed_forms_at_a_plain_step_job, str(tmp_path), WORLD, timeout_s=20)



def _labpal_grad_scaler_mixed_forms_at_a_plain_step_job(rank: int, out_dir: str) -> None:
    """As the single-batch job above, for LABPAL's SGD updates between its fits (steps without a search that
    read one batch through the multi-batch step): rank 0 raised alone there, rank 1 stepped. The one-phase
    rank's refusal rides the plain step's all-reduce: both ranks refused alike."""
    from salsa_fused import LABPAL
    from salsa_fused.rules import plan_step
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = LABPAL(ddp.parameters(), "SGD", backend="torch", approximation_batches=3, sgd_steps=2)

    def closure_at(step):
        def closure(i):
            x, y = _batch(10 * step + i, rank)
            return F.mse_loss(ddp(x), y)
        return closure

    def refused_at(step):
        assert not plan_step(opt.search_rule, opt.search_state, opt.search_config).is_search, step
        assert opt.next_batches().points == 0 and opt.next_batches().gradient == 1, step

    _scaled_steps_refusing_mixed_forms(rank, ddp, opt, closure_at, lambda closure: closure(0), 3, (1, 2),
                                       "a refused LABPAL plain step under GradScaler", refused_at)
    assert opt.search_state.step == 3


def test_ddp_labpal_grad_scaler_ranks_that_mix_the_forms_at_a_plain_step_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_labpal_grad_scaler_mixed_forms_at_a_plain_step_job, str(tmp_path), WORLD, timeout_s=20)


def _moved_by_a_forward(model: torch.nn.Module):
    """What a forward in training mode moves besides the weights: the generator (dropout) and BatchNorm's
    running statistics; with the weights and the optimizer's state, what a refused step leaves as it was."""
    return torch.get_rng_state(), _flat(model.buffers()).clone()


def _assert_not_moved(model: torch.nn.Module, before, what: str) -> None:
    rng, buffers = _moved_by_a_forward(model)
    assert torch.equal(rng, before[0]), f"{what}: the generator moved"
    assert torch.equal(buffers, before[1]), f"{what}: BatchNorm's running statistics moved"


def _grad_scaler_one_phase_refused_job(rank: int, out_dir: str) -> None:
    """DDP under torch.amp.GradScaler, every rank calling the one-phase scaler.step(opt, closure) at a search
    step past the first. Alone it is refused before the closure runs; under DDP it is refused after the
    step's own forward and backward (77fd3b9), so that forward's dropout draws and BatchNorm updates must go
    back as at any refused one-phase step: the retry in the two-phase form then runs the same forward."""
    model = _dropout_batch_norm_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FusedSaLSa(ddp.parameters(), backend="torch", model=ddp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for step in range(3):
        x, y = _batch(step, rank)

        def closure():
            return F.mse_loss(ddp(x), y)

        if step == 1:
            before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
            moved_before = _moved_by_a_forward(model)
            opt.zero_grad()
            with pytest.raises(RuntimeError, match="under torch.amp.GradScaler use the two-phase form"):
                scaler.step(opt, closure)
            assert torch.equal(_flat(ddp.parameters()), before)
            _assert_same_state(_state_of(opt), state_before, "a refused one-phase step under GradScaler")
            _assert_not_moved(model, moved_before, "a refused one-phase step under GradScaler")
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)  # its per-step records of the refused step
        opt.zero_grad()
        loss = closure()
        scaler.scale(loss).backward()
        scaler.step(opt, closure, loss=loss)
        scaler.update()
    assert opt.search_state.step == 3
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_grad_scaler_one_phase_refusal_puts_the_forward_back(tmp_path):
    spawn_in_gloo_group(_grad_scaler_one_phase_refused_job, str(tmp_path), WORLD, timeout_s=20)


def _labpal_mixed_forms_puts_the_forward_back_job(rank: int, out_dir: str) -> None:
    """LABPAL under DDP, rank 0 in the one-phase form and rank 1 in the two-phase form at an approximation
    past the first step: refused with the mixed-forms error in the exchange that opens the one-phase form's
    search (da04879). Rank 0 had run its gradient forward: its dropout draws and BatchNorm updates go back,
    as they do where the single-batch one-phase form is refused as mixed forms (in its search's exchange)."""
    from salsa_fused import LABPAL
    model = _dropout_batch_norm_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = LABPAL(ddp.parameters(), backend="torch", approximation_batches=3, sgd_steps=2, model=ddp)
    for step in range(5):
        def closure(i, step=step):
            x, y = _batch(10 * step + i, rank)
            return F.mse_loss(ddp(x), y)
        if step == 3:
            assert opt.next_batches().points > 0 and opt.next_batches().gradient == 1, step
            before, state_before = _flat(ddp.parameters()).clone(), _state_of(opt)
            moved_before = _moved_by_a_forward(model)
            _refused_as_mixed_forms(rank, opt, closure, lambda: closure(0), torch.Tensor.detach)
            assert torch.equal(_flat(ddp.parameters()), before)
            _assert_same_state(_state_of(opt), state_before, f"step {step}")
            if rank == 0:
                _assert_not_moved(model, moved_before, "the one-phase rank refused as mixed forms")
        opt.zero_grad()
        opt.step(closure)
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_labpal_one_phase_rank_refused_as_mixed_forms_puts_the_forward_back(tmp_path):
    spawn_in_gloo_group(_labpal_mixed_forms_puts_the_forward_back_job, str(tmp_path), WORLD, timeout_s=20)


def _labpal_grad_scaler_mixed_forms_job(rank: int, out_dir: str) -> None:
    """LABPAL under DDP and torch.amp.GradScaler: at an approximation, and at an NSGD update (a search without
    points), rank 0 calls scaler.step(opt, closure) (the one-phase form, refused under a scaler) while rank 1
    uses the two-phase form. As in the single-batch
    form (77fd3b9), rank 0 must not raise before its backward: rank 1 waits in DDP's gradient all-reduce.
    Refused on both ranks with the mixed-forms error, weights and state as before; the ranks step on alike."""
    from salsa_fused import LABPAL
    ddp = torch.nn.parallel.DistributedDataParallel(_make_model(0))
    opt = LABPAL(ddp.parameters(), backend="torch", approximation_batches=3, sgd_steps=2)

    def closure_at(step):
        def closure(i):
            x, y = _batch(10 * step + i, rank)
            return F.mse_loss(ddp(x), y)
        return closure

    def refused_at(step):  # an update (NSGD: a search without points) and an approximation (points)
        assert opt.next_batches().points == (0 if step == 1 else 3) and opt.next_batches().gradient == 1, step

    _scaled_steps_refusing_mixed_forms(rank, ddp, opt, closure_at, lambda closure: closure(0), 5, (1, 3),
                                       "a refused LABPAL step under GradScaler", refused_at)
    assert opt.search_state.step == 5


def test_ddp_labpal_grad_scaler_ranks_that_mix_the_forms_are_refused_alike(tmp_path):
    spawn_in_gloo_group(_labpal_grad_scaler_mixed_forms_job, str(tmp_path), WORLD, timeout_s=20)


def _labpal_check_after_a_failed_point_job(rank: int, out_dir: str) -> None:
    """LABPAL on FSDP2 in the two-phase form, at its first approximation, where the check of loss= runs k more
    forwards at w0 after the point's own: on rank 1 the last point forward raises after its model forward (a
    closure's own check of its batch). Rank 1 skipped the check's forwards, rank 0 ran them, so rank 0's
    all-gathers met rank 1's all-reduce of the check (collectives paired wrongly, gloo errors or times out).
    Every rank runs the check's forwards: rank 1 raises its own error, rank 0 ClosureFailedOnAnotherRank, the
    weights and state as before, and the retry steps alike."""
    from torch.distributed.device_mesh import init_device_mesh

    from salsa_fused import LABPAL, ClosureFailedOnAnotherRank
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(0, mesh)
    opt = LABPAL(model.parameters(), backend="torch", approximation_batches=3, sgd_steps=2, model=model)
    raised = []
    for step in range(3):
        def closure(i, step=step):
            x, y = _batch(10 * step + i, rank)
            loss = F.mse_loss(model(x), y)
            if rank == 1 and step == 0 and i == 2 and not raised:
                raised.append(i)
                raise RuntimeError("rank 1's own check of batch 2")
            return loss

        def two_phase():
            opt.zero_grad()
            loss = closure(0)
            loss.backward()
            return opt.step(closure, loss=loss.detach())
        if step == 0:
            assert opt.next_batches().points == 3 and opt.next_batches().gradient == 1
            before, state_before = _full_weights(model), _state_of(opt)
            expected = (RuntimeError, "rank 1's own check") if rank == 1 else \
                (ClosureFailedOnAnotherRank, r"the closure raised on rank 1 \(1 of the 2 data-parallel ranks\)")
            with pytest.raises(expected[0], match=expected[1]):
                two_phase()
            assert torch.equal(_full_weights(model), before)
            _assert_same_state(_state_of(opt), state_before, "a refused approximation")
        two_phase()
    assert opt.search_state.step == 3 and len(raised) == rank
    _assert_same_on_all_ranks(_full_weights(model), "weights")


@fsdp2_forwards
def test_fsdp2_labpal_check_of_loss_after_a_point_forward_raised_on_one_rank(tmp_path):
    spawn_in_gloo_group(_labpal_check_after_a_failed_point_job, str(tmp_path), WORLD, timeout_s=20)


def _found_inf_on_one_rank_job(rank: int, out_dir: str) -> None:
    """FSDP2 under torch.amp.GradScaler with each rank's found_inf from its own shards (DTensor's all-reduce of it
    taken out here, as a scaler without it, or plain local gradient shards, would have it): an inf in rank 0's
    shard only, at a plain step and at a search step, is skipped on every rank alike; k, t and the weights stay
    alike, the steps after keep their collectives in step, and the agreed skip is written into the scaler's own
    records: both scales back off, unwarned (before, rank 1's kept 16 while rank 0's fell to 8). A scaler whose
    records cannot be found (found_inf set by hand, no torch GradScaler.step calling) is warned that they part."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    DTensor._op_dispatcher._custom_op_handlers.pop(torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default,
                                                   None)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _fsdp_model(0, mesh)
    opt = FusedSaLSa(model.parameters(), model=model, backend="torch", always_search_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    injected = {}
    for step in range(1, 15):
        if step == 2:
            _skip_interval_warmup(opt)  # the interval grows to 10: plain steps, and (one skipped) a search at 12
        x, y = _batch(step, rank)
        closure = fsdp_closure(model, lambda: F.mse_loss(model(x), y))
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        plain = _next_step_is_plain(opt)
        inject = step in (4, 12)
        if inject and rank == 0:
            model[0].weight.grad._local_tensor.view(-1)[0] = float("inf")
        before, state_before, searches = _full_weights(model), opt.search_state, opt.num_searches
        scale_before = scaler.get_scale()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler.step(opt, closure, loss=loss.detach())
        scaler.update()
        warned = [str(w.message) for w in caught if "found_inf differs between the ranks" in str(w.message)]
        state = opt.search_state
        _assert_same_on_all_ranks(torch.tensor([float(state.step), float(state.steps_since_search),
                                                float(opt.num_searches), scaler.get_scale()], dtype=torch.float64),
                                  f"k, t, scale at {step}")
        after = _full_weights(model)
        _assert_same_on_all_ranks(after, f"weights at step {step}")
        if inject:
            injected[step] = plain
            assert torch.equal(after, before), f"step {step} skipped on every rank"
            assert (state.step, state.steps_since_search) == (state_before.step, state_before.steps_since_search)
            assert opt.num_searches == searches
            assert scaler.get_scale() == scale_before / 2, (step, scaler.get_scale())  # rank 1's found none
        else:
            assert not torch.equal(after, before) and scaler.get_scale() == scale_before
        assert not warned, (step, warned)
    assert injected == {4: True, 12: False}, injected  # a plain step and a search step

    opt.zero_grad()
    x, y = _batch(15, rank)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    before = _full_weights(model)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.full((), float(rank == 0))
    with pytest.warns(RuntimeWarning, match="found_inf differs between the ranks") if rank == 1 else \
            warnings.catch_warnings():
        if rank == 0:
            warnings.simplefilter("error")
        opt.step(fsdp_closure(model, lambda: F.mse_loss(model(x), y)), loss=loss.detach())
    del opt.grad_scale, opt.found_inf
    assert torch.equal(_full_weights(model), before)


@fsdp2_forwards
def test_fsdp2_grad_scaler_with_found_inf_on_one_rank_skips_on_every_rank(tmp_path):
    spawn_in_gloo_group(_found_inf_on_one_rank_job, str(tmp_path), WORLD, timeout_s=30)


def _ddp_found_inf_job(rank: int, out_dir: str) -> None:
    """DDP under torch.amp.GradScaler: an inf in rank 0's own gradient before DDP's all-reduce reaches every
    rank's found_inf (the gradients are averaged before unscale), at a plain step and at a search step: every
    rank skips alike, unwarned, and the scalers' scales stay alike."""
    import warnings
    model = _make_model(0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = FusedSaLSa(ddp.parameters(), model=ddp, backend="torch", always_search_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    inject = [False]
    if rank == 0:
        model[0].weight.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("inf")) if inject[0] else g)
    for step in range(1, 15):
        if step == 2:
            _skip_interval_warmup(opt)
        x, y = _batch(step, rank)
        inject[0] = step in (4, 12)
        opt.zero_grad()
        loss = F.mse_loss(ddp(x), y)
        scaler.scale(loss).backward()
        inject[0] = False
        plain, state_before = _next_step_is_plain(opt), opt.search_state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler.step(opt, lambda: F.mse_loss(ddp(x), y), loss=loss.detach())
        scaler.update()
        assert not [w for w in caught if "found_inf differs" in str(w.message)]
        state = opt.search_state
        _assert_same_on_all_ranks(torch.tensor([float(state.step), float(state.steps_since_search),
                                                scaler.get_scale()], dtype=torch.float64), f"k, t, scale at {step}")
        if step in (4, 12):
            assert plain == (step == 4)
            assert state.step == state_before.step and scaler.get_scale() < 2.0 ** 4
    _assert_same_on_all_ranks(_flat(ddp.parameters()), "weights")


def test_ddp_grad_scaler_inf_on_one_ranks_batch_is_skipped_alike(tmp_path):
    spawn_in_gloo_group(_ddp_found_inf_job, str(tmp_path), WORLD, timeout_s=30)


class _WithExpert(torch.nn.Module):
    """``_make_model``'s network plus an expert layer that the forward uses only while ``self.used``."""

    def __init__(self, seed: int):
        super().__init__()
        self.body = _make_model(seed)
        self.expert = torch.nn.Linear(IN_FEATURES, 1)
        self.used = True

    def forward(self, x):
        out = self.body(x)
        return out + 0.5 * torch.tanh(self.expert(x)) if self.used else out


_EXPERT_OUT = range(4, 9)  # the steps the expert sits out


def _expert_sits_out_job(rank: int, out_dir: str, wrapper: str = "fsdp2") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    model = _WithExpert(0)
    if wrapper == "fsdp2":
        fsdp2().fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        opt = FusedSaLSa(model.parameters(), model=model, max_search_interval=1)
    else:  # DDP leaves an unused parameter's .grad as it was (None) with find_unused_parameters
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = FusedSaLSa(ddp.parameters(), max_search_interval=1)
    ref = _WithExpert(0)
    ref_opt = FusedSaLSa(ref.parameters(), reduction=SearchReduction(), max_search_interval=1)
    for step in range(12):
        model.used = ref.used = step not in _EXPERT_OUT
        x, y = _batch(step, rank)
        opt.zero_grad(set_to_none=True)
        if wrapper == "fsdp2":
            opt.step(lambda: F.mse_loss(model(x), y))
        else:  # two-phase: DDP averages the gradients of the caller's backward
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step(lambda: F.mse_loss(model(x), y), loss=loss)
        gx, gy = _global_batch(step)
        ref_opt.zero_grad(set_to_none=True)
        ref_opt.step(lambda: F.mse_loss(ref(gx), gy))
        for p, q in zip(model.expert.parameters(), ref.expert.parameters()):
            counts = [opt.state[p].get(key) for key in ("steps_sat_out", "sat_out_since")]
            assert counts == [ref_opt.state[q].get(key) for key in ("steps_sat_out", "sat_out_since")], (step, counts)
        weights = _full_weights(model) if wrapper == "fsdp2" else _flat(model.parameters())
        torch.testing.assert_close(weights, _flat(ref.parameters()), rtol=1e-5, atol=1e-6)
    assert opt.state[model.expert.weight]["steps_sat_out"] == len(_EXPERT_OUT)


def _expert_sits_out_under_ddp_job(rank: int, out_dir: str) -> None:
    _expert_sits_out_job(rank, out_dir, wrapper="ddp")


@fsdp2_forwards
@pytest.mark.skipif(fsdp2() is None, reason="this torch has no FSDP2")
def test_fsdp2_an_expert_that_sits_out_counts_its_own_steps_as_in_one_process(tmp_path):
    """Per-parameter step counts on sharded parameters: an expert layer unused for 5 steps (its gradients
    None on every rank) comes back with the steps it sat out left out of its bias corrections, and the
    sharded run follows one process on the global batch, counts and weights."""
    spawn_in_gloo_group(_expert_sits_out_job, str(tmp_path), WORLD, timeout_s=120)


def test_ddp_an_expert_that_sits_out_counts_its_own_steps_as_in_one_process(tmp_path):
    """The same under DDP with ``find_unused_parameters=True`` (an MoE's way), in the two-phase form."""
    spawn_in_gloo_group(_expert_sits_out_under_ddp_job, str(tmp_path), WORLD, timeout_s=120)


def _ddp_buffers_after_searches_job(rank: int, out_dir: str) -> None:
    """DDP broadcasts rank 0's buffers at the start of a forward that follows a training forward; a forward under
    ``no_grad`` (a search's trials, a factor's scoring) marks the next one as not to broadcast. Those forwards
    broadcast nothing and leave the mark as they found it, so the step after a search starts, as after AdamW's,
    from rank 0's BatchNorm statistics on every rank (rank 1's were its own there, 0.12 away from rank 0's on an
    audit's model), with one broadcast per step (the trials once broadcast at every trial). Also through
    LRFactorSearch, and with model= the inner module until the caller sets the wrapper in its place (as
    SaLSaTrainer does once Trainer has wrapped the model)."""
    from torch.nn.parallel import DistributedDataParallel

    from salsa_fused import LRFactorSearch

    for form in ("one-phase", "two-phase", "factor search", "wrapper set later"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 1))
        ddp = DistributedDataParallel(net)  # broadcast_buffers=True
        broadcasts = []
        sync_buffers = ddp._sync_buffers
        ddp._sync_buffers = lambda: (broadcasts.append(1), sync_buffers())[1]
        opt = FusedSaLSa(ddp.parameters(), model=net if form == "wrapper set later" else ddp, backend="torch")
        stepper = LRFactorSearch(opt, interval=2)
        at_forward = []
        net[1].register_forward_pre_hook(lambda module, args: at_forward.append(module.running_mean.clone()))
        searched = 0
        for k in range(8):
            if form == "wrapper set later" and k == 1:
                opt.model = ddp
            x, y = _batch(k, rank)
            closure = lambda: F.mse_loss(ddp(x), y)  # noqa: E731
            at_forward.clear()
            broadcasts.clear()
            opt.zero_grad()
            if form == "two-phase":
                loss = closure()
                loss.backward()
                opt.step(closure, loss=loss.detach())
            elif form == "factor search":
                stepper.step(closure, lambda: opt.step(closure))
            else:
                opt.step(closure)
            searched += opt.search_state.last_trials > 0
            if k >= 2:  # the first forward after the wrapper was set
                _assert_same_on_all_ranks(at_forward[0], f"{form}: the running mean the step-{k + 1} forward starts from")
                assert ddp.require_forward_param_sync, form
            if form != "wrapper set later" or k >= 2:
                assert len(broadcasts) == 1, (form, k, len(broadcasts))  # the step's own training forward's
        assert searched >= 2
        del ddp


def test_ddp_broadcasts_the_buffers_at_the_forward_after_a_search(tmp_path):
    spawn_in_gloo_group(_ddp_buffers_after_searches_job, str(tmp_path), WORLD, timeout_s=60)


def test_the_wrappers_are_looked_up_again_for_a_model_set_later(monkeypatch):
    """The FSDP2 modules were looked up once, so a model= set after the first step (as the docs now say to do
    with a framework's wrapper) was never resharded before a trial; the DDP wrappers are keyed on the model too."""
    import salsa_fused.optimizer as optimizer_module
    monkeypatch.setattr(optimizer_module, "fsdp_modules", lambda model: [model])
    first, later = _make_model(0), _make_model(0)
    opt = FusedSaLSa(first.parameters(), backend="torch")
    assert opt._fsdp_modules() == [] and opt._ddp_modules() == []
    opt.model = first
    assert opt._fsdp_modules() == [first]
    opt.model = later
    assert opt._fsdp_modules() == [later]
