"""Guidance: classifier-free (with its scale convention named), CFG-rescale, classifier guidance, composition of
scores, mixing under view transforms, and dynamic thresholding.

Symbols: m_u, m_c unconditional / conditional model outputs (eps, v, x0 or score — guidance is linear, so it applies
to any of them); w Ho & Salimans' weight, s = w + 1 diffusers' scale (refdiff.conventions).
"""

from __future__ import annotations

import numpy as np

from ._validate import as_f64, broadcast_rows, check_same_shape
from .conventions import cfg_combine

__all__ = ["cfg", "cfg_rescale", "classifier_guidance_eps", "classifier_guidance_mean", "compose",
           "mix_views", "dynamic_threshold", "check_threshold", "DYNAMIC_THRESHOLD_PERCENTILE"]

DYNAMIC_THRESHOLD_PERCENTILE = 0.995      # Saharia et al. 2022 (Imagen), diffusers' default ratio


def cfg(m_uncond, m_cond, scale, convention: str = "ho_salimans"):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) with the scale's convention named explicitly:
    ho_salimans (1 + w) m_c - w m_u; diffusers m_u + s (m_c - m_u); diffusers_original m_c + s (m_c - m_u)."""
    return cfg_combine(m_uncond, m_cond, scale, convention)


def _row_std(a, ddof):
    flat = a.reshape(a.shape[0], -1)
    return flat.std(axis=1, ddof=ddof).reshape((a.shape[0],) + (1,) * (a.ndim - 1))


def cfg_rescale(m_cfg, m_cond, phi: float = 0.7, ddof: int = 1):
    """CFG-rescale (Lin et al. 2023, Alg. 2): m_res = m_cfg std(m_c) / std(m_cfg) per sample, out = phi m_res +
    (1 - phi) m_cfg. Standard deviations over all non-batch dims, unbiased (ddof = 1) like diffusers' torch.std."""
    m_cfg, m_cond = as_f64(m_cfg, "m_cfg"), as_f64(m_cond, "m_cond")
    check_same_shape(m_cfg, m_cond, "m_cfg", "m_cond")
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must lie in [0, 1], got {phi}")
    if m_cfg.ndim < 2 or int(np.prod(m_cfg.shape[1:])) <= ddof:
        raise ValueError(f"CFG-rescale needs (B, ...) outputs with more than ddof = {ddof} elements per sample (a "
                         f"standard deviation), got shape {m_cfg.shape}")
    # a sample whose m_cfg is constant (std 0) gives 0 / 0 = NaN there, as IEEE (and diffusers' torch.std) does
    with np.errstate(divide="ignore", invalid="ignore"):
        rescaled = m_cfg * (_row_std(m_cond, ddof) / _row_std(m_cfg, ddof))
    return phi * rescaled + (1.0 - phi) * m_cfg


def classifier_guidance_eps(eps, grad_log_p, sigma, scale: float = 1.0):
    """Score-shift classifier guidance: eps~ = eps - s sigma grad log p_t(y | x) (Dhariwal & Nichol 2021, Alg. 2;
    guided-diffusion ``condition_score``). With s = 1 and the exact noisy classifier, eps~ is the conditional eps."""
    eps, g = as_f64(eps, "eps"), as_f64(grad_log_p, "grad_log_p")
    check_same_shape(eps, g, "eps", "grad_log_p")
    return eps - scale * broadcast_rows(sigma, eps, "sigma") * g


def classifier_guidance_mean(mean, variance, grad_log_p, scale: float = 1.0):
    """Mean-shift classifier guidance: mu~ = mu + s Sigma grad log p(y | x) (Sohl-Dickstein et al. 2015;
    Dhariwal & Nichol 2021, Alg. 1; guided-diffusion ``condition_mean``), Sigma = variance I."""
    mean, g = as_f64(mean, "mean"), as_f64(grad_log_p, "grad_log_p")
    check_same_shape(mean, g, "mean", "grad_log_p")
    return mean + scale * broadcast_rows(variance, mean, "variance") * g


def compose(m_uncond, m_conds, weights):
    """Composable diffusion (Liu et al. 2022, Eq. 10-11): m_u + sum_i w_i (m_i - m_u); w_i > 0 is AND, w_i < 0 NOT."""
    mu = as_f64(m_uncond, "m_uncond")
    weights = as_f64(weights, "weights", ndim=1)
    if len(m_conds) != weights.shape[0]:
        raise ValueError(f"got {len(m_conds)} conditional outputs and {weights.shape[0]} weights")
    out = mu.copy()
    for k, (m, w) in enumerate(zip(m_conds, weights)):
        m = as_f64(m, f"m_conds[{k}]")
        check_same_shape(m, mu, f"m_conds[{k}]", "m_uncond")
        out = out + w * (m - mu)
    return out


def mix_views(x, views, model_outputs_fn, weights=None):
    """Mix predictions made under invertible linear views (Geng et al. 2024, visual anagrams):
    m(x) = sum_k w_k V_k^{-1} m_k(V_k x), for views given as (forward, inverse) callables on (B, ...) arrays.

    ``model_outputs_fn(k, v_x)`` returns the k-th prompt's output at the viewed input; weights default to 1/K.
    """
    x = as_f64(x, "x")
    K = len(views)
    if K == 0:
        raise ValueError("need at least one view")
    w = np.full(K, 1.0 / K) if weights is None else as_f64(weights, "weights", ndim=1)
    if w.shape[0] != K:
        raise ValueError(f"got {K} views and {w.shape[0]} weights")
    out = np.zeros_like(x)
    for k, (fwd, inv) in enumerate(views):
        vx = as_f64(fwd(x), "view(x)")
        m = as_f64(model_outputs_fn(k, vx), "model output")
        check_same_shape(m, vx, "model output", "view(x)")
        back = as_f64(inv(m), "inverse view")
        check_same_shape(back, x, "inverse view", "x")
        out = out + w[k] * back
    return out


def check_threshold(percentile, max_value, ceiling=np.inf) -> None:
    """Dynamic thresholding's arguments: 0 < percentile <= 1, max_value > 0 (a negative one would flip every sign,
    since x0 is divided by s and multiplied by max_value) and ceiling >= max_value."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
    if not max_value > 0:
        raise ValueError(f"max_value must be > 0 (the data range; a negative one flips signs), got {max_value}")
    if not ceiling >= max_value:
        raise ValueError(f"ceiling must be >= max_value, got ceiling {ceiling} and max_value {max_value}")


def dynamic_threshold(x0, percentile: float = DYNAMIC_THRESHOLD_PERCENTILE, max_value: float = 1.0,
                      ceiling: float = np.inf):
    """Imagen dynamic thresholding (Saharia et al. 2022, §2.3): per sample s = max(quantile(|x0|, p), max_value)
    (capped at ``ceiling``), then x0 <- clip(x0, -s, s) / s * max_value. Quantiles interpolate linearly (torch's)."""
    x0 = as_f64(x0, "x0")
    check_threshold(percentile, max_value, ceiling)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be (B, ...) with at least one element per sample, got shape {x0.shape}")
    if x0.shape[0] == 0:
        return x0.copy()
    if x0[0].size == 0:
        raise ValueError(f"each sample needs at least one element for its quantile, got shape {x0.shape}")
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.clip(np.quantile(flat, percentile, axis=1), max_value, ceiling)
    s = s.reshape((x0.shape[0],) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s * max_value
