"""The optimizers the quality suite compares, by name.

Each entry builds an optimizer (and an LR scheduler where it has one) for a model of a
task and a run length. Families, which set how the training loop calls ``step``:

- ``fused``: FusedSaLSa configurations (``opt.step(closure)``).
- ``torch``: AdamW with linear warmup (5%) and cosine decay to 10% of the peak; the learning
  rate is in the name (``adamw_1e-3``), any rate can be asked for.
- ``torch`` also: ``adamw20_<lr>``, the same AdamW with a 20% warmup (a fairness check for the
  preset's long warm-up, NOTES.md section 6; not part of the grid).
- ``fused`` also: ``shape_w<W>_x<F>_d<D>[_f<final>][_b<beta3>]``, the author's settings with a
  piecewise-linear schedule on the applied step (the section 6 and 8 screens; see ``_shape``).
- ``schedulefree``: schedule-free AdamW at its defaults (``train()``/``eval()`` modes); also
  with its documented warmup (``schedulefree_warmup``) and ``prodigy-plus-schedule-free``.
- ``schedulefree_plus``: ScheduleFree+ (a Polyak rate from the loss) at its reference defaults;
  ``schedulefree_plus_warmup``: with a 5% warm-up (NOTES.md section 47).
- ``prodigy``: Prodigy at its defaults (a ``torch`` family optimizer without scheduler);
  ``prodigy_warmup``: with the warmup and cosine annealing its README documents.
- ``salsa_pub``: the published ``salsa.SaLSA.SaLSA`` at its defaults.
- ``labpal``: :class:`salsa_fused.LABPAL`, FusedSaLSa with the ``"labpal"`` rule (seed 003;
  ``opt.step(closure)`` with ``closure(i)`` the loss on the step's ``i``-th batch: the task's
  batches from the step's own onwards).
- ``beam``: a FusedSaLSa configuration inside :class:`salsa_fused.beam.StepSizeBeam` (NOTES.md
  section 11; ``beam.step(closure)`` with ``closure(i)`` as for ``labpal``).
- ``lr_factor``: AdamW or a FusedSaLSa configuration inside :class:`salsa_fused.LRFactorSearch`
  (seed 004): every 1% of the run (the seed decides once per epoch over 100 epochs) it scores
  the factors 2, 1, 0.5 of the step just taken on the next batch of the stream and multiplies
  the rate by their score-weighted geometric mean. On AdamW it replaces the schedule: a
  constant base rate, no warmup, no cosine.
- ``fused`` also: ``joint_b<beta3>_c<c>_g<growth>_p<peak>_w<warmup>_d<m|g>_i<interval>``, the preset at a
  point of NOTES.md section 39's joint search (:mod:`benchmarks.quality.joint`).
- ``mechanic``: :class:`benchmarks.quality.mechanic.Mechanic` on Adam (NOTES.md section 38's screen):
  called as a ``torch`` optimizer; its applied rate is the learned scale times the base's rate.

Weight decay 0.1 (on matrices only) for AdamW and the FusedSaLSa configurations that use
it; Prodigy, schedule-free and the published SaLSa run at their own defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from salsa_fused import LABPAL, FusedSaLSa, LRFactorSearch, presets
from salsa_fused.beam import StepSizeBeam
from salsa_fused.step_size import COLLAPSE_FRACTION, Cooldown, WarmupStableDecay

from . import joint
from .decay_per_run import DecayPerRun
from .hypergradient import HypergradientMultiplier
from .mechanic import Mechanic
from .relative_ceiling import RelativeCeiling
from .trust_ratio import TrustRatio, per_tensor_groups
from .schedulefree_plus import ScheduleFreePlus
from .searched_average import ScheduleFreeAverage
from .weight_average import PowerEMA
from .rules import ClimbingArmijo, EdgeRule, NonMonotoneArmijo, RatioArmijo

WEIGHT_DECAY = 0.1
WARMUP_FRACTION = 0.05
ADAMW_PREFIX = "adamw_"
#: AdamW at no weight decay, the zoo's schedule otherwise: the second grid of NOTES.md section 78
ADAMW_WD0_PREFIX = "adamwwd0_"
#: AdamW with betas (0.9, 0.95), the zoo's schedule and weight decay otherwise: the second grid of NOTES.md section 89
ADAMW_B95_PREFIX = "adamwb95_"
LONG_WARMUP_PREFIX = "adamw20_"  # adamw20_<lr>: AdamW with 20% warmup + cosine (a check, not the grid)
BACKEND = "auto"  # FusedSaLSa's backend in every configuration: "cpp" on the CPU when built (issue 18)
#: wsdadamw_<lr>: AdamW in the pretrain preset's schedule shape (section 43; not ``adamw_``: the zoo's grid is
#: the cosine one)
PRESET_SHAPE_PREFIX = "wsdadamw_"
SHAPE_PREFIX = "shape_"  # shape_w<warmup>_x<factor>_d<decay>[_f<final>][_b<beta3>]: WarmupStableDecay by name


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    family: str
    scheduler: Optional[object] = None
    schedule: Optional[WarmupStableDecay] = None  # FusedSaLSa's applied-step schedule
    beam: Optional[StepSizeBeam] = None  # the ``beam`` family's wrapper around ``optimizer``
    factor_search: Optional[LRFactorSearch] = None  # the ``lr_factor`` family's wrapper around ``optimizer``
    inner_family: Optional[str] = None  # ``lr_factor``: the wrapped optimizer's family (``torch`` or ``fused``)
    hyper: Optional[HypergradientMultiplier] = None  # section 53: a learned multiplier on the applied step
    average: Optional[ScheduleFreeAverage] = None  # section 60: schedule-free averaging of the searched steps
    ema: Optional[PowerEMA] = None  # section 62: a power EMA of the weights beside the run, read over the tail
    ceiling: Optional[RelativeCeiling] = None  # section 84: a ceiling on the applied step from the weights' scale
    trust: Optional[TrustRatio] = None  # section 95: per-tensor trust ratios as the groups' probe multipliers


def _fused(kwargs_of: Callable[[int], dict], decay: bool = True):
    def build(task, model, total_steps) -> Built:
        kwargs = dict(kwargs_of(total_steps))
        kwargs.setdefault("backend", BACKEND)
        wd = kwargs.pop("weight_decay", 0.0)
        opt = FusedSaLSa(task.param_groups(model, wd), **kwargs)
        return Built(opt, "fused", schedule=kwargs.get("schedule"))
    return build


def _preset(name: str, length_known: bool = True, told: Optional[Callable[[int], int]] = None, **overrides):
    """Preset ``name`` for the run's length (not told it without ``length_known``; told ``told(length)``
    instead with ``told``, section 59); ``overrides`` replace its arguments (ablations)."""
    def build(task, model, total_steps) -> Built:
        total_steps = (told(total_steps) if told else total_steps) if length_known else None
        kwargs = presets.preset_kwargs(name, total_steps)
        wd = kwargs.pop("weight_decay", 0.0)
        opt = presets.from_preset(task.param_groups(model, wd), name, total_steps=total_steps, backend=BACKEND,
                                  **overrides)
        return Built(opt, "fused", schedule=kwargs.get("schedule"))
    return build


def _end_known_late(cooldown: float):
    """The preset told no run length (``total_steps=None``) whose user learns the end ``cooldown`` of the
    run before it and then starts the documented cooldown, ``optimizer.schedule = Cooldown(
    optimizer.search_state.step, steps)``, from a step pre-hook (section 59)."""
    def build(task, model, total_steps) -> Built:
        built = _preset(presets.RECOMMENDED, length_known=False)(task, model, total_steps)
        steps = max(1, round(cooldown * total_steps))

        def start_cooldown(opt, args, kwargs):
            if opt.schedule is None and opt.search_state.step == total_steps - steps:
                opt.schedule = Cooldown(opt.search_state.step, steps)
        built.optimizer.register_step_pre_hook(start_cooldown)
        return built
    return build


def _nolength_averaged(y_matched: bool = False, **overrides):
    """The preset told no run length (``total_steps=None``), its steps averaged schedule-free
    (:class:`ScheduleFreeAverage`, section 60); ``overrides`` replace the preset's arguments. With
    ``y_matched`` every group's ``lr`` (the multiplier on the applied step; the trials still probe the
    searched level) is ``1 / (1 - β)``, so that ``y``, which moves ``1 - β`` of ``z``'s step once the average
    has weight, moves about the searched step (section 61)."""
    def build(task, model, total_steps) -> Built:
        built = _preset(presets.RECOMMENDED, length_known=False, **overrides)(task, model, total_steps)
        built.average = ScheduleFreeAverage(built.optimizer)
        if y_matched:
            for group in built.optimizer.param_groups:
                group["lr"] = 1.0 / (1.0 - built.average.beta)
        return built
    return build


def _nolength_ema(gamma: float, length_known: bool = False):
    """The preset told no run length (``total_steps=None``; told it with ``length_known``, section 63), its run
    untouched, with a power EMA of the weights (:class:`PowerEMA`, section 62) beside it: the zoo reads the final
    losses at the average."""
    def build(task, model, total_steps) -> Built:
        built = _preset(presets.RECOMMENDED, length_known=length_known)(task, model, total_steps)
        built.ema = PowerEMA(model, gamma)
        return built
    return build


def _early_freeze_preset(fraction: float, backoff_on_loss_rise: bool = False, hold_scale_on_loss_rise: bool = False,
                         decay_from_hold: bool = False, cooldown_floor: Optional[float] = None, schedule: Optional[dict] = None,
                         warmup_start: Optional[float] = None, **search):
    """The recommended preset whose schedule freezes the level early, at ``fraction`` of the search's
    peak fast average, once it falls below that (``freeze_below``; NOTES.md section 22; 0: never), backs
    off when the loss turns if ``backoff_on_loss_rise`` (section 23), and holds the warm-up's scale there
    if ``hold_scale_on_loss_rise`` (section 25), and decays the cooldown from that held scale if ``decay_from_hold``
    (section 73); each off unless asked, so these names build what they
    built before the preset adopted it. With ``cooldown_floor`` the cooldown is log-linear down to that
    fraction of the peak (:class:`LogLinearCooldown`, section 32); with ``warmup_start`` the warm-up
    starts at that fraction of the peak (:class:`WarmupFromFloor`, section 52). ``schedule``: other fields of its
    WarmupStableDecay (section 38: ``peak``; section 39: ``warmup``, ``decay``); ``search``: other FusedSaLSa
    arguments (section 35: ``max_search_interval``)."""
    def build(task, model, total_steps) -> Built:
        kwargs = {**presets.preset_kwargs(presets.RECOMMENDED, total_steps), **search}
        kwargs["schedule"] = replace(kwargs["schedule"], freeze_below=fraction,
                                     backoff_on_loss_rise=backoff_on_loss_rise,
                                     hold_scale_on_loss_rise=hold_scale_on_loss_rise,
                                     decay_from_hold=decay_from_hold)
        if schedule:
            kwargs["schedule"] = replace(kwargs["schedule"], **schedule)
        if cooldown_floor is not None:
            kwargs["schedule"] = LogLinearCooldown(**asdict(kwargs["schedule"]), floor=cooldown_floor)
        if warmup_start is not None:
            kwargs["schedule"] = WarmupFromFloor(**asdict(kwargs["schedule"]), start=warmup_start)
        wd = kwargs.pop("weight_decay", 0.0)
        opt = FusedSaLSa(task.param_groups(model, wd), backend=BACKEND, **kwargs)
        return Built(opt, "fused", schedule=kwargs["schedule"])
    return build


def _decay_per_run(kappa: float):
    """Section 78's ``pretrain_nowd`` with :class:`DecayPerRun` on the tensors the zoo's groups decay (section 79)."""
    def build(task, model, total_steps) -> Built:
        built = REGISTRY["pretrain_nowd"](task, model, total_steps)
        decayed = [p for group in task.param_groups(model, WEIGHT_DECAY) if group.get("weight_decay", WEIGHT_DECAY) > 0
                   for p in group["params"]]
        built.decay = DecayPerRun(built.optimizer, decayed, kappa, total_steps)
        return built
    return build


def _relative_ceiling(relative: float, at_peak: bool = False):
    """The shipped preset (``pretrain_hold_decayfromhold``) with its applied step at most ``relative`` times the
    weights' scale at the start (:class:`RelativeCeiling`, section 84); with ``at_peak``, its whole schedule scaled
    so that its peak is (section 85)."""
    def build(task, model, total_steps) -> Built:
        built = REGISTRY["pretrain_hold_decayfromhold"](task, model, total_steps)
        built.ceiling = RelativeCeiling(built.optimizer, relative, at_peak)
        return built
    return build


def _trust_ratio(normalized: bool = False, ratios: bool = True):
    """The shipped preset (``pretrain_hold_decayfromhold``) with a group per tensor whose probe multiplier is its
    trust ratio (:class:`TrustRatio`, section 95); with ``normalized``, the matrices' ratios over their geometric
    mean; without ``ratios``, the groups alone (every multiplier 1)."""
    def build(task, model, total_steps) -> Built:
        kwargs = presets.preset_kwargs(presets.RECOMMENDED, total_steps)
        kwargs["schedule"] = replace(kwargs["schedule"], freeze_below=1 / 16, backoff_on_loss_rise=True,
                                     hold_scale_on_loss_rise=True, decay_from_hold=True)
        wd = kwargs.pop("weight_decay", 0.0)
        opt = FusedSaLSa(per_tensor_groups(task.param_groups(model, wd)), backend=BACKEND, **kwargs)
        built = Built(opt, "fused", schedule=kwargs["schedule"])
        if ratios:
            built.trust = TrustRatio(opt, normalized)
        return built
    return build


def warmup_cosine(step: int, total_steps: int, warmup: float = WARMUP_FRACTION, floor: float = 0.1) -> float:
    """Multiplier of the peak rate at 0-based step ``step``: linear warmup, cosine to ``floor``."""
    warm = max(1, int(round(warmup * total_steps)))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw(lr: float, warmup: float = WARMUP_FRACTION, weight_decay: float = WEIGHT_DECAY, betas=(0.9, 0.999)):
    def build(task, model, total_steps) -> Built:
        opt = torch.optim.AdamW(task.param_groups(model, weight_decay), lr=lr, betas=betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, total_steps, warmup))
        return Built(opt, "torch", scheduler=sched)
    return build


def _adamw_in_preset_shape(lr: float):
    """AdamW at peak rate ``lr`` in the ``pretrain`` preset's schedule shape: its WarmupStableDecay at
    peak 1 (linear warm-up over 20% of the run, linear decay to zero over the rest) as the rate's
    multiplier, 0-based step ``k`` at the schedule's step ``k + 1`` (NOTES.md section 43)."""
    def build(task, model, total_steps) -> Built:
        shape = replace(presets.preset_kwargs(presets.RECOMMENDED, total_steps)["schedule"], peak=1.0)
        opt = torch.optim.AdamW(task.param_groups(model, WEIGHT_DECAY), lr=lr, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: shape.scale(min(k + 1, total_steps)))
        return Built(opt, "torch", scheduler=sched)
    return build


