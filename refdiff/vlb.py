"""The variational bound: DDPM / iDDPM discrete terms, VDM's continuous-time and discrete-T forms, bits per dim,
and the exact expectation of every term for Gaussian data with the exact denoiser.

Symbols
-------
L_T      prior term KL(q(x_T | x0) || N(0, I))
L_{t-1}  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), the model a Gaussian with the posterior mean at x0_hat
L_0      decoder -log p(x0 | x_1): discretized Gaussian on 256 levels in [-1, 1] (Ho et al. 2020, Eq. 13, with the
         exact normal CDF, not iDDPM's tanh approximation), or a Gaussian density for continuous data
VDM      diffusion term 1/2 int_0^1 -lambda'(t) ||eps - eps_hat(z_t)||^2 dt (Kingma et al. 2021, Eq. 17) and its T-step
         form T/2 E_i[expm1(lambda_s - lambda_t) ||eps - eps_hat||^2], s = (i-1)/T, t = i/T (Eq. 15 rewritten)
All terms are in nats per example (summed over dimensions); ``bits_per_dim`` converts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import integrate
from scipy.special import log_ndtr

from ._math import exp_remainder, log1mexp
from ._validate import as_f64, broadcast_rows, positive_int
from .forward import posterior
from .oracles import GaussianData
from .parametrization import to_x0_eps
from .schedules import ContinuousSchedule, DiscreteSchedule

__all__ = [
    "normal_kl", "gaussian_log_likelihood", "discretized_gaussian_log_likelihood", "bits_per_dim", "VARIANCES",
    "DDPMTerms", "ddpm_vlb_terms", "gaussian_ddpm_vlb", "VDMTerms", "vdm_diffusion_term", "vdm_discrete_diffusion_term",
    "vdm_prior_term", "vdm_reconstruction_term", "gaussian_vdm_elbo",
]

LOG_2PI = float(np.log(2.0 * np.pi))
LN2 = float(np.log(2.0))
HALF_BIN = 1.0 / 255.0           # 8-bit data in [-1, 1]: bins of width 2/255 around each level
GRID_ATOL = 1e-3                 # off-grid tolerance in units of half_bin; uint8 / 127.5 - 1 in float32 is ~1e-5 h
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _expm1_minus_x(d):
    """e^d - 1 - d without cancellation (a Taylor series near 0)."""
    return exp_remainder(d, 2)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise.

    = 1/2 [ (e^d - 1 - d) + (mean1 - mean2)^2 e^-logvar2 ], d = logvar1 - logvar2, with e^d - 1 - d formed
    without cancellation (the textbook -1 + d' + e^{-d'} loses all digits for nearly equal variances).
    """
    m1, l1, m2, l2 = (as_f64(v, n) for v, n in ((mean1, "mean1"), (logvar1, "logvar1"), (mean2, "mean2"),
                                                  (logvar2, "logvar2")))
    try:
        np.broadcast_shapes(m1.shape, l1.shape, m2.shape, l2.shape)
    except ValueError:
        raise ValueError(f"mean1 {m1.shape}, logvar1 {l1.shape}, mean2 {m2.shape}, logvar2 {l2.shape} do not "
                         "broadcast to one shape") from None
    with np.errstate(invalid="ignore", over="ignore"):
        kl = 0.5 * (_expm1_minus_x(l1 - l2) + (m1 - m2) ** 2 * np.exp(-l2))
        # a point mass N(m2, 0) (logvar2 = -inf): KL = +inf against any other law, 0 against the same point mass
        # (the formula gives 0 * inf = NaN when the means agree)
        same_point = np.isneginf(l1) & (m1 == m2)
        point2 = np.isneginf(l2) & ~np.isnan(l1) & ~np.isnan(m1) & ~np.isnan(m2)
        kl = np.where(point2, np.where(same_point, 0.0, np.inf), kl)
    return kl[()] if np.ndim(kl) == 0 else kl


