"""DPM-Solver (Lu et al. 2022a) singlestep orders 1-3, DPM-Solver++ (Lu et al. 2022b) multistep 2M / 3M and the
SDE-DPM-Solver++ 2M of diffusers / k-diffusion.

Symbols: lambda = log(alpha / sigma) (DPM-Solver's, half the full log-SNR), h = lambda_t - lambda_s > 0 for a step
from s to t, r = h_prev / h. The phi-numerators e^{-h} - 1, e^{-h} - 1 + h, ... are exp_remainder(-h, k)
(series near 0: the textbook forms cancel for small steps).

Order rules (recorded per step in the state): a step into the data (sigma = 0, h = inf) is first order; a multistep
method uses min(order, steps so far + 1) at the start; with ``lower_order_final`` and fewer than 15 steps, the last
step is first order and, for 3M, the one before it second order (diffusers' convention).
"""

from __future__ import annotations

import numpy as np

from .._math import exp_remainder
from .base import Level, Sampler, State

__all__ = ["DPMSolver", "DPMSolverPP", "SDEDPMSolverPP2M", "LOWER_ORDER_FINAL_STEPS"]

LOWER_ORDER_FINAL_STEPS = 15      # diffusers lowers the final orders only for runs shorter than this


def _h(cur: Level, nxt: Level):
    return np.asarray(nxt.lam, dtype=np.float64) - np.asarray(cur.lam, dtype=np.float64)


class DPMSolver(Sampler):
    """Singlestep DPM-Solver-k in noise-prediction form (Lu et al. 2022a, Eq. 3.7 for k = 1 and Alg. 1-2 with
    r1 = 1/2, and r1 = 1/3, r2 = 2/3). Intermediate levels at lambda_s + r h come from the grid's schedule."""

    history_needed = 0

    def __init__(self, order: int = 2):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
        self.order = order
        self.name = f"DPMSolver-{order}"

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else self.order

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        eps = (x - D * cur.alpha) / cur.sigma
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        h = _h(cur, nxt)
        a_t, s_t, a_s = nxt.alpha, nxt.sigma, cur.alpha
        em1 = np.expm1(h)                                            # e^h - 1
        if self.order == 1:
            return x * (a_t / a_s) - eps * (s_t * em1), {"order": 1}

        def level(r):
            return ctx.grid.level_at(np.asarray(cur.log_snr) + 2.0 * r * h)

        def eps_at(u, lvl):
            return (u - ctx.denoise(u, lvl) * lvl.alpha) / lvl.sigma

        if self.order == 2:
            r1 = 0.5
            l1 = level(r1)
            u = x * (l1.alpha / a_s) - eps * (l1.sigma * np.expm1(r1 * h))
            e1 = eps_at(u, l1)
            return x * (a_t / a_s) - eps * (s_t * em1) - (e1 - eps) * (s_t / (2.0 * r1) * em1), {"order": 2}
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        l1, l2 = level(r1), level(r2)
        u1 = x * (l1.alpha / a_s) - eps * (l1.sigma * np.expm1(r1 * h))
        d1 = eps_at(u1, l1) - eps
        phi_r2 = exp_remainder(r2 * h, 2) / (r2 * h)                  # (e^{r2 h} - 1) / (r2 h) - 1
        u2 = x * (l2.alpha / a_s) - eps * (l2.sigma * np.expm1(r2 * h)) - d1 * (l2.sigma * r2 / r1 * phi_r2)
        d2 = eps_at(u2, l2) - eps
        phi = exp_remainder(h, 2) / h                                 # (e^h - 1) / h - 1
        return x * (a_t / a_s) - eps * (s_t * em1) - d2 * (s_t / r2 * phi), {"order": 3}


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ in data-prediction form (Lu et al. 2022b, Alg. 2 for 2M with the midpoint rule; the
    third-order multistep update of their App. B / diffusers for 3M):

        x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D_s                                    (order 1)
        2M:  D = (1 + 1/(2r)) D_s - 1/(2r) D_{s-1}, x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D
        3M:  x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D_s + alpha_t R2 / h D1 - alpha_t R3 / h^2 D2
    with R_k = exp_remainder(-h, k), D1, D2 the divided differences over the last three data predictions.

    Global order: the warm-up (first step order 1, as in diffusers and k-diffusion) has local error O(h^2), so 3M
    converges at order 2 overall although its later steps are third order (measured: error ratios -> 4 under step
    halving). ``global_order`` records this; 2M is unaffected (an O(h^2) first step suffices for order 2).
    """

    history_needed = 2

    def __init__(self, order: int = 2, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
        self.order = order
        self.global_order = min(order, 2)
        self.lower_order_final = lower_order_final
        self.name = f"DPMSolver++{order}M"

    def step_order(self, state: State, grid) -> int:
        i, n = state.step, len(grid)
        order = min(self.order, i + 1)
        if grid.levels[i + 1].is_data:
            return 1
        if self.lower_order_final and n < LOWER_ORDER_FINAL_STEPS:
            order = min(order, n - i)
        return order

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        order = self.step_order(state, ctx.grid)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        h = _h(cur, nxt)
        r1_ = exp_remainder(-h, 1)
        base = x * (nxt.sigma / cur.sigma) - D * (nxt.alpha * r1_)
        levels = ctx.grid.levels
        i = state.step
        if order == 1:
            return base, {"order": 1}
        h0 = np.asarray(cur.lam) - np.asarray(levels[i - 1].lam)
        r0 = h0 / h
        D1_0 = (D - ctx.history[0]) / r0
        if order == 2:
            return base - D1_0 * (0.5 * nxt.alpha * r1_), {"order": 2}
        h1 = np.asarray(levels[i - 1].lam) - np.asarray(levels[i - 2].lam)
        r1 = h1 / h
        D1_1 = (ctx.history[0] - ctx.history[1]) / r1
        D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
        D2 = (D1_0 - D1_1) / (r0 + r1)
        return (base + D1 * (nxt.alpha * exp_remainder(-h, 2) / h)
                - D2 * (nxt.alpha * exp_remainder(-h, 3) / (h * h))), {"order": 3}


class SDEDPMSolverPP2M(Sampler):
    """SDE-DPM-Solver++(2M) with the midpoint rule (Lu et al. 2022b, App. A; diffusers ``sde-dpmsolver++``):

        x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D_s + alpha_t (1 - e^{-2h}) / 2 D1
              + sigma_t sqrt(1 - e^{-2h}) z,  D1 = (D_s - D_{s-1}) / r  (absent on the first step)
    """

    stochastic = True
    weak_order = 2                  # measured on the exact Gaussian output law: covariance error ~ h^2
    history_needed = 1
    name = "SDE-DPMSolver++2M"

    def step_order(self, state, grid):
        return 1 if state.step == 0 or grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        h = _h(cur, nxt)
        one_m = -np.expm1(-2.0 * h)                                   # 1 - e^{-2h}
        out = x * (nxt.sigma / cur.sigma * np.exp(-h)) + D * (nxt.alpha * one_m)
        order = 1
        if state.step > 0:
            r = (np.asarray(cur.lam) - np.asarray(ctx.grid.levels[state.step - 1].lam)) / h
            out = out + (D - ctx.history[0]) / r * (0.5 * nxt.alpha * one_m)
            order = 2
        return out + ctx.noise() * (np.asarray(nxt.sigma) * np.sqrt(one_m)), {"order": order}
