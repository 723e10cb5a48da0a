"""Flow-matching samplers (rectified flow, SD3 / Flux / video models): the PF ODE in flow coordinates
dx_f / dt = v = (x_f - D) / t, with x_f = x / (alpha + sigma) and flow time t = sigma / (alpha + sigma)
(Liu et al. 2022; Lipman et al. 2023; Esser et al. 2024). On flow levels (alpha = 1 - t, sigma = t) the map is the
identity; on any other schedule each step converts in and out, so the same code serves every family.

Symbols: t the flow time (diffusers' sigma of a flow scheduler), v = eps - x0 the velocity, D = x0_hat = x_f - t v.
"""

from __future__ import annotations

import numpy as np

from .base import Level, Sampler, State, check_noise_scale

__all__ = ["FlowEuler", "FlowEulerAncestral", "FlowHeun", "FlowStochastic", "flow_time"]


def flow_time(level: Level):
    """t = sigma / (alpha + sigma) of a level (0 at the data, 1 at pure noise)."""
    a, s = np.asarray(level.alpha, dtype=np.float64), np.asarray(level.sigma, dtype=np.float64)
    return s / (a + s)


def _to_flow(x, level: Level):
    return x / (np.asarray(level.alpha, dtype=np.float64) + np.asarray(level.sigma, dtype=np.float64))


def _from_flow(x_f, level: Level):
    return x_f * (np.asarray(level.alpha, dtype=np.float64) + np.asarray(level.sigma, dtype=np.float64))


class FlowEuler(Sampler):
    """Euler on the flow ODE: x_f' = x_f + (t_next - t) v (diffusers ``FlowMatchEulerDiscreteScheduler``, SD3 / Flux).
    On VP or VE levels this is DDIM written in flow time (the same affine update)."""

    snr_zero_start = True

    order = 1
    history_needed = 0
    name = "FlowEuler"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        t, t_next = flow_time(cur), flow_time(nxt)
        x_f = _to_flow(ctx.x, cur)
        D = ctx.denoise(ctx.x, cur)
        v = (x_f - D) / t
        return _from_flow(x_f + v * (t_next - t), nxt), {}


class FlowHeun(Sampler):
    """Heun's method on the flow ODE (diffusers ``FlowMatchHeunDiscreteScheduler``): an Euler predictor, then the
    trapezoidal average of v at both ends; the step into t = 0 stays Euler (order 1 there)."""

    snr_zero_start = True

    order = 2
    history_needed = 0
    name = "FlowHeun"

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        t, t_next = flow_time(cur), flow_time(nxt)
        x_f = _to_flow(ctx.x, cur)
        v = (x_f - ctx.denoise(ctx.x, cur)) / t
        x_pred = x_f + v * (t_next - t)
        if nxt.is_data:
            return _from_flow(x_pred, nxt), {"order": 1}
        v_next = (x_pred - ctx.denoise(_from_flow(x_pred, nxt), nxt)) / t_next
        return _from_flow(x_f + (v * 0.5 + v_next * 0.5) * (t_next - t), nxt), {"order": 2}


class FlowStochastic(Sampler):
    """Stochastic flow sampling (diffusers ``stochastic_sampling=True``, LTX-Video): the data prediction re-noised to
    the next level with fresh noise, x' = (1 - t_next) D + t_next z (in flow coordinates).

    Each step forgets x except through D: with a consistency model (D the PF-ODE endpoint, refdiff.oracles
    .ConsistencyOracle) the output law is exact at any number of steps; with a denoiser (D the posterior mean) it is
    biased and does not converge as the steps shrink. It has no order: refdiff judges it by its exact law."""

    snr_zero_start = True

    stochastic = True
    history_needed = 0
    name = "FlowStochastic"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {}
        t_next = flow_time(nxt)
        return _from_flow(D * (1.0 - t_next) + ctx.noise() * t_next, nxt), {}


class FlowEulerAncestral(Sampler):
    """Euler ancestral on the flow ODE (ComfyUI ``sample_euler_ancestral_RF``; diffusers
    ``LTXEulerAncestralRFScheduler``): an Euler step down to t_down = t'(1 + (t'/t - 1) eta), then the forward flow
    process from t_down up to t', x_f' = (1 - t') / (1 - t_down) x_f,down + sqrt(t'^2 - t_down^2 (1 - t')^2 /
    (1 - t_down)^2) s_noise z: the marginal at t' is kept exactly (s_noise = 1). eta = 0 is FlowEuler; the step into
    t = 0 returns D."""

    snr_zero_start = True
    history_needed = 0

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise = float(eta), float(s_noise)
        self.stochastic = self.eta > 0 and self.s_noise > 0
        self.order = None if self.stochastic else 1
        self.weak_order = 1 if self.stochastic else None
        self.name = f"FlowEulerAncestral(eta={eta:g})"

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        t, t_next = flow_time(cur), flow_time(nxt)
        x_f = _to_flow(ctx.x, cur)
        D = ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {}
        t_down = t_next * (1.0 + (t_next / t - 1.0) * self.eta)
        ratio = t_down / t
        x_down = x_f * ratio + D * (1.0 - ratio)
        if not self.stochastic:
            return _from_flow(x_down, nxt), {}
        keep = (1.0 - t_next) / (1.0 - t_down)
        up = np.sqrt(np.maximum(t_next ** 2 - (t_down * keep) ** 2, 0.0))
        return _from_flow(x_down * keep + ctx.noise() * (up * self.s_noise), nxt), {}