def gaussian_log_likelihood(x, mean, log_scale):
    """log N(x; mean, e^{2 log_scale}), elementwise."""
    x, m, ls = as_f64(x, "x"), as_f64(mean, "mean"), as_f64(log_scale, "log_scale")
    z = (x - m) * np.exp(-ls)
    return -0.5 * (LOG_2PI + z * z) - ls


def _log_ndtr_diff(a, b):
    """log(Phi(b) - Phi(a)) for a < b, from the tail where both CDFs are small (no cancellation)."""
    upper = (a + b) > 0                               # mirror: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    hi = np.where(upper, -a, b)
    lo = np.where(upper, -b, a)
    lhi = log_ndtr(hi)
    with np.errstate(divide="ignore"):
        return lhi + log1mexp(np.minimum(log_ndtr(lo) - lhi, 0.0))


def discretized_gaussian_log_likelihood(x, mean, log_scale, half_bin: float = HALF_BIN, lower: float = -1.0,
                                        upper: float = 1.0):
    """log P(x) for a Gaussian discretized to bins [x - h, x + h], the edge bins open (Ho et al. 2020, Eq. 13).

    Uses the exact normal CDF (scipy log_ndtr); iDDPM's tanh approximation of Phi is off by up to 1.8e-4 in the
    CDF and far more in relative terms in the tail bins. x must lie on the grid of levels lower + k 2h (k = 0 ..
    (upper - lower) / 2h; 8-bit data scaled to [-1, 1] by default), within GRID_ATOL h (float32-scaled data is
    far inside): an off-grid x would be scored with a bin that does not hold it. Edge bins are open.
    """
    x, m, ls = as_f64(x, "x"), as_f64(mean, "mean"), as_f64(log_scale, "log_scale")
    x, m, ls = np.broadcast_arrays(x, m, ls)
    if not (half_bin > 0 and upper > lower):
        raise ValueError(f"need half_bin > 0 and upper > lower, got half_bin {half_bin}, [{lower}, {upper}]")
    if np.any(~((x >= lower - half_bin) & (x <= upper + half_bin))):
        raise ValueError(f"x must lie in [{lower}, {upper}] for the discretized likelihood")
    k = np.rint((x - lower) / (2.0 * half_bin))
    off = np.abs(x - (lower + k * 2.0 * half_bin)) > GRID_ATOL * half_bin
    if np.any(off):
        bad_x = x[off].flat[0]
        raise ValueError(f"x must lie on the grid lower + k * 2 half_bin (levels {2 * half_bin:.6g} apart from "
                         f"{lower}); x = {bad_x!r} lies between levels (quantize the data first)")
    inv = np.exp(-ls)
    a = (x - half_bin - m) * inv
    b = (x + half_bin - m) * inv
    left = x <= lower + 0.5 * half_bin
    right = x >= upper - 0.5 * half_bin
    with np.errstate(invalid="ignore"):
        mid = _log_ndtr_diff(a, b)
    return np.where(left, log_ndtr(b), np.where(right, log_ndtr(-a), mid))


def bits_per_dim(nats, dims: int, n_levels: int = 256, data_range: float = 2.0):
    """Bits per dimension of a negative log-likelihood in nats.

    For a discrete likelihood (the VLB with a discretized decoder) use n_levels = data_range = 1 (no offset).
    For a continuous density over data scaled to a range of width ``data_range`` from ``n_levels`` levels with
    uniform dequantization, -log2 P(discrete) <= -log2 p(x) - D log2(data_range / n_levels): the offset is
    log2(n_levels / data_range) per dimension (7 bits for 8-bit images in [-1, 1]; Song et al. 2021, App. F.2).
    """
    dims = positive_int(dims, "dims")
    if not (n_levels > 0 and data_range > 0):
        raise ValueError(f"n_levels and data_range must be > 0, got {n_levels} and {data_range}")
    return as_f64(nats, "nats") / (dims * LN2) + np.log2(n_levels / data_range)


