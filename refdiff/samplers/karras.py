"""Samplers written on the VE probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, Eq. 4 with
s(t) = 1): Euler and Heun with EDM's churn (Alg. 1-2), Euler ancestral and DPM-2 (k-diffusion).

Each step maps the schedule's x to x_ve = x / alpha, runs the paper's algorithm in sigma = sigma / alpha, and maps
back with the next level's alpha, so the same code serves VP, VE, EDM and flow schedules.
"""

from __future__ import annotations

import numpy as np

from .base import Level, Sampler, State, check_noise_scale

__all__ = ["Euler", "Heun", "EulerAncestral", "DPM2", "DPMSolverPPSDE", "LMS", "Churn", "GradientEstimation", "HeunPP2"]

SQRT2_MINUS_1 = np.sqrt(2.0) - 1.0       # EDM's cap on gamma
# Gauss-Legendre nodes and weights on [-1, 1]: 4 points integrate the degree <= 3 Lagrange bases of LMS exactly
_GL_U, _GL_W = np.polynomial.legendre.leggauss(4)


class Churn:
    """EDM stochasticity (Karras et al. 2022, Alg. 2 lines 4-6): for S_tmin <= sigma <= S_tmax,
    gamma = min(S_churn / N, sqrt 2 - 1), sigma_hat = sigma (1 + gamma), x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z.

    N is the number of sampling steps (EDM's convention; k-diffusion and diffusers use len(sigmas) - 1, the same).
    """

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = np.inf, s_noise: float = 1.0):
        # written as "not (valid)" so that NaN fails too (NaN < 0 is False: a NaN S_churn once disabled churn)
        if not (s_churn >= 0 and s_noise >= 0 and s_tmin >= 0 and s_tmax >= s_tmin):
            raise ValueError(f"need S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax, got S_churn {s_churn}, "
                             f"S_noise {s_noise}, S_tmin {s_tmin}, S_tmax {s_tmax}")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), \
            float(s_noise)

    def gamma(self, sigma, n_steps: int):
        on = (np.asarray(sigma) >= self.s_tmin) & (np.asarray(sigma) <= self.s_tmax)
        return np.where(on, min(self.s_churn / n_steps, SQRT2_MINUS_1), 0.0)

    @property
    def active(self) -> bool:
        return self.s_churn > 0


def _ve(x, level: Level):
    return x / level.alpha


def _from_ve(x_ve, level: Level):
    return x_ve * level.alpha


def _churn(ctx, x_ve, cur: Level, churn: Churn | None):
    """(x_hat in VE, level_hat): EDM's noise injection, or the input unchanged."""
    if churn is None or not churn.active:
        return x_ve, cur
    sigma = cur.sigma_ve
    gamma = churn.gamma(sigma, len(ctx.grid))
    if np.all(gamma == 0):
        return x_ve, cur
    sigma_hat = sigma * (1.0 + gamma)
    lvl = ctx.grid.level_at(-2.0 * np.log(sigma_hat))
    return x_ve + ctx.noise() * (np.sqrt(sigma_hat ** 2 - sigma ** 2) * churn.s_noise), lvl


class Euler(Sampler):
    """Euler on the PF ODE in sigma (Karras et al. 2022, Alg. 2 without the correction), with optional churn."""

    history_needed = 0

    def __init__(self, churn: Churn | None = None):
        self.churn = churn
        self.stochastic = churn is not None and churn.active
        self.order = None if self.stochastic else 1
        self.weak_order = 1 if self.stochastic else None
        self.name = "Euler" + (f"(S_churn={churn.s_churn:g})" if self.stochastic else "")

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x_hat, lvl = _churn(ctx, _ve(ctx.x, cur), cur, self.churn)
        s_hat = lvl.sigma_ve
        D = ctx.denoise(_from_ve(x_hat, lvl), lvl)
        d = (x_hat - D) / s_hat
        return _from_ve(x_hat + d * (nxt.sigma_ve - s_hat), nxt), {}


