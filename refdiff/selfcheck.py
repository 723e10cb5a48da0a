"""Measurements of the reference against independent truth, shared by the tests and ``refdiff report``.

Each function measures one property and returns numbers; the tests assert on them with derived tolerances and
the report records them with a verdict. Nothing here draws hidden randomness: a numpy Generator is passed in.
"""

from __future__ import annotations

import numpy as np

from . import highprec, rng, schedules as S
from .oracles import GaussianData, _Mixture

__all__ = [
    "T_GRID", "EDM_T_GRID", "MAX_SCHEDULE_ULP", "schedule_ulp_errors", "discrete_ulp_errors", "roundtrip_errors",
    "tweedie_residual", "denoiser_mc_zscore", "pf_ode_error", "philox_kat_mismatches", "rng_vs_triton",
    "PHILOX_KAT", "FALSE_FAILURE", "z_bound",
]

# Schedule evaluation points: both ends, the near-end regions where cancellation lives, and the bulk.
# Subnormal t is excluded: B(t) = beta_min t there keeps fewer than 53 significant bits.
T_GRID = np.concatenate([[0.0, 1e-300, 1e-100, 1e-30, 1e-12, 1e-6, 1e-3], np.linspace(0.01, 0.99, 99),
                         [1 - 1e-6, 1 - 1e-9, 1 - 1e-12, 1 - 2.0 ** -52, 1 - 2.0 ** -53, 1.0]])
EDM_T_GRID = np.concatenate([[0.0, 1e-300, 1e-12, 2e-3], np.geomspace(2e-3, 80.0, 60), [1e3, 1e12]])
MAX_SCHEDULE_ULP = 8          # schedule functions within 8 ulp of mpmath (README, "Tests and tolerances")
LOG_SNR_ULP_FLOOR = 1.0       # lambda is a log of an O(1) ratio: near lambda = 0 only absolute eps is attainable
EPS = float(np.finfo(np.float64).eps)
FALSE_FAILURE = 1e-6          # a Monte-Carlo check may fail by chance (another seed) with at most this probability


def z_bound(m: int = 1, p: float = FALSE_FAILURE, dof: int | None = None) -> float:
    """The |z| bound under which m simultaneous two-sided comparisons all pass with probability >= 1 - p
    (Bonferroni: each at p / m). Gaussian statistics: z = -Phi^-1(p / (2 m)), 4.89 for one comparison, 5.6 for 16.
    With a standard error estimated from ``dof`` degrees of freedom the statistic is Student-t: its quantile."""
    from scipy.special import ndtri, stdtrit

    if m < 1 or not 0.0 < p < 1.0:
        raise ValueError(f"need m >= 1 comparisons and 0 < p < 1, got m = {m}, p = {p}")
    q = p / (2.0 * m)
    return float(-ndtri(q)) if dof is None else float(-stdtrit(dof, q))


def schedule_ulp_errors(schedule: S.ContinuousSchedule, t=None) -> dict:
    """Max ulp error of alpha, sigma, log_snr against 50-digit mpmath over ``t`` (default T_GRID / EDM_T_GRID)."""
    if t is None:
        t = EDM_T_GRID if isinstance(schedule, S.EDM) else T_GRID
    ma, ms, ml = highprec.mp_family(schedule)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "alpha": float(highprec.ulp_error(schedule.alpha(t), ma(t)).max()),
            "sigma": float(highprec.ulp_error(schedule.sigma(t), ms(t)).max()),
            "log_snr": float(highprec.ulp_error(schedule.log_snr(t), ml(t), LOG_SNR_ULP_FLOOR).max()),
        }


def discrete_ulp_errors(betas) -> dict:
    """Max ulp error of a DiscreteSchedule's alphas_cumprod, alpha, sigma, log_snr against mpmath."""
    d = S.DiscreteSchedule(betas)
    a, s, l = highprec.mp_discrete(d.betas)
    i = np.arange(d.T)
    return {
        "alphas_cumprod": float(highprec.ulp_error(d.alphas_cumprod, highprec.mp_alphas_cumprod(d.betas)).max()),
        "alpha": float(highprec.ulp_error(d.alpha(i), a).max()),
        "sigma": float(highprec.ulp_error(d.sigma(i), s).max()),
        "log_snr": float(highprec.ulp_error(d.log_snr(i), l, LOG_SNR_ULP_FLOOR).max()),
    }


