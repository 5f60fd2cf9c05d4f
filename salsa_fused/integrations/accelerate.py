"""FusedSaLSa under Hugging Face ``accelerate``: ``prepare`` and ``accumulate``.

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, optimizer, loader = accelerator.prepare(model, FusedSaLSa(model.parameters()), loader)
    search = SaLSaAccumulation(accelerator, optimizer, loss_of=lambda batch: loss_fn(model, batch))
    for batch in loader:
        with accelerator.accumulate(model):
            search.backward(batch)      # forward, accelerator.backward, remember the micro-batch
            optimizer.step()            # a no-op until the window's last micro-batch
            optimizer.zero_grad()

``accelerator.backward`` divides each micro-batch's loss by ``gradient_accumulation_steps``;
:meth:`SaLSaAccumulation.backward` records the micro-batch and, when
``accelerator.sync_gradients`` says the window is complete, binds to the optimizer the
forward-only loss over the whole window (divided the same way) and the window's summed
loss. accelerate's ``AcceleratedOptimizer.step()`` is a no-op while gradients still
accumulate, and on those micro-batches nothing is bound: the search runs once per
update, on the update step, over every micro-batch of it. Under fp16 the GradScaler
calls ``step()`` without a closure; FusedSaLSa unscales inside its passes
(``_step_supports_amp_scaling``), and the binding supplies the loss function.

Importing this module also gives ``AcceleratedOptimizer`` the methods ``mark_forward`` and
``bind_closure``, which reach the FusedSaLSa inside (for loops that bind by hand), and its
``step`` the FusedSaLSa forms ``step(closure)`` and ``step(closure, loss=loss)``: on a micro-batch
that does not sync they raise, since accelerate would skip the step and that micro-batch with it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from accelerate.optimizer import AcceleratedOptimizer

from . import AccumulatedLoss, _param_devices, check_micro_batch_loss, one_batch_salsa, unwrap_salsa

__all__ = ["SaLSaAccumulation"]


def _forward_to_salsa(name: str) -> Callable:
    def method(self, *args, **kwargs):
        return getattr(unwrap_salsa(self), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``FusedSaLSa.{name}`` of the wrapped optimizer (installed by salsa_fused)."
    return method


def _bind_where_the_step_runs(bind: Callable) -> Callable:
    """``FusedSaLSa.bind_closure`` of the wrapped optimizer, refused on a micro-batch that does not sync:
    accelerate skips that step, so the binding waited, each micro-batch's replaced the one before, and the
    step that syncs searched the last micro-batch's loss alone while it stepped on the window's gradients."""

    def bind_closure(self, *args, **kwargs):
        if not self.gradient_state.sync_gradients:
            raise RuntimeError(
                "bind_closure() on a micro-batch that does not sync gradients (gradient_accumulation_steps="
                f"{self.gradient_state.num_steps}): accelerate skips this micro-batch's step, so the binding would "
                "wait, the next micro-batch's would replace it, and the step that syncs would judge its trials on "
                "the last micro-batch only while it steps on the whole window's gradients. Bind once, where "
                "accelerator.sync_gradients is True, a closure of the whole window's mean loss, or use "
                "SaLSaAccumulation, which does (salsa_fused.integrations.accelerate, docs/integrations.md). "
                "Nothing was bound")
        return bind(self, *args, **kwargs)

    bind_closure.__name__, bind_closure.__doc__ = "bind_closure", bind.__doc__
    return bind_closure


# AcceleratedOptimizer forwards only torch.optim's methods: importing this module makes the
# prepared optimizer take FusedSaLSa's hand-offs to the next step() too.
for _name in ("mark_forward", "bind_closure"):
    if not hasattr(AcceleratedOptimizer, _name):
        _method = _forward_to_salsa(_name)
        setattr(AcceleratedOptimizer, _name, _bind_where_the_step_runs(_method) if _name == "bind_closure" else _method)


def _wrapped_salsa(prepared: AcceleratedOptimizer):
    try:
        return unwrap_salsa(prepared)
    except TypeError:
        return None


def _step_with_a_closure(accelerated_step: Callable) -> Callable:
    """accelerate's ``step``, for a FusedSaLSa also in the forms ``step(closure)`` and
    ``step(closure, loss=loss)``, refused on a micro-batch that does not sync: accelerate skips
    that step, closure and all, so the micro-batch would never be trained."""

    def step(self, closure=None, *, loss=None):
        if closure is None and loss is None:  # every step of other loops: no unwrapping (1.1 us for another optimizer)
            return accelerated_step(self)
        salsa = _wrapped_salsa(self)
        if salsa is None:
            return accelerated_step(self, closure) if loss is None else accelerated_step(self, closure, loss=loss)
        if not self.gradient_state.sync_gradients:
            raise RuntimeError(
                "step(closure) on a micro-batch that does not sync gradients (gradient_accumulation_steps="
                f"{self.gradient_state.num_steps}): accelerate skips the step there, closure included, so this "
                "micro-batch would never be trained (or, with loss=, the step that syncs would search its own "
                "micro-batch only). Use SaLSaAccumulation, which binds the whole window's loss on the step "
                "that syncs (salsa_fused.integrations.accelerate, docs/integrations.md)")
        if loss is None:
            return accelerated_step(self, closure)
        pending = salsa._handoff.bound_step
        salsa.bind_closure(closure, loss=loss)  # accelerate's step (and its GradScaler) take no loss=
        try:
            accelerated_step(self)
        except BaseException:  # as after FusedSaLSa's own step(closure, loss=): nothing of this step stays bound
            salsa._handoff.bound_step = pending
            raise
        return loss

    step.__name__, step.__doc__ = "step", accelerated_step.__doc__
    step.salsa_closure_forms = True
    return step


if not getattr(AcceleratedOptimizer.step, "salsa_closure_forms", False):
    AcceleratedOptimizer.step = _step_with_a_closure(AcceleratedOptimizer.step)


class SaLSaAccumulation:
    """Runs each micro-batch's forward and backward through ``accelerator`` and binds the
    window's loss function to the (prepared) FusedSaLSa on the step that updates.

    ``loss_of(batch)``: the mean loss of one micro-batch (forward only, no division by the
    accumulation steps: ``accelerator.backward`` and the bound closure both divide it).
    """

    def __init__(self, accelerator: Any, optimizer: Any, loss_of: Callable[[Any], torch.Tensor]) -> None:
        if not callable(loss_of):
            raise TypeError(f"loss_of must be callable, got {type(loss_of).__name__}")
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.salsa = one_batch_salsa(optimizer, "SaLSaAccumulation")
        self.loss_of = loss_of
        self.window = AccumulatedLoss()

    def _scaled_loss(self, batch: Any) -> torch.Tensor:
        return self.loss_of(batch) / self.accelerator.gradient_accumulation_steps

    def backward(self, batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (undivided) loss, detached."""
        rng = AccumulatedLoss.snapshot(_param_devices(self.salsa))
        loss = self.loss_of(batch)
        check_micro_batch_loss(loss, "SaLSaAccumulation's loss_of(batch)")  # before accelerate divides it
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps itself
        self.window.add(batch, loss.detach() / self.accelerator.gradient_accumulation_steps, rng)
        if self.accelerator.sync_gradients:
            self.window.bind(self.salsa, self._scaled_loss)
        return loss.detach()
