"""The closure's contract, kept at every forward a step runs: the loss a closure returns (a fresh forward's, not a
stale tensor: :func:`is_stale_loss`; a ``loss=`` that is the closure's, not a scaled or summed one:
:func:`loss_mismatch`), the gradients it must leave alone (:func:`gradients_watch`), the random state and running
statistics its extra forwards must not move, and the calls of a closure that takes a batch index. Also here: the
step's loss as one float scalar (:func:`loss_scalar`), hyperparameters a closure wrote (:func:`same_value`), the
GradScaler whose ``step`` runs this one (:func:`grad_scaler_records`), and Lightning among the callers (for the
words of a refusal).

Used by :class:`salsa_fused.FusedSaLSa` and by the wrappers that run its closure at other points
(:class:`salsa_fused.StepSizeBeam`, :class:`salsa_fused.LRFactorSearch`).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from . import functional as F
from ._compat import power_iteration_buffers
from ._rng import RNGSnapshot


#: The error for a closure that ran backward() itself, raised before the step's own backward.
CLOSURE_RAN_BACKWARD = ("{what} ran backward() itself (torch.optim's and the published package's closure "
                        "convention): here the closure returns the loss only, and step() runs the backward "
                        "(the weights and the moments are as they were and the step was not counted; the "
                        "gradients its backward left are in .grad: call zero_grad(), then step() with a "
                        "closure that returns the loss; under Lightning's automatic optimization the "
                        "trainer's closure runs the backward: set self.automatic_optimization = False as "
                        "docs/integrations.md shows)")


#: An attribute of a closure that wraps a caller's differently named one (StepSizeBeam's ``closure(i)``):
#: the name messages give its call.
CALL_NAME = "_salsa_call_name"


CLOSURE_CHANGED_GRADIENTS = ("{what} changed the step's gradients in place during a trial forward (a "
                             "zero_grad(set_to_none=False), a backward, or a clip_grad_norm_ / clip_grad_value_ "
                             "inside it): the search reads them at every trial, so trials must leave them as the "
                             "step's backward made them. The closure returns the loss only; call zero_grad() "
                             "before step(), and clip between backward() and step(closure, loss=loss), the "
                             "two-phase form (docs/training.md). The weights, the moments and the search state "
                             "are as they were")


#: torch's error for a backward() with no graph: what a closure that runs its own backward raises at a trial forward.
NO_GRAPH = "does not require grad and does not have a grad_fn"


CLOSURE_BACKWARD_AT_TRIAL = ("{what} ran backward() at a trial forward, which step() runs under torch.no_grad() "
                             "(torch.optim's closure convention): here the closure returns the loss only, and "
                             "the step's gradients come from your backward before step(closure, loss=loss), or "
                             "from step(closure)'s own. The weights, the moments and the search state are as "
                             "they were; a zero_grad() inside the closure may have cleared the gradients, so run "
                             "the forward and backward again before the next step()")


STALE_CLOSURE = ("{what} returned the step's own loss (the same tensor, or a view or detach() of it) at "
                 "trial weights: the search evaluates the closure at each trial and needs it to run the "
                 "forward again, e.g. step(lambda: loss_fn(model(x), y)), not step(lambda: loss). Each such "
                 "trial would pass the Armijo test and grow the step without bound. The weights, the moments "
                 "and the search state are as they were")


SCALED_LOSS = ("loss= is {ratio:.4g}x the closure's loss at the same weights, about the GradScaler's scale "
               "{scale:g}: it looks like scaler.scale(loss). Pass the unscaled loss, as the closure returns it "
               "(scaler.scale(loss).backward(); scaler.step(opt, closure, loss=loss)): the gradients are "
               "unscaled by the optimizer, and a scaled loss passes every Armijo test. The weights, the moments "
               "and the search state are as they were")


#: Below this GradScaler scale a loss= is not named scaled: one that differs from the closure's by a
#: small factor is refused as LOSS_NOT_THE_CLOSURES instead (a scale of 2 and a sum of 2 micro-batches look alike).
SCALED_LOSS_MIN_SCALE = 256.0


LOSS_NOT_THE_CLOSURES = (
    "{what}. The search judges its trials against loss=: one above the "
    "closure's passes trials it should not and inflates the level step after step, one below fails "
    "them all and collapses it. Pass the closure's value at the "
    "current weights, as the closure returns it: with gradient accumulation the mean over all micro-batches "
    "(not their sum, not the last micro-batch's loss), unscaled, the closure computing it alike (autocast "
    "inside it as in your forward, no term the closure leaves out), and with no other optimizer's step between "
    "your forward and this one (step FusedSaLSa first). The weights, the moments and the search "
    "state are as they were")


#: loss= against the closure's loss at w0 (the step's random draws replayed): the same number computed
#: twice, so they differ by rounding only: ~1e-6 relative for nondeterministic kernels, ~1e-2 for bf16
#: autocast in one forward and not the other, nothing for a Python float (f0 is float32 either way). The
#: mistakes are factors of 2 and more: the sum of k >= 2 micro-batch means is k x the closure's mean, the
#: last of k micro-batches' divided losses about 1/k, a scaled loss the scale. 1.5 either way lies between
#: (50x bf16's rounding, under the smallest mistake, k = 2); past it the Armijo test is off by a third of the
#: loss at least, more than any step's decrease, so a refusal is not a false alarm about a harmless gap.
LOSS_MISMATCH_FACTOR = 1.5


#: ... and they differ by more than this, absolutely: a loss near 0 is the difference of terms of order
#: 1-10 (log-softmax of a memorized sample), whose float32 rounding (eps * 8 ~ 1e-6) makes 1e-7 and 2e-7
#: alike. A loss of 0, a NaN/inf and losses of opposite sign are not compared (a ratio says nothing there).
LOSS_MISMATCH_MIN_DIFFERENCE = 1e-6


def loss_mismatch(given: float, closure: float, scale: float) -> Tuple[float, bool, bool]:
    """``(ratio, looks_scaled, differs)`` for a ``loss=`` of value ``given`` against the closure's ``closure`` at
    the same weights, under a GradScaler's ``scale`` (0 without one): ``ratio = given / closure`` (NaN where the
    closure's is 0 or not finite); ``looks_scaled``, the ratio within a factor of 2 of a scale of at least
    ``SCALED_LOSS_MIN_SCALE``, both positive; ``differs``, finite losses of the same sign, neither 0, more than
    ``LOSS_MISMATCH_FACTOR`` apart either way and ``LOSS_MISMATCH_MIN_DIFFERENCE`` apart absolutely."""
    ratio = given / closure if closure != 0 and math.isfinite(closure) else math.nan
    looks_scaled = (scale >= SCALED_LOSS_MIN_SCALE and given > 0 and closure > 0
                    and math.isfinite(ratio) and scale / 2 <= ratio <= 2 * scale)
    differs = (math.isfinite(given) and math.isfinite(ratio) and ratio > 0
               and not 1 / LOSS_MISMATCH_FACTOR <= ratio <= LOSS_MISMATCH_FACTOR
               and abs(given - closure) > LOSS_MISMATCH_MIN_DIFFERENCE)
    return ratio, looks_scaled, differs

#: How many frames above the optimizer's own a GradScaler's ``step`` is looked for (:func:`grad_scaler_records`).
_SCALER_FRAMES = 32


def grad_scaler_records(optimizer: Optimizer) -> Optional[List[torch.Tensor]]:
    """The per-device ``found_inf`` records that ``scaler.update()`` reads, of the ``torch.amp.GradScaler`` whose
    ``step(optimizer, ...)`` runs this step: torch hands the optimizer ``found_inf``, a sum of them, not the
    scaler (a ``grad_scaler=`` keyword only to a ``step`` that declares one). Found among the calling frames,
    in the scaler's private ``_per_optimizer_states`` (torch 2.13); None where there is no such frame or record."""
    codes, classes = set(), [torch.amp.GradScaler]  # the code of step() of GradScaler and of each subclass
    while classes:
        cls = classes.pop()
        code = getattr(cls.__dict__.get("step"), "__code__", None)
        if code is not None:
            codes.add(code)
        classes.extend(cls.__subclasses__())
    frame = sys._getframe(1)
    for _ in range(_SCALER_FRAMES):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code not in codes:  # only such a frame's locals are read: on Python 3.11 and 3.12 a read
            continue                    # keeps them alive until the frame returns (a caller's own step(), say)
        scaler, stepped = frame.f_locals.get("self"), frame.f_locals.get("optimizer")
        if stepped is optimizer and isinstance(scaler, torch.amp.GradScaler):
            states = getattr(scaler, "_per_optimizer_states", None)
            records = states.get(id(optimizer), {}).get("found_inf_per_device") if isinstance(states, dict) else None
            if not isinstance(records, dict) or not records:
                return None
            found = list(records.values())
            return found if all(isinstance(record, torch.Tensor) for record in found) else None
    return None


