"""SaLSaTrainer (Hugging Face Trainer) against the plain two-phase loop on the same batches."""

import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from salsa_fused import FusedSaLSa  # noqa: E402
from salsa_fused.integrations.transformers import SaLSaTrainer  # noqa: E402

SEQ, MICRO_BATCH, ACCUMULATE, STEPS = 12, 2, 2, 6


def tiny_gpt2(dropout=0.0):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(config)


def token_dataset(n):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 50, (SEQ,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


class RecordingTrainer(SaLSaTrainer):
    """Keeps the micro-batches Trainer fed, and the weights after every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_batches, self.weights_after_step, self.logged = [], [], []

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        self.seen_batches.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)


def train_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=MICRO_BATCH,
                  gradient_accumulation_steps=ACCUMULATE, max_steps=STEPS, learning_rate=1.0,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0, seed=3)
    values.update(overrides)
    return TrainingArguments(**values)


class StepWeights(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.trainer.logged.append(dict(logs))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.weights_after_step.append(
            {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()})


def run_trainer(tmp_path, model, **overrides):
    trainer = RecordingTrainer(model=model, args=train_args(tmp_path, **overrides),
                               train_dataset=token_dataset(STEPS * MICRO_BATCH * ACCUMULATE),
                               salsa_kwargs={"backend": "torch", "init_step_size": 0.01})
    trainer.add_callback(StepWeights(trainer))
    trainer.train()
    return trainer


def plain_loop(model, trainer, max_grad_norm=1.0, autocast=False):
    """The README's two-phase form: backward per micro-batch, clip, step(closure, loss=total)."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    opt = FusedSaLSa([{"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                     lr=1.0, backend="torch", init_step_size=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (STEPS - t) / STEPS))
    model.train()
    weights = []

    def micro_loss(inputs, count):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(**inputs, num_items_in_batch=count).loss.float()

    for step in range(STEPS):
        window = trainer.seen_batches[step * ACCUMULATE:(step + 1) * ACCUMULATE]
        total = 0.0
        opt.mark_forward()  # as the integration marks: its closure replays the window's forwards
        for inputs, count in window:
            loss = micro_loss(inputs, count)
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)

        def closure():
            return sum(micro_loss(inputs, count) for inputs, count in window)

        opt.step(closure, loss=total)
        schedule.step()
        opt.zero_grad()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return opt, weights


def test_trainer_matches_plain_loop_step_for_step(tmp_path):
    model = tiny_gpt2()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = run_trainer(tmp_path, model)
    assert len(trainer.weights_after_step) == STEPS
    assert len(trainer.seen_batches) == STEPS * ACCUMULATE

    reference = tiny_gpt2()
    reference.load_state_dict(start)
    opt, weights = plain_loop(reference, trainer)
    salsa = trainer.salsa_optimizer
    for step, (got, want) in enumerate(zip(trainer.weights_after_step, weights)):
        for name in want:
            assert torch.equal(got[name], want[name]), f"step {step}: {name} differs"
    assert salsa.search_state == opt.search_state
    assert salsa.num_searches == STEPS  # the first steps always search
    assert salsa.num_forward_evals > STEPS  # trial forwards ran
    # Trainer's default linear schedule reached the multiplier 0 at the end.
    assert [g["lr"] for g in salsa.param_groups] == [0.0, 0.0]

    logs = [entry for entry in trainer.logged if "loss" in entry]
    assert len(logs) == STEPS
    for key in ("salsa_step_size", "salsa_effective_step_size", "salsa_search_interval",
                "salsa_forward_evals", "salsa_searches"):
        assert key in logs[-1]
    assert logs[-1]["salsa_forward_evals"] == salsa.num_forward_evals
    assert logs[-1]["salsa_step_size"] == salsa.step_size


