"""Log-likelihood through the probability-flow ODE (instantaneous change of variables; Song et al. 2021, App. D.2).

Along the PF ODE dx/dt = v(x, t) = f(t) x - g(t)^2 score(x, t) / 2,

    log p_{t0}(x(t0)) = log p_{t1}(x(t1)) + int_{t0}^{t1} div v(x(t), t) dt,   div v = D f - g^2 div(score) / 2.

The divergence is exact (a given trace of the score Jacobian, e.g. ``oracles.*.score_divergence``) or the
Hutchinson estimate eps^T (d score / dx) eps with fixed probes (Rademacher or Gaussian, given explicitly),
whose per-probe results give a standard error. The ODE is solved with scipy ``solve_ivp``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from scipy.integrate import solve_ivp

from ._validate import as_f64
from .sde import SDE

__all__ = ["LikelihoodResult", "pf_ode_log_likelihood", "hutchinson_probes"]

FD_STEP = 1e-4            # central-difference step for Jacobian-vector products when no exact hvp is given


class LikelihoodResult(NamedTuple):
    """log_likelihood (B,) (mean over probes), standard_error (B,) (0 for the exact divergence),
    per_probe (P, B), x_end (B, D) the ODE's end point, nfev the number of drift evaluations."""

    log_likelihood: np.ndarray
    standard_error: np.ndarray
    per_probe: np.ndarray
    x_end: np.ndarray
    nfev: int


def hutchinson_probes(n: int, shape, rng: np.random.Generator, kind: str = "rademacher") -> np.ndarray:
    """n probe vectors of the given (B, D) shape with E[eps eps^T] = I: Rademacher (+-1) or Gaussian."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator")
    if kind == "rademacher":
        return rng.integers(0, 2, size=(n,) + tuple(shape)).astype(np.float64) * 2.0 - 1.0
    if kind == "gaussian":
        return rng.standard_normal((n,) + tuple(shape))
    raise ValueError(f"probe kind must be 'rademacher' or 'gaussian', got {kind!r}")


def pf_ode_log_likelihood(x0, sde: SDE, score_fn: Callable, *, divergence_fn: Callable | None = None,
                          probes=None, hvp_fn: Callable | None = None, prior_logp: Callable | None = None,
                          t0: float | None = None, t1: float | None = None, method: str = "DOP853",
                          rtol: float = 1e-11, atol: float = 1e-12) -> LikelihoodResult:
    """log p_{t0}(x0) per row by integrating the PF ODE from t0 to t1 with the change-of-variables term.

    Parameters
    ----------
    x0 : (B, D) points at time t0 (default sde.t_min)
    score_fn : (x (B, D), t) -> score (B, D)
    divergence_fn : (x, t) -> tr d score / dx (B,): exact divergence. Otherwise ``probes`` (P, B, D) are required
        and the Hutchinson estimate eps^T H eps is used, with H eps from ``hvp_fn(x, t, eps)`` or by a central
        difference of score_fn (step FD_STEP, error O(FD_STEP^2)).
    prior_logp : z (B, D) -> log p_{t1}(z) (B,); default the SDE's prior
    t0 : the start time, default ``sde.t_min`` (0 for the VP / sub-VP / VE SDEs). At sigma(t0) = 0 the marginal is
        the data law itself: exact for smooth data such as the Gaussian oracles, but the score of discrete or
        low-dimensional data is infinite there. Such a start is refused with a ValueError naming what to pass:
        t0 = 1e-5 (Song et al. 2021, App. D; then log p_{t0} is the likelihood of the slightly noised data, and a
        dequantization / decoder term gives bits per dimension).
    """
    x0 = as_f64(x0, "x0", ndim=2, finite=True)
    B, D = x0.shape
    t0 = sde.t_min if t0 is None else float(t0)
    t1 = sde.T if t1 is None else float(t1)
    if not t1 > t0:
        raise ValueError(f"need t1 > t0, got t0 = {t0}, t1 = {t1}")
    if divergence_fn is None:
        if probes is None:
            raise ValueError("give divergence_fn (exact divergence) or probes (Hutchinson estimator)")
        probes = as_f64(probes, "probes")
        if probes.ndim != 3 or probes.shape[1:] != (B, D):
            raise ValueError(f"probes must have shape (P, {B}, {D}), got {probes.shape}")
        P = probes.shape[0]
    else:
        P = 1
    prior_logp = sde.prior_logp if prior_logp is None else prior_logp
    with np.errstate(all="ignore"):
        try:
            start = as_f64(score_fn(x0, t0), "score")
        except (ValueError, ZeroDivisionError, FloatingPointError) as exc:
            start, reason = None, f"{type(exc).__name__}: {exc}"
    if start is None or not np.all(np.isfinite(start)):
        why = reason if start is None else "non-finite values"
        raise ValueError(f"the score at t0 = {t0:g} (sigma = {float(sde.sigma(t0)):.3g}) gives {why}: at sigma = 0 the "
                         "marginal is the data law, whose score is infinite for discrete or low-dimensional data; "
                         "start the ODE at a small positive time, e.g. t0=1e-5 (Song et al. 2021, App. D)")

    def div_score(x, t):
        if divergence_fn is not None:
            return as_f64(divergence_fn(x, t), "divergence")[None]
        out = np.empty((P, B))
        for p in range(P):
            e = probes[p]
            if hvp_fn is not None:
                hv = as_f64(hvp_fn(x, t, e), "hvp")
            else:
                hv = (score_fn(x + FD_STEP * e, t) - score_fn(x - FD_STEP * e, t)) / (2.0 * FD_STEP)
            out[p] = np.sum(e * hv, axis=1)
        return out

    def rhs(t, y):
        x = y[: B * D].reshape(B, D)
        f, g2 = sde.f(t), sde.g2(t)
        v = f * x - 0.5 * g2 * as_f64(score_fn(x, t), "score")
        div = D * f - 0.5 * g2 * div_score(x, t)
        return np.concatenate([v.ravel(), div.ravel()])

    y0 = np.concatenate([x0.ravel(), np.zeros(P * B)])
    sol = solve_ivp(rhs, (t0, t1), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    x_end = sol.y[: B * D, -1].reshape(B, D)
    delta = sol.y[B * D:, -1].reshape(P, B)
    per_probe = as_f64(prior_logp(x_end), "prior_logp")[None] + delta
    se = per_probe.std(axis=0, ddof=1) / np.sqrt(P) if P > 1 else np.zeros(B)
    return LikelihoodResult(per_probe.mean(axis=0), se, per_probe, x_end, int(sol.nfev))