def roundtrip_errors(schedule: S.ContinuousSchedule, t) -> np.ndarray:
    """|t_of_log_snr(log_snr(t)) - t| in units of the attainable error ulp(t) + eps |lambda / lambda'(t)|.

    lambda is known to ~|lambda| eps (it is a log); that moves the recovered t by |lambda| eps / |lambda'|, so a
    round trip can be no better than that plus the rounding of t itself. A value <= a few means 'a few ulp'.
    """
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = schedule.log_snr(t)
        back = schedule.t_of_log_snr(lam)
        unit = np.spacing(np.abs(t)) + EPS * np.abs(lam / schedule.d_log_snr_dt(t))
    return np.abs(back - t) / unit


def tweedie_residual(oracle: _Mixture, x, alpha, sigma) -> float:
    """max |alpha E[x0|x] - x - sigma^2 score(x)| / max(|x|, sigma^2 |score|): Tweedie's formula, relative."""
    D = oracle.denoise(x, alpha, sigma)
    sc = oracle.score(x, alpha, sigma)
    a = np.reshape(alpha, (-1, 1)) if np.ndim(alpha) else alpha
    s = np.reshape(sigma, (-1, 1)) if np.ndim(sigma) else sigma
    scale = np.maximum(np.abs(x).max(), (s * s * np.abs(sc)).max())
    return float(np.abs(a * D - x - s * s * sc).max() / scale)


def denoiser_mc_zscore(oracle: _Mixture, x, alpha: float, sigma: float, rng_: np.random.Generator,
                       n: int = 200_000) -> float:
    """Largest |z| of the exact denoiser against a self-normalised importance-sampling posterior mean.

    Prior draws x0_j ~ p_0 weighted by N(x; alpha x0_j, sigma^2 I) estimate E[x0|x]; the standard error is the
    delta-method one, sqrt(sum w_j^2 (x0_j - m)^2) / sum w_j. The criterion is |z| <= z_bound(rows x D).
    """
    x = np.atleast_2d(x)
    x0 = oracle.sample(n, rng_)
    out = 0.0
    for row in x:
        logw = -0.5 * np.sum((row - alpha * x0) ** 2, axis=1) / sigma ** 2
        w = np.exp(logw - logw.max())
        m = w @ x0 / w.sum()
        se = np.sqrt((w[:, None] ** 2 * (x0 - m) ** 2).sum(axis=0)) / w.sum()
        exact = oracle.denoise(row[None], alpha, sigma)[0]
        out = max(out, float(np.max(np.abs(exact - m) / se)))
    return out


def pf_ode_error(data: GaussianData, schedule: S.ContinuousSchedule, t_from: float, t_to: float, x,
                 rtol: float = 1e-12) -> float:
    """max |exact PF-ODE map - solve_ivp(DOP853)| from t_from to t_to, relative to max |x_t_to|.

    The ODE is dx/dt = alpha'(t) E[x0|x] + sigma'(t) E[eps|x], the conditional expectation of
    d(alpha x0 + sigma eps)/dt (Song et al. 2021, Eq. 13 rewritten with the denoiser).
    """
    from .samplers.reference import pf_ode_solve

    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    num = pf_ode_solve(schedule, data.denoise, x, t_from, t_to, rtol=rtol, atol=rtol * 1e-3)
    exact = data.pf_ode_solution(x, schedule.alpha(t_from), schedule.sigma(t_from), schedule.alpha(t_to),
                                 schedule.sigma(t_to))
    return float(np.abs(num - exact).max() / np.abs(exact).max())


# Known-answer vectors of Philox4x32-10 (Salmon et al. 2011, Random123 kat_vectors): counter, key, output.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_kat_mismatches() -> int:
    """Number of Random123 known-answer vectors that refdiff.rng.philox4x32 gets wrong (0 expected)."""
    bad = 0
    for ctr, key, want in PHILOX_KAT:
        got = rng.philox4x32(*(np.uint32(c) for c in ctr), np.uint32(key[0]), np.uint32(key[1]))
        bad += tuple(int(g) for g in got) != want
    return bad


def rng_vs_triton(seeds, offsets, device: str = "cpu") -> dict:
    """Compare refdiff.rng with Triton's own generator: uniform / word mismatches and max normal ulp distance."""
    from kernels.rng_probe import triton_rand

    offsets = np.asarray(offsets, dtype=np.int64)
    res = {"uniform_mismatches": 0, "word_mismatches": 0, "normal_max_ulp": 0}
    for seed in seeds:
        u, z, w = triton_rand(seed, offsets, device)
        ru, rz = rng.philox_uniform(seed, offsets), rng.philox_normal(seed, offsets)
        rw = np.stack(rng.philox_randint4x(seed, offsets), axis=1)
        res["uniform_mismatches"] += int(np.count_nonzero(u.view(np.uint32) != ru.view(np.uint32)))
        res["word_mismatches"] += int(np.count_nonzero(w != rw))
        ulp = np.abs(z.view(np.int32).astype(np.int64) - rz.view(np.int32).astype(np.int64))
        res["normal_max_ulp"] = max(res["normal_max_ulp"], int(ulp.max()))
    return res