def test_trainer_bf16_autocast_and_no_clipping(tmp_path):
    model = tiny_gpt2()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = run_trainer(tmp_path, model, bf16=True, max_grad_norm=0.0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = tiny_gpt2()
    reference.load_state_dict(start)
    _, weights = plain_loop(reference, trainer, max_grad_norm=math.inf, autocast=True)
    for name, want in weights[-1].items():
        torch.testing.assert_close(trainer.weights_after_step[-1][name], want, rtol=1e-5, atol=1e-6)


def test_trainer_refuses_other_optimizers_and_warns_on_learning_rate(tmp_path):
    model = tiny_gpt2()
    adam = torch.optim.AdamW(model.parameters())
    trainer = SaLSaTrainer(model=model, args=train_args(tmp_path), train_dataset=token_dataset(4),
                           optimizers=(adam, None))
    with pytest.raises(TypeError, match="FusedSaLSa"):
        trainer.create_optimizer()
    trainer = SaLSaTrainer(model=model, args=train_args(tmp_path, learning_rate=5e-5),
                           train_dataset=token_dataset(4))
    with pytest.warns(UserWarning, match="multiplier"):
        trainer.create_optimizer()
    with pytest.raises(ValueError, match="salsa_kwargs"):
        SaLSaTrainer(model=model, args=train_args(tmp_path), salsa_kwargs={"lr": 0.1})
    given = FusedSaLSa(model.parameters(), backend="torch")  # salsa_kwargs beside it were dropped, silently
    with pytest.raises(ValueError, match=r"salsa_kwargs \(c, init_step_size\) configure the FusedSaLSa that "
                                         r"SaLSaTrainer builds, but an optimizer was passed"):
        SaLSaTrainer(model=model, args=train_args(tmp_path), optimizers=(given, None),
                     salsa_kwargs={"init_step_size": 0.01, "c": 0.1})


def test_trainer_refuses_a_rule_that_reads_several_batches_per_step(tmp_path):
    trainer = SaLSaTrainer(model=tiny_gpt2(), args=train_args(tmp_path), train_dataset=token_dataset(4),
                           salsa_kwargs={"backend": "torch", "search_rule": "labpal"})
    with pytest.raises(ValueError, match="SaLSaTrainer binds a closure over one update's batches"):
        trainer.create_optimizer()


def test_trainer_builds_with_the_adam_constants_and_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_gpt2()
    args = train_args(tmp_path, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    trainer = SaLSaTrainer(model=model, args=args, train_dataset=token_dataset(4))
    group = trainer.create_optimizer().param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)

    trainer = SaLSaTrainer(model=model, args=args, train_dataset=token_dataset(4),
                           optimizer_cls_and_kwargs=(FusedSaLSa, {"init_step_size": 0.01, "betas": (0.5, 0.9)}))
    opt = trainer.create_optimizer()
    assert opt.init_step_size == 0.01 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.model is model

    def trainer_with(cls_and_kwargs, salsa_kwargs=None):
        return SaLSaTrainer(model=model, args=args, train_dataset=token_dataset(4),
                            optimizer_cls_and_kwargs=cls_and_kwargs, salsa_kwargs=salsa_kwargs)

    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs names 'AdamW'"):
        trainer_with((torch.optim.AdamW, {})).create_optimizer()
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs must not set 'lr'"):
        trainer_with((FusedSaLSa, {"lr": 0.5})).create_optimizer()
    with pytest.raises(ValueError, match="c set by both"):
        trainer_with((FusedSaLSa, {"c": 0.3}), {"c": 0.4}).create_optimizer()


class BatchNormRegression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                        torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.body(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def regression_rows(n):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=generator)
    return [{"x": row, "labels": row[:1].sin()} for row in x]


def test_the_gradients_trainer_lets_go_of_after_a_step_are_not_kept_by_the_optimizer(tmp_path):
    """Trainer frees the gradients with model.zero_grad() after optimizer.step(), not through the optimizer: the
    buckets kept the step's gradients alive through the next step's forwards and backwards, one gradient set more
    at the peak of every Trainer run (an audit). A model with dropout and BatchNorm, through Trainer's own loop."""
    import gc
    import weakref

    class Watch(transformers.TrainerCallback):
        def __init__(self):
            self.refs, self.alive = [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.refs = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]

        def on_step_end(self, args, state, control, **kwargs):  # after Trainer's model.zero_grad()
            gc.collect()
            self.alive.append(sum(ref() is not None for ref in self.refs))

    model = BatchNormRegression()
    args = train_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=8,
                      lr_scheduler_type="constant")
    trainer = SaLSaTrainer(model=model, args=args, train_dataset=regression_rows(8 * 4 * 2),
                           salsa_kwargs={"backend": "cpp"})
    watch = Watch()
    trainer.add_callback(watch)
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper around it
    assert inner.search_state.step == 4 and len(watch.alive) == 4
    assert watch.alive == [0, 0, 0, 0]


