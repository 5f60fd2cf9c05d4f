"""The table the generic optimizer tests run over (in the spirit of PyTorch's ``OptimizerInfo``).

- ``BACKENDS``: one line per backend (adding a backend adds a line here);
- ``CONFIGS``: FusedSaLSa configurations, each with an id;
- ``TOLERANCES``: how closely another backend must follow the torch reference, per backend and
  weight dtype (every entry carries its reason); ``PARITY_TOLERANCES``: how closely it follows
  salsa-optimizer 0.1.0 over a long fp32 run;
- ``ERROR_INPUTS``: constructor arguments that must raise, and the message they raise with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from salsa_fused import backends
from salsa_fused.step_size import WarmupStableDecay


@dataclass(frozen=True)
class BackendInfo:
    name: str
    usable: Callable[[], bool]  # can it run in this process (on the CPU, or CUDA when present)?


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BACKENDS = [
    BackendInfo("torch", lambda: True),
    BackendInfo("triton", lambda: backends.usable("triton", _device())),
    BackendInfo("cpp", lambda: backends.usable("cpp", _device())),
    BackendInfo("cuda", lambda: torch.cuda.is_available() and backends.usable("cuda", _device())),
]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str


_BF16 = Tolerance(1.6e-2, 1e-5, "one bf16 rounding of the written weight: 2 ulps at 8 bits")

TOLERANCES = {
    "triton": {
        torch.float32: Tolerance(1e-5, 1e-6, "kernels fuse the same fp32 ops in another order (a few ulps "
                                             "per step, tests/backends/test_triton_backend.py)"),
        torch.bfloat16: _BF16,
    },
    "cpp": {
        torch.float32: Tolerance(1e-5, 1e-6, "the kernels' sqrt is IEEE; torch's CPU sqrt is 1 ulp off "
                                             "on ~17% of elements: 1 ulp of the preconditioner per step "
                                             "(bitwise otherwise: tests/backends/test_cpp_backend.py)"),
        torch.bfloat16: _BF16,
    },
    "cuda": {
        torch.float32: Tolerance(1e-5, 1e-6, "torch's CUDA reference divides by a host scalar through its "
                                             "reciprocal: an ulp or two at the operands' scale per step "
                                             "(measured on an H200, tests/backends/test_cpp_backend.py)"),
        torch.bfloat16: _BF16,
    },
}

#: Runs of 100-200 steps against salsa-optimizer 0.1.0 (tests/test_reference_parity.py): decisions
#: and step sizes must be identical; weights (and losses, with atol 1e-7) within this.
PARITY_TOLERANCES = {
    "cpp": Tolerance(1e-4, 2e-5, "per step the kernels' IEEE sqrt differs from torch's by 1 ulp of the "
                                 "preconditioner on ~20% of elements; over 100 steps training compounds it: "
                                 "measured at most 8.3e-6 on a weight and 1.8e-6 on a loss (AVX2 machine), "
                                 "1.1e-5 on a weight (AVX-512 machine), every decision identical"),
    # the one run whose compounding depends on the CPU: 100 steps of the conv net along momentum
    "cpp_conv_momentum": Tolerance(1e-3, 1e-4, "as 'cpp', but this run compounds the 1-ulp differences "
                                               "further, by an amount that depends on the CPU torch runs on: "
                                               "at most 8.3e-6 on a weight and 1.8e-6 on a loss on an AVX2 "
                                               "machine, 5.2e-5 on a weight and 1.3e-4 relative on a loss on "
                                               "an Intel AVX-512 one, 6.1e-5 and 6.0e-4 on an AMD EPYC "
                                               "AVX-512 one (at ccbdfd1 too); every decision identical on all"),
}


@dataclass(frozen=True)
class Config:
    id: str
    kwargs: dict


CONFIGS = [
    Config("default", {}),
    Config("momentum_wd_inplace", dict(search_direction="momentum", weight_decay=0.1, restore="inplace")),
    Config("schedule", dict(weight_decay=0.1, init_step_size=0.1,
                            schedule=WarmupStableDecay(8, warmup=0.25, decay=0.5))),
    Config("every_step", dict(adaptive_interval=False, growth=1.5, backtrack=0.5, max_trials=4)),
]


ERROR_INPUTS = [
    (dict(init_step_size=0.0), ValueError, "init_step_size must be a finite number > 0"),
    (dict(search_direction="sideways"), ValueError, "search_direction must be one of"),
    (dict(restore="maybe"), ValueError, "restore must be one of"),
    (dict(backend="fpga"), ValueError, "backend must be one of"),
    (dict(search_rule="greedy"), ValueError, "search_rule must be one of"),
    (dict(search_rule=3), TypeError, "search_rule must be a rule name"),
    (dict(schedule=object()), TypeError, "schedule must have scale"),
    (dict(c=1.0), ValueError, "c must lie in"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas\\[1\\] must lie in"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0"),
    (dict(weight_decay=float("nan")), ValueError, "weight_decay must be a finite number >= 0"),
]
