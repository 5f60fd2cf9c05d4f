"""Train with FusedSaLSa through Hugging Face ``transformers.Trainer``.

    from salsa_fused.integrations.transformers import SaLSaTrainer
    args = TrainingArguments(output_dir, learning_rate=1.0, ...)   # lr: a multiplier
    trainer = SaLSaTrainer(model=model, args=args, train_dataset=data)
    trainer.train()

``Trainer`` runs forward and backward on each micro-batch, clips the gradients and
calls ``optimizer.step()`` without arguments. :class:`SaLSaTrainerMixin` records each
micro-batch (inputs, ``num_items_in_batch``, the accumulation divisor and the random
state) in ``training_step``; after the backward of the window's last micro-batch it
binds to the optimizer a forward-only loss over the whole window, computed exactly as
``training_step`` computed it, and the window's summed loss. Trainer's own
``optimizer.step()`` then runs the two-phase SaLSa step on the clipped (and, under fp16,
GradScaler-unscaled) gradients. bf16/fp16 autocast comes from accelerate's wrapper of
``model.forward``, so trial forwards run under the same autocast as the training one.

Scheduler: Trainer always builds one; by default (``lr_scheduler_type="linear"``,
no warmup) ``lr`` falls linearly from ``learning_rate`` to 0 over the run. FusedSaLSa
reads ``lr`` as a multiplier on the level ``eta`` its search finds: trials probe at the
``lr`` a group started with, and the schedule's later ``lr`` scales the applied step (with
``learning_rate=1.0`` the linear schedule multiplies it by ``1 - t/T``). Use
``lr_scheduler_type="constant"`` for the applied step the search finds, unscaled, and with an
optimizer that has a schedule of its own (a preset): Trainer's scheduler would shape its step a
second time, and ``create_scheduler`` warns then, and when the two plan runs of different lengths.

NaN/inf gradients of steps without a search are counted on the device; what no search has read
is read (``FusedSaLSa.report_nonfinite``) before each checkpoint and at the end of ``train()``.

Logged with Trainer's training logs: ``salsa_step_size`` (the level eta), ``salsa_effective_step_size``
(the first group's applied step of the next plain step, ``opt.applied_steps[0]``), ``salsa_search_interval``,
``salsa_forward_evals``, ``salsa_searches``, ``salsa_backtracks``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("salsa_fused.integrations.transformers needs transformers: "
                      "pip install transformers") from error

from ..optimizer import FusedSaLSa
from . import AccumulatedLoss, _param_devices, one_batch_salsa, unwrap_salsa

__all__ = ["SaLSaTrainerMixin", "SaLSaTrainer"]


def _refuse_trainer_keys(kwargs: dict, where: str) -> None:
    for key in ("lr", "weight_decay", "params"):
        if key in kwargs:
            raise ValueError(f"{where} must not set {key!r}: it comes from TrainingArguments "
                             "(learning_rate, weight_decay) and the model")


def _holds_parameters_of(model, optimizer: FusedSaLSa) -> bool:
    """Every parameter ``optimizer`` steps is one of ``model``'s."""
    owned = {id(p) for p in model.parameters()}
    return all(id(p) in owned for group in optimizer.param_groups for p in group["params"])


