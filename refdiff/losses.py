"""Training objectives: the denoising losses, their per-sample weightings, noise-level samplers, and the map of any
objective to its Kingma & Gao weighting w(lambda).

Symbols
-------
x_t = alpha x0 + sigma eps,  lambda = log SNR = log(alpha^2 / sigma^2)
c_pred   ||pred error||^2 / ||eps error||^2 at fixed x_t: eps 1, x0 1/SNR, v ((alpha^2+sigma^2)/alpha)^2,
         flow ((alpha+sigma)/alpha)^2, score 1/sigma^2
W_x0     a weighting written on the x0 error (Min-SNR and EDM papers do so); the weight applied to a model of
         prediction type `pred` is W_x0 c_x0 / c_pred
w(lambda) Kingma & Gao (2023), Eq. 5: every objective equals 1/2 int w(lambda) E||eps_hat - eps||^2 d lambda, with
         w = 2 p(lambda) W_eps(lambda) for noise levels drawn with density p(lambda)

Weightings (``WEIGHTINGS``): constant (1 on the prediction's own error), snr (W_x0 = SNR, Salimans & Ho 2022),
truncated_snr (max(SNR, 1)), min_snr (min(SNR, gamma), Hang et al. 2023), edm (SNR + 1/sigma_data^2, Karras et
al. 2022 Eq. 8 with lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2), elbo (W_eps = -lambda'/2, Kingma et
al. 2021) and sigmoid (W_eps = -lambda' sigmoid(b - lambda) / 2, Kingma & Gao 2023 §5).
Noise-level samplers take the uniforms explicitly: uniform, stratified, antithetic (VDM), discrete uniform,
log-normal sigma (EDM), logit-normal t (Esser et al. 2024).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import expit, ndtri

from ._validate import as_f64, broadcast_rows, positive_int
from .parametrization import PREDICTIONS, from_x0_eps
from .schedules import ContinuousSchedule, DiscreteSchedule

__all__ = [
    "WEIGHTINGS", "MIN_SNR_GAMMA", "loss_weight", "eps_space_weight", "TrainingLoss", "training_loss",
    "UniformTime", "StratifiedTime", "AntitheticTime", "DiscreteUniformTime", "LogNormalSigma", "LogitNormalTime",
    "implied_weighting",
]

WEIGHTINGS = ("constant", "snr", "truncated_snr", "min_snr", "edm", "elbo", "sigmoid")
MIN_SNR_GAMMA = 5.0            # Hang et al. 2023, the recommended gamma
EDM_SIGMA_DATA = 0.5
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2   # Karras et al. 2022, Table 1: ln sigma ~ N(P_mean, P_std^2)
SIGMOID_BIAS = 2.0             # Kingma & Gao 2023: b = 2 for their best ImageNet 64 runs


def _ratios(kind, a, s):
    """(r, snr_r) with r = c_x0 / c_pred and snr_r = SNR * r, each in a form finite wherever it is defined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "x0":
            return np.ones_like(a * s), (a * a) / (s * s)
        if kind == "eps":
            return (s * s) / (a * a), np.ones_like(a * s)
        if kind == "v":
            n = a * a + s * s
            return (s / n) ** 2, (a / n) ** 2
        if kind == "flow":
            n = a + s
            return (s / n) ** 2, (a / n) ** 2
        return s ** 4 / (a * a), s * s                      # score: c_score = 1 / sigma^2