class Heun(Sampler):
    """Heun's second-order method (Karras et al. 2022, Alg. 1-2): Euler, then the trapezoidal correction with the
    slope at the Euler point; the final step into sigma = 0 stays Euler (recorded as order 1)."""

    history_needed = 0

    def __init__(self, churn: Churn | None = None):
        self.churn = churn
        self.stochastic = churn is not None and churn.active
        self.order = None if self.stochastic else 2
        # churn re-noises to the exact marginal at sigma_hat, so the law's error is the ODE step's (measured on
        # the exact Gaussian output law: covariance error ~ h^2)
        self.weak_order = 2 if self.stochastic else None
        self.name = "Heun" + (f"(S_churn={churn.s_churn:g})" if self.stochastic else "")

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x_hat, lvl = _churn(ctx, _ve(ctx.x, cur), cur, self.churn)
        s_hat, s_next = lvl.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(_from_ve(x_hat, lvl), lvl)
        d = (x_hat - D) / s_hat
        x_next = x_hat + d * (s_next - s_hat)
        if nxt.is_data:
            return _from_ve(x_next, nxt), {"order": 1}
        D2 = ctx.denoise(_from_ve(x_next, nxt), nxt)
        d2 = (x_next - D2) / s_next
        return _from_ve(x_hat + (d * 0.5 + d2 * 0.5) * (s_next - s_hat), nxt), {"order": 2}


def _ancestral(s, s_to, eta):
    """(sigma_up, sigma_down) of an ancestral step from s to s_to (k-diffusion ``get_ancestral_step``; radicands
    clamped at 0)."""
    up = np.minimum(s_to, eta * np.sqrt(np.maximum(s_to * s_to * (s * s - s_to * s_to) / (s * s), 0.0)))
    return up, np.sqrt(np.maximum(s_to * s_to - up * up, 0.0))


class EulerAncestral(Sampler):
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): step to sigma_down by Euler, add noise of std sigma_up,
    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2) (radicands clamped at 0: diffusers #14213 took a square root of a
    negative fp32 rounding)."""

    stochastic = True
    weak_order = 1
    history_needed = 0

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.name = f"EulerAncestral(eta={eta:g})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return _from_ve(D, nxt), {}
        up, down = _ancestral(s, sn, self.eta)
        x_down = x + (x - D) / s * (down - s)
        return _from_ve(x_down + ctx.noise() * (up * self.s_noise), nxt), {}


class DPM2(Sampler):
    """DPM-2 (k-diffusion ``sample_dpm_2``): a midpoint step at sigma_mid = sqrt(sigma sigma_next) (log-sigma midpoint);
    Euler into sigma = 0."""

    order = 2
    history_needed = 0
    name = "DPM2"

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        d = (x - D) / s
        if nxt.is_data:
            return _from_ve(x + d * (sn - s), nxt), {"order": 1}
        mid = ctx.grid.level_at(0.5 * (np.asarray(cur.log_snr) + np.asarray(nxt.log_snr)))
        s_mid = mid.sigma_ve
        x2 = x + d * (s_mid - s)
        D2 = ctx.denoise(_from_ve(x2, mid), mid)
        return _from_ve(x + (x2 - D2) / s_mid * (sn - s), nxt), {"order": 2}


class DPMSolverPPSDE(Sampler):
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``, diffusers ``DPMSolverSDEScheduler``): in t = -log sigma,
    an ancestral DPM-Solver++ first-order step to the intermediate sigma_r = sigma^(1-r) sigma_next^r, a second model
    evaluation there, then an ancestral step from the start with D_r = (1 - 1/(2r)) D + 1/(2r) D(x_r):

        x_r  = D + (sigma_down / sigma) (x - D) + sigma_up z_1          (ancestral pair sigma -> sigma_r)
        x'   = D_r + (sigma_down' / sigma) (x - D_r) + sigma_up' z_2      (ancestral pair sigma -> sigma_next)

    Euler into sigma = 0. k-diffusion and diffusers draw z_1, z_2 from one Brownian path (a torchsde tree; the two
    increments overlap and are correlated); refdiff uses the draws it is given, so a check replays theirs.
    """

    history_needed = 0

    def __init__(self, eta: float = 1.0, r: float = 0.5, s_noise: float = 1.0):
        if not (0.0 <= eta < np.inf and 0.0 < r < 1.0 and 0.0 <= s_noise < np.inf):
            raise ValueError(f"need finite eta >= 0, 0 < r < 1 and s_noise >= 0, got eta {eta}, r {r}, s_noise "
                             f"{s_noise}")
        self.eta, self.r, self.s_noise = float(eta), float(r), float(s_noise)
        self.stochastic = eta > 0
        # the second stage restarts from x with the first stage's D_r mixed in but not its noise: on the exact
        # Gaussian law the covariance error is O(h) (refdiff order)
        self.weak_order = 1 if self.stochastic else None
        self.order = None if self.stochastic else 2             # eta = 0: DPM-Solver++(2S) with r (second order)
        self.name = f"DPMSolver++SDE(eta={eta:g})"

    def _noise(self, ctx, up):
        return ctx.noise() * (up * self.s_noise) if self.stochastic else 0.0

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic and self.eta > 0:
            raise NotImplementedError("the second stage restarts from x and so re-reads the first stage's noise: no "
                                      "per-stage coefficients in the kernel's slots (one new noise per stage)")
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return _from_ve(D, nxt), {"order": 1}
        s_r = np.exp((1.0 - self.r) * np.log(s) + self.r * np.log(sn))
        up, down = _ancestral(s, s_r, self.eta)
        x_r = D + (x - D) * (down / s) + self._noise(ctx, up)
        mid = ctx.grid.level_at(-2.0 * np.log(s_r))
        D_r = ctx.denoise(_from_ve(x_r, mid), mid)
        fac = 0.5 / self.r
        D_d = D * (1.0 - fac) + D_r * fac
        up, down = _ancestral(s, sn, self.eta)
        return _from_ve(D_d + (x - D_d) * (down / s) + self._noise(ctx, up), nxt), {"order": 2}


