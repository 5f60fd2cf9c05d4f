"""Keeping every rank's search decision identical.

Each Armijo decision depends on the loss at the current and the trial weights; on a
data-parallel run every rank sees its own batch, so the losses are averaged over the
data-parallel group before the host decides (one small all-reduce per read). The
preconditioned gradient norm ``q`` is a sum over all elements of the model: with
replicated weights (DDP) every rank already holds all of it and it is not reduced;
with sharded weights (FSDP2) the per-shard partial sums are summed over the shard group.

Who reduces what, for a run on ``W`` ranks:

=============================  ==========================  ===========================
layout                         losses ``f0``, ``f1``         ``q`` (and the skip flags)
=============================  ==========================  ===========================
one process                    as they are                  as it is
DDP (replicated weights)       mean over the world          as it is (already global)
FSDP2, 1-D mesh                mean over the world          sum over the mesh's group
HSDP, 2-D mesh (rep, shard)    mean over the world          sum over the shard dim only
=============================  ==========================  ===========================

Averaging identical losses is harmless, so ranks that see the same batch (tensor
parallel peers) may sit in the loss group; they must not sit in the shard group unless
their weights are sharded (replicated weights would count more than once in ``q``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._compat import fsdp2
from .errors import ClosureFailedOnAnotherRank, NonFiniteError, NonFiniteOnEveryRank

MIXED_FORMS = (
    "the data-parallel ranks mix the one-phase step(closure) and the two-phase step(closure, loss=...) at step "
    "{step}: {two_phase} of the {ranks} data-parallel ranks passed loss=. The two forms run different collectives "
    "at a search step: use the same form on every rank (under a GradScaler, the two-phase one: the one-phase "
    "form is refused there). Nothing was stepped")


#: The relative range of the ranks' ``q`` past which their gradients were not averaged
#: (:meth:`SearchReduction.refuse_gradients_that_differ`): averaged ones give every rank the same bits; a rank
#: on its own batch's gradients is off by far more.
GRADIENT_SPREAD = 1e-4
#: The integer dtype a tensor's bits are summed as, by element size (:meth:`SearchReduction.refuse_weights_that_differ`).
_SAME_SIZE_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: The ranks' status in an exchange's all-reduce (:meth:`SearchReduction.exchange`): four float64 sums.
STATUS_SIZE = 4


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class SearchReduction:
    """Where the search's scalars are reduced; ``None`` groups mean 'do not reduce'.

    ``loss_group``: the data-parallel ranks; ``f0`` and each ``f1`` are averaged over it.
    ``shard_group``: the ranks that hold disjoint shards of the weights; the partial
    ``q`` (and the non-finite flags read with it) are summed over it. A shard group of more than one rank
    needs a loss group: the loss group's all-reduces are where the ranks agree their losses, a plain step's
    skip, a forward that raised and their forms.
    """

    loss_group: Optional[object] = None
    shard_group: Optional[object] = None

    def __post_init__(self) -> None:
        if self.loss_group is None and self.shard_group is not None and dist.get_world_size(self.shard_group) > 1:
            raise ValueError(
                f"SearchReduction got a shard_group (of {dist.get_world_size(self.shard_group)} ranks) without a "
                "loss_group: the ranks of the shard group would each decide the search on their own loss, and "
                "agree nothing else either (a GradScaler's found_inf at a plain step, a closure that raised on one "
                "rank, the step's form): where they see different batches their searches part at the first step "
                "(gloo aborts on a collective mismatch, NCCL hangs); where they see the same one, one rank's "
                "skipped plain step parts their step counts and hangs the next search. Pass loss_group=: the "
                "data-parallel group (dist.group.WORLD under FSDP2 or HSDP), or the shard group itself where all "
                "its ranks see the same batch (averaging equal losses changes nothing)")

    def __deepcopy__(self, memo) -> "SearchReduction":
        """The same groups: a process group is a handle on this process's communicator, not data
        (``copy.deepcopy`` of an optimizer built with an explicit reduction)."""
        return SearchReduction(self.loss_group, self.shard_group)

    def __getstate__(self):
        if self.active:
            raise TypeError("a SearchReduction with process groups cannot be pickled (the groups live in this "
                            "process): save optimizer.state_dict(), which holds no reduction, and pass the "
                            "reduction again to the optimizer that loads it")
        return dict(self.__dict__)

    @property
    def active(self) -> bool:
        return self.loss_group is not None or self.shard_group is not None

    @property
    def loss_ranks(self) -> int:
        """How many ranks the loss is averaged over (1: not reduced)."""
        return 1 if self.loss_group is None else dist.get_world_size(self.loss_group)

    def average_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """Mean of ``losses`` (a 1-D fp32 tensor) over the loss group; the input is not modified."""
        if self.loss_group is None:
            return losses
        reduced = losses.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.loss_group)
        return reduced / self.loss_ranks

    def any_rank(self, flag: bool, device: Optional[torch.device] = None) -> bool:
        """``flag`` or-ed over the loss group: a choice that decides how many forwards (so how many
        collectives) a step runs must be the same on every rank. One tiny all-reduce; no-op alone."""
        if self.loss_group is None:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.loss_group)
        return bool(value.item())

    def exchange(self, values: torch.Tensor, two_phase: bool,
                 failure: Optional[BaseException] = None) -> torch.Tensor:
        """The search's all-reduce over the loss group, with the ranks' status in it: ``values`` (1-D)
        averaged, then four sums for :meth:`check`: the ranks stepping in the two-phase form, the ranks
        whose forward raised (``failure``, this rank's exception), those ranks' numbers + 1, and the ranks
        whose forward raised :class:`NonFiniteError`. Four more elements in the all-reduce the search runs
        anyway, no collective of their own. No loss group: ``values`` as they are."""
        if self.loss_group is None:
            return values
        # Always float64, whatever the values' dtype: every rank must send one dtype (a rank in the other form
        # sends another loss here: buffers of two sizes abort gloo, hang NCCL), and the flags' sums must stay
        # exact (256 + 1 = 256 in bf16). The flags are filled in on the device: a tensor made from a list on
        # CUDA is a copy that waits for the stream, a host sync a GradScaler's plain step would add.
        payload = values.new_zeros(values.numel() + STATUS_SIZE, dtype=torch.float64)
        payload[:-STATUS_SIZE] = values.reshape(-1)  # then: two-phase, failed, its rank + 1, failed non-finite
        if two_phase:
            payload[-4] = 1.0
        if failure is not None:
            payload[-3] = 1.0
            payload[-2] = float(dist.get_rank() + 1)
            if isinstance(failure, NonFiniteError):
                payload[-1] = 1.0
        dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.loss_group)
        return torch.cat([payload[:-STATUS_SIZE] / self.loss_ranks, payload[-STATUS_SIZE:]])

    def check(self, status: Sequence[float], two_phase: bool, failure: Optional[BaseException], step: int,
              where: Optional[str] = None) -> None:
        """Raise on every rank alike when the ranks of an :meth:`exchange` (its last four values,
        ``status``, read) did not all step in the same form, or when a rank's forward raised:
        ``failure``, this rank's exception, is raised again (as :class:`NonFiniteOnEveryRank` from it where
        every rank's forward raised :class:`NonFiniteError`); a rank whose own forward returned raises
        :class:`ClosureFailedOnAnotherRank`, whose message goes on with ``where`` (which forward raised,
        and where that leaves the weights; by default a search's, at ``step``). No loss group: ``failure``
        raised, if any."""
        if self.loss_group is None or not status:
            if failure is not None:
                raise failure
            return
        two_phase_ranks, failed_ranks, rank_sum, nonfinite_ranks = (round(value) for value in status)
        if two_phase_ranks not in (0, self.loss_ranks):
            raise ValueError(MIXED_FORMS.format(step=step, two_phase=two_phase_ranks, ranks=self.loss_ranks)) \
                from failure
        if failure is not None and nonfinite_ranks == self.loss_ranks:
            raise NonFiniteOnEveryRank(
                f"the closure raised NonFiniteError on every one of the {self.loss_ranks} data-parallel ranks "
                f"at step {step} (this rank's: {failure}): an agreed divergence, raised on every rank alike") \
                from failure
        if failure is not None:
            raise failure
        if failed_ranks:
            which = f"rank {rank_sum - 1}" if failed_ranks == 1 else f"{failed_ranks} ranks"
            if where is None:
                where = (f"at step {step}, in a forward of the search (that rank raised its own exception): every "
                         "rank raises, the weights and the optimizer's state as before the step, so that the ranks "
                         "stay in step (a retry of the step on every rank runs on alike)")
            raise ClosureFailedOnAnotherRank(
                f"the closure raised on {which} ({failed_ranks} of the {self.loss_ranks} data-parallel ranks) "
                f"{where}")

    def refuse_gradients_that_differ(self, own_q: float, step: int, device: Optional[torch.device] = None,
                                     weights: Optional[Callable[[], List[torch.Tensor]]] = None) -> None:
        """Raise on every rank alike when the ranks' ``q`` differ. With replicated weights each rank's ``q``
        comes from the gradients DDP averaged, so it is the same on every rank; a rank whose backward skipped
        the all-reduce (the module inside DDP called, ``no_sync()`` on the micro-batch that steps, no DDP at
        all) steps on its own gradients, and its weights part from its peers' at every step, silently. One
        all-reduce of ``q`` and ``-q`` (MAX: the largest and the smallest over the loss group) per search; a
        non-finite ``q`` is left to the search's own checks. Where they differ at all, ``weights()`` (this
        step's, not yet moved) are compared bit for bit (:meth:`refuse_weights_that_differ`): ranks that parted
        at a step without a search are named so. Then a relative range of ``q`` above :data:`GRADIENT_SPREAD`
        is refused as this step's gradients. Every rank of the loss group must call it at the same search."""
        extremes = torch.tensor([own_q, -own_q], dtype=torch.float64, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.loss_group)
        highest, negated_lowest = extremes.tolist()
        lowest = -negated_lowest
        if highest == lowest or not (math.isfinite(highest) and math.isfinite(lowest)):
            return
        if weights is not None:
            self.refuse_weights_that_differ(weights(), step, device)
        if not highest - lowest > GRADIENT_SPREAD * max(abs(highest), abs(lowest)):
            return  # the same gradients, q summed in another order
        raise ValueError(
            f"the {self.loss_ranks} data-parallel ranks stepped on different gradients at step {step} (the slope "
            f"q = g.d: {own_q:.6g} on this rank, from {lowest:.6g} to {highest:.6g} over the ranks): step() "
            "needs the gradients averaged over the ranks before it runs, as DDP's backward does. Call the "
            "DDP-wrapped model (not the module inside it) in the closure, and leave no_sync() off the micro-batch "
            "whose backward comes last before step(). Nothing was stepped")

    def refuse_weights_that_differ(self, weights: List[torch.Tensor], step: int,
                                   device: Optional[torch.device] = None) -> None:
        """Raise on every rank alike when the replicated ``weights`` are not the same bits on every rank of the
        loss group: a sum of their bits as integers (exact, and the same in any order), compared over the
        ranks in one all-reduce (MAX of it and of its complement)."""
        total = torch.zeros((), dtype=torch.int64, device=device)
        for weight in weights:
            bits = weight.detach().view(_SAME_SIZE_INTEGER[weight.element_size()])
            total += bits.sum(dtype=torch.int64).to(device)
        extremes = torch.stack([total, ~total])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.loss_group)
        highest, complement_of_lowest = extremes.tolist()
        lowest = ~complement_of_lowest
        if highest == lowest:
            return
        raise ValueError(
            f"the {self.loss_ranks} data-parallel ranks' weights differ at step {step}, before it moved them: they "
            "parted at an earlier step without a search (plain steps compare nothing across the ranks), where "
            "some rank stepped on gradients its peers did not have: a last micro-batch whose backward ran under "
            "no_sync() (a short accumulation window at the end of an epoch, say), a parameter whose .grad was None "
            "on some ranks only, the module inside DDP called. Nothing was stepped, but the ranks cannot go on "
            "from weights that differ: load the last checkpoint on every rank")

    def shared_forward(self, forward: Callable[[], torch.Tensor], dtype: torch.dtype,
                       device: Optional[torch.device]) -> Tuple[torch.Tensor, Optional[Exception]]:
        """``forward()`` (a forward whose loss the ranks share: 0-dim, of ``dtype``) and None, or, where the
        ranks share it and it raised, NaN (on ``device``) and its exception: the rank must still join the
        all-reduce its peers wait in (:meth:`exchange`), flagged as failed, and raise after it (:meth:`check`).
        Alone, or for an exception that is not an ``Exception`` (``KeyboardInterrupt``), it propagates at once."""
        if self.loss_group is None:
            return forward(), None
        try:
            return forward(), None
        except Exception as error:  # out of memory on one rank, a closure that raised on its batch
            return torch.full((), math.nan, dtype=dtype, device=device), error

    def shared_loss(self, forward: Callable[[], torch.Tensor], dtype: torch.dtype, device: Optional[torch.device],
                    two_phase: bool, step: int, where: Optional[str] = None) -> float:
        """``forward()`` averaged over the loss group (:meth:`shared_forward`), read, and the ranks' status
        checked (``two_phase``: the form the caller steps in; ``step``, ``where``: :meth:`check`'s)."""
        local, failure = self.shared_forward(forward, dtype, device)
        (value, *status) = self.exchange(local.reshape(1), two_phase, failure).tolist()
        self.check(status, two_phase, failure, step, where)
        return value

    def differing(self, texts: Dict[str, str], device: Optional[torch.device] = None) -> List[str]:
        """The names whose text is not the same on every rank of the loss group. One all-reduce (MAX) of
        a 48-bit hash per name and of its negation: each rank learns the largest and the smallest."""
        if self.loss_group is None:
            return []
        names = sorted(texts)
        hashes = [float(int.from_bytes(hashlib.sha256(texts[name].encode()).digest()[:6], "big")) for name in names]
        extremes = torch.tensor(hashes + [-h for h in hashes], dtype=torch.float64, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.loss_group)
        highest, lowest = extremes[:len(names)].tolist(), extremes[len(names):].tolist()
        return [name for name, high, low in zip(names, highest, lowest) if high != -low]

    def sum_over_shards(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """Sum of a shard's partial ``q`` over the shard group (no-op for replicated weights)."""
        if self.shard_group is None:
            return partial_sum
        reduced = partial_sum.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.shard_group)
        return reduced


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "_local_tensor") and hasattr(tensor, "placements")


