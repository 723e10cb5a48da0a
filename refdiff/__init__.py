"""refdiff: the numerical ground truth for diffusion models.

A float64 NumPy/SciPy reference of diffusion mathematics (schedules, forward process, parametrizations,
oracles with exact scores, Triton-compatible RNG, conventions). Imports numpy and scipy only.
"""

from . import conventions, forward, oracles, parametrization, rng, schedules
from .forward import posterior, q_sample, transition
from .oracles import FiniteAtoms, GaussianData, GaussianMixture
from .parametrization import convert, edm_precond, from_x0_eps, to_x0_eps
from .rng import philox_normal, philox_uniform
from .schedules import (EDM, VE, Cosine, DiscreteSchedule, RectifiedFlow, Sigmoid, VPLinear, cosine_betas,
                        karras_sigmas, linear_betas, rescale_zero_terminal_snr, scaled_linear_betas, timesteps)

__version__ = "0.1.0"

__all__ = [
    "conventions", "forward", "oracles", "parametrization", "rng", "schedules",
    "posterior", "q_sample", "transition",
    "FiniteAtoms", "GaussianData", "GaussianMixture",
    "convert", "edm_precond", "from_x0_eps", "to_x0_eps",
    "philox_normal", "philox_uniform",
    "EDM", "VE", "Cosine", "DiscreteSchedule", "RectifiedFlow", "Sigmoid", "VPLinear", "cosine_betas",
    "karras_sigmas", "linear_betas", "rescale_zero_terminal_snr", "scaled_linear_betas", "timesteps",
    "__version__",
]