#: AdamW named by its peak rate, ``<prefix><lr>``; the prefix picks the schedule.
RATE_NAMED: Dict[str, Callable[[float], Callable]] = {
    ADAMW_PREFIX: _adamw,  # the zoo's grid: 5% warm-up, cosine to 10%
    ADAMW_WD0_PREFIX: lambda lr: _adamw(lr, weight_decay=0.0),  # the same at no weight decay (section 78)
    ADAMW_B95_PREFIX: lambda lr: _adamw(lr, betas=(0.9, 0.95)),  # the same at beta2 0.95 (section 89)
    LONG_WARMUP_PREFIX: lambda lr: _adamw(lr, warmup=0.2),  # a check, not the grid
    PRESET_SHAPE_PREFIX: _adamw_in_preset_shape,  # section 43
}


def _rate_named(name: str) -> Optional[Callable]:
    """The builder a rate-named AdamW (``adamw_1e-3``, ``adamw20_3e-2``, ``wsdadamw_1e-2``) stands for;
    None for any other name. ValueError on a prefix whose rate is not a number."""
    for prefix, make in RATE_NAMED.items():
        if name.startswith(prefix):
            try:
                lr = float(name[len(prefix):])
            except ValueError:
                raise ValueError(f"bad name {name!r}: expected a rate after {prefix!r}, e.g. {prefix}1e-3") from None
            return make(lr)
    return None


