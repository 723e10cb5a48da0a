"""Few-step samplers of consistency-style models: multistep consistency sampling (Song et al. 2023, Alg. 1; diffusers
``CMStochasticIterativeScheduler``), the Latent Consistency Model's multistep sampler (Luo et al. 2023, Alg. 3;
``LCMScheduler``) and Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024,
Alg. 4; ``TCDScheduler``).

Symbols: f the consistency function (the model's data prediction after the boundary parametrization
f = c_skip(t) x + c_out(t) F, Song et al. 2023, Eq. 5), e the boundary level (the grid's last: the data, or
sigma_min), gamma TCD's stochasticity. With an exact consistency function (refdiff.oracles.ConsistencyOracle) each
sampler produces the boundary law exactly at any number of steps: they are judged by their exact law, not by an
order (a denoiser in place of f leaves them biased at every step count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..schedules import ContinuousSchedule, DiscreteSchedule
from .base import Level, Sampler, State

__all__ = ["boundary_scalings", "BOUNDARIES", "CMMultistep", "LCM", "TCD", "TargetLevel"]

BOUNDARIES = ("none", "edm", "lcm", "trigflow")
CM_SIGMA_DATA = 0.5          # Song et al. 2023 (EDM's), LCM's
CM_SIGMA_MIN = 0.002
LCM_TIMESTEP_SCALING = 10.0  # Luo et al. 2023 / diffusers LCMScheduler


@dataclass(frozen=True)
class TargetLevel(Level):
    """A level at which the model is asked for its map to ``target`` (TCD's intermediate level)."""

    target: Level | None = None


def boundary_scalings(kind: str, level: Level, sigma_data: float = CM_SIGMA_DATA, sigma_min: float = CM_SIGMA_MIN,
                      timestep_scaling: float = LCM_TIMESTEP_SCALING):
    """(c_skip, c_out) of the consistency boundary condition f = c_skip x + c_out F at ``level``.

    "edm" (Song et al. 2023, App. C, time t = sigma / alpha): c_skip = s_d^2 / ((t - eps)^2 + s_d^2),
    c_out = s_d (t - eps) / sqrt(s_d^2 + t^2); "lcm" (Luo et al. 2023, time t = the discrete timestep scaled by
    ``timestep_scaling``): c_skip = s_d^2 / ((s t)^2 + s_d^2), c_out = s t / sqrt((s t)^2 + s_d^2); "trigflow" (sCM,
    Lu & Song 2024, Eq. 3: x_t = cos(t) x_0 + sin(t) s_d z, f = cos(t) x_t - s_d sin(t) F): the level's own x is
    x_t alpha / cos(t) with tan(t) = sigma / (alpha s_d), so c_skip = alpha / k^2, c_out = -sigma / k with
    k^2 = alpha^2 + sigma^2 / s_d^2 (finite at pure noise, alpha = 0); "none": (0, 1)."""
    if kind == "none":
        return 0.0, 1.0
    if kind == "edm":
        t = np.asarray(level.sigma, dtype=np.float64) / np.asarray(level.alpha, dtype=np.float64)
        return (sigma_data ** 2 / ((t - sigma_min) ** 2 + sigma_data ** 2),
                sigma_data * (t - sigma_min) / np.sqrt(sigma_data ** 2 + t ** 2))
    if kind == "lcm":
        t = np.asarray(level.t, dtype=np.float64) * timestep_scaling
        return sigma_data ** 2 / (t ** 2 + sigma_data ** 2), t / np.sqrt(t ** 2 + sigma_data ** 2)
    if kind == "trigflow":
        a, s = np.asarray(level.alpha, dtype=np.float64), np.asarray(level.sigma, dtype=np.float64)
        k2 = a * a + (s / sigma_data) ** 2
        return a / k2, -s / np.sqrt(k2)
    raise ValueError(f"boundary must be one of {BOUNDARIES}, got {kind!r}")


def _renoise(ctx, D, boundary: Level, nxt: Level):
    """A draw of q(x_next | x_e = D): the forward process from the boundary level to the next one."""
    ratio = np.asarray(nxt.alpha, dtype=np.float64) / np.asarray(boundary.alpha, dtype=np.float64)
    var = np.asarray(nxt.sigma, dtype=np.float64) ** 2 - (ratio * np.asarray(boundary.sigma, dtype=np.float64)) ** 2
    if np.any(var < 0):
        raise ValueError("the next level lies below the boundary level: nothing to re-noise")
    return D * ratio + ctx.noise() * np.sqrt(var)


class _Consistency(Sampler):
    stochastic = True
    history_needed = 0

    def __init__(self, boundary: str = "none", **scaling_kw):
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        self.boundary, self.scaling_kw = boundary, scaling_kw
        self.snr_zero_start = boundary != "edm"          # EDM's t = sigma / alpha is infinite at pure noise

    def f(self, ctx, x, level):
        """The consistency output c_skip x + c_out F at the sample x."""
        c_skip, c_out = boundary_scalings(self.boundary, level, **self.scaling_kw)
        return x * c_skip + ctx.denoise(x, level) * c_out

    def scalings(self, level):
        return boundary_scalings(self.boundary, level, **self.scaling_kw)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = self.f(ctx, ctx.x, cur)
        if state.step == len(ctx.grid) - 1:          # the last step lands on the boundary level itself
            return D, {}
        return _renoise(ctx, D, ctx.grid.levels[-1], nxt), {}


class CMMultistep(_Consistency):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(x_T, T); for each later level t_n,
    x_n = x0 + sqrt(t_n^2 - eps^2) z (the forward process from the boundary level eps), x0 = f(x_n, t_n). The grid's
    last level is the boundary (sigma_min for EDM-style CMs); the boundary condition defaults to "edm";
    ``boundary="trigflow"`` is sCM's multistep sampler (Lu & Song 2024: TrigFlow levels, e.g. t = pi/2, 1.1, 0)."""

    def __init__(self, boundary: str = "edm", **scaling_kw):
        super().__init__(boundary, **scaling_kw)
        self.name = "sCM(TrigFlow)" if boundary == "trigflow" else "CMMultistep"


class LCM(_Consistency):
    """The Latent Consistency Model's multistep sampler (Luo et al. 2023, Alg. 3; diffusers ``LCMScheduler``): on VP
    levels, x0 = c_skip(t) x_t + c_out(t) x0_model(x_t), then x_next = alpha_next x0 + sigma_next z; the last step
    returns x0. Boundary condition "lcm" by default (discrete timesteps scaled by 10)."""

    name = "LCM"

    def __init__(self, boundary: str = "lcm", **scaling_kw):
        super().__init__(boundary, **scaling_kw)


class TCD(Sampler):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, Alg. 4; diffusers
    ``TCDScheduler``): from t to the next level s, the model's trajectory-consistency map to the intermediate level
    s' = (1 - gamma) s (in the schedule's time; table indices floored on a discrete table), taken as DDIM,
    x_s' = alpha_s' x0 + sigma_s' eps; then forward noise from s' back to s. gamma = 0 is deterministic (DDIM with
    the model's map), gamma = 1 re-noises from the data (LCM-like). The model is asked at a TargetLevel naming s'
    (an exact trajectory-consistency oracle answers for that target; a network ignores it)."""

    snr_zero_start = True

    stochastic = True
    history_needed = 0

    def __init__(self, gamma: float = 0.3):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"TCD's gamma must lie in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.stochastic = gamma > 0
        self.name = f"TCD(gamma={gamma:g})"

    def _intermediate(self, grid, nxt: Level) -> Level:
        sch = grid.schedule
        if nxt.is_data:
            return nxt
        if isinstance(sch, DiscreteSchedule):
            i = int(np.floor((1.0 - self.gamma) * float(np.asarray(nxt.t))))
            return Level(i, sch.alpha(i), sch.sigma(i), sch.log_snr(i))
        if isinstance(sch, ContinuousSchedule):
            t = (1.0 - self.gamma) * np.asarray(nxt.t, dtype=np.float64)
            return Level(t, sch.alpha(t), sch.sigma(t), sch.log_snr(t))
        raise ValueError("TCD places its intermediate level in the schedule's time: build the grid with "
                         "Grid.from_discrete or Grid.from_times")

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        mid = self._intermediate(ctx.grid, nxt)
        asked = TargetLevel(cur.t, cur.alpha, cur.sigma, cur.log_snr, target=mid)
        D = ctx.denoise(ctx.x, asked)
        eps_hat = (ctx.x - D * cur.alpha) / cur.sigma
        x_mid = D * mid.alpha + eps_hat * mid.sigma
        if self.gamma == 0.0 or state.step == len(ctx.grid) - 1 or nxt.is_data:
            return x_mid if not nxt.is_data else D * nxt.alpha, {}
        return _renoise(ctx, x_mid, mid, nxt), {}
