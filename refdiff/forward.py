"""The forward (noising) process: q(x_t | x_0), q(x_t | x_s) for s < t, and the posterior q(x_s | x_t, x_0).

Symbols
-------
alpha_t, sigma_t    marginal x_t = alpha_t x_0 + sigma_t eps (Kingma et al. 2021, Eq. 1)
alpha_{t|s}         alpha_t / alpha_s
sigma_{t|s}^2       sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = -sigma_t^2 expm1(lambda_t - lambda_s) (VDM Eq. 2-3)
lambda              log_snr = log(alpha^2 / sigma^2)

Shapes: x of shape (B, ...) with alpha / sigma scalars or per-row (B,) vectors. All float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validate import as_f64, broadcast_rows, check_same_shape

__all__ = ["q_sample", "q_moments", "transition", "posterior", "Gaussian"]


class Gaussian(NamedTuple):
    """Isotropic Gaussian N(mean, var I) with per-row variance broadcast against mean."""

    mean: np.ndarray
    var: np.ndarray


def q_sample(x0, alpha, sigma, eps) -> np.ndarray:
    """x_t = alpha x_0 + sigma eps (Ho et al. 2020, Eq. 4), with the noise ``eps`` given explicitly.

    Parameters
    ----------
    x0, eps : array (B, ...)
    alpha, sigma : scalar or (B,)
    """
    x0 = as_f64(x0, "x0")
    eps = as_f64(eps, "eps")
    check_same_shape(x0, eps, "x0", "eps")
    return broadcast_rows(alpha, x0, "alpha") * x0 + broadcast_rows(sigma, x0, "sigma") * eps


def q_moments(x0, alpha, sigma) -> Gaussian:
    """Mean alpha x_0 and variance sigma^2 of q(x_t | x_0)."""
    x0 = as_f64(x0, "x0")
    a = broadcast_rows(alpha, x0, "alpha")
    s = broadcast_rows(sigma, x0, "sigma")
    return Gaussian(a * x0, s * s)


LEVEL_LOG_SNR_ATOL = 1e-6     # |log_snr - 2 log(alpha / sigma)|: float32-rounded alpha, sigma move it by < 2.4e-7


def _check_level(alpha, sigma, log_snr, name):
    """A log-SNR given beside (alpha, sigma) must be theirs: it sets the variance factor, so a contradicting one
    (swapped arguments, another schedule's level) would give a silently wrong posterior."""
    with np.errstate(divide="ignore", invalid="ignore"):
        implied = 2.0 * (np.log(alpha) - np.log(sigma))
        same_inf = np.isinf(log_snr) & (implied == log_snr)
        off = ~same_inf & ~(np.abs(log_snr - implied) <= LEVEL_LOG_SNR_ATOL * np.maximum(1.0, np.abs(implied)))
    if np.any(off):
        k = np.unravel_index(int(np.argmax(off)), np.shape(off))
        raise ValueError(f"log_snr_{name} = {np.broadcast_to(log_snr, np.shape(off))[k]!r} contradicts alpha_{name}, "
                         f"sigma_{name}, whose log-SNR 2 log(alpha / sigma) is {np.broadcast_to(implied, np.shape(off))[k]!r}")


def _ratio_terms(alpha_s, sigma_s, alpha_t, sigma_t, log_snr_s, log_snr_t, like):
    """alpha_{t|s} and the variance factor 1 - e^{lambda_t - lambda_s} = sigma_{t|s}^2 / sigma_t^2.

    With the log-SNRs given the factor is -expm1(lambda_t - lambda_s), exact to a few ulp even when s and t are
    close; from (alpha, sigma) alone it is 1 - (alpha_t sigma_s / (alpha_s sigma_t))^2, which loses digits then.
    """
    a_s = broadcast_rows(alpha_s, like, "alpha_s")
    s_s = broadcast_rows(sigma_s, like, "sigma_s")
    a_t = broadcast_rows(alpha_t, like, "alpha_t")
    s_t = broadcast_rows(sigma_t, like, "sigma_t")
    if (log_snr_s is None) != (log_snr_t is None):
        raise ValueError("give both log_snr_s and log_snr_t, or neither")
    if np.any(a_s <= 0) or np.any(s_t < 0) or np.any(s_s < 0) or np.any(a_t < 0):
        raise ValueError("need alpha_s > 0 (alpha_{t|s} = alpha_t / alpha_s) and non-negative alpha_t, sigma_s, sigma_t")
    if log_snr_s is not None:
        _check_level(a_s, s_s, broadcast_rows(log_snr_s, like, "log_snr_s"), "s")
        _check_level(a_t, s_t, broadcast_rows(log_snr_t, like, "log_snr_t"), "t")
        d = broadcast_rows(log_snr_t, like, "log_snr_t") - broadcast_rows(log_snr_s, like, "log_snr_s")
        if np.any(d > 0):
            raise ValueError("need s < t, i.e. log_snr_t <= log_snr_s")
        factor = -np.expm1(d)
    else:
        r = a_t * s_s / (a_s * s_t)
        factor = (1.0 - r) * (1.0 + r)
        if np.any(factor < 0):
            raise ValueError("need s < t: sigma_t / alpha_t must be >= sigma_s / alpha_s")
    return a_s, s_s, a_t, s_t, factor


def transition(x_s, alpha_s, sigma_s, alpha_t, sigma_t, *, log_snr_s=None, log_snr_t=None) -> Gaussian:
    """q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I) for s < t (Kingma et al. 2021, Eq. 2-3)."""
    x_s = as_f64(x_s, "x_s")
    a_s, _, a_t, s_t, factor = _ratio_terms(alpha_s, sigma_s, alpha_t, sigma_t, log_snr_s, log_snr_t, x_s)
    return Gaussian((a_t / a_s) * x_s, s_t * s_t * factor)


def posterior(x_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, *, log_snr_s=None, log_snr_t=None) -> Gaussian:
    """q(x_s | x_t, x_0) for s < t (Kingma et al. 2021, Eq. 29-31; Ho et al. 2020, Eq. 6-7 for consecutive steps).

    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0,
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    With s = 0 (alpha_s = 1, sigma_s = 0) this is the point mass at x_0, as in DDPM's first step.
    """
    x_t = as_f64(x_t, "x_t")
    x0 = as_f64(x0, "x0")
    check_same_shape(x_t, x0, "x_t", "x0")
    if np.any(np.asarray(sigma_t) == 0):
        raise ValueError("posterior needs sigma_t > 0 (at sigma_t = 0, x_t is x_0 and there is nothing to invert)")
    a_s, s_s, a_t, s_t, factor = _ratio_terms(alpha_s, sigma_s, alpha_t, sigma_t, log_snr_s, log_snr_t, x_t)
    keep = s_s * s_s / (s_t * s_t)                  # sigma_s^2 / sigma_t^2
    mean = (a_t / a_s) * keep * x_t + a_s * factor * x0
    return Gaussian(mean, factor * s_s * s_s)