def loss_weight(weighting: str, prediction: str, alpha, sigma, *, gamma: float = MIN_SNR_GAMMA,
                sigma_data: float = EDM_SIGMA_DATA, bias: float = SIGMOID_BIAS, dlog_snr_dt=None) -> np.ndarray:
    """Per-sample weight on mean((pred - target)^2) for a model of type ``prediction`` (see the module table).

    Finite at SNR = 0 and SNR = inf wherever the limit is: min_snr is min(SNR r, gamma r) with both terms
    formed directly, e.g. eps: min(1, gamma / SNR); v: min(SNR, gamma) / (SNR + 1) for VP; x0: min(SNR, gamma).
    ``elbo`` and ``sigmoid`` need dlog_snr_dt (they are defined per unit time, Kingma & Gao Eq. 5).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    a = as_f64(alpha, "alpha")
    s = as_f64(sigma, "sigma")
    if weighting == "constant":
        return np.ones(np.broadcast(a, s).shape)[()]
    r, snr_r = _ratios(prediction, a, s)
    if weighting == "min_snr":
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        return np.minimum(snr_r, gamma * r)[()]
    if weighting == "snr":
        return snr_r[()]
    if weighting == "truncated_snr":
        return np.maximum(snr_r, r)[()]
    if weighting == "edm":
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        return (snr_r + r / sigma_data ** 2)[()]
    if dlog_snr_dt is None:
        raise ValueError(f"the {weighting} weighting is defined per unit time: pass dlog_snr_dt")
    w_eps = -0.5 * as_f64(dlog_snr_dt, "dlog_snr_dt")
    if weighting == "sigmoid":
        with np.errstate(divide="ignore", invalid="ignore"):
            w_eps = w_eps * expit(bias - np.log(a * a) + np.log(s * s))
    return (w_eps * snr_r)[()]


def eps_space_weight(weight, prediction: str, alpha, sigma) -> np.ndarray:
    """W_eps = weight * c_pred: the same loss written on the eps error."""
    a = as_f64(alpha, "alpha")
    s = as_f64(sigma, "sigma")
    r, snr_r = _ratios(prediction, a, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        return as_f64(weight, "weight") / snr_r          # c_pred = c_x0 / r = 1 / (SNR r) = 1 / snr_r


class TrainingLoss(NamedTuple):
    """Result of one reference training step: per-sample loss (B,), weight (B,), the noisy input, the target,
    and the rows whose loss is not finite (NaN / inf in the model output propagate, and are listed here)."""

    loss: np.ndarray
    weight: np.ndarray
    x_t: np.ndarray
    target: np.ndarray
    nonfinite_rows: np.ndarray


def _levels(schedule, t):
    if isinstance(schedule, DiscreteSchedule):
        return schedule.alpha(t), schedule.sigma(t), None
    if isinstance(schedule, ContinuousSchedule):
        return schedule.alpha(t), schedule.sigma(t), schedule.d_log_snr_dt(t)
    raise ValueError(f"schedule must be a DiscreteSchedule or a ContinuousSchedule, got {type(schedule).__name__}")


def training_loss(model, x0, t, eps, schedule, prediction: str = "eps", weighting: str = "constant",
                  reduction: str = "mean", strict: bool = False, **weight_kw) -> TrainingLoss:
    """One denoising training step with injected randomness (Ho et al. 2020, Alg. 1, generalised).

    x_t = alpha_t x0 + sigma_t eps; loss_b = weight(t_b) * mean_or_sum((model(x_t, t) - target)^2) over the
    non-batch dims, where the target is eps, x0, v = alpha eps - sigma x0, score -eps / sigma or flow eps - x0.

    Parameters
    ----------
    model : callable (x_t (B, ...), t (B,)) -> prediction (B, ...)
    x0, eps : (B, ...) data and noise (the noise is always given)
    t : (B,) integer indices for a DiscreteSchedule, times for a ContinuousSchedule
    strict : raise FloatingPointError naming the rows and times whose loss is not finite

    Raises
    ------
    ValueError
        eps or score prediction where alpha = 0 (zero terminal SNR): the input is then pure noise, the eps target
        equals the input, and such a model can never produce x0 — train v or x0 prediction there.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x0 = as_f64(x0, "x0")
    eps = as_f64(eps, "eps")
    if x0.shape != eps.shape or x0.ndim < 1:
        raise ValueError(f"x0 and eps must have the same shape (B, ...), got {x0.shape} and {eps.shape}")
    if x0.ndim > 1 and int(np.prod(x0.shape[1:])) == 0:
        raise ValueError(f"each example needs at least one element (a mean over none is undefined), got x0 of "
                         f"shape {x0.shape}")
    t = np.asarray(t)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},) to match x0 of shape {x0.shape}, got {t.shape}")
    a, s, dl = _levels(schedule, t)
    if prediction in ("eps", "score") and np.any(a == 0):
        raise ValueError(f"{prediction} prediction at alpha = 0 (SNR = 0): x_t is pure noise, so the target is the "
                         "input itself and the model never learns x0; use v or x0 prediction with zero terminal SNR")
    x_t = broadcast_rows(a, x0, "alpha") * x0 + broadcast_rows(s, x0, "sigma") * eps
    target = from_x0_eps(x0, eps, prediction, a, s)
    pred = as_f64(model(x_t, t), "model output")
    if pred.shape != x0.shape:
        raise ValueError(f"model output shape {pred.shape} does not match x0 shape {x0.shape}")
    w = np.broadcast_to(loss_weight(weighting, prediction, a, s, dlog_snr_dt=dl, **weight_kw), a.shape)
    err = ((pred - target) ** 2).reshape(x0.shape[0], int(np.prod(x0.shape[1:])))
    per = err.mean(axis=1) if reduction == "mean" else err.sum(axis=1)
    loss = w * per
    bad = np.flatnonzero(~np.isfinite(loss))
    if strict and bad.size:
        raise FloatingPointError(f"non-finite loss in rows {bad[:8].tolist()} at t = {t[bad[:8]].tolist()}")
    return TrainingLoss(loss, np.asarray(w, dtype=np.float64), x_t, target, bad)


# ------------------------------------------------------------------------------------------------
# noise-level samplers: explicit uniforms in, times out; and the density of lambda they induce
# ------------------------------------------------------------------------------------------------

def _uniforms(u) -> np.ndarray:
    u = as_f64(u, "u")
    if np.any((u < 0) | (u >= 1)):
        raise ValueError("uniforms must lie in [0, 1)")
    return u


