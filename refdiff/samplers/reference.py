"""Ground-truth integrators of the probability-flow ODE: classical RK4 as a sampler, and scipy solve_ivp.

The PF ODE of x_t = alpha x0 + sigma eps is dx/dt = alpha'(t) D + sigma'(t) eps_hat, eps_hat = (x - alpha D) / sigma
(the conditional expectation of d x_t / dt; Song et al. 2021, Eq. 13 in denoiser form).
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

from ..schedules import ContinuousSchedule
from .base import Level, Sampler, State

__all__ = ["pf_velocity", "RK4", "pf_ode_solve"]


def pf_velocity(schedule: ContinuousSchedule, x, D, t):
    """alpha'(t) D + sigma'(t) (x - alpha D) / sigma."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    return D * schedule.dalpha_dt(t) + (x - D * a) * (schedule.dsigma_dt(t) / s)


class RK4(Sampler):
    """Classical fourth-order Runge-Kutta in t on the PF ODE; the step into sigma = 0 is the exact limit x = D.

    Its last stage needs all four slopes, i.e. three earlier data predictions: more than the kernel interface's two
    history slots, so RK4 is a reference integrator with a paper form only.
    """

    snr_zero_start = True

    order = 4
    history_needed = 0
    name = "RK4"

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else 4

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        sch = ctx.grid.schedule
        if not isinstance(sch, ContinuousSchedule):
            raise ValueError("RK4 needs a grid built from a continuous schedule")
        x = ctx.x
        if nxt.is_data:
            return ctx.denoise(x, cur) * nxt.alpha, {"order": 1}
        t0, h = cur.t, nxt.t - cur.t
        mid = Level(t0 + 0.5 * h, sch.alpha(t0 + 0.5 * h), sch.sigma(t0 + 0.5 * h), sch.log_snr(t0 + 0.5 * h))

        def k(u, lvl):
            return pf_velocity(sch, u, ctx.denoise(u, lvl), lvl.t)

        k1 = k(x, cur)
        k2 = k(x + k1 * (0.5 * h), mid)
        k3 = k(x + k2 * (0.5 * h), mid)
        k4 = k(x + k3 * h, nxt)
        return x + (k1 + k2 * 2.0 + k3 * 2.0 + k4) * (h / 6.0), {"order": 4}


def pf_ode_solve(schedule: ContinuousSchedule, denoise, x, t_from: float, t_to: float, method: str = "DOP853",
                 rtol: float = 1e-13, atol: float | None = None):
    """Solve the PF ODE from t_from to t_to with scipy (RK45, DOP853, Radau ...): the ground truth for order tests.

    ``denoise(x (B, D), alpha, sigma) -> D``. atol defaults to rtol * 1e-3 * max|x|.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    B, Dm = x.shape
    atol = rtol * 1e-3 * max(1.0, float(np.abs(x).max())) if atol is None else atol

    def f(t, y):
        y = y.reshape(B, Dm)
        return pf_velocity(schedule, y, denoise(y, schedule.alpha(t), schedule.sigma(t)), t).ravel()

    sol = solve_ivp(f, (t_from, t_to), x.ravel(), method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp ({method}) failed: {sol.message}")
    return sol.y[:, -1].reshape(B, Dm)
