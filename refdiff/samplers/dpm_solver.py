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
from .._validate import positive_int
from .base import Level, Sampler, State, check_noise_scale
from .karras import _ancestral

__all__ = ["DPMSolver", "DPMFast", "dpm_fast_orders", "dpm_fast_sigmas", "dpm_solver_step", "DPMSolverPP", "DPMSolverPPSinglestep", "SDEDPMSolverPP2M", "DEIS", "LOWER_ORDER_FINAL_STEPS",
           "multistep_order"]

LOWER_ORDER_FINAL_STEPS = 15      # diffusers lowers the final orders only for runs shorter than this


def multistep_order(order: int, i: int, n: int, next_is_data: bool, lower_order_final: bool = True) -> int:
    """The order step i of n uses in a multistep method of ``order``: min(order, i + 1) during the warm-up, 1 into
    the data, and with ``lower_order_final`` and n < 15 at most n - i (diffusers' convention)."""
    if next_is_data:
        return 1
    out = min(order, i + 1)
    if lower_order_final and n < LOWER_ORDER_FINAL_STEPS:
        out = min(out, n - i)
    return out


def _h(cur: Level, nxt: Level):
    return np.asarray(nxt.lam, dtype=np.float64) - np.asarray(cur.lam, dtype=np.float64)


class DPMSolver(Sampler):
    """Singlestep DPM-Solver-k in noise-prediction form (Lu et al. 2022a, Eq. 3.7 for k = 1 and Alg. 1-2 with
    r1 = 1/2 (``r1`` to change it), and r1 = 1/3, r2 = 2/3). Intermediate levels at lambda_s + r h come from the
    grid's schedule."""

    history_needed = 0

    def __init__(self, order: int = 2, r1: float = 0.5):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
        if not 0.0 < r1 < 1.0:
            raise ValueError(f"DPM-Solver-2's r1 must lie in (0, 1), got {r1}")
        self.order, self.r1 = order, float(r1)
        self.name = f"DPMSolver-{order}" + (f"(r1={r1:g})" if order == 2 and r1 != 0.5 else "")

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else self.order

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        return dpm_solver_step(ctx, x, D, cur, nxt, self.order, self.r1), {"order": self.order}


def dpm_solver_step(ctx, x, D, cur: Level, nxt: Level, order: int, r1: float = 0.5):
    """One DPM-Solver-``order`` step from ``cur`` (where D = D(x) is already evaluated) to ``nxt`` (not the data)."""
    eps = (x - D * cur.alpha) / cur.sigma
    h = _h(cur, nxt)
    a_t, s_t, a_s = nxt.alpha, nxt.sigma, cur.alpha
    em1 = np.expm1(h)                                            # e^h - 1
    if order == 1:
        return x * (a_t / a_s) - eps * (s_t * em1)

    def level(r):
        return ctx.grid.level_at(np.asarray(cur.log_snr) + 2.0 * r * h)

    def eps_at(u, lvl):
        return (u - ctx.denoise(u, lvl) * lvl.alpha) / lvl.sigma

    if order == 2:
        l1 = level(r1)
        u = x * (l1.alpha / a_s) - eps * (l1.sigma * np.expm1(r1 * h))
        e1 = eps_at(u, l1)
        return x * (a_t / a_s) - eps * (s_t * em1) - (e1 - eps) * (s_t / (2.0 * r1) * em1)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    l1, l2 = level(r1), level(r2)
    u1 = x * (l1.alpha / a_s) - eps * (l1.sigma * np.expm1(r1 * h))
    d1 = eps_at(u1, l1) - eps
    phi_r2 = exp_remainder(r2 * h, 2) / (r2 * h)                  # (e^{r2 h} - 1) / (r2 h) - 1
    u2 = x * (l2.alpha / a_s) - eps * (l2.sigma * np.expm1(r2 * h)) - d1 * (l2.sigma * r2 / r1 * phi_r2)
    d2 = eps_at(u2, l2) - eps
    phi = exp_remainder(h, 2) / h                                 # (e^h - 1) / h - 1
    return x * (a_t / a_s) - eps * (s_t * em1) - d2 * (s_t / r2 * phi)


