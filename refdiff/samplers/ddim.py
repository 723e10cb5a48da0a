"""DDIM (Song et al. 2021a, Eq. 12) with eta, its inversion, and DDPM ancestral sampling (Ho et al. 2020, Alg. 2).

Symbols: x_t = alpha_t x0 + sigma_t eps; D the data prediction at the current level, eps_hat = (x - alpha D) / sigma;
full log-SNR lambda; the posterior q(x_s | x_t, x0) has variance sigma_s^2 (1 - e^{lambda_t - lambda_s}).
"""

from __future__ import annotations

import numpy as np

from .base import Level, Sampler, State

__all__ = ["DDIM", "DDPM", "DDPM_VARIANCES"]

DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _posterior_keep(cur: Level, nxt: Level):
    """1 - e^{lambda_t - lambda_s} (t = cur, s = nxt): the fraction of sigma_s^2 that is fresh noise."""
    with np.errstate(invalid="ignore"):
        keep = -np.expm1(np.asarray(cur.log_snr, dtype=np.float64) - np.asarray(nxt.log_snr, dtype=np.float64))
    return np.where(np.isinf(nxt.log_snr), 1.0, keep)


class DDIM(Sampler):
    """DDIM(eta): x_s = alpha_s D + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta z,
    sigma_eta = eta sigma_s sqrt(1 - e^{lambda_t - lambda_s}) (Song et al. 2021a, Eq. 12 and 16).

    eta = 0 is the deterministic first-order PF-ODE solver (= DPM-Solver-1, = Euler in sigma_ve); eta = 1 is
    DDPM's ancestral step with the posterior variance. The same formula runs in the noising direction on an
    increasing grid: that is DDIM inversion (eta must be 0 there).
    """

    snr_zero_start = True

    history_needed = 0

    def __init__(self, eta: float = 0.0):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.eta = float(eta)
        self.stochastic = eta > 0
        self.order = None if self.stochastic else 1
        self.weak_order = 1 if self.stochastic else None
        self.name = f"DDIM(eta={eta:g})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        eps_hat = (x - D * cur.alpha) / cur.sigma
        if self.eta == 0.0 or nxt.is_data:
            return D * nxt.alpha + eps_hat * nxt.sigma, {}
        if np.any(np.asarray(nxt.log_snr) < np.asarray(cur.log_snr)):
            raise ValueError("DDIM with eta > 0 only runs towards the data (inversion needs eta = 0)")
        frac = self.eta ** 2 * _posterior_keep(cur, nxt)
        sigma_eta = np.asarray(nxt.sigma) * np.sqrt(frac)
        return D * nxt.alpha + eps_hat * (np.asarray(nxt.sigma) * np.sqrt(1.0 - frac)) + ctx.noise() * sigma_eta, {}


class DDPM(Sampler):
    """Ancestral sampling from the model posterior p(x_s | x_t) = N(mu_tilde(x_t, D), var) (Ho et al. 2020, Eq. 6-7,
    Alg. 2), generalised to any s < t:

        mu_tilde = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s (1 - e^{lambda_t - lambda_s}) D
        fixed_small: var = sigma_s^2 (1 - e^{lambda_t - lambda_s})   (the posterior variance)
        fixed_large: var = sigma_t^2 (1 - e^{lambda_t - lambda_s})   (= beta_t for consecutive steps)
        learned_range: log var = f log(fixed_large) + (1 - f) log(fixed_small), f = (v + 1) / 2 from the model
                       (Nichol & Dhariwal 2021, Eq. 15; paper form only: a per-element variance is not a stage
                       coefficient).
    The last step into the data adds no noise (as in the papers' samplers).
    """

    snr_zero_start = True

    stochastic = True
    weak_order = 1
    history_needed = 0

    def __init__(self, variance: str = "fixed_small", variance_fn=None):
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"variance must be one of {DDPM_VARIANCES}, got {variance!r}")
        if variance == "learned_range" and variance_fn is None:
            raise ValueError("learned_range needs variance_fn(x, level) -> model variance output in [-1, 1]")
        self.variance, self.variance_fn = variance, variance_fn
        self.name = f"DDPM({variance})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        x = ctx.x
        D = ctx.denoise(x, cur)
        keep = _posterior_keep(cur, nxt)
        a_ts = np.asarray(cur.alpha) / np.asarray(nxt.alpha)
        ratio = np.asarray(nxt.sigma) ** 2 / np.asarray(cur.sigma) ** 2
        mean = x * (a_ts * ratio) + D * (np.asarray(nxt.alpha) * keep)
        if nxt.is_data:
            return mean, {}
        small = np.asarray(nxt.sigma) ** 2 * keep
        large = np.asarray(cur.sigma) ** 2 * keep
        if self.variance == "fixed_small":
            var = small
        elif self.variance == "fixed_large":
            var = large
        else:
            if ctx.symbolic:
                raise NotImplementedError("learned_range has a per-element variance from the model: it has a paper "
                                          "form only, not per-stage coefficients")
            frac = (np.asarray(self.variance_fn(x, cur), dtype=np.float64) + 1.0) / 2.0
            var = np.exp(frac * np.log(large) + (1.0 - frac) * np.log(small))
        return mean + ctx.noise() * np.sqrt(var), {}