class _TimeDensityFromT:
    """p(lambda) = p_t(t(lambda)) / |dlambda/dt| for samplers defined on the schedule's time."""

    def log_snr_density(self, lam, schedule: ContinuousSchedule):
        lam = as_f64(lam, "lam")
        t = schedule.t_of_log_snr(lam)
        return self.time_density(t) / np.abs(schedule.d_log_snr_dt(t))


class UniformTime(_TimeDensityFromT):
    """t ~ U(t_min, t_max) (Ho et al. 2020; Kingma et al. 2021)."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not t_max > t_min:
            raise ValueError(f"need t_max > t_min, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def sample(self, u, schedule=None):
        return self.t_min + _uniforms(u) * (self.t_max - self.t_min)

    def time_density(self, t):
        t = np.asarray(t, dtype=np.float64)
        inside = (t >= self.t_min) & (t <= self.t_max)
        return np.where(inside, 1.0 / (self.t_max - self.t_min), 0.0)


class StratifiedTime(UniformTime):
    """t_i = t_min + (i + u_i) / n (t_max - t_min): one draw per stratum; the marginal density stays uniform."""

    def sample(self, u, schedule=None):
        u = _uniforms(u)
        n = u.shape[0]
        return self.t_min + (np.arange(n) + u) / n * (self.t_max - self.t_min)


class AntitheticTime(UniformTime):
    """VDM's low-discrepancy draw t_i = (u_0 + i / n) mod 1 from a single uniform u_0 (Kingma et al. 2021, App. I)."""

    def sample(self, u, schedule=None, n: int | None = None):
        u = _uniforms(u).reshape(-1)
        if u.size != 1 or n is None:
            raise ValueError("antithetic sampling takes one uniform u_0 and the batch size n")
        n = positive_int(n, "n")
        return self.t_min + np.mod(u[0] + np.arange(n) / n, 1.0) * (self.t_max - self.t_min)


class DiscreteUniformTime:
    """i ~ U{0, ..., T-1} (Ho et al. 2020, Alg. 1) as floor(u T)."""

    def __init__(self, T: int):
        self.T = positive_int(T, "T")

    def sample(self, u, schedule=None):
        return np.minimum(np.floor(_uniforms(u) * self.T), self.T - 1).astype(np.int64)


class LogNormalSigma:
    """ln sigma_ve ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1); lambda = -2 ln sigma ~ N(-2 P_mean, 4 P_std^2)."""

    def __init__(self, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD):
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def sample(self, u, schedule: ContinuousSchedule):
        u = _uniforms(u)
        if np.any(u == 0):
            raise ValueError("u = 0 maps to sigma = 0; uniforms must lie in (0, 1) here")
        lam = -2.0 * (self.p_mean + self.p_std * ndtri(u))
        return schedule.t_of_log_snr(lam)

    def log_snr_density(self, lam, schedule=None):
        m, sd = -2.0 * self.p_mean, 2.0 * self.p_std
        z = (as_f64(lam, "lam") - m) / sd
        return np.exp(-0.5 * z * z) / (sd * np.sqrt(2.0 * np.pi))


class LogitNormalTime(_TimeDensityFromT):
    """logit(t) ~ N(m, s^2) on the schedule's time (Esser et al. 2024, Eq. 19; SD3 uses m = 0, s = 1)."""

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if not s > 0:
            raise ValueError(f"s must be positive, got {s}")
        self.m, self.s = float(m), float(s)

    def sample(self, u, schedule=None):
        u = _uniforms(u)
        if np.any(u == 0):
            raise ValueError("u = 0 maps to t = 0; uniforms must lie in (0, 1) here")
        return expit(self.m + self.s * ndtri(u))

    def time_density(self, t):
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (np.log(t) - np.log1p(-t) - self.m) / self.s
            out = np.exp(-0.5 * z * z) / (self.s * np.sqrt(2.0 * np.pi) * t * (1.0 - t))
        return np.where((t > 0) & (t < 1), out, 0.0)


def implied_weighting(prediction: str, weighting: str, sampler, schedule: ContinuousSchedule, lam, **weight_kw):
    """Kingma & Gao (2023) weighting w(lambda) and density p(lambda) implied by an objective.

    The objective E_{t ~ sampler}[weight(t) ||pred_hat - pred||^2] equals 1/2 int w(lambda) ||eps_hat - eps||^2
    d lambda with w = 2 p(lambda) W_eps(lambda), W_eps = weight * c_pred. Returns (w, p), each shaped like lam.
    """
    lam = as_f64(lam, "lam")
    t = schedule.t_of_log_snr(lam)
    a, s = schedule.alpha(t), schedule.sigma(t)
    weight = loss_weight(weighting, prediction, a, s, dlog_snr_dt=schedule.d_log_snr_dt(t), **weight_kw)
    p = sampler.log_snr_density(lam, schedule)
    return 2.0 * p * eps_space_weight(weight, prediction, a, s), p
