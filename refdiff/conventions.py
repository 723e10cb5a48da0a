"""Converters between the conventions of other libraries, said once and tested by round trips.

refdiff's own conventions (README, "Conventions"): discrete index i in {0..T-1} is the paper's x_{i+1}; log_snr is the
full log(alpha^2 / sigma^2); VP marginals x = alpha x0 + sigma eps; guidance weight w of Ho & Salimans.

| quantity            | refdiff                | other conventions                                          |
|---------------------|------------------------|------------------------------------------------------------|
| discrete time       | index i, t = (i+1)/T   | improved-diffusion index i; DPM-Solver t_n = (n+1)/N       |
| log-SNR             | lambda (full)          | DPM-Solver lambda = lambda / 2; VDM gamma = -lambda        |
| VP <-> VE           | (alpha, sigma)         | k-diffusion / EDM sigma = sigma / alpha, x_ve = x / alpha  |
| VP <-> flow         | (alpha, sigma)         | rectified flow t: alpha = 1 - t, sigma = t                 |
| CFG scale           | w (Ho & Salimans 2022) | diffusers s = w + 1; diffusers original formulation s = w  |
"""

from __future__ import annotations

import numpy as np

from ._validate import as_f64, positive_int

__all__ = [
    "index_to_t", "t_to_index", "log_snr_to_dpm_lambda", "dpm_lambda_to_log_snr", "log_snr_to_vdm_gamma",
    "vdm_gamma_to_log_snr", "vp_to_ve", "ve_to_vp", "vp_to_flow", "flow_to_vp", "CFG_CONVENTIONS",
    "cfg_scale", "cfg_combine",
]


def index_to_t(i, T: int):
    """Continuous time t = (i + 1) / T of discrete index i (the improved-diffusion / DPM-Solver grid t_n = (n+1)/N)."""
    T = positive_int(T, "T")
    i = np.asarray(i)
    if not np.issubdtype(i.dtype, np.integer) or (i.size and (i.min() < 0 or i.max() >= T)):
        raise ValueError(f"index must be an integer in [0, {T - 1}]")
    return (i + 1.0) / T


def t_to_index(t, T: int):
    """The index i with (i + 1) / T == t; t must lie on the grid (to rounding), else ValueError."""
    T = positive_int(T, "T")
    t = as_f64(t, "t", finite=True)
    k = np.rint(t * T)
    # t carries at most one rounding from (i + 1) / T: |t T - k| <= T ulp(t) / 2 < 1e-9 for any sane T
    if np.any(np.abs(t * T - k) > 1e-9 * np.maximum(1.0, k)) or np.any((k < 1) | (k > T)):
        raise ValueError(f"t is not on the grid {{1/T, ..., 1}} for T = {T}")
    return (k - 1).astype(np.int64)


def log_snr_to_dpm_lambda(log_snr):
    """DPM-Solver's lambda = log(alpha / sigma) = log_snr / 2 (Lu et al. 2022, §3.1)."""
    return 0.5 * as_f64(log_snr, "log_snr")


def dpm_lambda_to_log_snr(lam):
    return 2.0 * as_f64(lam, "lam")


def log_snr_to_vdm_gamma(log_snr):
    """VDM's gamma = -log_snr (Kingma et al. 2021, §3.4: sigma^2 = sigmoid(gamma))."""
    return -as_f64(log_snr, "log_snr")


def vdm_gamma_to_log_snr(gamma):
    return -as_f64(gamma, "gamma")


def vp_to_ve(alpha, sigma):
    """VE noise level sigma / alpha of a VP marginal (x_ve = x_vp / alpha; Karras et al. 2022, Eq. 4)."""
    a = as_f64(alpha, "alpha")
    s = as_f64(sigma, "sigma")
    if np.any(a <= 0):
        raise ValueError("vp_to_ve needs alpha > 0 (zero SNR has no finite VE sigma)")
    return s / a


def ve_to_vp(sigma_ve):
    """(alpha, sigma) = (1, sigma_ve) / sqrt(1 + sigma_ve^2), via hypot so that huge sigma_ve does not overflow."""
    s = as_f64(sigma_ve, "sigma_ve")
    if np.any(s < 0):
        raise ValueError("sigma_ve must be non-negative")
    h = np.hypot(1.0, s)
    return 1.0 / h, s / h


def vp_to_flow(alpha, sigma):
    """Rectified-flow time t = sigma / (alpha + sigma) of the same SNR; x_flow = x_vp / (alpha + sigma)."""
    a = as_f64(alpha, "alpha")
    s = as_f64(sigma, "sigma")
    if np.any(a + s <= 0):
        raise ValueError("need alpha + sigma > 0")
    return s / (a + s)


def flow_to_vp(t):
    """VP (alpha, sigma) with the SNR of flow time t: (1 - t, t) / hypot(1 - t, t)."""
    t = as_f64(t, "t")
    if np.any((t < 0) | (t > 1)):
        raise ValueError("flow time must lie in [0, 1]")
    h = np.hypot(1.0 - t, t)
    return (1.0 - t) / h, t / h


# Guidance-scale conventions for the same knob (Ho & Salimans 2022, Eq. 6; diffusers pipelines / guiders):
#   ho_salimans:        m = (1 + w) m_c - w m_u
#   diffusers:          m = m_u + s (m_c - m_u),   s = w + 1
#   diffusers_original: m = m_c + s (m_c - m_u),   s = w
CFG_CONVENTIONS = {"ho_salimans": 0.0, "diffusers": 1.0, "diffusers_original": 0.0}


def cfg_scale(value, from_convention: str, to_convention: str):
    """Convert a guidance scale between conventions (each is an offset from Ho & Salimans' w)."""
    for c in (from_convention, to_convention):
        if c not in CFG_CONVENTIONS:
            raise ValueError(f"CFG convention must be one of {sorted(CFG_CONVENTIONS)}, got {c!r}")
    w = as_f64(value, "scale") - CFG_CONVENTIONS[from_convention]
    return w + CFG_CONVENTIONS[to_convention]


def cfg_combine(m_uncond, m_cond, scale, convention: str = "ho_salimans"):
    """Classifier-free guidance combine in the named convention; all three give m_u + (w + 1)(m_c - m_u)."""
    mu = as_f64(m_uncond, "m_uncond")
    mc = as_f64(m_cond, "m_cond")
    if mu.shape != mc.shape:
        raise ValueError(f"m_uncond and m_cond must have the same shape, got {mu.shape} and {mc.shape}")
    w = cfg_scale(scale, convention, "ho_salimans")
    if convention == "ho_salimans":
        return (1.0 + w) * mc - w * mu
    if convention == "diffusers":
        return mu + (w + 1.0) * (mc - mu)
    return mc + w * (mc - mu)
