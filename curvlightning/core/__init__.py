"""Pure PyTorch curvature: functional views, products, estimators, collectives.

Nothing here imports Lightning; a user without Lightning can call it directly.
"""

from curvlightning.core.distributed import (
    Reducer,
    SingleProcess,
    TorchDistributed,
    default_reducer,
)
from curvlightning.core.estimators import (
    Estimate,
    hutchinson_diagonal,
    hutchinson_trace,
    reduce_estimate,
)
from curvlightning.core.fisher import FISHER_KINDS, fisher_diagonal
from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from curvlightning.core.operators import (
    HVP_BACKENDS,
    HessianOperator,
    per_sample_gradients,
    segments,
)
from curvlightning.core.probes import ProbeSource, mix_seed

__all__ = [
    "FISHER_KINDS",
    "HVP_BACKENDS",
    "LIKELIHOODS",
    "Estimate",
    "FunctionalModel",
    "HessianOperator",
    "Likelihood",
    "ProbeSource",
    "Reducer",
    "SingleProcess",
    "TorchDistributed",
    "default_reducer",
    "fisher_diagonal",
    "flatten",
    "get_likelihood",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "mix_seed",
    "per_sample_gradients",
    "reduce_estimate",
    "segments",
    "unflatten",
]