def _hypergradient(inner: Callable, beta: float, start_fraction: float):
    """``inner`` (a ``fused`` build) with :class:`HypergradientMultiplier` learning a multiplier on its
    applied step from the step ``start_fraction`` of the run on (NOTES.md section 53)."""
    def build(task, model, total_steps) -> Built:
        built = inner(task, model, total_steps)
        start = max(1, round(start_fraction * total_steps))
        return replace(built, hyper=HypergradientMultiplier(built.optimizer, beta, start_step=start))
    return build


def _labpal(mode: str, **kwargs):
    """LABPAL at the paper's settings, its batch-size schedule over the run (t_max = its steps).
    (``results/zoo/validation_labpal_rule.jsonl`` ran on the torch backend, before the C++ kernels
    had the raw-gradient direction.)"""
    def build(task, model, total_steps) -> Built:
        return Built(LABPAL(model.parameters(), mode, t_max=total_steps, backend=BACKEND, **kwargs), "labpal")
    return build


def _beam(inner: Callable, **beam_kwargs):
    """The FusedSaLSa configuration ``inner`` builds, inside a :class:`StepSizeBeam` (NOTES.md section
    11); the model's buffers (BatchNorm's running statistics) are put back after every branch."""
    def build(task, model, total_steps) -> Built:
        built = inner(task, model, total_steps)
        beam = StepSizeBeam(built.optimizer, total_steps, buffers=list(model.buffers()), **beam_kwargs)
        return Built(built.optimizer, "beam", schedule=built.schedule, beam=beam)
    return build


LR_FACTOR_DECISIONS = 100  # seed 004: one decision per epoch, 100 epochs


def _constant_adamw(lr: float):
    """AdamW at a constant rate (the ``lr_factor`` family's base: the factor search is its schedule)."""
    def build(task, model, total_steps) -> Built:
        opt = torch.optim.AdamW(task.param_groups(model, WEIGHT_DECAY), lr=lr, betas=(0.9, 0.999))
        return Built(opt, "torch")
    return build


def _lr_factor(inner: Callable, decisions: int = LR_FACTOR_DECISIONS):
    """The optimizer ``inner`` builds (``torch`` family without scheduler, or ``fused``) inside an
    :class:`LRFactorSearch` deciding every ``total_steps / decisions`` steps."""
    def build(task, model, total_steps) -> Built:
        built = inner(task, model, total_steps)
        if built.family not in ("torch", "fused") or built.scheduler is not None:
            raise ValueError(f"lr_factor wraps a torch optimizer without scheduler or a FusedSaLSa, "
                             f"got family {built.family!r}")
        search = LRFactorSearch(built.optimizer, interval=max(1, total_steps // decisions))
        return Built(built.optimizer, "lr_factor", schedule=built.schedule, factor_search=search,
                     inner_family=built.family)
    return build


def _prodigy(task, model, total_steps) -> Built:
    from prodigyopt import Prodigy
    return Built(Prodigy(model.parameters()), "prodigy")


def _schedulefree(task, model, total_steps) -> Built:
    from schedulefree import AdamWScheduleFree
    return Built(AdamWScheduleFree(model.parameters()), "schedulefree")


def _prodigy_warmup(task, model, total_steps) -> Built:
    """Prodigy as its README documents with a schedule: ``safeguard_warmup=True``, a linear warmup
    over 5% of the run, cosine annealing to 0 (``T_max`` = the run)."""
    from prodigyopt import Prodigy
    opt = Prodigy(model.parameters(), lr=1.0, safeguard_warmup=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, total_steps, floor=0.0))
    return Built(opt, "prodigy", scheduler=sched)


def _schedulefree_warmup(task, model, total_steps) -> Built:
    """Schedule-free AdamW at its default rate with its documented ``warmup_steps`` (5% of the run)."""
    from schedulefree import AdamWScheduleFree
    warmup = max(1, int(round(WARMUP_FRACTION * total_steps)))
    return Built(AdamWScheduleFree(model.parameters(), warmup_steps=warmup), "schedulefree")


def _schedulefree_plus(warmup: bool):
    """ScheduleFree+ (:mod:`benchmarks.quality.schedulefree_plus`) at its reference implementation's
    defaults; with ``warmup``, a linear warm-up of its rate over 5% of the run (the zoo's warm-up, as for
    schedule-free AdamW) and the averaging held at the last iterate over the same steps (its
    ``c_warmup``, documented as 1x or 2x the warm-up)."""
    def build(task, model, total_steps) -> Built:
        steps = max(1, int(round(WARMUP_FRACTION * total_steps))) if warmup else 0
        return Built(ScheduleFreePlus(model.parameters(), warmup_steps=steps, c_warmup=steps), "schedulefree_plus")
    return build


def _prodigy_plus_schedulefree(task, model, total_steps) -> Built:
    """``prodigy-plus-schedule-free`` at its defaults (its README documents no warmup)."""
    from prodigyplus import ProdigyPlusScheduleFree
    return Built(ProdigyPlusScheduleFree(model.parameters()), "schedulefree")


def _mechanic_adam(s_init: float = 1e-8):
    """Mechanic (NOTES.md section 38) on Adam at base rate 1 with the grid's schedule (5% warmup, cosine
    to 10%), no weight decay in the base: Mechanic's own (0.01, scaled) stands in for it."""
    def build(task, model, total_steps) -> Built:
        base = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda k: warmup_cosine(k, total_steps))
        return Built(Mechanic(base, s_init=s_init), "mechanic", scheduler=sched)
    return build


