"""salsa_fused: SaLSa line-search Adam on fused multi-tensor kernels.

``from salsa_fused import FusedSaLSa``, then ``loss = opt.step(closure)`` where
``closure()`` runs the forward pass and returns the loss.
"""

from .beam import StepSizeBeam
from .errors import NonFiniteError
from .labpal import LABPAL
from .line_search import SearchConfig, SearchState
from .lr_factor import LRFactorSearch
from .optimizer import FusedSaLSa

__all__ = ["FusedSaLSa", "LABPAL", "LRFactorSearch", "NonFiniteError", "SearchConfig", "SearchState",
           "StepSizeBeam"]
__version__ = "0.1.0"
