"""Checkpoints: a run saved at step N and resumed in a fresh model and optimizer takes the
same next steps, bit for bit (torch.save and torch.distributed.checkpoint flows).

The resumed objects are built with a different seed and init_step_size, so everything
that matters must come from the checkpoint. The DDP (new processes) and FSDP2 (sharded
state through torch.distributed.checkpoint) versions are in test_distributed.py.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from examples.gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus
from salsa_fused import FusedSaLSa

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