def shard_group_of(params: Iterable[torch.Tensor]) -> Optional[object]:
    """The process group over which ``params`` (DTensors) are sharded; ``None`` if they are not.

    Every sharded parameter must use the same mesh and shard along the same single mesh
    dimension (FSDP2's 1-D mesh, or the shard dimension of an HSDP 2-D mesh). Parameters
    that are not sharded cannot be mixed in: they would count once per rank in ``q``.
    """
    params = list(params)
    layouts = set()
    unsharded = 0
    for p in params:
        if not _is_dtensor(p):
            unsharded += 1
            continue
        shard_dims = tuple(i for i, placement in enumerate(p.placements) if placement.is_shard())
        if not shard_dims:
            unsharded += 1
            continue
        layouts.add((p.device_mesh, shard_dims))
    if not layouts:
        return None
    if len(layouts) > 1:
        raise ValueError("FusedSaLSa found DTensor parameters sharded over different meshes or mesh "
                         "dimensions; pass reduction=SearchReduction(loss_group=..., shard_group=...)")
    ((mesh, shard_dims),) = layouts
    if len(shard_dims) != 1:
        raise ValueError(f"FusedSaLSa found parameters sharded over mesh dimensions {shard_dims}; "
                         "automatic detection handles one shard dimension: pass "
                         "reduction=SearchReduction(loss_group=..., shard_group=...)")
    if unsharded:
        raise ValueError(f"{unsharded} of {len(params)} parameters are not sharded DTensors while the "
                         "rest are: their share of the preconditioned norm would count once per rank. "
                         "Shard every parameter (fully_shard the root module) or pass reduction=")
    return mesh.get_group(shard_dims[0])