def _published(task, model, total_steps) -> Built:
    from salsa.SaLSA import SaLSA
    return Built(SaLSA(model.parameters()), "salsa_pub")


@dataclass(frozen=True)
class ShapedDecay:
    """Screen schedule: linear warmup over ``warmup``, flat, then a ``shape`` cooldown ("linear",
    "cosine", "sqrt": 1 - sqrt(progress)) over the last ``decay`` fraction to ``final``, all times
    ``factor``; the search runs during the cooldown iff ``search_in_decay``."""

    total_steps: int
    warmup: float = 0.05
    decay: float = 0.5
    shape: str = "linear"
    factor: float = 1.0
    final: float = 0.0
    search_in_decay: bool = False

    SHAPES = ("linear", "cosine", "sqrt")

    def __post_init__(self):
        if self.shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}, got {self.shape!r}")

    def scale(self, step: int) -> float:
        n = self.total_steps
        warm = int(round(self.warmup * n))
        start = n - int(round(self.decay * n))
        if step <= warm:
            value = step / warm
        elif step <= start:
            value = 1.0
        else:
            x = min(1.0, (step - start) / max(1, n - start))
            y = {"linear": 1 - x, "cosine": 0.5 * (1 + math.cos(math.pi * x)), "sqrt": 1 - math.sqrt(x)}[self.shape]
            value = self.final + (1 - self.final) * y
        return self.factor * value

    def searches(self, step: int) -> bool:
        return self.search_in_decay or step <= self.total_steps - int(round(self.decay * self.total_steps))


@dataclass(frozen=True)
class LogLinearCooldown(WarmupStableDecay):
    """The ``pretrain`` preset's schedule with a log-linear cooldown: after ``D`` the scale falls
    geometrically from ``peak`` to ``peak * floor`` at ``total_steps``,
    ``peak * floor ** ((k - D) / (total_steps - D))``, the same number of steps per halving (quality
    NOTES section 32), where the preset's linear cooldown spends half of it above half the peak."""

    floor: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.floor, float) and 0.0 < self.floor < 1.0):
            raise ValueError(f"floor must be a float in (0, 1), got {self.floor!r}")

    def _shape(self, step: int) -> float:
        start = self.decay_start
        if step <= start:
            return super()._shape(step)
        return self.floor ** ((step - start) / (self.total_steps - start))


@dataclass(frozen=True)
class WarmupFromFloor(WarmupStableDecay):
    """The ``pretrain`` preset's schedule with a warm-up that starts at ``start`` of the peak instead of
    at 0: ``peak * (start + (1 - start) * k / W)`` for ``k <= W`` (quality NOTES section 52); the stable
    phase and the cooldown as the preset's. ``start = 0.5`` applies the searched level itself (1x) at
    the first step, as the defaults do, and climbs to the peak (2x) by the end of the warm-up."""

    start: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.start, float) and 0.0 < self.start < 1.0):
            raise ValueError(f"start must be a float in (0, 1), got {self.start!r}")

    def _shape(self, step: int) -> float:
        if 1 <= step <= self.warmup_steps:
            return self.start + (1.0 - self.start) * step / self.warmup_steps
        return super()._shape(step)


@dataclass(frozen=True)
class Knots:
    """Screen schedule: the multiplier on the searched level is piecewise linear through ``knots``
    (pairs of (fraction of the run, multiplier), fractions increasing from 0 to 1); the search
    runs while the fraction of the run is <= ``search_until``."""

    total_steps: int
    knots: tuple
    search_until: float

    def __post_init__(self):
        fractions = [f for f, _ in self.knots]
        if fractions[0] != 0.0 or fractions[-1] != 1.0 or fractions != sorted(fractions):
            raise ValueError(f"knot fractions must rise from 0 to 1, got {fractions}")

    def scale(self, step: int) -> float:
        x = min(1.0, step / self.total_steps)
        for (x0, y0), (x1, y1) in zip(self.knots, self.knots[1:]):
            if x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return self.knots[-1][1]

    def searches(self, step: int) -> bool:
        return step <= round(self.search_until * self.total_steps)


def _knots(*knots, search_until):
    return _fused(lambda n: _author(schedule=Knots(n, tuple(knots), search_until)))


def _author(**extra):
    return dict(beta3=0.99, search_direction="momentum", weight_decay=WEIGHT_DECAY, **extra)


def _wsd(total_steps):
    return WarmupStableDecay(total_steps, warmup=0.05, decay=0.2)