class LMS(Sampler):
    """Linear multistep in sigma (k-diffusion ``sample_lms``, diffusers ``LMSDiscreteScheduler``): the derivatives
    d_j = (x_j - D_j) / sigma_j at the last ``order`` levels are Lagrange-interpolated in sigma and integrated over
    the step, x_next = x + sum_j d_j int_{sigma}^{sigma_next} L_j(s) ds (exactly: 4-point Gauss-Legendre).

    The warm-up raises the order by one per step; its first-order first step (local error O(h^2)) limits the global
    order to 2 although later steps are of order ``order``. The past d_j need the past x_j, which the kernel's slots
    do not carry: paper form only (past values in ``State.extra``).
    """

    history_needed = 0

    def __init__(self, order: int = 4):
        if order not in (1, 2, 3, 4):
            raise ValueError(f"LMS order must be 1..4, got {order}")
        self.order = order
        self.global_order = min(order, 2)
        self.name = f"LMS-{order}"

    def step_order(self, state, grid):
        return min(self.order, state.step + 1)

    def _nodes(self, state, k: int, s):
        """The Lagrange nodes, newest first: this level's sigma and those of the last k - 1 steps."""
        return [s] + list(state.extra.get("sigmas", ())[:k - 1])

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("LMS interpolates past derivatives (x_j - D_j) / sigma_j, which need past x_j: "
                                      "no per-stage coefficients in the kernel's slots")
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        k = self.step_order(state, ctx.grid)
        ds = ((x - D) / s,) + tuple(state.extra.get("d", ())[:k - 1])
        nodes = self._nodes(state, k, s)
        out = x
        for j, d in enumerate(ds):
            coef = 0.0
            for q in range(len(_GL_U)):
                tau = 0.5 * (sn - s) * _GL_U[q] + 0.5 * (sn + s)
                basis = 1.0
                for m, node in enumerate(nodes):
                    if m != j:
                        basis = basis * (tau - node) / (nodes[j] - node)
                coef = coef + _GL_W[q] * basis
            out = out + d * (0.5 * (sn - s) * coef)
        keep = {"d": ds[:self.order - 1], "sigmas": tuple(nodes[:self.order - 1]), "order": k}
        return _from_ve(out, nxt), keep