def called_from_lightning() -> bool:
    """Is a frame of Lightning (``lightning``, ``pytorch_lightning``) among this call's callers? Read only on a
    path that is about to raise."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").split(".")[0] in ("lightning", "pytorch_lightning"):
            return True
        frame = frame.f_back
    return False


def from_lightning_manual(closure) -> bool:
    """Is ``closure`` the one Lightning's precision plugin hands to ``optimizer.step`` for a module in manual
    optimization (a partial of the plugin's own method, the module its first argument)? Read only on a
    path that is about to raise."""
    if not isinstance(closure, functools.partial):
        return False
    module = getattr(closure.func, "__module__", None) or ""
    return (module.split(".")[0] in ("lightning", "pytorch_lightning") and bool(closure.args)
            and getattr(closure.args[0], "automatic_optimization", None) is False)


def loss_scalar(loss: torch.Tensor, device: Optional[torch.device], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``loss.detach().reshape(()).to(device=device, dtype=dtype)``: the same tensor, without the last two
    ops (about 2 us of a plain step's host time) when the loss is a 0-dim tensor of ``dtype`` on ``device``."""
    value = loss.detach()
    if value.dim() or value.dtype is not dtype or (device is not None and value.device != device):
        value = value.reshape(()).to(device=device, dtype=dtype)
    return value


def losses_with_values(losses) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The step's own loss tensors, each with a copy of its value (one small device copy per
    search step, no host read): what :func:`is_stale_loss` compares a trial loss with."""
    return [(loss, loss.detach().clone()) for loss in losses if isinstance(loss, torch.Tensor)]


def is_stale_loss(value: torch.Tensor, earlier_losses: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                   rerun: Optional[Callable[[], object]]) -> bool:
    """Is ``value``, a closure's loss, a loss it returned before (``earlier_losses``: pairs of such a loss and
    its value then: the step's own, or an LRFactorSearch's earlier factors') still holding that value, rather
    than one its forward computed: that loss itself or a tensor sharing its memory (a ``detach()``, a view)?
    A new forward's loss shares no memory with a live earlier one, except a static output buffer (CUDA graphs)
    that each forward rewrites: one that holds another value is not stale, be it a view of that memory or the
    earlier tensor itself (CUDA graph trees return the same tensor object from replay to replay). One that
    holds the same value as any of them (a trial's loss equal to the step's own, bitwise) is told by
    ``rerun``, the closure once more at the same weights (once, however many earlier losses it ties), with
    ``value``'s memory set to NaN: a forward writes its loss there again, a closure that runs none leaves the
    NaN. The memory gets its bits back either way; without ``rerun`` (under data parallelism, where a lone
    forward's collectives, DDP's buffer broadcast or FSDP2's all-gathers, would meet no peer) it is stale.
    The value is read only where the memory is shared."""
    if not any(_holds_earlier_loss(value, earlier, earlier_value) for earlier, earlier_value in earlier_losses):
        return False
    if rerun is None:
        return True
    memory = value.data  # written without moving the tensor's version counter: its bits are put back
    bits = memory.clone()
    memory.fill_(math.nan)
    try:
        with torch.no_grad():
            rerun()
        return bool(torch.isnan(memory).all())
    finally:
        memory.copy_(bits)


def forget_autocast_casts() -> None:
    """Drop autocast's cached low-precision copies of the weights. Inside one autocast region (a step called
    in it) the cache outlives a weight write, and a later forward there would read the weights from before it."""
    torch.clear_autocast_cache()


def _holds_earlier_loss(value: torch.Tensor, earlier: torch.Tensor, earlier_value: torch.Tensor) -> bool:
    """Is ``value`` ``earlier`` or a tensor sharing its memory, holding ``earlier``'s value then (``earlier_value``)?"""
    if value is not earlier:
        if not isinstance(earlier, torch.Tensor) or value.device != earlier.device:
            return False
        try:
            shared = value.untyped_storage().data_ptr() == earlier.untyped_storage().data_ptr() != 0
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional)
            return False
        if not shared:
            return False
    return torch.equal(value.detach().reshape(()), earlier_value.reshape(()))


