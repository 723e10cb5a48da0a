"""DPM-adaptive: DPM-Solver with an embedded error estimate and a PID step-size controller (Lu et al. 2022a,
Sec. 3.4 and App. C; k-diffusion ``sample_dpm_adaptive`` and its ``PIDStepSizeController``).

A function that owns its loop (the step sizes are chosen from the sample itself, so it is not a ``Sampler`` on a
fixed grid). In t = -log sigma (VE sigma = sigma / alpha of the level) each attempt from s to s + h runs a
low- and a high-order DPM-Solver step sharing their first evaluations: order 3 pairs DPM-Solver-2 (r1 = 1/3) with
DPM-Solver-3, order 2 pairs DPM-Solver-1 with DPM-Solver-2 (r1 = 1/2). The scaled error

    E = || (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|)) ||_2 / sqrt(numel)

(x_prev the last accepted low-order value, VE coordinates) feeds the controller: factor = limiter(E^-b1 E_1^-b2
E_2^-b3) with limiter(f) = 1 + atan(f - 1), b1 = (p + i + d) / k, b2 = -(p + 2d) / k, b3 = d / k, k the order
(1.5 with noise); the attempt is accepted when factor >= accept_safety, and h is multiplied by factor either way.
An accepted step continues from x_high (local extrapolation), plus ancestral noise for eta > 0.

The controller bounds the local error of the low-order step; refdiff judges it by the global error it achieves
against the exact solution as the tolerance shrinks (``refdiff order``: error against rtol, not an order).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .._validate import as_f64, positive_int
from ..schedules import ContinuousSchedule
from .base import Grid, Level, NumericContext, check_noise_scale
from .dpm_solver import dpm_solver_step
from .karras import _ancestral

__all__ = ["dpm_adaptive", "AdaptiveResult", "PIDController", "StepLimitError"]

H_INIT = 0.05
END_SLACK = 1e-5          # k-diffusion stops once t is within 1e-5 of t_end


class StepLimitError(RuntimeError):
    """An adaptive run that did not reach its end level within ``max_steps`` attempts."""


class PIDController:
    """k-diffusion's PID step-size controller (Söderlind 2003 filter coefficients, arctan limiter)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = float(h)
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2.0 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = float(accept_safety), float(eps)
        self.errs = []

    def propose(self, error: float) -> bool:
        inv = 1.0 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1.0 + np.arctan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return bool(accept)


class AdaptiveResult(NamedTuple):
    x: np.ndarray
    nfe: int
    n_accept: int
    n_reject: int
    sigmas: np.ndarray          # the accepted levels' VE sigmas, from sigma_max down to sigma_min
    errors: np.ndarray          # the scaled error E of every attempt


def _levels(schedule):
    """lam -> Level: VE levels (alpha = 1) without a schedule, else the schedule's level at that log-SNR."""
    if schedule is None:
        def at(lam):
            s = np.exp(-lam)
            return Level(s, 1.0, s, 2.0 * lam)
        return at
    if not isinstance(schedule, ContinuousSchedule):
        raise ValueError(f"schedule must be a ContinuousSchedule (or None for VE levels), got {type(schedule).__name__}")

    def at(lam):
        t = schedule.t_of_log_snr(2.0 * lam)
        return Level(t, schedule.alpha(t), schedule.sigma(t), 2.0 * lam)
    return at