def test_a_given_optimizer_without_model_keeps_batchnorm_statistics(tmp_path):
    # BatchNorm and dropout: Trainer's real loop, the window's dropout replayed by the trials
    """Trials of a FusedSaLSa passed through optimizers=(opt, None) without model= used to update the
    running statistics too: each search added its trial forwards to num_batches_tracked."""
    steps, accumulate = 6, 2
    model = BatchNormRegression()
    opt = FusedSaLSa(model.parameters(), backend="torch")
    args = train_args(tmp_path, max_steps=steps, gradient_accumulation_steps=accumulate,
                      per_device_train_batch_size=8, lr_scheduler_type="constant")
    trainer = SaLSaTrainer(model=model, args=args, train_dataset=regression_rows(8 * steps * accumulate),
                           optimizers=(opt, None))
    trainer.train()
    assert opt.model is model and opt.num_forward_evals > steps  # searches ran trial forwards
    assert int(model.body[1].num_batches_tracked) == steps * accumulate
    assert all(torch.isfinite(p).all() for p in model.parameters())

    other = torch.nn.Linear(2, 2)
    stranger = FusedSaLSa(other.parameters(), backend="torch")
    trainer = SaLSaTrainer(model=tiny_gpt2(), args=train_args(tmp_path), train_dataset=token_dataset(4),
                           optimizers=(stranger, None))
    trainer.create_optimizer()
    assert stranger.model is None  # not this model's parameters: not attached


def test_trainer_warns_where_its_scheduler_would_reshape_a_preset(tmp_path):
    from salsa_fused import presets

    def created(total_steps, **overrides):
        model = tiny_gpt2()
        opt = presets.recommended(model.parameters(), total_steps=total_steps, backend="torch")
        trainer = SaLSaTrainer(model=model, args=train_args(tmp_path, **overrides), train_dataset=token_dataset(4),
                               optimizers=(opt, None))
        trainer.create_optimizer()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.create_scheduler(STEPS)
        return [str(w.message) for w in caught]

    messages = created(STEPS)  # Trainer's default scheduler, linear
    assert len(messages) == 1 and "lr_scheduler_type='linear' multiplies" in messages[0]
    messages = created(STEPS + 4, lr_scheduler_type="constant")
    assert len(messages) == 1 and f"total_steps={STEPS + 4} and Trainer will run {STEPS}" in messages[0]
    assert created(STEPS, lr_scheduler_type="constant") == []


def test_trainer_reports_a_plain_steps_nan_at_the_end_and_before_a_checkpoint(tmp_path):
    """A NaN gradient on a step without a search is counted on the device; with no later search to read
    it, train() used to return as if nothing happened, under the default nonfinite="raise"."""
    from salsa_fused import presets
    from salsa_fused.errors import NonFiniteError

    class Poison(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:  # the 4th update: the preset searched on the 1st only
                next(model.parameters()).grad.view(-1)[0] = float("nan")

    for save in ("no", "steps"):
        model = tiny_gpt2()
        opt = presets.recommended(model.parameters(), total_steps=STEPS, backend="torch")
        args = train_args(tmp_path / save, lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy=save,
                          save_steps=STEPS - 1)
        trainer = SaLSaTrainer(model=model, args=args, train_dataset=token_dataset(STEPS * MICRO_BATCH * ACCUMULATE),
                               optimizers=(opt, None), callbacks=[Poison()])
        with pytest.raises(NonFiniteError, match="1 gradient elements"):
            trainer.train()
        assert opt.num_searches == 1 and opt.search_state.step == (STEPS - 1 if save == "steps" else STEPS)
        assert not (tmp_path / save / f"checkpoint-{STEPS - 1}").exists()  # refused before it was written
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_optimizer_takes_the_ddp_wrapper_trainer_made_after_it(tmp_path):
    """Trainer wraps its model in DDP after create_optimizer, so model= was the inner module and the search's
    trial forwards left DDP's buffer-broadcast mark cleared: the forward after each search started from each
    rank's own BatchNorm statistics. The first training step hands the optimizer the wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = BatchNormRegression()
        trainer = SaLSaTrainer(model=model, args=train_args(tmp_path, per_device_train_batch_size=8,
                                                            gradient_accumulation_steps=1),
                               train_dataset=regression_rows(16), salsa_kwargs={"backend": "torch"})
        trainer.create_optimizer()
        assert trainer.optimizer.model is model
        wrapped = DistributedDataParallel(model)
        rows = regression_rows(8)
        inputs = {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}
        trainer.current_gradient_accumulation_steps = 1  # as Trainer's loop sets it before its steps
        trainer.training_step(wrapped, inputs)
        assert trainer.optimizer.model is wrapped and trainer.optimizer._ddp_modules() == [wrapped]
        trainer.optimizer.model = model  # torch_compile=True: accelerate compiles the wrapper
        trainer.optimizer.zero_grad()
        trainer.training_step(torch.compile(wrapped, backend="eager"), inputs)
        assert trainer.optimizer.model is wrapped
        del wrapped
    finally:
        dist.destroy_process_group()