def dpm_fast_orders(nfe: int) -> list:
    """k-diffusion's DPM-fast order sequence for ``nfe`` evaluations: m = nfe // 3 + 1 steps, third order except
    the last ones: [3, ..., 3, 2, 1] when 3 divides nfe, else [3, ..., 3, nfe % 3] (Lu et al. 2022a, Sec. 3.4)."""
    nfe = positive_int(nfe, "nfe")
    m = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (m - 2) + [2, 1]
    return [3] * (m - 1) + [nfe % 3]


class DPMFast(Sampler):
    """DPM-fast (Lu et al. 2022a, Sec. 3.4; k-diffusion ``sample_dpm_fast``): singlestep DPM-Solver with the orders
    of ``dpm_fast_orders(nfe)`` on a grid of len(orders) steps uniform in lambda (``Grid`` of ``dpm_fast_sigmas``),
    and k-diffusion's ancestral noise for eta > 0 (each step to max(sigma_down, sigma_end), then noise of the
    remaining variance). The orders' tail limits the run: with a final first-order step (nfe % 3 != 2) the global
    order is 2, with a final second-order step 3."""

    history_needed = 0

    def __init__(self, nfe: int, eta: float = 0.0, s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        self.nfe, self.orders = int(nfe), dpm_fast_orders(nfe)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = eta > 0 and s_noise > 0
        final = 3 if self.orders[-1] == 2 else 2
        self.order, self.global_order = (3, final) if not self.stochastic else (None, None)
        self.weak_order = 1 if self.stochastic else None
        self.name = f"DPM-fast(nfe={nfe}" + (f",eta={eta:g})" if self.stochastic else ")")

    def step_order(self, state, grid):
        return self._orders_for(grid)[state.step]

    def _orders_for(self, grid):
        if len(grid) != len(self.orders):
            raise ValueError(f"DPM-fast with nfe={self.nfe} runs {len(self.orders)} steps, the grid has {len(grid)}: "
                             f"build it with dpm_fast_sigmas(nfe, ...)")
        return self.orders

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        order = self._orders_for(ctx.grid)[state.step]
        if nxt.is_data:
            raise ValueError("DPM-fast ends at sigma_min > 0 (k-diffusion refuses sigma_min = 0)")
        x = ctx.x
        D = ctx.denoise(x, cur)
        target, up = nxt, 0.0
        if self.stochastic:
            end = ctx.grid.levels[-1]
            _, down = _ancestral(cur.sigma_ve, nxt.sigma_ve, self.eta)
            s_to = np.maximum(down, end.sigma_ve)
            up = np.sqrt(nxt.sigma_ve ** 2 - s_to ** 2)
            target = ctx.grid.level_at(-2.0 * np.log(s_to)) if np.any(s_to != nxt.sigma_ve) else nxt
        out = dpm_solver_step(ctx, x, D, cur, target, order)
        out = out * (nxt.alpha / target.alpha)               # VE coordinates: the noise moves x at fixed alpha
        if self.stochastic:
            out = out + ctx.noise() * (nxt.alpha * up * self.s_noise)
        return out, {"order": order}


def dpm_fast_sigmas(nfe: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """The len(dpm_fast_orders(nfe)) + 1 VE sigmas of DPM-fast, uniform in t = -log sigma from sigma_max down to
    sigma_min (both > 0)."""
    if not (0.0 < sigma_min < sigma_max < np.inf):
        raise ValueError(f"DPM-fast needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    m = len(dpm_fast_orders(nfe))
    return np.exp(-np.linspace(-np.log(sigma_max), -np.log(sigma_min), m + 1))


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ in data-prediction form (Lu et al. 2022b, Alg. 2 for 2M with the midpoint rule; a
    third-order multistep update for 3M):

        x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D_s                                    (order 1)
        2M:  D = (1 + 1/(2r)) D_s - 1/(2r) D_{s-1}, x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D
        3M:  x_t = (sigma_t / sigma_s) x_s - alpha_t R1 D_s + alpha_t R2 / h D1 - 2 alpha_t R3 / h^2 D2
    with R_k = exp_remainder(-h, k), D1 ~ h D' and D2 ~ h^2 D'' / 2 the divided differences over the last three
    data predictions. The exact solution's D'' term is -alpha_t R3 D'', hence the factor 2 on D2.

    **Finding:** the released DPM-Solver code, diffusers and k-diffusion use -alpha_t R3 / h^2 D2 (half the D''
    term): their "third-order" steps have local error O(h^3), so 3M runs at order 2 even from an exact warm-up
    (``halved_d2=True`` reproduces them; measured in tests/test_samplers.py). From a cold start the first-order
    warm-up step (local error O(h^2)) limits any 3M run to global order 2 as well; ``global_order`` records this.
    """

    snr_zero_start = True

    history_needed = 2

    def __init__(self, order: int = 2, lower_order_final: bool = True, halved_d2: bool = False):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order}")
        self.order = order
        self.global_order = min(order, 2)
        self.lower_order_final = lower_order_final
        self.d2_scale = 1.0 if halved_d2 else 2.0
        self.name = f"DPMSolver++{order}M" + ("(halved D2)" if halved_d2 and order == 3 else "")

    def step_order(self, state: State, grid) -> int:
        return multistep_order(self.order, state.step, len(grid), grid.levels[state.step + 1].is_data,
                               self.lower_order_final)

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
                - D2 * (self.d2_scale * nxt.alpha * exp_remainder(-h, 3) / (h * h))), {"order": 3}


class SDEDPMSolverPP2M(Sampler):
    """SDE-DPM-Solver++(2M) with the midpoint rule (Lu et al. 2022b, App. A; diffusers ``sde-dpmsolver++``):

        x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D_s + alpha_t (1 - e^{-2h}) / 2 D1
              + sigma_t sqrt(1 - e^{-2h}) z,  D1 = (D_s - D_{s-1}) / r  (absent on the first step)
    """

    snr_zero_start = True

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


class DPMSolverPPSinglestep(Sampler):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1) in data-prediction form: a first-order step to an intermediate
    level u at lambda_s + r h, then

        D_r = (1 - 1/(2r)) D_s + 1/(2r) D(u),    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_r.

    ``intermediate(step, cur, nxt)`` may name the intermediate Level of each step (diffusers' singlestep scheduler
    uses the grid point between two steps of its timestep list); None there makes that step first order. By
    default the intermediate is at r = ``r`` from the grid's schedule. A step into the data is first order.
    """

    history_needed = 0
    order = 2

    def __init__(self, r: float = 0.5, intermediate=None):
        if not 0.0 < r < 1.0:
            raise ValueError(f"r must lie in (0, 1), got {r}")
        self.r, self.intermediate = float(r), intermediate
        self.name = "DPMSolver++2S"

    def _mid(self, ctx, step: int, cur: Level, nxt: Level):
        if self.intermediate is not None:
            return self.intermediate(step, cur, nxt)
        return ctx.grid.level_at(np.asarray(cur.log_snr) + self.r * (np.asarray(nxt.log_snr) - np.asarray(cur.log_snr)))

    def step_order(self, state, grid):
        if grid.levels[state.step + 1].is_data:
            return 1
        if self.intermediate is not None and self.intermediate(state.step, grid.levels[state.step],
                                                               grid.levels[state.step + 1]) is None:
            return 1
        return 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        h = _h(cur, nxt)
        mid = self._mid(ctx, state.step, cur, nxt)
        if mid is None:
            return x * (nxt.sigma / cur.sigma) - D * (nxt.alpha * exp_remainder(-h, 1)), {"order": 1}
        h0 = _h(cur, mid)
        r = h0 / h
        u = x * (mid.sigma / cur.sigma) - D * (mid.alpha * exp_remainder(-h0, 1))
        D_r = D * (1.0 - 0.5 / r) + ctx.denoise(u, mid) * (0.5 / r)
        return x * (nxt.sigma / cur.sigma) - D_r * (nxt.alpha * exp_remainder(-h, 1)), {"order": 2}


class DPMSolverPP3S(DPMSolverPPSinglestep):
    """DPM-Solver++(3S) in data-prediction form (the DPM-Solver code's singlestep third-order update; Lu et al. 2022a
    Alg. 2 written for the data prediction): two intermediate levels u1, u2 at lambda_s + r1 h, lambda_s + r2 h,

        u1 = (sigma_1 / sigma_s) x - alpha_1 (e^{-r1 h} - 1) D
        u2 = (sigma_2 / sigma_s) x - alpha_2 (e^{-r2 h} - 1) D + (r2 / r1) alpha_2 phi_2(r2 h) (D(u1) - D)
        x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D + (1 / r2) alpha_t phi_2(h) (D(u2) - D),

    phi_2(z) = (e^{-z} - 1) / z + 1. ``second="midpoint"``: u2 by the 2S midpoint update over [s, s + r2 h] instead,
    u2 = ... - (r2 / r1) alpha_2 (e^{-r2 h} - 1) / 2 (D(u1) - D) (diffusers' singlestep scheduler; both second order,
    so the step stays third order). ``intermediate(step, cur, nxt)`` names each step's levels: (mid1, mid2) a 3S step;
    one Level or None are DPMSolverPPSinglestep's 2S and first-order steps; by default (r1, r2) = (1/3, 2/3) of the
    step in log-SNR. A step into the data is first order."""

    order = 3

    def __init__(self, r1: float = 1.0 / 3.0, r2: float = 2.0 / 3.0, intermediate=None, second: str = "paper"):
        if not 0.0 < r1 < r2 < 1.0:
            raise ValueError(f"need 0 < r1 < r2 < 1, got {r1}, {r2}")
        if second not in ("paper", "midpoint"):
            raise ValueError(f"second must be 'paper' or 'midpoint', got {second!r}")
        super().__init__(0.5, intermediate)
        self.r1, self.r2, self.second = float(r1), float(r2), second
        self.name = "DPMSolver++3S" + ("(midpoint u2)" if second == "midpoint" else "")

    def _mid(self, ctx, step, cur, nxt):
        if self.intermediate is not None:
            return self.intermediate(step, cur, nxt)
        lam0, lam1 = np.asarray(cur.log_snr), np.asarray(nxt.log_snr)
        return tuple(ctx.grid.level_at(lam0 + r * (lam1 - lam0)) for r in (self.r1, self.r2))

    def step_order(self, state, grid):
        cur, nxt = grid.levels[state.step], grid.levels[state.step + 1]
        if not nxt.is_data and (self.intermediate is None or isinstance(self.intermediate(state.step, cur, nxt),
                                                                        tuple)):
            return 3
        return super().step_order(state, grid)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        mids = None if nxt.is_data else self._mid(ctx, state.step, cur, nxt)
        if not isinstance(mids, tuple):                     # 2S, first order or into the data
            return super().step(ctx, cur, nxt, state)
        x = ctx.x
        D = ctx.denoise(x, cur)
        h = _h(cur, nxt)
        m1, m2 = mids
        h1, h2 = _h(cur, m1), _h(cur, m2)
        r1, r2 = h1 / h, h2 / h
        u1 = x * (m1.sigma / cur.sigma) - D * (m1.alpha * np.expm1(-h1))
        d1 = ctx.denoise(u1, m1) - D
        u2 = x * (m2.sigma / cur.sigma) - D * (m2.alpha * np.expm1(-h2))
        if self.second == "midpoint":
            u2 = u2 - d1 * (m2.alpha * np.expm1(-h2) * 0.5 * r2 / r1)
        else:
            u2 = u2 + d1 * (m2.alpha * (r2 / r1) * exp_remainder(-h2, 2) / h2)
        d2 = ctx.denoise(u2, m2) - D
        first = x * (nxt.sigma / cur.sigma) - D * (nxt.alpha * np.expm1(-h))
        return first + d2 * (nxt.alpha * exp_remainder(-h, 2) / (h * r2)), {"order": 3}


def _lagrange_antiderivatives(nodes, u):
    """A_j(u) with A_j' = L_j(u) e^u, for the Lagrange basis L_j on ``nodes`` (u = log rho: int L_j(log rho) d rho
    = A_j(log rho_t) - A_j(log rho_s)). A_j = e^u (P - P' + P''), exact for the degree <= 2 bases used here;
    A_j(-inf) = 0 (an end at rho = 0)."""
    k = len(nodes)
    out = []
    for j in range(k):
        others = [nodes[m] for m in range(k) if m != j]
        den = 1.0
        for o in others:
            den = den * (nodes[j] - o)
        if k == 1:
            poly = 1.0
        elif k == 2:
            poly = (u - others[0] - 1.0) / den
        else:
            a, b = others
            poly = ((u - a) * (u - b) - (2.0 * u - a - b) + 2.0) / den
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.exp(u) * poly
        out.append(np.where(np.isneginf(u), 0.0, val))
    return out


def _lagrange_integrals(nodes, lo, hi):
    """int_lo^hi L_j(u) e^u du for each basis function (see ``_lagrange_antiderivatives``)."""
    return [b - a for a, b in zip(_lagrange_antiderivatives(nodes, lo), _lagrange_antiderivatives(nodes, hi))]


class DEIS(Sampler):
    """DEIS-AB with the log-rho polynomial (Zhang & Chen 2023; diffusers ``DEISMultistepScheduler``, ``logrho``): on
    rho = sigma / alpha the PF ODE is d(x / alpha) / d rho = eps, and eps is extrapolated by the Lagrange polynomial
    in log rho through the last ``order`` noise predictions:

        x_t / alpha_t = x_s / alpha_s + sum_j eps_j int_{rho_s}^{rho_t} L_j(log rho) d rho.

    Order 1 is DDIM. The past eps_j = (x_j - alpha_j D_j) / sigma_j need the past x_j, which the kernel's slots do
    not carry: this sampler has a paper form only (the past values travel in ``State.extra``). Orders follow the
    multistep rule (warm-up, lower_order_final); like DPM-Solver++ 3M, the first-order warm-up limits the global
    order to 2.
    """

    history_needed = 0

    def __init__(self, order: int = 2, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
        self.order, self.lower_order_final = order, lower_order_final
        self.global_order = min(order, 2)
        self.name = f"DEIS-{order}"

    def step_order(self, state, grid):
        return multistep_order(self.order, state.step, len(grid), grid.levels[state.step + 1].is_data,
                               self.lower_order_final)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("DEIS extrapolates past eps_j = (x_j - alpha_j D_j) / sigma_j, which need past "
                                      "x_j: no per-stage coefficients in the kernel's slots")
        x = ctx.x
        D = ctx.denoise(x, cur)
        eps = (x - D * cur.alpha) / cur.sigma
        order = self.step_order(state, ctx.grid)
        past = state.extra.get("eps", ())
        eps_k = (eps,) + tuple(past[:order - 1])
        with np.errstate(divide="ignore"):
            logs = [np.log(np.asarray(cur.sigma_ve))] + list(state.extra.get("log_rho", ())[:order - 1])
            lo, hi = logs[0], np.log(np.asarray(nxt.sigma_ve))
        coefs = _lagrange_integrals(logs, lo, hi)
        out = x / cur.alpha
        for c, e in zip(coefs, eps_k):
            out = out + e * c
        keep = {"eps": (eps,) + tuple(past[:1]), "log_rho": tuple(logs[:2]), "order": order}
        return out * nxt.alpha, keep
