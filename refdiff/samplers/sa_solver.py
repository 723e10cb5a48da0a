"""SA-Solver: the stochastic Adams predictor-corrector in data prediction (Xue et al. 2023, Eq. 15 and 18; ComfyUI
``sa_solver`` / ``sa_solver_pece``).

Symbols: lambda = log(alpha / sigma), tau(sigma) the stochasticity (0: the PF ODE), k = 1 + tau^2. A step from s to t:

    x_t = (sigma_t / sigma_s) e^{-tau^2 h} x_s + sum_i b_i D_i + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,
    b_i = alpha_t int_{lambda_s}^{lambda_t} k e^{-k (lambda_t - u)} L_i(u) du,

L_i the Lagrange basis over the nodes' lambdas. The predictor (order p) uses the last p evaluations; after the model
is evaluated at the predicted point, the corrector (order c) redoes the previous step with the last c evaluations,
the new one included, and the same noise. One evaluation per step (``pece``: a second one at the corrected point).
The weights are exact (the polynomial-times-exponential integrals in closed form, through exp_remainder). Past
evaluations travel in ``State.extra``: paper form only.
"""

from __future__ import annotations

import math

import numpy as np

from .._math import exp_remainder
from .base import Level, Sampler, State

__all__ = ["SASolver", "sa_tau_interval", "stochastic_adams_weights"]


def sa_tau_interval(sigma_hi: float, sigma_lo: float, eta: float = 1.0):
    """ComfyUI's default stochasticity: tau = eta for sigma (VE) in [sigma_lo, sigma_hi], 0 outside."""
    if not (0.0 <= sigma_lo <= sigma_hi and eta >= 0):
        raise ValueError(f"need 0 <= sigma_lo <= sigma_hi and eta >= 0, got {sigma_lo}, {sigma_hi}, {eta}")
    return lambda sigma: eta if sigma_lo <= float(np.asarray(sigma)) <= sigma_hi else 0.0


def stochastic_adams_weights(nodes, lam_s: float, lam_t: float, tau: float, alpha_t: float):
    """b_i = alpha_t int_{lam_s}^{lam_t} k e^{-k (lam_t - u)} L_i(u) du for the Lagrange basis over ``nodes``.

    About lam_t the monomial moments are int k e^{-k (lam_t - u)} (u - lam_t)^j du = (-1)^j j! / k^j P(j + 1, H),
    H = k h, with the regularized incomplete gamma P(j + 1, H) = e^{-H} R_{j+1}(H) (exp_remainder: no cancellation
    for small H); the basis weights solve the transposed Vandermonde system of the nodes about lam_t."""
    nodes = np.asarray(nodes, dtype=np.float64)
    n = nodes.size
    k = 1.0 + tau * tau
    H = k * (lam_t - lam_s)
    if not H > 0:
        raise ValueError(f"SA-Solver steps towards the data (lambda increasing), got lambda {lam_s} -> {lam_t}")
    moments = np.array([(-1.0) ** j * math.factorial(j) / k ** j * np.exp(-H) * exp_remainder(H, j + 1)
                        for j in range(n)])
    V = np.vander(nodes - lam_t, n, increasing=True).T            # V[j, i] = (node_i - lam_t)^j
    return alpha_t * np.linalg.solve(V, moments)


