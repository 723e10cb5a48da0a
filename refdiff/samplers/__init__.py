"""Samplers: one module per family, each step in paper form and in the shared coefficient form (see ``base``);
``sampler(name)`` looks one up by its k-diffusion / ComfyUI name (``registry``)."""

from .ancestral import DPM2Ancestral, DPMSolverPP2SAncestral
from .base import Affine, Grid, Level, Sampler, State, StepCoeffs, apply, model_coeffs, step_coeffs
from .cfgpp import DPMSolverPP2MCFGpp, EulerCFGpp
from .consistency import LCM, TCD, CMMultistep, TargetLevel, boundary_scalings
from .ddim import DDIM, DDPM
from .dpm_adaptive import AdaptiveResult, StepLimitError, dpm_adaptive
from .dpm_sde import DPMSolverPP2MSDE, DPMSolverPP3MSDE
from .dpm_solver import (DEIS, DPMFast, DPMSolver, DPMSolverPP, DPMSolverPP3S, DPMSolverPPSinglestep, SDEDPMSolverPP2M,
                         dpm_fast_orders, dpm_fast_sigmas)
from .er_sde import ERSDE
from .exponential import SEEDS, RESMultistep
from .flow import FlowEuler, FlowEulerAncestral, FlowHeun, FlowStochastic
from .karras import DPM2, LMS, Churn, DPMSolverPPSDE, Euler, EulerAncestral, GradientEstimation, Heun, HeunPP2
from .pndm import IPNDM, PNDM
from .reference import RK4, pf_ode_solve, pf_velocity
from .registry import SAMPLER_NAMES, sampler
from .sa_solver import SASolver, sa_tau_interval
from .sde import PredictorCorrector, ReverseEulerMaruyama
from .unipc import UniPC

__all__ = ["Affine", "Grid", "Level", "Sampler", "State", "StepCoeffs", "apply", "model_coeffs", "step_coeffs",
           "SAMPLER_NAMES", "sampler",
           "DDIM", "DDPM", "DEIS", "DPMSolver", "DPMSolverPP", "DPMSolverPP3S", "DPMSolverPPSinglestep", "DPMSolverPPSDE",
           "SDEDPMSolverPP2M", "DPM2", "LMS", "Churn", "Euler", "EulerAncestral", "Heun", "RK4", "pf_ode_solve",
           "pf_velocity", "PredictorCorrector", "ReverseEulerMaruyama", "UniPC",
           "DPM2Ancestral", "DPMSolverPP2SAncestral", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPMFast",
           "dpm_fast_orders", "dpm_fast_sigmas", "dpm_adaptive", "AdaptiveResult", "StepLimitError",
           "EulerCFGpp", "DPMSolverPP2MCFGpp", "RESMultistep", "SEEDS", "ERSDE", "SASolver", "sa_tau_interval",
           "GradientEstimation", "HeunPP2", "PNDM", "IPNDM", "FlowEuler", "FlowEulerAncestral", "FlowHeun", "FlowStochastic",
           "CMMultistep", "LCM", "TCD", "TargetLevel", "boundary_scalings"]
