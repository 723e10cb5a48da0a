"""Conversions among model parametrizations at a noise level (alpha, sigma), and EDM preconditioning.

Symbols (x = alpha x0 + sigma eps)
----------------------------------
eps     noise prediction (Ho et al. 2020)
x0      data prediction, the denoiser D (Karras et al. 2022)
v       alpha eps - sigma x0 (Salimans & Ho 2022, Eq. 9; general alpha, sigma)
score   grad log p_t(x) = -eps / sigma (Song et al. 2021; Tweedie)
flow    rectified-flow velocity eps - x0 (Liu et al. 2022; Esser et al. 2024): d x / d t for x = (1 - t) x0 + t eps

Every conversion goes through the pair (x0, eps), whose inverse is exact for any alpha, sigma:
v  -> x0 = (alpha x - sigma v) / (alpha^2 + sigma^2), eps = (sigma x + alpha v) / (alpha^2 + sigma^2)
flow -> x0 = (x - sigma u) / (alpha + sigma),        eps = (x + alpha u) / (alpha + sigma)
Singular points are refused, never returned as inf / NaN: eps -> x0 needs alpha > 0 (an eps model says
nothing about x0 at zero SNR), x0 -> eps and score need sigma > 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validate import as_f64, broadcast_rows, check_same_shape
from .schedules import VPLinear

__all__ = ["PREDICTIONS", "to_x0_eps", "from_x0_eps", "convert", "Precond", "edm_precond", "ve_precond",
           "vp_precond", "EDM_SIGMA_DATA"]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
EDM_SIGMA_DATA = 0.5          # Karras et al. 2022, Table 1 (sigma_data for images in [-1, 1])
VP_M = 1000                   # Karras et al. 2022, Table 1: c_noise = (M - 1) sigma^{-1}(sigma) for VP


def _check_kind(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction type must be one of {PREDICTIONS}, got {kind!r}")


def _coeffs(x, alpha, sigma):
    a = broadcast_rows(alpha, x, "alpha")
    s = broadcast_rows(sigma, x, "sigma")
    if np.any(a < 0) or np.any(s < 0) or np.any((a == 0) & (s == 0)):
        raise ValueError("need alpha >= 0, sigma >= 0 and not both zero")
    return a, s


def to_x0_eps(pred, kind: str, x, alpha, sigma):
    """(x0, eps) implied by a model output ``pred`` of type ``kind`` at noisy input x.

    Parameters
    ----------
    pred, x : array (B, ...)
    kind : one of PREDICTIONS
    alpha, sigma : scalar or (B,)

    Raises
    ------
    ValueError
        eps or score prediction where alpha == 0 (zero terminal SNR: x0 is undefined — use v or x0
        prediction there); x0 prediction where sigma == 0 (eps undefined).
    """
    _check_kind(kind)
    pred = as_f64(pred, "model output")
    x = as_f64(x, "x")
    check_same_shape(pred, x, "model output", "x")
    a, s = _coeffs(x, alpha, sigma)
    if kind in ("eps", "score"):
        if np.any(a == 0):
            raise ValueError(f"{kind} prediction at alpha = 0 (SNR = 0): x0 = (x - sigma eps) / alpha is 0/0; "
                             "an eps model carries no information about x0 at zero terminal SNR — use v or x0 "
                             "prediction, or start sampling below t = T")
        eps = pred if kind == "eps" else -s * pred
        if kind == "score" and np.any(s == 0):
            raise ValueError("score prediction at sigma = 0 is undefined")
        return (x - s * eps) / a, eps
    if kind == "x0":
        if np.any(s == 0):
            raise ValueError("x0 prediction at sigma = 0: eps = (x - alpha x0) / sigma is undefined")
        return pred, (x - a * pred) / s
    if kind == "v":
        n = a * a + s * s
        return (a * x - s * pred) / n, (s * x + a * pred) / n
    n = a + s
    return (x - s * pred) / n, (x + a * pred) / n


def from_x0_eps(x0, eps, kind: str, alpha, sigma):
    """The model output of type ``kind`` that corresponds to (x0, eps) at (alpha, sigma)."""
    _check_kind(kind)
    x0 = as_f64(x0, "x0")
    eps = as_f64(eps, "eps")
    check_same_shape(x0, eps, "x0", "eps")
    a, s = _coeffs(x0, alpha, sigma)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        if np.any(s == 0):
            raise ValueError("score at sigma = 0 is undefined")
        return -eps / s
    return eps - x0


def convert(pred, from_kind: str, to_kind: str, x, alpha, sigma):
    """Convert a model output between parametrizations at noisy input x (via the (x0, eps) pair)."""
    x0, eps = to_x0_eps(pred, from_kind, x, alpha, sigma)
    return from_x0_eps(x0, eps, to_kind, alpha, sigma)


class Precond(NamedTuple):
    """Preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Eq. 7)."""

    c_skip: np.ndarray
    c_out: np.ndarray
    c_in: np.ndarray
    c_noise: np.ndarray


def _sigma(sigma) -> np.ndarray:
    s = as_f64(sigma, "sigma")
    if np.any(~(s > 0)) or np.any(~np.isfinite(s)):
        raise ValueError("sigma must be positive and finite for preconditioning")
    return s


def edm_precond(sigma, sigma_data: float = EDM_SIGMA_DATA) -> Precond:
    """EDM column of Karras et al. (2022), Table 1: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4. sigma is the VE noise level sigma_t / alpha_t."""
    s = _sigma(sigma)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")
    r = np.hypot(s, sigma_data)
    return Precond(sigma_data ** 2 / (r * r), s * sigma_data / r, 1.0 / r, 0.25 * np.log(s))


def ve_precond(sigma) -> Precond:
    """VE column of Table 1: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""
    s = _sigma(sigma)
    one = np.ones_like(s)
    return Precond(one, s, one, np.log(0.5 * s))


def vp_precond(sigma, schedule=None) -> Precond:
    """VP column of Table 1: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) t(sigma) with t the VP-linear inverse (beta_d = 19.9, beta_min = 0.1 unless given)."""
    s = _sigma(sigma)
    schedule = VPLinear(0.1, 20.0) if schedule is None else schedule
    t = schedule.t_of_log_snr(-2.0 * np.log(s))
    return Precond(np.ones_like(s), -s, 1.0 / np.hypot(s, 1.0), (VP_M - 1) * np.asarray(t))