class GradientEstimation(Sampler):
    """The gradient-estimation sampler (Permenter & Yuan 2024, Alg. 2; ComfyUI ``gradient_estimation``): Euler in
    VE sigma with the derivative extrapolated by the last change, d_bar = d + (gamma - 1) (d - d_old), i.e.
    x' = x + (sigma' - sigma) d_bar for every step after the first (Euler), the step into sigma = 0 included (as
    ComfyUI). gamma = 2 by default. The fixed extrapolation ignores the step sizes: a first-order method on general
    grids. ``cfg_pp=True``: ComfyUI's ``gradient_estimation_cfg_pp``, d from the unconditional prediction and
    x' = D_g + sigma' d + (gamma - 1)(d - d_old)(sigma' - sigma). Past d travels in ``State.extra``: paper form
    only."""

    order = 1
    history_needed = 0

    def __init__(self, gamma: float = 2.0, cfg_pp: bool = False):
        if not np.isfinite(gamma):
            raise ValueError(f"gamma must be finite, got {gamma}")
        self.gamma, self.cfg_pp = float(gamma), bool(cfg_pp)
        self.name = f"GradientEstimation(gamma={gamma:g})" + ("(CFG++)" if cfg_pp else "")

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("gradient estimation reads the previous derivative (x_old - D_old) / sigma_old, "
                                      "which needs the previous x: paper form only")
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        d = (x - (ctx.uncond_denoised() if self.cfg_pp else D)) / s
        corr = 0.0 if state.step == 0 else (d - state.extra["d"]) * ((self.gamma - 1.0) * (sn - s))
        out = D + d * sn + corr if self.cfg_pp else x + d * (sn - s) + corr
        return _from_ve(out, nxt), {"d": d}


class HeunPP2(Sampler):
    """Heun++ (ComfyUI ``heunpp2``, from sd-webui-samplers-scheduler): with the next two levels ahead, a three-stage
    step x' = x + (sigma' - sigma)(w1 d + w2 d2 + w3 d3), d2 at the Euler point at sigma', d3 one Euler step further
    at sigma'' (the level after), w2 = sigma' / (3 sigma_0), w3 = sigma'' / (3 sigma_0), w1 = 1 - w2 - w3, sigma_0
    the run's first level; before the last step Heun weighted w2 = sigma' / (2 sigma_0); the last step Euler. The
    weights fade to Euler as sigma / sigma_0 shrinks: a first-order method."""

    order = 1
    history_needed = 0
    name = "HeunPP2"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("Heun++'s weights read the run's first level: paper form only")
        lv = ctx.grid.levels
        i = state.step
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        s0 = lv[0].sigma_ve
        D = ctx.denoise(ctx.x, cur)
        d = (x - D) / s
        dt = sn - s
        if i + 1 == len(lv) - 1:                                   # the last step: Euler
            return _from_ve(x + d * dt, nxt), {"order": 1}
        x2 = x + d * dt
        d2 = (x2 - ctx.denoise(_from_ve(x2, nxt), nxt)) / sn
        if i + 2 == len(lv) - 1:                                   # the step before the last: weighted Heun
            w2 = sn / (2.0 * s0)
            return _from_ve(x + (d * (1.0 - w2) + d2 * w2) * dt, nxt), {"order": 2}
        nn = lv[i + 2]
        snn = nn.sigma_ve
        x3 = x2 + d2 * (snn - sn)
        d3 = (x3 - ctx.denoise(_from_ve(x3, nn), nn)) / snn
        w2, w3 = sn / (3.0 * s0), snn / (3.0 * s0)
        return _from_ve(x + (d * (1.0 - w2 - w3) + d2 * w2 + d3 * w3) * dt, nxt), {"order": 3}