# ------------------------------------------------------------------------------------------------
# objectives and likelihood
# ------------------------------------------------------------------------------------------------

def kingma_gao_table(lam) -> dict:
    """Kingma & Gao (2023), Table 1: objective -> (prediction, weighting, sampler, schedule, w(lambda) up to a
    constant), evaluated at ``lam``. The plain cosine (s = 0) is the schedule the iDDPM / v rows assume."""
    from .losses import LogNormalSigma, UniformTime

    lam = np.asarray(lam, dtype=np.float64)
    cos = S.Cosine(0.0)
    return {
        "eps, cosine (iDDPM)": ("eps", "constant", UniformTime(), cos, 1 / np.cosh(lam / 2)),
        "v, cosine": ("v", "constant", UniformTime(), cos, np.exp(-lam / 2)),
        "x0, EDM": ("x0", "edm", LogNormalSigma(), S.EDM(),
                    np.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) * (np.exp(-lam) + 0.25) / 0.25),
        "flow, rectified": ("flow", "constant", UniformTime(), S.RectifiedFlow(), np.exp(-lam / 2)),
        "eps, min-SNR-5, cosine": ("eps", "min_snr", UniformTime(), cos,
                                   np.minimum(1, 5 * np.exp(-lam)) / np.cosh(lam / 2)),
        "ELBO": ("eps", "elbo", UniformTime(), S.LinearLogSNR(20.0, -20.0), np.ones_like(lam)),
        "sigmoid(b=2)": ("v", "sigmoid", UniformTime(), S.Sigmoid(-6.0, 6.0, 0.5), 1 / (1 + np.exp(lam - 2))),
    }


def kingma_gao_ratio_spread(prediction, weighting, sampler, schedule, expected, lam) -> float:
    """max |ratio / ratio_mid - 1| of the implied w(lambda) to a table entry known up to a constant factor."""
    from .losses import implied_weighting

    w, _ = implied_weighting(prediction, weighting, sampler, schedule, lam)
    ratio = w / expected
    return float(np.max(np.abs(ratio / ratio[len(ratio) // 2] - 1.0)))


def vdm_gap_slopes(schedule, data: GaussianData, x0, Ts=(10, 100, 1000, 10000)):
    """Exact VDM bounds at each T for Gaussian data: (bounds (len(Ts), B), continuous ELBO (B,), fitted log-log
    slopes of bound - ELBO against T (B,))."""
    from .vlb import gaussian_vdm_elbo

    Ts = np.asarray(Ts, dtype=np.float64)
    cont = gaussian_vdm_elbo(schedule, data, x0).total
    bounds = np.stack([gaussian_vdm_elbo(schedule, data, x0, int(T)).total for T in Ts])
    with np.errstate(invalid="ignore"):
        slopes = np.array([np.polyfit(np.log(Ts), np.log(bounds[:, j] - cont[j]), 1)[0]
                           for j in range(bounds.shape[1])])
    return bounds, cont, slopes


def pf_likelihood_error(data: _Mixture, sde, x0, probes=None, **kw) -> tuple:
    """PF-ODE log-likelihood of x0 with the exact score and the exact marginal at T as prior, against the exact
    log density: returns (max |error| in nats, max |z| = |error| / standard error (inf for the exact divergence))."""
    from .likelihood import pf_ode_log_likelihood

    a, s = sde.alpha, sde.sigma
    res = pf_ode_log_likelihood(
        x0, sde, lambda x, t: data.score(x, a(t), s(t)),
        divergence_fn=None if probes is not None else (lambda x, t: data.score_divergence(x, a(t), s(t))),
        probes=probes, hvp_fn=lambda x, t, v: data.score_hvp(x, a(t), s(t), v),
        prior_logp=lambda z: data.log_prob(z, a(sde.T), s(sde.T)), **kw)
    err = np.abs(res.log_likelihood - data.log_prob(x0, a(sde.t_min), s(sde.t_min)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(res.standard_error > 0, err / res.standard_error, np.inf)
    return float(err.max()), float(z.max())