def default_reduction(params: Optional[Iterable[torch.Tensor]] = None) -> SearchReduction:
    """Losses averaged over the whole world when ``torch.distributed`` runs with >1 rank;
    ``q`` summed over the shard group when ``params`` are sharded DTensors (FSDP2)."""
    if not is_distributed():
        return SearchReduction()
    shard_group = shard_group_of(params) if params is not None else None
    if shard_group is not None and dist.get_world_size(shard_group) == 1:
        shard_group = None
    return SearchReduction(loss_group=dist.group.WORLD, shard_group=shard_group)


def fsdp_closure(model: torch.nn.Module, closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``closure`` made safe for trial forwards under FSDP2.

    FSDP2 keeps the root module's parameters unsharded after a forward (they are
    expected back for the backward). A trial forward runs under ``torch.no_grad()``
    with no backward, so the next trial would reuse the stale unsharded copy instead of
    the trial weights the optimizer wrote into the shards. The returned closure reshards
    every FSDP module of ``model`` first (a no-op when already sharded), so each call
    all-gathers the current shards. Alternative: ``fully_shard(model, reshard_after_forward=True)``
    on the root (one more all-gather of the root's parameters per training step).
    """
    modules = fsdp_modules(model)

    def resharded_closure():
        for module in modules:
            module.reshard()
        return closure()

    resharded_closure.reshards_fsdp = True  # FusedSaLSa reads it: no warning about stale trials
    resharded_closure.fsdp_modules = modules  # resharded again after a search (the applied move)
    return resharded_closure


def ddp_modules(model: torch.nn.Module) -> list:
    """The ``DistributedDataParallel`` wrappers among ``model``'s modules (``model`` itself, when it is one)."""
    from torch.nn.parallel import DistributedDataParallel
    return [m for m in model.modules() if isinstance(m, DistributedDataParallel)]


@contextlib.contextmanager
def without_buffer_broadcast(wrappers: Sequence[torch.nn.Module]):
    """Forwards run inside (a search's trials, a factor's scoring forward) through the DDP ``wrappers`` broadcast
    no buffers, and the next forward outside broadcasts as it would have: DDP broadcasts rank 0's buffers at a
    forward when its mark ``require_forward_param_sync`` is set, and a forward under ``no_grad`` clears it, so
    that, left so, the training forward after a search skipped the broadcast (each rank started from its own
    BatchNorm statistics), and set again before each trial, every trial broadcast them all."""
    marks = [(wrapper, wrapper.require_forward_param_sync) for wrapper in wrappers]
    for wrapper, _ in marks:
        wrapper.require_forward_param_sync = False
    try:
        yield
    finally:
        for wrapper, mark in marks:
            wrapper.require_forward_param_sync = mark


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 modules (``fully_shard``-ed) among ``model``'s modules; none without FSDP2."""
    api = fsdp2()
    if api is None:
        return []
    return [m for m in model.modules() if isinstance(m, api.FSDPModule)]