def same_value(now, before) -> bool:
    """``now`` is ``before``, or a value of its type equal to it (a tensor only itself: comparing reads it)."""
    if now is before:
        return True
    if type(now) is not type(before) or isinstance(now, torch.Tensor):
        return False
    try:
        return bool(now == before)
    except (TypeError, ValueError, RuntimeError):  # a tuple of tensors, say
        return False


def running_statistics(model: Optional[torch.nn.Module]) -> List[torch.Tensor]:
    """The buffers of ``model``'s modules that any extra forward in training mode would update: those
    tracking running statistics (BatchNorm's) and spectral norm's power-iteration vectors ``u``, ``v``
    (both of torch's forms); none without a model. Taken in evaluation mode too: a closure may switch
    the model to ``train()`` and back around its forward."""
    if model is None:
        return []
    buffers = []
    for module in model.modules():
        buffers += (module.buffers(recurse=False) if getattr(module, "track_running_stats", False)
                    else power_iteration_buffers(module))
    return buffers


def leave_random_state(rng: Optional[RNGSnapshot], running: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the generators at ``rng`` (if any) and each running-statistics buffer at its saved copy."""
    if rng is not None:
        rng.set()
    with torch.no_grad():
        for buffer, saved in running:
            buffer.copy_(saved)


def call_name(closure: Callable, default: str = "closure()") -> str:
    """How messages name a call of ``closure``: its :data:`CALL_NAME` where a wrapper set one."""
    return getattr(closure, CALL_NAME, default)


def gradients_watch(passes: F.Passes, param_groups: Sequence[dict], what: str) -> Callable[[], None]:
    """A check, for after each forward of a search, that raises when a closure changed the step's
    gradients in place (their version counters moved): the trials read those gradients. Under
    FSDP2 the buckets hold each gradient's local shard, whose counter an in-place op on the
    DTensor gradient does not move: the DTensor's own counter is read too (``param_groups``: the
    optimizer's groups where its gradients are sharded, else empty). A bucket holds a copy of a
    gradient laid out otherwise than its weight (a transpose's strides): the parameter's own
    ``.grad``, which the closure changes, is read then."""
    recorded = [(g, g._version) for bucket in passes.buckets for g in bucket.grads]
    recorded += [(p.grad, p.grad._version) for bucket in passes.buckets for p, g in zip(bucket.params, bucket.grads)
                 if p.grad is not None and p.grad is not g]
    recorded += [(p.grad, p.grad._version) for group in param_groups for p in group["params"]
                 if p.grad is not None and hasattr(p.grad, "_local_tensor")]

    def unchanged() -> None:
        if any(g._version != version for g, version in recorded):
            raise RuntimeError(CLOSURE_CHANGED_GRADIENTS.format(what=what))
    return unchanged


def takes_an_index(closure) -> bool:
    try:
        inspect.signature(closure).bind(0)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume it does
        return True
    return True


def _wants_an_index(closure) -> bool:
    """Whether ``closure`` cannot be called with no argument but can with one (a batch index)."""
    try:
        signature = inspect.signature(closure)
    except ValueError:  # no signature to read (a builtin)
        return False
    try:
        signature.bind()
    except TypeError:
        return takes_an_index(closure)
    return False


def call_plain(closure):
    """``closure()``, with the contract named when the closure wants a batch index."""
    try:
        return closure()
    except TypeError as error:
        if not _wants_an_index(closure):
            raise
        raise TypeError("this FusedSaLSa's search rule reads one batch per step, so its closure takes no "
                        "argument: closure() runs the forward pass and returns the loss; the closure given "
                        "wants a batch index (closure(i) is search_rule='labpal' or 'labpal_sgd', and "
                        "StepSizeBeam.step)") from error


def call_indexed(closure, index: int):
    """``closure(index)``, with the contract named when the closure takes no batch index."""
    try:
        return closure(index)
    except TypeError as error:
        if takes_an_index(closure):
            raise
        raise TypeError("this FusedSaLSa's search rule reads several batches per step, so its closure "
                        "takes the batch index: closure(i) runs the forward pass on batch i of this step "
                        "and returns its loss (rules.Batches); the closure given takes no argument") from error


class IndexedReplay:
    """``closure(i)`` whose later calls within one step replay the random state its first call drew
    from (the same dropout masks for batch ``i`` at every point); ``end`` is the random state after
    the latest first call, where the generators are left after the step."""

    def __init__(self, closure, devices, first: Optional[Dict[int, RNGSnapshot]] = None,
                 end: Optional[RNGSnapshot] = None):
        self.closure, self.devices = closure, devices
        self.first = dict(first or {})
        self.end = end

    def __call__(self, index: int):
        before = self.first.get(index)
        if before is not None:
            before.set()
            return call_indexed(self.closure, index)
        self.first[index] = RNGSnapshot.capture(self.devices)
        value = call_indexed(self.closure, index)
        self.end = RNGSnapshot.capture(self.devices)
        return value