# ------------------------------------------------------------------------------------------------
# DDPM / iDDPM discrete bound
# ------------------------------------------------------------------------------------------------

class DDPMTerms(NamedTuple):
    """Per-example terms in nats: prior (B,), kl (B, T-1) for t = 2..T, decoder (B,); total (B,)."""

    prior: np.ndarray
    kl: np.ndarray
    decoder: np.ndarray

    @property
    def total(self):
        return self.prior + self.kl.sum(axis=1) + self.decoder


def _sum_dims(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _posterior_logvar(schedule: DiscreteSchedule):
    """log beta_tilde_i for i = 1..T-1 (the variance of q(x_i | x_{i+1}, x0) in paper indexing), and i = 0
    clipped to beta_tilde_1 as in iDDPM (the true value 0 would make the decoder degenerate)."""
    i = np.arange(1, schedule.T)
    var = posterior(np.zeros((i.size, 1)), np.zeros((i.size, 1)), schedule.alpha(i - 1), schedule.sigma(i - 1),
                    schedule.alpha(i), schedule.sigma(i), log_snr_s=schedule.log_snr(i - 1),
                    log_snr_t=schedule.log_snr(i)).var.ravel()
    logvar = np.log(var)
    return np.concatenate(([logvar[0]], logvar)) if schedule.T > 1 else np.array([np.log(schedule.betas[0])])


def _model_logvar(schedule, variance, i, var_values, post_logvar):
    if variance == "fixed_small":
        return post_logvar[i]
    log_beta = np.log(schedule.betas)
    log_beta = np.concatenate(([post_logvar[0]], log_beta[1:]))          # iDDPM: beta_tilde_1 at the first step
    if variance == "fixed_large":
        return log_beta[i]
    if var_values is None:
        raise ValueError("learned_range variance needs the model's variance output (values in [-1, 1])")
    frac = (as_f64(var_values, "variance output") + 1.0) / 2.0          # Nichol & Dhariwal 2021, Eq. 15
    return frac * log_beta[i] + (1.0 - frac) * post_logvar[i]


def _model_output(model, x_t, i, variance):
    out = model(x_t, i)
    if variance == "learned_range":
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("with learned_range the model must return (prediction, variance_values)")
        return out
    return out, None


def ddpm_vlb_terms(schedule: DiscreteSchedule, x0, model, eps, prediction: str = "eps",
                   variance: str = "fixed_small", decoder: str = "discretized") -> DDPMTerms:
    """All T + 1 terms of the DDPM bound for each example, each KL at its own draw x_t = alpha_t x0 + sigma_t eps_t.

    Parameters
    ----------
    schedule : DiscreteSchedule with T steps (index i is the paper's x_{i+1})
    x0 : (B, ...) data (on the 256-level grid of [-1, 1] for the discretized decoder)
    model : callable (x_t, i (B,)) -> prediction of type ``prediction``; with ``learned_range`` it returns
        (prediction, variance_values in [-1, 1])
    eps : (T, B, ...) noise for the draw of x_{i+1} used by the term at index i (i = 0 is the decoder's x_1)
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if decoder not in ("discretized", "gaussian"):
        raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")
    x0 = as_f64(x0, "x0")
    eps = as_f64(eps, "eps")
    T, B = schedule.T, x0.shape[0]
    if eps.shape != (T,) + x0.shape:
        raise ValueError(f"eps must have shape {(T,) + x0.shape} (one draw per step), got {eps.shape}")
    post_logvar = _posterior_logvar(schedule)
    kl = np.empty((B, T - 1))
    decoder_nll = None
    for i in range(T):
        idx = np.full(B, i)
        a_t, s_t = schedule.alpha(i), schedule.sigma(i)
        x_t = a_t * x0 + s_t * eps[i]
        pred, var_values = _model_output(model, x_t, idx, variance)
        x0_hat, _ = to_x0_eps(pred, prediction, x_t, a_t, s_t)
        logvar = _model_logvar(schedule, variance, i, var_values, post_logvar)
        if i == 0:
            log_scale = 0.5 * np.broadcast_to(logvar, x0.shape)
            ll = (discretized_gaussian_log_likelihood(x0, x0_hat, log_scale) if decoder == "discretized"
                  else gaussian_log_likelihood(x0, x0_hat, log_scale))
            decoder_nll = -_sum_dims(ll)
            continue
        kw = dict(log_snr_s=schedule.log_snr(i - 1), log_snr_t=schedule.log_snr(i))
        lv = (schedule.alpha(i - 1), schedule.sigma(i - 1), a_t, s_t)
        true_mean = posterior(x_t, x0, *lv, **kw).mean
        model_mean = posterior(x_t, x0_hat, *lv, **kw).mean
        kl[:, i - 1] = _sum_dims(normal_kl(true_mean, post_logvar[i], model_mean, logvar))
    a_T, s_T = schedule.alpha(T - 1), schedule.sigma(T - 1)
    prior = _sum_dims(normal_kl(a_T * x0, 2.0 * np.log(s_T), 0.0, 0.0))
    return DDPMTerms(prior, kl, decoder_nll)


def _mmse_per_example(data: GaussianData, x0, alpha, sigma):
    """E_eps ||x0 - E[x0 | alpha x0 + sigma eps]||^2 for each example x0 (B,), Gaussian data, exact denoiser.

    In C's eigenbasis the denoiser is x0_hat = mu + K (x_t - alpha mu), K = alpha l / v, v = alpha^2 l + sigma^2, so
    x0 - x0_hat = (sigma^2 / v) z - (sigma alpha l / v) eps with z = U^T (x0 - mu): its mean square is
    sum_j (sigma^2 / v_j)^2 z_j^2 + (sigma alpha l_j / v_j)^2.
    """
    lam, U = data.eigvals[0], data.eigvecs[0]
    z = (as_f64(x0, "x0") - data.mean) @ U
    v = alpha * alpha * lam + sigma * sigma
    return ((sigma * sigma / v) ** 2 * z * z).sum(axis=1) + ((sigma * alpha * lam / v) ** 2).sum()


def gaussian_ddpm_vlb(schedule: DiscreteSchedule, data: GaussianData, x0, variance: str = "fixed_small") -> DDPMTerms:
    """E over the noise of every DDPM term for Gaussian data and the exact denoiser, Gaussian decoder: exact.

    KL_i = 1/2 sum_dims [(e^d - 1 - d)] + c0_i^2 E||x0 - x0_hat||^2 / (2 var_model), with c0 the posterior's x0
    coefficient, since the true and model posterior means differ by c0 (x0 - x0_hat). Decoder: the Gaussian NLL
    1/2 D log(2 pi var) + E||x0 - x0_hat||^2 / (2 var). The prior term is deterministic.
    """
    if variance == "learned_range":
        raise ValueError("the exact expectation needs a fixed variance")
    x0 = as_f64(x0, "x0")
    B, D = x0.shape
    T = schedule.T
    post_logvar = _posterior_logvar(schedule)
    kl = np.empty((B, T - 1))
    for i in range(1, T):
        logvar = _model_logvar(schedule, variance, i, None, post_logvar)
        c0 = posterior(np.zeros((1, 1)), np.ones((1, 1)), schedule.alpha(i - 1), schedule.sigma(i - 1),
                       schedule.alpha(i), schedule.sigma(i), log_snr_s=schedule.log_snr(i - 1),
                       log_snr_t=schedule.log_snr(i)).mean.item()
        m = _mmse_per_example(data, x0, schedule.alpha(i), schedule.sigma(i))
        kl[:, i - 1] = 0.5 * D * _expm1_minus_x(post_logvar[i] - logvar) + 0.5 * c0 * c0 * m * np.exp(-logvar)
    logvar0 = _model_logvar(schedule, variance, 0, None, post_logvar)
    m0 = _mmse_per_example(data, x0, schedule.alpha(0), schedule.sigma(0))
    decoder = 0.5 * D * (LOG_2PI + logvar0) + 0.5 * m0 * np.exp(-logvar0)
    a_T, s_T = schedule.alpha(T - 1), schedule.sigma(T - 1)
    prior = _sum_dims(normal_kl(a_T * x0, 2.0 * np.log(s_T), 0.0, 0.0))
    return DDPMTerms(prior, kl, decoder)


# ------------------------------------------------------------------------------------------------
# VDM: continuous time and T steps
# ------------------------------------------------------------------------------------------------

class VDMTerms(NamedTuple):
    """Per-example VDM terms in nats: prior, reconstruction and diffusion (B,)."""

    prior: np.ndarray
    reconstruction: np.ndarray
    diffusion: np.ndarray

    @property
    def total(self):
        return self.prior + self.reconstruction + self.diffusion


def _check_vdm(schedule):
    if not isinstance(schedule, ContinuousSchedule) or not schedule.variance_preserving:
        raise ValueError("the VDM bound needs a variance-preserving ContinuousSchedule")
    if not (np.isfinite(schedule.log_snr(0.0)) and np.isfinite(schedule.log_snr(1.0))):
        raise ValueError(f"the VDM bound needs finite log-SNR at t = 0 and t = 1, got {schedule!r}")


def _vdm_inputs(x0, eps, t):
    """x0, eps (B, ...) of one shape and per-example levels t (B,); an empty batch is allowed (empty result)."""
    x0, eps = as_f64(x0, "x0"), as_f64(eps, "eps")
    if x0.ndim < 2 or x0.shape != eps.shape:
        raise ValueError(f"x0 and eps must have one shape (B, ...) with a data axis, got {x0.shape} and {eps.shape}")
    if np.shape(t) != (x0.shape[0],):
        raise ValueError(f"t / i must have shape ({x0.shape[0]},) to match x0 of shape {x0.shape}, got {np.shape(t)}")
    return x0, eps


def _eps_hat(eps_hat, z, t):
    out = as_f64(eps_hat(z, t), "eps_hat")
    if out.shape != z.shape:
        raise ValueError(f"eps_hat returned shape {out.shape} for z of shape {z.shape}")
    return out


def vdm_diffusion_term(schedule: ContinuousSchedule, x0, t, eps, eps_hat):
    """Continuous-time diffusion loss estimator -1/2 lambda'(t) ||eps - eps_hat(z_t, t)||^2 (B,), t ~ U(0, 1) given."""
    _check_vdm(schedule)
    t = as_f64(t, "t")
    x0, eps = _vdm_inputs(x0, eps, t)
    if x0.shape[0] == 0:
        return np.zeros(0)
    a, s = broadcast_rows(schedule.alpha(t), x0, "alpha"), broadcast_rows(schedule.sigma(t), x0, "sigma")
    z = a * x0 + s * eps
    return -0.5 * schedule.d_log_snr_dt(t) * _sum_dims((eps - _eps_hat(eps_hat, z, t)) ** 2)


def vdm_discrete_diffusion_term(schedule: ContinuousSchedule, x0, i, T: int, eps, eps_hat):
    """T-step diffusion loss estimator T/2 expm1(lambda_s - lambda_t) ||eps - eps_hat(z_t)||^2 (B,), i ~ U{1..T}.

    Kingma et al. (2021), Eq. 15: (SNR(s) - SNR(t)) ||x - x_hat||^2 = expm1(lambda_s - lambda_t) ||eps - eps_hat||^2.
    """
    _check_vdm(schedule)
    T = positive_int(T, "T")
    i = np.asarray(i)
    if not np.issubdtype(i.dtype, np.integer) or (i.size and (i.min() < 1 or i.max() > T)):
        raise ValueError(f"i must be integers in [1, {T}]")
    x0, eps = _vdm_inputs(x0, eps, i)
    if x0.shape[0] == 0:
        return np.zeros(0)
    t, s_ = i / T, (i - 1) / T
    a, s = broadcast_rows(schedule.alpha(t), x0, "alpha"), broadcast_rows(schedule.sigma(t), x0, "sigma")
    z = a * x0 + s * eps
    w = 0.5 * T * np.expm1(schedule.log_snr(s_) - schedule.log_snr(t))
    return w * _sum_dims((eps - _eps_hat(eps_hat, z, t)) ** 2)


def vdm_prior_term(schedule: ContinuousSchedule, x0):
    """KL(q(z_1 | x) || N(0, I)) (B,)."""
    _check_vdm(schedule)
    x0 = as_f64(x0, "x0")
    return _sum_dims(normal_kl(schedule.alpha(1.0) * x0, 2.0 * np.log(schedule.sigma(1.0)), 0.0, 0.0))


def vdm_reconstruction_term(schedule: ContinuousSchedule, x0, eps):
    """-log p(x | z_0) with the Gaussian decoder N(x; z_0 / alpha_0, (sigma_0 / alpha_0)^2) for continuous data (B,)."""
    _check_vdm(schedule)
    x0, eps = as_f64(x0, "x0"), as_f64(eps, "eps")
    a, s = schedule.alpha(0.0), schedule.sigma(0.0)
    z0 = a * x0 + s * eps
    return -_sum_dims(gaussian_log_likelihood(x0, z0 / a, np.log(s / a)))


def gaussian_vdm_elbo(schedule: ContinuousSchedule, data: GaussianData, x0, T: int | None = None) -> VDMTerms:
    """Exact expected VDM terms for Gaussian data with the exact denoiser (B,), T steps or continuous (T=None).

    With m(t) = E||x0 - x0_hat(z_t)||^2 (``_mmse_per_example``): discrete diffusion = sum_i 1/2 (SNR_s - SNR_t) m(t_i);
    continuous = 1/2 int e^lambda m(lambda) d lambda over [lambda(1), lambda(0)], by adaptive quadrature.
    Reconstruction = D/2 (log(2 pi sigma_0^2 / alpha_0^2) + 1).
    """
    _check_vdm(schedule)
    x0 = as_f64(x0, "x0", ndim=2)
    if T is not None:
        T = positive_int(T, "T")
    D = x0.shape[1]
    lam0, lam1 = schedule.log_snr(0.0), schedule.log_snr(1.0)
    if T is None:
        def integrand(lam, row):
            t = schedule.t_of_log_snr(lam)
            return 0.5 * np.exp(lam) * _mmse_per_example(data, row[None], schedule.alpha(t), schedule.sigma(t))[0]

        diffusion = np.array([integrate.quad(integrand, lam1, lam0, args=(row,), epsabs=0, epsrel=1e-13,
                                             limit=400)[0] for row in x0])
    else:
        i = np.arange(1, T + 1)
        t, s_ = i / T, (i - 1) / T
        lam_t = schedule.log_snr(t)
        gap = np.exp(lam_t) * np.expm1(schedule.log_snr(s_) - lam_t)      # SNR_s - SNR_t without cancellation
        m = np.stack([_mmse_per_example(data, x0, schedule.alpha(tk), schedule.sigma(tk)) for tk in t], axis=1)
        diffusion = 0.5 * (m * gap).sum(axis=1)
    recon = np.full(x0.shape[0], 0.5 * D * (LOG_2PI - lam0 + 1.0))       # log(sigma_0^2 / alpha_0^2) = -lambda_0
    return VDMTerms(vdm_prior_term(schedule, x0), recon, diffusion)
