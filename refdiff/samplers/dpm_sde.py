"""DPM-Solver++ 2M / 3M SDE of k-diffusion (Crowson 2023), with eta and both second-order solver types.

Symbols: lambda = log(alpha / sigma) (half the log-SNR), h = lambda_t - lambda_s, eta the SDE's noise scale
(eta = 0: the ODE; eta = 1: the reverse SDE, Lu et al. 2022b, App. B), H = (1 + eta) h, D_1 and D_2 the previous
data predictions, r_k = h_k / h for the previous steps' h_k.

The step integrates the linear part exactly: in data prediction the reverse SDE with noise scale eta solves to

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t int_0^H e^{-v} D(lambda_t - v / (1 + eta)) dv
          + sigma_t sqrt(1 - e^{-2 eta h}) z,

and Taylor-expanding D gives the weights -expm1(-H) on D, R_2(-H) / H on the first divided difference and
-2 R_3(-H) / H^2 on the second (R_k = refdiff._math.exp_remainder).
"""

from __future__ import annotations

import numpy as np

from .._math import exp_remainder
from .base import Level, Sampler, State, check_noise_scale
from .dpm_solver import _h

__all__ = ["DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "SOLVER_TYPES"]

SOLVER_TYPES = ("midpoint", "heun")


class _MultistepSDE(Sampler):
    history_needed = 2

    def _start(self, ctx, cur, nxt, D):
        """x_t without the history terms and the noise, and (h, H)."""
        h = _h(cur, nxt)
        H = h * (1.0 + self.eta)
        decay = np.exp(-self.eta * h) if self.eta else 1.0         # eta = 0 from SNR 0 (h = inf): 1, not 0 * inf
        base = ctx.x * (nxt.sigma / cur.sigma * decay) - D * (nxt.alpha * np.expm1(-H))
        return base, h, H

    def _noise(self, ctx, nxt, h):
        if not self.stochastic:
            return 0.0
        return ctx.noise() * (np.asarray(nxt.sigma) * np.sqrt(-np.expm1(-2.0 * self.eta * h)) * self.s_noise)

    def _prev_h(self, ctx, state, k):
        """h of the step k steps back (k = 1: the previous step)."""
        lv = ctx.grid.levels
        i = state.step
        return _h(lv[i - k], lv[i - k + 1])


class DPMSolverPP2MSDE(_MultistepSDE):
    """k-diffusion ``sample_dpmpp_2m_sde`` (ComfyUI's ``dpmpp_2m_sde`` / ``_heun``): the first divided difference
    d = (D - D_1) / r weighted by alpha_t R_2(-H) / H ("heun", the exact first-order Taylor term) or by
    alpha_t (1 - e^{-H}) / 2 ("midpoint", diffusers' ``sde-dpmsolver++``); first order on the first step; the step
    into the data returns D. eta = 1 with "midpoint" is ``SDEDPMSolverPP2M``; eta = 0 is the 2M ODE solver."""

    snr_zero_start = True

    def __init__(self, eta: float = 1.0, solver_type: str = "midpoint", s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
        self.eta, self.solver_type, self.s_noise = float(eta), solver_type, float(s_noise)
        self.stochastic = eta > 0 and s_noise > 0
        self.order, self.weak_order = (None, 2) if self.stochastic else (2, None)
        self.history_needed = 1
        self.name = f"DPMSolver++2M-SDE(eta={eta:g},{solver_type})"

    def step_order(self, state, grid):
        return 1 if state.step == 0 or grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        x, h, H = self._start(ctx, cur, nxt, D)
        order = 1
        if state.step > 0:
            d = (D - ctx.history[0]) * (h / self._prev_h(ctx, state, 1))
            w = exp_remainder(-H, 2) / H if self.solver_type == "heun" else -0.5 * np.expm1(-H)
            x = x + d * (nxt.alpha * w)
            order = 2
        return x + self._noise(ctx, nxt, h), {"order": order}


class DPMSolverPP3MSDE(_MultistepSDE):
    """k-diffusion ``sample_dpmpp_3m_sde``: the 2M SDE step plus the second divided difference
    D2 = (D1_0 - D1_1) / (r0 + r1) weighted by -2 alpha_t R_3(-H) / H^2, the exact D'' term (module docstring);
    the first two steps are first and second order ("heun" weight), the step into the data returns D.

    **Finding:** k-diffusion and ComfyUI weight D2 by -alpha_t R_3(-H) / H^2, half the D'' term, as the released
    DPM-Solver++ 3M does (refdiff.samplers.DPMSolverPP): at eta = 0 it is a second-order method. ``halved_d2=True``
    reproduces them."""

    snr_zero_start = True

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, halved_d2: bool = False):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = eta > 0 and s_noise > 0
        self.d2_scale = 1.0 if halved_d2 else 2.0
        self.order = None if self.stochastic else 3
        # a cold start's first-order step limits the run to global order 2 (as DPMSolverPP(3))
        self.global_order = None if self.stochastic else 2
        self.weak_order = 2 if self.stochastic else None
        self.name = f"DPMSolver++3M-SDE(eta={eta:g})" + ("(halved D2)" if halved_d2 else "")

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else min(3, state.step + 1)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        x, h, H = self._start(ctx, cur, nxt, D)
        order = min(3, state.step + 1)
        if order >= 2:
            phi2 = exp_remainder(-H, 2) / H
            r0 = self._prev_h(ctx, state, 1) / h
            d1_0 = (D - ctx.history[0]) / r0
            if order == 2:
                x = x + d1_0 * (nxt.alpha * phi2)
            else:
                r1 = self._prev_h(ctx, state, 2) / h
                d1_1 = (ctx.history[0] - ctx.history[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + d1 * (nxt.alpha * phi2) - d2 * (self.d2_scale * nxt.alpha * exp_remainder(-H, 3) / (H * H))
        return x + self._noise(ctx, nxt, h), {"order": order}
