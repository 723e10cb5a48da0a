"""CFG++ samplers (Chung et al. 2024, "CFG++: manifold-constrained classifier-free guidance"; ComfyUI
``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2m_cfg_pp``).

CFG++ takes the data prediction from the guided output D_g = D(m_u + w (m_c - m_u)) but re-noises along the
unconditional noise: after DDIM's x0 = D_g, the step moves with eps_u = (x - alpha D_u) / sigma (Alg. 1):

    x' = alpha' D_g + sigma' eps_u.

Without guidance D_u = D_g and these are DDIM, Euler ancestral and DPM-Solver++ 2M. The guided and unconditional
predictions enter separately (``ctx.uncond_denoised``), so there is no per-stage coefficient form.

**Finding:** in VE coordinates the step is x' = x + w (D_c - D_u) + (sigma' / sigma - 1)(x - D_u): the guidance moves
x by w (D_c - D_u) at every step, an amount that does not shrink with the step. Under guidance CFG++ is therefore not
a discretisation of any ODE — more steps mean more guidance — and its runs have no limit as the steps shrink (on
refdiff's labelled mixture the differences of runs with N and 2N steps fall at no steady order: 0.13, 1.10, 0.97,
0.84 from 128 to 2048 steps at w = 2; the second-order variants the same). Orders are measured without guidance
(``refdiff order``); tests/test_samplers.py checks the non-vanishing step.
"""

from __future__ import annotations

import numpy as np

from .base import Level, Sampler, State, check_noise_scale
from .karras import _ancestral

__all__ = ["EulerCFGpp", "DPMSolverPP2MCFGpp"]


class EulerCFGpp(Sampler):
    """CFG++ DDIM / Euler (Alg. 1), with k-diffusion's ancestral noise for eta > 0 (``euler_ancestral_cfg_pp``):
    x' = alpha' D_g + sigma_down' eps_u + alpha' sigma_up z, (sigma_down, sigma_up) the ancestral pair of the VE
    sigmas scaled by alpha'. The step into the data returns D_g."""

    history_needed = 0

    def __init__(self, eta: float = 0.0, s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = eta > 0 and s_noise > 0
        self.order, self.weak_order = (None, 1) if self.stochastic else (1, None)
        self.name = "EulerCFG++" if not self.stochastic else f"EulerAncestralCFG++(eta={eta:g})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = ctx.denoise(ctx.x, cur)
        D_u = ctx.uncond_denoised()
        if nxt.is_data:
            return D * nxt.alpha, {}
        eps_u = (ctx.x - D_u * cur.alpha) / cur.sigma
        up, down = _ancestral(cur.sigma_ve, nxt.sigma_ve, self.eta)
        out = D * nxt.alpha + eps_u * (nxt.alpha * down)
        if self.stochastic:
            out = out + ctx.noise() * (nxt.alpha * up * self.s_noise)
        return out, {}


class DPMSolverPP2MCFGpp(Sampler):
    """CFG++ DPM-Solver++ 2M as ComfyUI runs it (``dpmpp_2m_cfg_pp``), in VE coordinates with t = -log sigma:
    x' = D_g + e^{-h} (x - D_u) + (1 - e^{-h}) / (2 r) (D_g - D_u,old), r = h_last / h, the last term from the
    second step on (and not into the data). The first-order part is CFG++'s DDIM; the correction extrapolates the
    guided prediction against the previous unconditional one (ComfyUI's choice, kept)."""

    history_needed = 0
    order = 2
    name = "DPMSolver++2MCFG++"

    def step_order(self, state, grid):
        return 1 if state.step == 0 or grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("CFG++ reads the unconditional prediction apart from the guided one")
        x = ctx.x / cur.alpha
        D = ctx.denoise(ctx.x, cur)
        D_u = ctx.uncond_denoised()
        if nxt.is_data:
            return D * nxt.alpha, {"D_u": D_u, "order": 1}
        h = np.log(cur.sigma_ve) - np.log(nxt.sigma_ve)
        out = D + (x - D_u) * np.exp(-h)
        order = 1
        if state.step > 0:
            prev = ctx.grid.levels[state.step - 1]
            r = (np.log(prev.sigma_ve) - np.log(cur.sigma_ve)) / h
            out = out - (D - state.extra["D_u"]) * (np.expm1(-h) / (2.0 * r))
            order = 2
        return out * nxt.alpha, {"D_u": D_u, "order": order}
