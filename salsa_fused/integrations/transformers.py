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
``lr_scheduler_type="constant"`` for the applied step the search finds, unscaled.

Logged with Trainer's training logs: ``salsa_step_size`` (the level eta), ``salsa_effective_step_size``
(the first group's applied step of the next plain step, ``opt.applied_steps[0]``), ``salsa_search_interval``,
``salsa_forward_evals``, ``salsa_searches``, ``salsa_backtracks``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("salsa_fused.integrations.transformers needs transformers: "
                      "pip install transformers") from error

from ..optimizer import FusedSaLSa
from . import AccumulatedLoss, _param_devices, one_batch_salsa, unwrap_salsa

__all__ = ["SaLSaTrainerMixin", "SaLSaTrainer"]


class SaLSaTrainerMixin:
    """Makes a ``Trainer`` (or subclass, e.g. TRL's) step a :class:`FusedSaLSa` with a line search.

    ``salsa_kwargs``: keyword arguments for the FusedSaLSa that ``create_optimizer``
    builds (``init_step_size``, ``c``, ``betas``...). Trainer's two param groups (weight
    decay / none) are kept; ``TrainingArguments.learning_rate`` becomes the groups' ``lr``
    multiplier (set it to 1.0) and ``weight_decay`` the decoupled decay of the first group.
    A FusedSaLSa passed through ``optimizers=(opt, scheduler)`` is used as given.
    Not supported: DeepSpeed (it owns the optimizer step), context parallelism.
    """

    def __init__(self, *args: Any, salsa_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        self.salsa_kwargs = dict(salsa_kwargs or {})
        for key in ("lr", "weight_decay", "params"):
            if key in self.salsa_kwargs:
                raise ValueError(f"salsa_kwargs must not set {key!r}: it comes from TrainingArguments "
                                 "(learning_rate, weight_decay) and the model")
        self._salsa_window = AccumulatedLoss()
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("SaLSaTrainer does not support DeepSpeed: DeepSpeed runs the optimizer step itself")
        if self.optimizer is None:
            opt_model = self.model if model is None else model
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
            kwargs = {"model": opt_model, **self.salsa_kwargs}  # trials keep BatchNorm's statistics
            self.optimizer = FusedSaLSa(groups, lr=self.args.learning_rate, **kwargs)
            self.optimizer._lr_checked = True  # warned above, in TrainingArguments' words
        one_batch_salsa(self.optimizer, "SaLSaTrainer")  # a clear error for any other optimizer
        return self.optimizer

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
        devices = _param_devices(self.salsa_optimizer)
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