def dpm_adaptive(model: Callable, x, sigma_max: float, sigma_min: float, *, schedule=None, prediction: str = "eps",
                 order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = H_INIT,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
                 eta: float = 0.0, s_noise: float = 1.0, noise=None, max_steps: int = 10_000) -> AdaptiveResult:
    """Adaptive DPM-Solver from VE sigma ``sigma_max`` down to ``sigma_min`` (both > 0), k-diffusion's defaults.

    ``model(x, level)`` returns a ``prediction`` output as in refdiff.solve.sample; ``schedule`` (a continuous one)
    names the levels (alpha, sigma, t) of the VE sigmas, VE levels when None. ``noise``: a Generator or a callable
    returning standard normal draws of x's shape (only with eta > 0). More than ``max_steps`` attempts (accepted or
    rejected) raise StepLimitError: a tolerance the controller cannot reach is an error, not a silent stop.
    """
    from ..parametrization import to_x0_eps
    from ..solve import noise_source

    x = as_f64(x, "x")
    if order not in (2, 3):
        raise ValueError(f"DPM-adaptive order must be 2 or 3, got {order}")
    if not (0.0 < sigma_min < sigma_max < np.inf):
        raise ValueError(f"DPM-adaptive needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (0.0 <= v < np.inf):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("rtol and atol cannot both be 0: the error would be divided by 0")
    if not (0.0 < abs(h_init) < np.inf):
        raise ValueError(f"h_init must be a nonzero finite step in t = -log sigma, got {h_init}")
    if not all(np.isfinite(c) for c in (pcoeff, icoeff, dcoeff)) or not 0.0 < accept_safety <= 1.0:
        raise ValueError("pcoeff, icoeff, dcoeff must be finite and accept_safety in (0, 1]")
    check_noise_scale(eta, s_noise)
    max_steps = positive_int(max_steps, "max_steps")
    stochastic = eta > 0 and s_noise > 0
    if stochastic and noise is None:
        raise ValueError("eta > 0 adds noise: pass noise (a Generator or a callable)")
    draw = noise_source(noise, x.shape) if stochastic else None
    at = _levels(schedule)
    t_end = -np.log(sigma_min)
    s = -np.log(sigma_max)
    grid = Grid([at(s), at(t_end)], schedule)
    nfe = [0]
    cache = {}

    def denoise(u, level):
        key = (float(np.asarray(level.log_snr)), u.tobytes())
        if key not in cache:
            nfe[0] += 1
            cache[key] = to_x0_eps(_call(model, u, level), prediction, u, level.alpha, level.sigma)[0]
        return cache[key]

    pid = PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if stochastic else order, accept_safety)
    cur = at(s)
    x_prev = x / cur.alpha
    sigmas, errors = [float(sigma_max)], []
    n_accept = n_reject = 0
    while s < t_end - END_SLACK:
        if n_accept + n_reject >= max_steps:
            raise StepLimitError(f"DPM-adaptive did not reach sigma_min = {sigma_min:g} within max_steps = "
                                 f"{max_steps} attempts ({n_accept} accepted, {n_reject} rejected, at sigma "
                                 f"{np.exp(-s):.4g}, last scaled error {errors[-1]:.3g}): loosen rtol / atol or "
                                 f"raise max_steps")
        cache.clear()
        t = min(t_end, s + pid.h)
        cur, nxt = at(s), at(t)
        target, up = nxt, 0.0
        if stochastic:
            _, down = _ancestral(np.exp(-s), np.exp(-t), eta)
            t_ = min(t_end, -np.log(down))
            target = at(t_)
            up = np.sqrt(max(np.exp(-2.0 * t) - np.exp(-2.0 * t_), 0.0))
        ctx = NumericContext(x, denoise, None, (), grid)
        D = ctx.denoise(x, cur)
        if order == 2:
            x_low = dpm_solver_step(ctx, x, D, cur, target, 1)
            x_high = dpm_solver_step(ctx, x, D, cur, target, 2, 0.5)
        else:
            x_low = dpm_solver_step(ctx, x, D, cur, target, 2, 1.0 / 3.0)
            x_high = dpm_solver_step(ctx, x, D, cur, target, 3)
        lo, hi = x_low / target.alpha, x_high / target.alpha               # VE coordinates, as k-diffusion's x
        delta = np.maximum(atol, rtol * np.maximum(np.abs(lo), np.abs(x_prev)))
        error = float(np.linalg.norm((lo - hi) / delta) / np.sqrt(x.size))
        errors.append(error)
        if not np.isfinite(error):
            raise FloatingPointError(f"DPM-adaptive: the error estimate is {error} at sigma {np.exp(-s):.4g} "
                                     f"(the model returned non-finite values?)")
        if pid.propose(error):
            x_prev = lo
            out = hi
            if stochastic:
                out = out + draw() * (up * s_noise)
            x = out * nxt.alpha
            s = t
            sigmas.append(float(np.exp(-t)))
            n_accept += 1
        else:
            n_reject += 1
    return AdaptiveResult(x, nfe[0], n_accept, n_reject, np.array(sigmas), np.array(errors))


def _call(model, u, level):
    from ..solve import _flat

    out = as_f64(model(u, _flat(level)), "model output")
    if out.shape != u.shape:
        raise ValueError(f"model output has shape {out.shape}, x has shape {u.shape}")
    return out
