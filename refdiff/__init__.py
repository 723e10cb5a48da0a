"""refdiff: the numerical ground truth for diffusion models.

A float64 NumPy/SciPy reference of diffusion mathematics (schedules, forward process, parametrizations,
training objectives and the variational bound, SDEs and PF-ODE likelihood, samplers in paper and coefficient
form, guidance, editing, distillation targets, oracles with exact scores, Triton-compatible RNG, conventions).
Imports numpy and scipy only.
"""

from . import (conventions, distill, editing, forward, grids, guidance, likelihood, losses, oracles, parametrization,
               rng, samplers, schedules, sde, solve, vlb)
from .forward import posterior, q_sample, transition
from .oracles import FiniteAtoms, GaussianData, GaussianMixture
from .parametrization import convert, edm_precond, from_x0_eps, to_x0_eps
from .likelihood import pf_ode_log_likelihood
from .losses import implied_weighting, loss_weight, training_loss
from .rng import philox_normal, philox_uniform
from .samplers import (DDIM, DDPM, DPM2, RK4, DPMSolver, DPMSolverPP, Euler, EulerAncestral, Grid, Heun,
                       PredictorCorrector, ReverseEulerMaruyama, SDEDPMSolverPP2M, StepCoeffs, UniPC, apply,
                       step_coeffs)
from .solve import sample
from .sde import VESDE, VPSDE, ScheduleSDE, SubVPSDE
from .vlb import bits_per_dim, ddpm_vlb_terms, discretized_gaussian_log_likelihood, normal_kl
from .schedules import (EDM, VE, Cosine, DiscreteSchedule, LinearLogSNR, RectifiedFlow, Sigmoid, VPLinear,
                        cosine_betas, karras_sigmas, linear_betas, rescale_zero_terminal_snr, scaled_linear_betas,
                        timesteps)

__version__ = "0.1.0"

__all__ = [
    "distill", "editing", "guidance", "samplers", "solve", "sample",
    "DDIM", "DDPM", "DPM2", "RK4", "DPMSolver", "DPMSolverPP", "Euler", "EulerAncestral", "Grid", "Heun",
    "PredictorCorrector", "ReverseEulerMaruyama", "SDEDPMSolverPP2M", "StepCoeffs", "UniPC", "apply", "step_coeffs",
    "conventions", "forward", "grids", "likelihood", "losses", "oracles", "parametrization", "rng", "schedules", "sde", "vlb",
    "pf_ode_log_likelihood", "implied_weighting", "loss_weight", "training_loss",
    "VESDE", "VPSDE", "ScheduleSDE", "SubVPSDE",
    "bits_per_dim", "ddpm_vlb_terms", "discretized_gaussian_log_likelihood", "normal_kl", "LinearLogSNR",
    "posterior", "q_sample", "transition",
    "FiniteAtoms", "GaussianData", "GaussianMixture",
    "convert", "edm_precond", "from_x0_eps", "to_x0_eps",
    "philox_normal", "philox_uniform",
    "EDM", "VE", "Cosine", "DiscreteSchedule", "RectifiedFlow", "Sigmoid", "VPLinear", "cosine_betas",
    "karras_sigmas", "linear_betas", "rescale_zero_terminal_snr", "scaled_linear_betas", "timesteps",
    "__version__",
]