REGISTRY: Dict[str, Callable] = {
    # FusedSaLSa: the published configurations
    "salsa_faithful": _fused(lambda n: {}),
    "salsa_author": _preset("author_gpt"),
    # ablations (benchmarks/quality/NOTES.md)
    "salsa_c0.1": _fused(lambda n: dict(c=0.1)),
    "salsa_author_c0.1": _fused(lambda n: dict(c=0.1, beta3=0.99, search_direction="momentum",
                                               weight_decay=WEIGHT_DECAY)),
    "salsa_author_wsd": _fused(lambda n: dict(beta3=0.99, search_direction="momentum",
                                              weight_decay=WEIGHT_DECAY, schedule=_wsd(n))),
    "salsa_author_wsd30": _fused(lambda n: dict(beta3=0.99, search_direction="momentum",
                                                weight_decay=WEIGHT_DECAY,
                                                schedule=WarmupStableDecay(n, warmup=0.05, decay=0.3))),
    # the recommended preset before NOTES.md section 6
    "salsa_author_wsd50": _fused(lambda n: dict(beta3=0.99, search_direction="momentum",
                                                weight_decay=WEIGHT_DECAY,
                                                schedule=WarmupStableDecay(n, warmup=0.05, decay=0.5))),
    "salsa_author_linear": _fused(lambda n: dict(beta3=0.99, search_direction="momentum",
                                                 weight_decay=WEIGHT_DECAY,
                                                 schedule=WarmupStableDecay(n, warmup=0.05, decay=0.95))),
    "salsa_author_c0.3_wsd": _fused(lambda n: dict(c=0.3, beta3=0.99, search_direction="momentum",
                                                   weight_decay=WEIGHT_DECAY, schedule=_wsd(n))),
    # seed 001's rules at the paper's constants (no weight decay, as there): salsa_fused.adam_sls
    "adam_sls": _fused(lambda n: dict(search_rule="sls")),
    "alsals": _fused(lambda n: dict(search_rule="alsals")),
    # seed 003 (salsa_fused.labpal, a FusedSaLSa rule): the paper's 1000 updates per fit, and a refit every 100
    "labpal_nsgd": _labpal("NSGD"),
    "labpal_sgd": _labpal("SGD"),
    "labpal_nsgd_refit100": _labpal("NSGD", sgd_steps=100),
    "salsa_faithful_wsd": _fused(lambda n: dict(weight_decay=WEIGHT_DECAY, schedule=_wsd(n))),
    "edge1_mom": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                       search_rule=EdgeRule(sigma=1.0))),
    "edge2_grad": _fused(lambda n: dict(weight_decay=WEIGHT_DECAY, search_rule=EdgeRule(sigma=2.0))),
    "edge2_mom": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                       search_rule=EdgeRule(sigma=2.0))),
    "edge4_mom": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                       search_rule=EdgeRule(sigma=4.0))),
    "edge2_mom_wsd": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                           search_rule=EdgeRule(sigma=2.0), schedule=_wsd(n))),
    "edge4_mom_wsd": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                           search_rule=EdgeRule(sigma=4.0), schedule=_wsd(n))),
    "edge1_mom_wsd": _fused(lambda n: dict(search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                           search_rule=EdgeRule(sigma=1.0), schedule=_wsd(n))),
    "edge2_grad_wsd": _fused(lambda n: dict(weight_decay=WEIGHT_DECAY, search_rule=EdgeRule(sigma=2.0),
                                            schedule=_wsd(n))),
    # teacher-gap screen (NOTES.md section 4): x<f> = f times the searched level applied
    "wsd50_x1.5": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.5, factor=1.5))),
    "wsd50_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.5, factor=2.0))),
    "wsd50_c0.3": _fused(lambda n: _author(c=0.3, schedule=WarmupStableDecay(n, 0.05, 0.5))),
    "wsd40": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.4))),
    "wsd60": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.6))),
    "wsd50_to0.1": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5, final=0.1))),
    "wsd50_sqrt": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.5, shape="sqrt"))),
    "wsd70_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.7, factor=2.0))),
    "cos95_search": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, shape="cosine", final=0.1,
                                                                    search_in_decay=True))),
    "cos95_search_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, shape="cosine", final=0.1,
                                                                       factor=2.0, search_in_decay=True))),
    "wsd50_cos": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.5, shape="cosine"))),
    "wsd50_search": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.5, search_in_decay=True))),
    "lin95_search": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, search_in_decay=True))),
    "lin95_search_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, factor=2.0,
                                                                       search_in_decay=True))),
    "lin95_search_x1.5": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, factor=1.5,
                                                                         search_in_decay=True))),
    "lin95_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, factor=2.0))),
    "wsd70_x1.5": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.7, factor=1.5))),
    "wsd70": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.7))),
    "wsd85_x2": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.85, factor=2.0))),
    "lin95_x1.5": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.95, factor=1.5))),
    "wsd85_x1.5": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.85, factor=1.5))),
    "wsd70_x1.25": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.7, factor=1.25))),
    "wsd85_x1.25": _fused(lambda n: _author(schedule=ShapedDecay(n, decay=0.85, factor=1.25))),
    # long warm-up screen (NOTES.md section 6): the multiplier on the searched level rises over
    # the first 20-30% of the run (x1 at 5% for the "ramp" ones), then a linear cooldown to 0
    "ramp1.5_d70": _knots((0, 0), (0.05, 1), (0.25, 1.5), (0.3, 1.5), (1, 0), search_until=0.3),
    "ramp2_d70": _knots((0, 0), (0.05, 1), (0.25, 2), (0.3, 2), (1, 0), search_until=0.3),
    "w20_x1.5_d70": _knots((0, 0), (0.2, 1.5), (0.3, 1.5), (1, 0), search_until=0.3),
    "w20_x2_d70": _knots((0, 0), (0.2, 2), (0.3, 2), (1, 0), search_until=0.3),
    "w25_x1.5_tri": _knots((0, 0), (0.25, 1.5), (1, 0), search_until=0.25),
    "w20_x1_d50": _knots((0, 0), (0.2, 1), (0.5, 1), (1, 0), search_until=0.5),
    # the smoothed test's memory (NOTES.md section 7): the shipped preset with a shorter beta3
    "pretrain_beta3_0.99": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.2, 0.8, peak=2.0))),  # shipped
    # between sections 6 and 7
    "tri_beta3_0.9": _fused(lambda n: dict(beta3=0.9, search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                           schedule=WarmupStableDecay(n, 0.2, 0.8, peak=2.0))),
    # the configuration shipped as "pretrain" since section 7
    "tri_beta3_0.95": _fused(lambda n: dict(beta3=0.95, search_direction="momentum", weight_decay=WEIGHT_DECAY,
                                            schedule=WarmupStableDecay(n, 0.2, 0.8, peak=2.0))),
    # non-monotone acceptance screen (NOTES.md section 5): the then recommended preset (author + WSD 50%)
    # with the Armijo decrease measured from max(f0, EMA or window max of earlier searches' f0)
    "nm_ema0.9": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                          search_rule=NonMonotoneArmijo("ema", smoothing=0.9))),
    "nm_ema0.5": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                          search_rule=NonMonotoneArmijo("ema", smoothing=0.5))),
    "nm_max10": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                         search_rule=NonMonotoneArmijo("max", window=10))),
    "nm_max3": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                        search_rule=NonMonotoneArmijo("max", window=3))),
    # ... with h kept the plain smoothed decrease (the reference only in the current term)
    "nm_ema0.9_h": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                            search_rule=NonMonotoneArmijo("ema", 0.9, reference_in_average=False))),
    "nm_max10_h": _fused(lambda n: _author(schedule=WarmupStableDecay(n, 0.05, 0.5),
                                           search_rule=NonMonotoneArmijo("max", window=10,
                                                                         reference_in_average=False))),
    # the shipped `pretrain` preset (salsa_fused.presets.RECOMMENDED; not recommended yet). Since NOTES.md
    # section 22 its schedule freezes a collapsing level early (freeze_below=1/16): rows of this name and of
    # every beam_* on it (beam_cool_margin included) that name a commit before that adoption ran without the freeze;
    # pretrain_freeze16 / beam_cool_margin_freeze16 ran it. Since section 23 it also backs off when the
    # loss turns (backoff_on_loss_rise): rows before that adoption ran without it; pretrain_backoff /
    # beam_cool_margin_backoff ran it. Since section 25 it also holds the warm-up's scale at the first
    # back-off (hold_scale_on_loss_rise): rows before that adoption ran without it; pretrain_hold /
    # beam_cool_margin_hold ran it. Since section 73 the hold is also the cooldown's peak (decay_from_hold):
    # rows before that adoption ran without it; pretrain_hold_decayfromhold ran it and now builds the same
    # optimizer as these (pretrain_hold keeps section 25's). Section 27's rollback at the
    # freeze was adopted (227b68b) and reverted the same day; no committed row of these names ran with it.
    "salsa_recommended": _preset(presets.RECOMMENDED),
    # ... told no run length (total_steps=None): no schedule, the searched level throughout (NOTES 13)
    "salsa_recommended_nolength": _preset(presets.RECOMMENDED, length_known=False),
    # section 59: ... told no run length, the end learned 20% before it, then Cooldown by hand; and the preset
    # told a third of the run's length (two thirds run past its end) or three times it (stopped a third in)
    "pretrain_endlate20": _end_known_late(0.2),
    "pretrain_told_third": _preset(presets.RECOMMENDED, told=lambda n: max(3, round(n / 3))),
    "pretrain_told_triple": _preset(presets.RECOMMENDED, told=lambda n: 3 * n),
    # section 60: ... told no run length, its steps averaged schedule-free; with the momentum direction, and
    # with beta1 = 0 (the gradient direction, as schedule-free AdamW has no first moment)
    "nolength_sf": _nolength_averaged(),
    "nolength_sf_b0": _nolength_averaged(betas=(0.0, 0.999)),
    # section 61: ... with y's move matched to the searched step (lr = 1 / (1 - beta) = 10)
    "nolength_sf_ymatch": _nolength_averaged(y_matched=True),
    # section 62: ... its run untouched, the losses read at a power EMA of its weights (gamma 3, 7, 17)
    **{f"nolength_ema{gamma}": _nolength_ema(gamma) for gamma in (3, 7, 17)},
    # section 63: the preset told its length, its run untouched, the losses read at the power EMA (gamma 17)
    "pretrain_ema17": _nolength_ema(17, length_known=True),
    # the search's own constants around the shipped preset (NOTES.md section 9): the growth of eta
    # before each search, the always-search warm-up, searching every step of the search phase
    "rec_growth1.0": _preset(presets.RECOMMENDED, growth=1.0),
    "rec_growth1.05": _preset(presets.RECOMMENDED, growth=1.05),
    "rec_growth1.2": _preset(presets.RECOMMENDED, growth=1.2),
    "rec_always0": _preset(presets.RECOMMENDED, always_search_steps=0),
    "rec_always30": _preset(presets.RECOMMENDED, always_search_steps=30),
    "rec_every_step": _preset(presets.RECOMMENDED, adaptive_interval=False),
    # the beam of step-size factors (seed 004's ALR, NOTES.md section 11): halve/keep/double the applied
    # step at fractions of the run, each branch a horizon of H (a fraction of the run) steps
    "beam_pretrain": _beam(_preset(presets.RECOMMENDED), cooldown=0.0),
    "beam_pretrain_h0.06": _beam(_preset(presets.RECOMMENDED), horizon=0.06, cooldown=0.0),
    # each branch scored after a cooldown of C = H steps (against the short horizon's bias to small steps):
    # chosen on the development tasks (NOTES.md section 11), StepSizeBeam's defaults
    "beam_pretrain_cool": _beam(_preset(presets.RECOMMENDED), cooldown=1.0),
    # the last point at the end of the warm-up (20%, where the level is frozen) (NOTES.md section 15,
    # written before its run). The brackets of sections 14-16 (``extensions``, ``downward_extensions``)
    # and the floor of section 11 (``min_multiplier``) lost their ablations and left StepSizeBeam;
    # their rows name the commits that ran them.
    "beam_warmup_end": _beam(_preset(presets.RECOMMENDED), cooldown=1.0, points=(0.05, 0.1, 0.15, 0.2)),
    # a factor other than x1 is taken only if its score is more than 1% below x1's (the move margin):
    # on beam_pretrain_cool (NOTES.md section 16, written before its runs; chosen and validated there)
    "beam_cool_margin": _beam(_preset(presets.RECOMMENDED), cooldown=1.0, move_margin=0.01),
    # NOTES.md section 17's paired move test (``move_confidence``, registry beam_cool_paired1/2) did not
    # beat beam_cool_margin and left StepSizeBeam; its rows name commit cd72439, which ran them.
    # NOTES.md section 18's longer horizon for moves down (``down_horizon``, registry
    # beam_cool_margin_down3/2) was not better than beam_cool_margin by its rule and left StepSizeBeam;
    # its rows name commit a26ae4c (and e7a25c9, 2339622, 9acec88, whose package code is a26ae4c's).
    # NOTES.md section 19's moves down decided at 2x alone, without and with a floor of the Armijo
    # smoothing's span (``down_horizon``/``down_floor``, registry beam_cool_margin_downalone2 /
    # beam_cool_margin_downfloor2) were out on development seeds 2-3 and left again; rows name 7268428.
    # NOTES.md sections 20-21's floors on the frozen level (``level_floor`` at the freeze, registry
    # pretrain_floor16 / beam_cool_margin_floor16; and ``floor_while_searching``, *_floor16_searching)
    # were not adopted (a spike at the raise; up to 45 forwards per step) and left the package; their
    # code is in commit 2680d11 (rows name dad0aae, 8c540dd, 2fa2e89, f37fe33, 2680d11).
    # NOTES.md section 22 (written before its runs): the level frozen early, at 1/16 of the search's
    # peak fast average, once it falls below that; no later step searches
    "pretrain_freeze16": _early_freeze_preset(1 / 16),
    "beam_cool_margin_freeze16": _beam(_early_freeze_preset(1 / 16), cooldown=1.0, move_margin=0.01),
    # and, after its adoption, the preset and M1 without it: the controls of section 22's replication
    "pretrain_nofreeze": _early_freeze_preset(0.0),
    "beam_cool_margin_nofreeze": _beam(_early_freeze_preset(0.0), cooldown=1.0, move_margin=0.01),
    # NOTES.md section 23 (written before its runs): a range test on the search phase's own losses, the
    # applied step halved each time their smoothed value doubles from its lowest (backoff_on_loss_rise)
    "pretrain_backoff": _early_freeze_preset(1 / 16, backoff_on_loss_rise=True),
    "beam_cool_margin_backoff": _beam(_early_freeze_preset(1 / 16, backoff_on_loss_rise=True), cooldown=1.0,
                                      move_margin=0.01),
    # NOTES.md section 25 (written before its runs): at the first back-off the warm-up's scale stops rising
    # (hold_scale_on_loss_rise)
    "pretrain_hold": _early_freeze_preset(1 / 16, backoff_on_loss_rise=True, hold_scale_on_loss_rise=True),
    "beam_cool_margin_hold": _beam(_early_freeze_preset(1 / 16, backoff_on_loss_rise=True,
                                                        hold_scale_on_loss_rise=True), cooldown=1.0, move_margin=0.01),
    # NOTES.md section 73 (written before its runs): the hold also becomes the peak, so the cooldown decays
    # from the held scale at once (decay_from_hold)
    "pretrain_hold_decayfromhold": _early_freeze_preset(1 / 16, backoff_on_loss_rise=True,
                                                        hold_scale_on_loss_rise=True, decay_from_hold=True),
    # NOTES.md section 76: the opt-in beam (move_margin=0.01) on that preset, as StepSizeBeam on the shipped one
    "beam_cool_margin_decayfromhold": _beam(_early_freeze_preset(1 / 16, backoff_on_loss_rise=True,
                                                                 hold_scale_on_loss_rise=True, decay_from_hold=True),
                                            cooldown=1.0, move_margin=0.01),
    # NOTES.md section 78 (written before its runs): that preset with no weight decay on any group
    "pretrain_nowd": _early_freeze_preset(1 / 16, backoff_on_loss_rise=True, hold_scale_on_loss_rise=True,
                                          decay_from_hold=True, weight_decay=0.0),
    # NOTES.md section 84 (written before its runs): that preset with its applied step capped at 0.63 times the
    # geometric mean RMS of the weight matrices at the start (K chosen on development, in hindsight)
    "pretrain_relceil0.63": _relative_ceiling(0.63),
    # NOTES.md section 85 (written before its runs): the same constant, the whole schedule scaled so that its peak
    # stays under the ceiling (the multiple of the level min(2, C / level)), as section 84's hindsight scored it
    "pretrain_relpeak0.63": _relative_ceiling(0.63, at_peak=True),
    # NOTES.md section 86 (written before its runs): the same rule at larger constants, chosen among on development
    **{f"pretrain_relpeak{k}": _relative_ceiling(k, at_peak=True) for k in (1.0, 1.6)},
    # NOTES.md section 89 (written before its runs): that preset with Adam's beta2 at 0.95 or 0.99, not 0.999
    **{f"pretrain_beta2_{beta2}": _early_freeze_preset(1 / 16, backoff_on_loss_rise=True, hold_scale_on_loss_rise=True,
                                                       decay_from_hold=True, betas=(0.9, beta2))
       for beta2 in (0.95, 0.99)},
    # NOTES.md section 95 (written before its runs): that preset with LAMB's per-tensor trust ratios, as published
    # (matrices moved relative to their scale) and normalized (only the allocation between layers changes)
    "pretrain_trust": _trust_ratio(),
    "pretrain_trust_norm": _trust_ratio(normalized=True),
    # the same per-tensor groups at probe multiplier 1: the split alone, which should not change the preset
    "pretrain_pertensor": _trust_ratio(ratios=False),
    # NOTES.md section 79 (written before its runs): no decay from the optimizer; the zoo's decayed tensors shrink
    # by 1 - kappa s_t / T per step instead (DecayPerRun), kappa 1: the same over the run whatever the level
    "pretrain_decay_per_run": _decay_per_run(1.0),
    # NOTES.md section 30 (written before its runs): curvature targeting, the preset with its Armijo test
    # replaced by the edge rule aiming at sigma times the greedy step (sigma 1: greedy; 2: the edge).
    # Not eligible on development (geomean 1.266 / 1.348 of the preset); kept runnable for its rows.
    "pretrain_edge1": _preset(presets.RECOMMENDED, search_rule=EdgeRule(sigma=1.0)),
    "pretrain_edge2": _preset(presets.RECOMMENDED, search_rule=EdgeRule(sigma=2.0)),
    # NOTES.md section 32 (a development-only prototype, no rule): the preset with a log-linear cooldown to
    # 1/10 and 1/100 of its peak; not a candidate (the GRU loses 1.2-16x), kept runnable for its rows
    "pretrain_logcool0.1": _early_freeze_preset(1 / 16, True, True, cooldown_floor=0.1),
    "pretrain_logcool0.01": _early_freeze_preset(1 / 16, True, True, cooldown_floor=0.01),
    # NOTES.md sections 35-37: the preset searching on every step of its search phase (not eligible on
    # development: 1.20x forwards, the mid-size teacher 1.098x); kept runnable for its rows
    "pretrain_every": _early_freeze_preset(1 / 16, True, True, max_search_interval=1),
    # section 36: the same with searches at most 2 or 3 steps apart (not eligible either)
    "pretrain_every2": _early_freeze_preset(1 / 16, True, True, max_search_interval=2),
    "pretrain_every3": _early_freeze_preset(1 / 16, True, True, max_search_interval=3),
    # section 38 (a screen): the warm-up to 3x or 4x the searched level, the back-off and the hold as shipped
    "pretrain_peak3": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=3.0)),
    "pretrain_peak4": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=4.0)),
    # section 43 (an oracle bound, not a candidate): the preset at other fixed multiples of its searched level
    # (0.25x and 16x where 0.5x or 8x was a task-length's best)
    "pretrain_peak0.25": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=0.25)),
    "pretrain_peak0.5": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=0.5)),
    "pretrain_peak1": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=1.0)),
    "pretrain_peak8": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=8.0)),
    "pretrain_peak16": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=16.0)),
    # section 45: the warm-up shorter than the search phase (which stays 20%: a stable phase at the peak between)
    "pretrain_warm5": _early_freeze_preset(1 / 16, True, True, schedule=dict(warmup=0.05)),
    "pretrain_warm10": _early_freeze_preset(1 / 16, True, True, schedule=dict(warmup=0.1)),
    # section 52: the warm-up starting at 1/2 or 1/4 of its peak (the searched level at 1x or 0.5x) instead of 0
    "pretrain_wstart0.5": _early_freeze_preset(1 / 16, True, True, warmup_start=0.5),
    "pretrain_wstart0.25": _early_freeze_preset(1 / 16, True, True, warmup_start=0.25),
    # section 53: the preset with a multiplier on its applied step learned by hypergradient descent
    # (beta: the log-multiplier's rate per unit cosine), from the first step or from the end of the search phase
    "pretrain_hyper0.01": _hypergradient(_early_freeze_preset(1 / 16, True, True), 0.01, 0.0),
    "pretrain_hyper0.03": _hypergradient(_early_freeze_preset(1 / 16, True, True), 0.03, 0.0),
    "pretrain_hyper0.03_late": _hypergradient(_early_freeze_preset(1 / 16, True, True), 0.03, 0.2),
    # section 41 (a development screen): the Armijo test on the smoothed ratio (f0 - f1) / (eta q)
    "pretrain_ratio_test": _early_freeze_preset(1 / 16, True, True, search_rule=RatioArmijo()),
    # section 42: a first trial that doubles per search while the batch's own Armijo test passes, at the
    # preset's warm-up peak (2) and at 1.5 and 1 (a level that is not still climbing at the freeze may want less)
    "pretrain_climb": _early_freeze_preset(1 / 16, True, True, search_rule=ClimbingArmijo()),
    "pretrain_climb_peak1.5": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=1.5),
                                                   search_rule=ClimbingArmijo()),
    "pretrain_climb_peak1": _early_freeze_preset(1 / 16, True, True, schedule=dict(peak=1.0),
                                                 search_rule=ClimbingArmijo()),
    # section 37 (a development screen): the beam on section 35's every-step search phase
    "beam_every": _beam(_early_freeze_preset(1 / 16, True, True, max_search_interval=1), cooldown=1.0,
                        move_margin=0.01),
    # NOTES.md section 33's log-linear cooldown after a back-off (``hedge_cooldown_on_loss_rise``, registry
    # pretrain_hedge) was eligible on development and not adopted (mlp_tanh_deep at long 1.18x); it left the
    # package; its rows name commits 14a4317 / 82143c0, its code and tests 14a4317.
    # NOTES.md section 27's rollback at the freeze (``rollback_at_freeze``, registry pretrain_rollback) was
    # adopted by its rule, then reverted after a new user's held-out tasks (up to 21x worse) and left the
    # package; its rows name commits 0771179 / 0d25a14, its code 5c3e9ab and its tests 0771179.
    # NOTES.md section 26's Polyak ceiling after the search phase (``polyak_ceiling``, registry
    # pretrain_ceiling) was not adopted and left the package; its rows name commits c32557e / e4dfea7, its code.
    # NOTES.md section 24's watch after the search phase (``backoff_after_search``, registry pretrain_watch /
    # beam_cool_margin_watch) was not adopted and left the package; its rows name commit ea8ac60, its code.
    # seed 004's LR-factor search (Factor_3, a decision every 1% of the run): on AdamW at a constant
    # 1e-3 (PyTorch's default rate; no other schedule), and on the faithful FusedSaLSa defaults
    # (the factor multiplies the applied step, target "schedule")
    "lrf_adamw_1e-3": _lr_factor(_constant_adamw(1e-3)),
    "lrf_salsa_defaults": _lr_factor(_fused(lambda n: {})),
    # references
    "prodigy": _prodigy,
    "schedulefree": _schedulefree,
    # with their documented warmup (the zoo's references, ZOO.md)
    "prodigy_warmup": _prodigy_warmup,
    "schedulefree_warmup": _schedulefree_warmup,
    "prodigy_plus_sf": _prodigy_plus_schedulefree,
    "schedulefree_plus": _schedulefree_plus(False),
    "schedulefree_plus_warmup": _schedulefree_plus(True),
    "salsa_published": _published,
    # NOTES.md section 38: Mechanic's learned scale on Adam (a screen)
    "mechanic_adam": _mechanic_adam(),
    "mechanic_adam_s1e-3": _mechanic_adam(1e-3),
    "mechanic_adam_s1e-4": _mechanic_adam(1e-4),
    "mechanic_adam_s1e-2": _mechanic_adam(1e-2),
    "mechanic_adam_s1e-1": _mechanic_adam(1e-1),
}

