"""Samplers: one module per family, each step in paper form and in the shared coefficient form (see ``base``)."""

from .base import Affine, Grid, Level, Sampler, State, StepCoeffs, apply, model_coeffs, step_coeffs
from .ddim import DDIM, DDPM
from .dpm_solver import DEIS, DPMSolver, DPMSolverPP, DPMSolverPPSinglestep, SDEDPMSolverPP2M
from .karras import DPM2, LMS, Churn, DPMSolverPPSDE, Euler, EulerAncestral, Heun
from .reference import RK4, pf_ode_solve, pf_velocity
from .sde import PredictorCorrector, ReverseEulerMaruyama
from .unipc import UniPC

__all__ = ["Affine", "Grid", "Level", "Sampler", "State", "StepCoeffs", "apply", "model_coeffs", "step_coeffs",
           "DDIM", "DDPM", "DEIS", "DPMSolver", "DPMSolverPP", "DPMSolverPPSinglestep", "DPMSolverPPSDE",
           "SDEDPMSolverPP2M", "DPM2", "LMS", "Churn", "Euler", "EulerAncestral", "Heun", "RK4", "pf_ode_solve",
           "pf_velocity", "PredictorCorrector", "ReverseEulerMaruyama", "UniPC"]
