"""Samplers by name: ComfyUI's / k-diffusion's sampler names (``KSAMPLER_NAMES``) and the other families refdiff
implements, each mapped to the refdiff sampler with the settings those libraries run by default.

``sampler("dpmpp_2m_sde")`` returns ``DPMSolverPP2MSDE(eta=1, solver_type="midpoint")``; keyword arguments override
the defaults (``sampler("dpmpp_2m_sde", eta=0.5)``). ``dpm_fast`` needs ``nfe``; ``dpm_adaptive`` is a function that
owns its loop (``refdiff.samplers.dpm_adaptive``), not a sampler on a grid. The ``_gpu`` variants of ComfyUI differ
only in where the Brownian noise is drawn and map to the same sampler.
"""

from __future__ import annotations

import difflib

from .ancestral import DPM2Ancestral, DPMSolverPP2SAncestral
from .cfgpp import DPMSolverPP2MCFGpp, EulerCFGpp
from .consistency import LCM, TCD, CMMultistep
from .ddim import DDIM, DDPM
from .dpm_sde import DPMSolverPP2MSDE, DPMSolverPP3MSDE
from .dpm_solver import DEIS, DPMFast, DPMSolver, DPMSolverPP, DPMSolverPPSinglestep, SDEDPMSolverPP2M
from .er_sde import ERSDE
from .exponential import SEEDS, RESMultistep
from .flow import FlowEuler, FlowHeun, FlowStochastic
from .karras import DPM2, LMS, DPMSolverPPSDE, Euler, EulerAncestral, GradientEstimation, Heun, HeunPP2
from .pndm import IPNDM, PNDM
from .reference import RK4
from .sa_solver import SASolver
from .sde import PredictorCorrector, ReverseEulerMaruyama
from .unipc import UniPC

__all__ = ["SAMPLER_NAMES", "sampler"]


def _with(cls, **defaults):
    def make(**kw):
        return cls(**{**defaults, **kw})
    make.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in defaults.items())})"
    return make


def _needs_nfe(**kw):
    if "nfe" not in kw:
        raise ValueError("dpm_fast chooses its steps from the evaluation budget: pass nfe=, and run it on "
                         "Grid.from_sigmas(dpm_fast_sigmas(nfe, sigma_min, sigma_max))")
    return DPMFast(**kw)


def _adaptive(**kw):
    raise ValueError("dpm_adaptive chooses its own steps from the sample, so it is not a sampler on a grid: call "
                     "refdiff.samplers.dpm_adaptive(model, x, sigma_max, sigma_min, ...)")


SAMPLER_NAMES = {
    # k-diffusion / ComfyUI KSAMPLER_NAMES
    "euler": _with(Euler),
    "euler_cfg_pp": _with(EulerCFGpp),
    "euler_ancestral": _with(EulerAncestral),
    "euler_ancestral_cfg_pp": _with(EulerCFGpp, eta=1.0),
    "heun": _with(Heun),
    "heunpp2": _with(HeunPP2),
    "dpm_2": _with(DPM2),
    "dpm_2_ancestral": _with(DPM2Ancestral),
    "lms": _with(LMS, order=4),
    "dpm_fast": _needs_nfe,
    "dpm_adaptive": _adaptive,
    "dpmpp_2s_ancestral": _with(DPMSolverPP2SAncestral),
    "dpmpp_sde": _with(DPMSolverPPSDE),
    "dpmpp_sde_gpu": _with(DPMSolverPPSDE),
    "dpmpp_2m": _with(DPMSolverPP, order=2),
    "dpmpp_2m_cfg_pp": _with(DPMSolverPP2MCFGpp),
    "dpmpp_2m_sde": _with(DPMSolverPP2MSDE),
    "dpmpp_2m_sde_gpu": _with(DPMSolverPP2MSDE),
    "dpmpp_2m_sde_heun": _with(DPMSolverPP2MSDE, solver_type="heun"),
    "dpmpp_2m_sde_heun_gpu": _with(DPMSolverPP2MSDE, solver_type="heun"),
    "dpmpp_3m_sde": _with(DPMSolverPP3MSDE),
    "dpmpp_3m_sde_gpu": _with(DPMSolverPP3MSDE),
    "ddpm": _with(DDPM),
    # LCM's boundary condition c_skip x + c_out F applied by the sampler (diffusers LCMScheduler); ComfyUI applies
    # it inside the model: pass boundary="none" for a model whose output already is the consistency function
    "lcm": _with(LCM),
    "ipndm": _with(IPNDM),
    "ipndm_v": _with(IPNDM, variable=True),
    "res_multistep": _with(RESMultistep),
    "res_multistep_cfg_pp": _with(RESMultistep, cfg_pp=True),
    "res_multistep_ancestral": _with(RESMultistep, eta=1.0),
    "res_multistep_ancestral_cfg_pp": _with(RESMultistep, eta=1.0, cfg_pp=True),
    "gradient_estimation": _with(GradientEstimation),
    "gradient_estimation_cfg_pp": _with(GradientEstimation, cfg_pp=True),
    "er_sde": _with(ERSDE),
    "seeds_2": _with(SEEDS, stages=2),
    "seeds_3": _with(SEEDS, stages=3),
    # ComfyUI's tau is eta = 1 between the model's 20% and 80% sigmas (sa_tau_interval): model-specific, so a
    # constant tau = 1 here; pass tau=sa_tau_interval(hi, lo) for ComfyUI's window
    "sa_solver": _with(SASolver, predictor_order=3, corrector_order=4, tau=1.0),
    "sa_solver_pece": _with(SASolver, predictor_order=3, corrector_order=4, tau=1.0, pece=True),
    "ddim": _with(DDIM),
    # the other families (ComfyUI's uni_pc / uni_pc_bh2 are UniPC-3 and its deis the time-AB DEIS: not these)
    "deis_logrho": _with(DEIS),
    "unipc_bh1": _with(UniPC, order=2, variant="bh1"),
    "unipc_bh2": _with(UniPC, order=2, variant="bh2"),
    "dpm_solver": _with(DPMSolver, order=3),
    "dpmpp_2s": _with(DPMSolverPPSinglestep),
    "sde_dpmpp_2m": _with(SDEDPMSolverPP2M),
    "plms": _with(PNDM, variant="plms"),
    "pndm": _with(PNDM, variant="prk"),
    "flow_euler": _with(FlowEuler),
    "flow_heun": _with(FlowHeun),
    "flow_stochastic": _with(FlowStochastic),
    "cm": _with(CMMultistep),
    "scm": _with(CMMultistep, boundary="trigflow"),
    "tcd": _with(TCD),
    "rk4": _with(RK4),
    "euler_maruyama": _with(ReverseEulerMaruyama),
    "predictor_corrector": _with(PredictorCorrector),
}


def sampler(name: str, **kw):
    """The sampler registered as ``name`` (see ``SAMPLER_NAMES``), keyword arguments overriding its defaults."""
    if name not in SAMPLER_NAMES:
        close = difflib.get_close_matches(str(name), list(SAMPLER_NAMES), n=1)
        raise ValueError(f"unknown sampler {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; known: "
                         f"{sorted(SAMPLER_NAMES)}")
    return SAMPLER_NAMES[name](**kw)