DEFAULT_ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_SET = ("salsa_faithful", "salsa_author", "salsa_recommended", "prodigy", "schedulefree",
               "salsa_published")


def adamw_name(lr: float, prefix: str = ADAMW_PREFIX) -> str:
    return f"{prefix}{lr:.0e}".replace("e-0", "e-")


def build(name: str, task, model, total_steps: int) -> Built:
    rate_named = _rate_named(name)
    if rate_named is not None:
        return rate_named(task, model, total_steps)
    if name.startswith(SHAPE_PREFIX):
        return _shape(name)(task, model, total_steps)
    if name.startswith(joint.PREFIX):
        return _joint(name)(task, model, total_steps)
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(REGISTRY)} or adamw_<lr>")
    return REGISTRY[name](task, model, total_steps)


def _shape(name: str):
    """``shape_w0.2_x1.5_d0.7``: warm up linearly to ``x`` times the searched level over the first
    ``w`` of the run, flat, then a linear cooldown to ``f`` (default 0) times it over the last ``d``;
    the search is frozen during the cooldown: ``WarmupStableDecay(n, w, d, f, peak=x)``, with the
    author's settings and ``beta3`` = ``b`` (default the author's 0.99). (The section 6 screen ran
    these names through the equivalent ``Knots`` form; the two agree to rounding,
    ``tests/benchmarks/test_quality_smoke.py``.)"""
    fields = {}
    try:
        for part in name[len(SHAPE_PREFIX):].split("_"):
            if part[0] in fields:
                raise ValueError(part)
            fields[part[0]] = float(part[1:])
        warmup, factor, decay = fields.pop("w"), fields.pop("x"), fields.pop("d")
        final, beta3 = fields.pop("f", 0.0), fields.pop("b", 0.99)
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"bad shape name {name!r}: expected e.g. shape_w0.2_x1.5_d0.7") from None
    if fields:
        raise ValueError(f"bad shape name {name!r}: unknown fields {sorted(fields)} (w, x, d, f, b)")
    if not (0 < warmup and 0 < decay and warmup + decay <= 1):
        raise ValueError(f"bad shape name {name!r}: need 0 < w, 0 < d, w + d <= 1")
    if not 0 <= beta3 < 1:
        raise ValueError(f"bad shape name {name!r}: need 0 <= b < 1")
    return _fused(lambda n: {**_author(schedule=WarmupStableDecay(n, warmup, decay, final, peak=factor)),
                             "beta3": beta3})


def _joint(name: str):
    """``joint_b.._c.._g.._p.._w.._d.._i..``: the preset at a point of section 39's joint search
    (:mod:`benchmarks.quality.joint`)."""
    schedule, search = joint.overrides(joint.parse(name))
    return _early_freeze_preset(COLLAPSE_FRACTION, True, True, schedule=schedule, **search)


def known(names: List[str]) -> None:
    for name in names:
        if name.startswith(SHAPE_PREFIX):
            _shape(name)  # raises on a malformed name before any run starts
        elif name.startswith(joint.PREFIX):
            joint.parse(name)
        elif name not in REGISTRY and _rate_named(name) is None:  # a malformed rate raises here too
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(REGISTRY)} or adamw_<lr>")
