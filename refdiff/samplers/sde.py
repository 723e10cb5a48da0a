"""Reverse-SDE samplers (Song et al. 2021): Euler-Maruyama on dx = [f x - g^2 score] dt + g dW_bar, and the
predictor-corrector sampler with the Langevin corrector (Song et al. 2021, Alg. 4-5).

The score comes from the data prediction: score = (alpha D - x) / sigma^2. Times are the schedule's (the grid must
carry a continuous schedule); the VP noise is additive, so Euler-Maruyama has strong order 1.
"""

from __future__ import annotations

import numpy as np

from .._validate import positive_int
from ..sde import ScheduleSDE
from .base import Level, Sampler, State

__all__ = ["ReverseEulerMaruyama", "PredictorCorrector", "LANGEVIN_SNR"]

LANGEVIN_SNR = 0.16            # Song et al. 2021, App. G: snr for VP / CIFAR-10


def _sde(ctx):
    from ..schedules import ContinuousSchedule

    if not isinstance(ctx.grid.schedule, ContinuousSchedule):
        raise ValueError("reverse-SDE samplers need a grid built from a continuous schedule (Grid.from_times)")
    return ScheduleSDE(ctx.grid.schedule)


def _em(ctx, x, D, cur: Level, nxt: Level):
    sde = _sde(ctx)
    t, dt = cur.t, np.asarray(cur.t) - np.asarray(nxt.t)
    f, g2 = sde.f(t), sde.g2(t)
    score = (D * cur.alpha - x) / (np.asarray(cur.sigma) ** 2)
    return x - (x * f - score * g2) * dt + ctx.noise() * np.sqrt(g2 * dt)


class ReverseEulerMaruyama(Sampler):
    """x_{t - dt} = x + [g^2 score - f x] dt + g sqrt(dt) z (Song et al. 2021, Eq. 6 discretised)."""

    stochastic = True
    strong_order = 1.0              # additive noise: Euler-Maruyama = Milstein
    weak_order = 1
    history_needed = 0
    name = "ReverseEulerMaruyama"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = ctx.denoise(ctx.x, cur)
        return _em(ctx, ctx.x, D, cur, nxt), {}


class PredictorCorrector(Sampler):
    """n Langevin corrector steps at the current level, then an Euler-Maruyama predictor step (Song et al. 2021,
    Alg. 4 / 5). Corrector step size e = 2 (snr ||z|| / ||score||)^2 per sample, x <- x + e score + sqrt(2 e) z.

    The step size depends on per-sample norms of the current sample, so the corrector is not an affine stage with
    precomputed coefficients: this sampler has a paper form only (kernels need a reduction pass for it).
    """

    stochastic = True
    weak_order = 1
    history_needed = 0

    def __init__(self, snr: float = LANGEVIN_SNR, n_corrector: int = 1):
        if not 0 < snr < np.inf:
            raise ValueError(f"need a finite snr > 0, got {snr}")
        self.snr, self.n_corrector = float(snr), positive_int(n_corrector, "n_corrector", minimum=0)
        self.name = f"PC(snr={snr:g}, n={n_corrector})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic and self.n_corrector:
            raise NotImplementedError("the Langevin step size depends on per-sample norms; no per-stage coefficients")
        x = ctx.x
        for _ in range(self.n_corrector):
            score = (ctx.denoise(x, cur) * cur.alpha - x) / (np.asarray(cur.sigma) ** 2)
            z = ctx.noise()
            axes = tuple(range(1, x.ndim))
            ratio = np.sqrt(np.sum(z * z, axis=axes, keepdims=True)) / np.sqrt(np.sum(score * score, axis=axes,
                                                                                      keepdims=True))
            e = 2.0 * (self.snr * ratio) ** 2
            x = x + e * score + np.sqrt(2.0 * e) * z
        D = ctx.denoise(x, cur)
        return _em(ctx, x, D, cur, nxt), {}