class SASolver(Sampler):
    """SA-Solver with predictor order p (1-4) and corrector order c (0-4), stochasticity tau(sigma_ve) (a number or a
    callable; 0 gives the PF ODE); ``pece`` re-evaluates the model at the corrected point. Orders lowered at the
    start (fewer evaluations) and, when the grid ends at the data, near the end (as ComfyUI)."""

    history_needed = 0

    def __init__(self, predictor_order: int = 3, corrector_order: int = 4, tau=0.0, pece: bool = False):
        if predictor_order not in (1, 2, 3, 4) or corrector_order not in (0, 1, 2, 3, 4):
            raise ValueError(f"SA-Solver orders: predictor 1..4, corrector 0..4; got {predictor_order}, "
                             f"{corrector_order}")
        if not callable(tau) and not (0.0 <= float(tau) < np.inf):
            raise ValueError(f"tau must be a callable or a finite number >= 0, got {tau!r}")
        self.p, self.c, self.pece = predictor_order, corrector_order, bool(pece)
        self.tau = tau if callable(tau) else (lambda sigma, v=float(tau): v)
        self.stochastic = callable(tau) or float(tau) > 0
        # PEC order: the predictor's (local error h^(p+1)) lifted by a corrector of c nodes (local h^(c+1)) to
        # min(p + 1, c). The cold start: the first step (Euler-type predictor, local h^2) is redone by the corrector
        # with the 2 evaluations then known (local h^3) when c >= 2, so a run reaches at most order 3 (2 without)
        self.order = None if self.stochastic else (min(predictor_order + 1, corrector_order) if corrector_order
                                                   else predictor_order)
        self.global_order = None if self.stochastic else min(self.order, 3 if corrector_order >= 2 else 2)
        # on the exact Gaussian law: O(h) with the Euler-type predictor alone, O(h^2) from p = 2 on (the
        # extrapolation of D along the noised path limits higher orders; refdiff order)
        self.weak_order = (1 if predictor_order == 1 else 2) if self.stochastic else None
        self.name = f"SA-Solver(p={predictor_order},c={corrector_order}" + (",tau" if self.stochastic else "") + \
            (",pece)" if pece else ")")

    def _weights(self, nodes, lam_s, lam_t, tau, alpha_t, corrector: bool):
        """The weights b_i of the step lam_s -> lam_t over ``nodes`` (oldest first); ``corrector``: the corrector's
        redo of the previous step (its nodes end at lam_t), else the predictor's (they end at lam_s)."""
        return stochastic_adams_weights(nodes, lam_s, lam_t, tau, alpha_t)

    def _orders(self, i, n_evals, n_levels, to_data):
        p = min(self.p, n_evals)
        c = 0 if i == 0 else min(self.c, n_evals)
        if to_data:
            p = min(p, n_levels - 2 - i)
            c = min(c, n_levels - 1 - i)
        return p, c

    def step_order(self, state, grid):
        if grid.levels[state.step + 1].is_data:
            return 1
        return min(self.p, state.step + 1)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("SA-Solver combines up to four past data predictions: paper form only")
        lv = ctx.grid.levels
        i = state.step
        to_data = lv[-1].is_data
        x_pred = ctx.x
        D = ctx.denoise(x_pred, cur)
        Ds = (tuple(state.extra.get("D", ())) + (D,))[-max(self.p, self.c):]
        lams = (tuple(state.extra.get("lam", ())) + (float(np.asarray(cur.lam)),))[-max(self.p, self.c):]
        p, c = self._orders(i, len(Ds), len(lv), to_data)
        if c == 0:
            x = x_pred
        else:                      # redo the previous step s -> this level with the new evaluation and the same noise
            prev = lv[i - 1]
            tau_prev = state.extra["tau"]
            b = self._weights(lams[-c:], float(np.asarray(prev.lam)), float(np.asarray(cur.lam)), tau_prev,
                              float(np.asarray(cur.alpha)), corrector=True)
            h = float(np.asarray(cur.lam) - np.asarray(prev.lam))
            x = state.extra["x"] * (cur.sigma / prev.sigma * np.exp(-tau_prev ** 2 * h))
            for bi, Di in zip(b, Ds[-c:]):
                x = x + Di * bi
            if state.extra.get("noise") is not None:
                x = x + state.extra["noise"]
            if self.pece:
                D = ctx.denoise(x, cur)
                Ds = Ds[:-1] + (D,)
        keep = {"D": Ds, "lam": lams, "x": x}
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1, **keep, "noise": None, "tau": 0.0}
        tau = float(self.tau(nxt.sigma_ve))
        h = float(np.asarray(nxt.lam) - np.asarray(cur.lam))
        b = self._weights(lams[-p:], float(np.asarray(cur.lam)), float(np.asarray(nxt.lam)), tau,
                          float(np.asarray(nxt.alpha)), corrector=False)
        out = x * (nxt.sigma / cur.sigma * np.exp(-tau ** 2 * h))
        for bi, Di in zip(b, Ds[-p:]):
            out = out + Di * bi
        noise = None
        if tau > 0:
            noise = ctx.noise() * (np.asarray(nxt.sigma) * np.sqrt(-np.expm1(-2.0 * tau ** 2 * h)))
            out = out + noise
        return out, {"order": p, **keep, "noise": noise, "tau": tau}
