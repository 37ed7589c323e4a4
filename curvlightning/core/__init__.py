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
from curvlightning.core.fisher import FISHER_KINDS, FISHER_METHODS, fisher_diagonal
from curvlightning.core.functional import FunctionalModel, flatten, unflatten
from curvlightning.core.ggn import GGNOperator, ggn_trace_output_sampling
from curvlightning.core.gradients import (
    NoiseScaleEMA,
    gradient_snr,
    noise_scale_across_ranks,
    noise_scale_from_gradients,
    per_sample_gradients_chunked,
)
from curvlightning.core.hutchpp import hutchpp_trace
from curvlightning.core.jacobian import (
    class_sensitivity,
    jacobian_frobenius_estimate,
    jacobian_row_norms,
    jacobian_rows,
)
from curvlightning.core.lanczos import lanczos, spectral_density, top_eigenvalues
from curvlightning.core.likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from curvlightning.core.newton import (
    conjugate_gradient,
    newton_direction,
    quadratic_model_change,
)
from curvlightning.core.operators import (
    HVP_BACKENDS,
    HessianOperator,
    per_sample_gradients,
    segments,
)
from curvlightning.core.probes import ProbeSource, mix_seed
from curvlightning.core.products import (
    BATCHED_HVP_BACKENDS,
    BatchedHessianOperator,
    FiniteDifferenceHessianOperator,
    curvature_sdpa,
    finite_difference_hvp,
    hessian_operator,
)
from curvlightning.core.quadform import SequentialQuadraticForm, quadratic_form_trace
from curvlightning.core.sumsq import (
    fisher_sumsq,
    gradient_power_sums,
    sum_of_squared_gradients,
)

__all__ = [
    "SequentialQuadraticForm",
    "quadratic_form_trace",
    "BATCHED_HVP_BACKENDS",
    "BatchedHessianOperator",
    "FiniteDifferenceHessianOperator",
    "GGNOperator",
    "curvature_sdpa",
    "finite_difference_hvp",
    "ggn_trace_output_sampling",
    "hessian_operator",
    "FISHER_KINDS",
    "FISHER_METHODS",
    "HVP_BACKENDS",
    "LIKELIHOODS",
    "Estimate",
    "FunctionalModel",
    "HessianOperator",
    "Likelihood",
    "NoiseScaleEMA",
    "ProbeSource",
    "Reducer",
    "SingleProcess",
    "TorchDistributed",
    "class_sensitivity",
    "conjugate_gradient",
    "default_reducer",
    "fisher_diagonal",
    "fisher_sumsq",
    "flatten",
    "get_likelihood",
    "gradient_power_sums",
    "gradient_snr",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "jacobian_frobenius_estimate",
    "jacobian_row_norms",
    "jacobian_rows",
    "lanczos",
    "mix_seed",
    "newton_direction",
    "noise_scale_across_ranks",
    "noise_scale_from_gradients",
    "per_sample_gradients",
    "per_sample_gradients_chunked",
    "quadratic_model_change",
    "reduce_estimate",
    "segments",
    "spectral_density",
    "sum_of_squared_gradients",
    "top_eigenvalues",
    "unflatten",
]