class SaLSaTrainerMixin:
    """Makes a ``Trainer`` (or subclass, e.g. TRL's) step a :class:`FusedSaLSa` with a line search.

    ``salsa_kwargs``: keyword arguments for the FusedSaLSa that ``create_optimizer``
    builds (``init_step_size``, ``c``, ``betas``...), over ``optimizer_cls_and_kwargs`` (a FusedSaLSa
    class and its arguments) and ``TrainingArguments``' ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.
    Trainer's two param groups (weight decay / none) are kept; ``TrainingArguments.learning_rate``
    becomes the groups' ``lr`` multiplier (set it to 1.0) and ``weight_decay`` the decoupled decay of
    the first group. A FusedSaLSa passed through ``optimizers=(opt, scheduler)`` is used as given,
    with ``model=`` set to Trainer's model if it had none and steps only that model's parameters.
    Not supported: DeepSpeed (it owns the optimizer step), context parallelism.
    """

    def __init__(self, *args: Any, salsa_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        self.salsa_kwargs = dict(salsa_kwargs or {})
        _refuse_trainer_keys(self.salsa_kwargs, "salsa_kwargs")
        self._salsa_window = AccumulatedLoss()
        super().__init__(*args, **kwargs)
        if self.salsa_kwargs and self.optimizer is not None:  # as Trainer refuses optimizer_cls_and_kwargs there
            raise ValueError(f"salsa_kwargs ({', '.join(sorted(self.salsa_kwargs))}) configure the FusedSaLSa that "
                             "SaLSaTrainer builds, but an optimizer was passed as optimizers=(optimizer, ...), which "
                             "is used as given: they would be dropped. Build that optimizer with them, or leave "
                             "optimizers= out")

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("SaLSaTrainer does not support DeepSpeed: DeepSpeed runs the optimizer step itself")
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            if self.args.learning_rate != 1.0:
                warnings.warn(
                    f"FusedSaLSa reads TrainingArguments.learning_rate={self.args.learning_rate} as a "
                    "multiplier on the level its line search finds; set learning_rate=1.0 unless "
                    "you mean to scale every step", stacklevel=2)
            optimizer_cls, kwargs = self._salsa_cls_and_kwargs()
            kwargs = {"model": opt_model, **kwargs}  # trials keep BatchNorm's statistics
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **kwargs)
            self.optimizer._lr_checked = True  # warned above, in TrainingArguments' words
        salsa = one_batch_salsa(self.optimizer, "SaLSaTrainer")  # a clear error for any other optimizer
        if salsa.model is None and _holds_parameters_of(opt_model, salsa):
            salsa.model = opt_model  # as when built here: trials keep BatchNorm's statistics
        return self.optimizer

    def _salsa_cls_and_kwargs(self):
        """The optimizer class and its arguments: TrainingArguments' Adam constants (``adam_beta1``,
        ``adam_beta2``, ``adam_epsilon``), then ``optimizer_cls_and_kwargs`` (a FusedSaLSa class), then
        ``salsa_kwargs``; a key set by both of the last two is refused."""
        optimizer_cls, given = FusedSaLSa, {}
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            optimizer_cls, given = self.optimizer_cls_and_kwargs
            if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, FusedSaLSa)):
                raise TypeError(f"SaLSaTrainer steps a FusedSaLSa; optimizer_cls_and_kwargs names "
                                f"{getattr(optimizer_cls, '__name__', optimizer_cls)!r}")
            given = dict(given or {})
            _refuse_trainer_keys(given, "optimizer_cls_and_kwargs")
            both = sorted(set(given) & set(self.salsa_kwargs))
            if both:
                raise ValueError(f"{', '.join(both)} set by both optimizer_cls_and_kwargs and salsa_kwargs: "
                                 "set each in one place")
        adam = {"betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon}
        return optimizer_cls, {**adam, **given, **self.salsa_kwargs}

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler, with a warning where it would shrink a step that the optimizer's own
        ``schedule`` (a preset's warm-up and cooldown) already shapes, or where the two plan runs of
        different lengths."""
        if self.lr_scheduler is None and self.optimizer is not None:
            schedule = self.salsa_optimizer.schedule
            kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
            if schedule is not None and kind != "constant":
                warnings.warn(
                    f"the optimizer has its own schedule ({type(schedule).__name__}) and Trainer's "
                    f"lr_scheduler_type={kind!r} multiplies the step it applies again: set "
                    "lr_scheduler_type='constant' to apply the optimizer's schedule alone", stacklevel=2)
            planned = getattr(schedule, "total_steps", None)
            if planned is not None and planned != num_training_steps:
                warnings.warn(
                    f"the optimizer's schedule plans total_steps={planned} and Trainer will run "
                    f"{num_training_steps} optimizer steps: build it with total_steps={num_training_steps}",
                    stacklevel=2)
        return super().create_scheduler(num_training_steps, optimizer)

    # ------------------------------------------------------------------ NaN/inf of plain steps
    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``, then the plain steps' NaN/inf counts that no search has read
        (``FusedSaLSa.report_nonfinite``: raises under ``nonfinite="raise"``)."""
        output = super().train(*args, **kwargs)
        self._salsa_report_nonfinite()
        return output

    def _save_checkpoint(self, *args: Any, **kwargs: Any):
        self._salsa_report_nonfinite()  # before the state is written: the device's counts are not in it
        return super()._save_checkpoint(*args, **kwargs)

    def _salsa_report_nonfinite(self) -> None:
        if self.optimizer is not None:
            self.salsa_optimizer.report_nonfinite()

    @property
    def salsa_optimizer(self) -> FusedSaLSa:
        """The FusedSaLSa under accelerate's wrapper."""
        return unwrap_salsa(self.optimizer)

    # ------------------------------------------------------------------ the loss of one micro-batch
    def _salsa_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirrors ``Trainer.training_step``: is ``compute_loss`` already normalized over the window?"""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def _salsa_micro_batch_loss(self, model, entry) -> torch.Tensor:
        """The loss ``training_step`` backpropagated for one recorded micro-batch, recomputed."""
        inputs, num_items_in_batch, divisor = entry
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if not self._salsa_loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss / divisor
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None, *args: Any, **kwargs: Any):
        salsa = self.salsa_optimizer
        wrapper = getattr(model, "_orig_mod", model)  # torch_compile=True: accelerate compiles the DDP wrapper
        if isinstance(wrapper, DistributedDataParallel) and salsa.model is not None and wrapper.module is salsa.model:
            # Trainer wraps its model in DDP after create_optimizer: the optimizer's model= becomes the wrapper, whose
            # buffer broadcast the search's trial forwards then leave as the training forward set it
            salsa.model = wrapper
        devices = _param_devices(salsa)
        rng = AccumulatedLoss.snapshot(devices)
        divisor = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        self._salsa_window.add((inputs, num_items_in_batch, divisor), loss, rng)
        if self.accelerator.sync_gradients:
            # The window is complete: Trainer clips, then calls optimizer.step(), which uses this.
            self._salsa_window.bind(self.optimizer,
                                    lambda entry: self._salsa_micro_batch_loss(model, entry))
        return loss

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.optimizer is not None:
            opt = self.salsa_optimizer
            logs = {**logs,
                    "salsa_step_size": opt.step_size,
                    "salsa_effective_step_size": opt.applied_steps[0],
                    "salsa_search_interval": opt.search_interval,
                    "salsa_forward_evals": opt.num_forward_evals,
                    "salsa_searches": opt.num_searches,
                    "salsa_backtracks": opt.num_backtracks}
        return super().log(logs, *args, **kwargs)


class SaLSaTrainer(SaLSaTrainerMixin, Trainer):
    """``transformers.Trainer`` stepping :class:`FusedSaLSa` with its line search."""
