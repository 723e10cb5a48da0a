"""Ancestral second-order samplers of k-diffusion (Crowson 2022): DPM-2 ancestral and DPM-Solver++(2S) ancestral.

Each step runs the ODE method from sigma to sigma_down and adds fresh noise of std sigma_up, where
(sigma_down, sigma_up) is k-diffusion's ``get_ancestral_step``: sigma_up = min(sigma_next, eta sqrt(sigma_next^2
(sigma^2 - sigma_next^2) / sigma^2)), sigma_down = sqrt(sigma_next^2 - sigma_up^2) (VE sigmas, sigma / alpha of
the level; the step maps in and out of VE coordinates so any schedule works). A step into the data is Euler, no
noise. With the ODE step exact, a step would map the marginal p_sigma to p_sigma_down and the noise (sigma_down^2 +
sigma_up^2 = sigma_next^2) to p_sigma_next exactly: the law's error is the ODE method's, so these converge in law
at weak order 2 (measured on the exact Gaussian law, ``refdiff order``), where Euler ancestral is order 1.
"""

from __future__ import annotations

import numpy as np

from .base import Level, Sampler, State, check_noise_scale
from .karras import _ancestral, _from_ve, _ve

__all__ = ["DPM2Ancestral", "DPMSolverPP2SAncestral"]


class _Ancestral(Sampler):
    history_needed = 0

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else 2

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = eta > 0 and s_noise > 0
        # eta = 0 is the ODE method itself (order 2); otherwise the law converges at the ODE part's order
        self.order, self.weak_order = (None, 2) if self.stochastic else (2, None)

    def _down_level(self, ctx, sigma_down):
        return ctx.grid.level_at(-2.0 * np.log(sigma_down))

    def _up_down(self, s, s_next):
        """(sigma_up, sigma_down) of the step from s to s_next (k-diffusion's ``get_ancestral_step``)."""
        return _ancestral(s, s_next, self.eta)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = _ve(ctx.x, cur)
        s = cur.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return _from_ve(D, nxt), {"order": 1}
        up, down = self._up_down(s, nxt.sigma_ve)
        x = self._ode_step(ctx, x, D, s, down, cur)
        if self.stochastic:
            x = x + ctx.noise() * (up * self.s_noise)
        return _from_ve(x, nxt), {"order": 2}


class DPM2Ancestral(_Ancestral):
    """k-diffusion ``sample_dpm_2_ancestral``: DPM-2 (the log-sigma midpoint sigma_mid = sqrt(sigma sigma_down))
    from sigma to sigma_down, then noise sigma_up z."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        super().__init__(eta, s_noise)
        self.name = f"DPM2Ancestral(eta={eta:g})"

    def _mid(self, s, down):
        """The log-sigma midpoint sqrt(sigma sigma_down) at which DPM-2 evaluates."""
        return np.exp(0.5 * (np.log(s) + np.log(down)))

    def _ode_step(self, ctx, x, D, s, down, cur):
        d = (x - D) / s
        s_mid = self._mid(s, down)
        mid = self._down_level(ctx, s_mid)
        x2 = x + d * (s_mid - s)
        d2 = (x2 - ctx.denoise(_from_ve(x2, mid), mid)) / s_mid
        return x + d2 * (down - s)


class DPMSolverPP2SAncestral(_Ancestral):
    """k-diffusion ``sample_dpmpp_2s_ancestral``: DPM-Solver++(2S) with r = 1/2 (Lu et al. 2022b, Alg. 1) in
    t = -log sigma from sigma to sigma_down, then noise sigma_up z:
    x_s = (sigma_s / sigma) x - expm1(-h / 2) D, x' = (sigma_down / sigma) x - expm1(-h) D(x_s), h = log(sigma / sigma_down)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        super().__init__(eta, s_noise)
        self.name = f"DPMSolver++2SAncestral(eta={eta:g})"

    def _ode_step(self, ctx, x, D, s, down, cur):
        h = np.log(s) - np.log(down)
        s_mid = np.exp(np.log(s) - 0.5 * h)
        mid = self._down_level(ctx, s_mid)
        x2 = x * (s_mid / s) - D * np.expm1(-0.5 * h)
        D2 = ctx.denoise(_from_ve(x2, mid), mid)
        return x * (down / s) - D2 * np.expm1(-h)
