"""salsa_fused: SaLSa line-search Adam on fused multi-tensor kernels.

``from salsa_fused import FusedSaLSa``, then ``loss = opt.step(closure)`` where
``closure()`` runs the forward pass and returns the loss.
"""

from .beam import StepSizeBeam
from .errors import ClosureFailedOnAnotherRank, NonFiniteError, NonFiniteOnEveryRank
from .labpal import LABPAL
from .line_search import SearchConfig, SearchState
from .lr_factor import LRFactorSearch
from .optimizer import FusedSaLSa

__all__ = ["ClosureFailedOnAnotherRank", "FusedSaLSa", "LABPAL", "LRFactorSearch", "NonFiniteError",
           "NonFiniteOnEveryRank", "SearchConfig", "SearchState", "StepSizeBeam"]
__version__ = "0.1.0"

#: Submodules imported on first access (``salsa_fused.presets`` after ``import salsa_fused``), as
#: the ones the names above pull in are: the integrations import their frameworks only then.
_SUBMODULES = ("adam_sls", "applied", "backends", "beam", "buckets", "checkpoint", "closures", "diagnostics",
               "distributed", "errors", "functional", "integrations", "labpal", "line_search", "lr_factor",
               "optimizer", "presets", "rules", "step_size", "validation")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
