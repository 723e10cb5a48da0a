"""Exponential-integrator samplers in data prediction beyond DPM-Solver: RES multistep (Zhang et al. 2023,
"Improved order analysis and design of exponential integrator for diffusion models"; ComfyUI ``res_multistep``,
also ancestral) and SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023, stochastic explicit exponential derivative-free
solvers; ComfyUI ``seeds_2`` / ``seeds_3`` / ``exp_heun_2_x0``).

Symbols: lambda = log(alpha / sigma), h = lambda_t - lambda_s, eta the SDE noise scale (0: the ODE), H = (1 + eta) h,
phi_1(-H) H = -expm1(-H) and phi_2(-H) H = R_2(-H) / H (refdiff._math.exp_remainder), r the intermediate
stage's fraction of h. SEEDS adds the exact Ornstein-Uhlenbeck increments of each stage: the first stage's draw is
carried, decayed, into the next (so the noise of a step has the exact variance sigma_t^2 (1 - e^{-2 eta h})).
"""

from __future__ import annotations

import numpy as np

from .._math import exp_remainder
from .base import Level, Sampler, State, check_noise_scale
from .dpm_solver import _h
from .karras import _ancestral, _from_ve, _ve

__all__ = ["RESMultistep", "SEEDS", "SEEDS_SOLVER_TYPES"]

SEEDS_SOLVER_TYPES = ("phi_1", "phi_2")


def _phi1(H):
    """phi_1(-H) H = 1 - e^{-H}."""
    return -np.expm1(-H)


def _phi2(H):
    """phi_2(-H) H = (e^{-H} - 1 + H) / H."""
    return exp_remainder(-H, 2) / H


class RESMultistep(Sampler):
    """RES second-order multistep (Zhang et al. 2023, Eq. 18) in VE coordinates, with k-diffusion's ancestral noise
    for eta > 0: from sigma to sigma_down, x' = e^{-h} x + h (b1 D + b2 D_old), b2 = phi_2 / c2, b1 = phi_1 - b2,
    c2 = (t_old - t) / h the previous evaluation's relative position (t = -log sigma); then noise sigma_up z. The
    first step (and the step into the data) is Euler. At eta = 0 this is DPM-Solver++ 2M with the exact Taylor weight
    (``DPMSolverPP2MSDE(eta=0, solver_type="heun")``).

    ``comfy_c2=True`` reproduces ComfyUI, which places the previous evaluation at the previous step's sigma_down
    (c2 = (t_prev - t(sigma_down_prev)) / h) instead of where it was made; the two agree at eta = 0.

    ``cfg_pp=True`` is ComfyUI's ``res_multistep_cfg_pp`` (CFG++, Chung et al. 2024): the exponential part moves
    along the unconditional prediction D_u and the guided one enters once, x' = e^{-h} (x + D_g - D_u) +
    h (b1 D_u + b2 D_u,old) (first step: x' = D_g + sigma_down (x - D_u) / sigma); without guidance it is the same
    sampler. Reads D_u apart from D_g: paper form only."""

    history_needed = 1

    def __init__(self, eta: float = 0.0, s_noise: float = 1.0, comfy_c2: bool = False, cfg_pp: bool = False):
        check_noise_scale(eta, s_noise)
        self.eta, self.s_noise, self.comfy_c2, self.cfg_pp = float(eta), float(s_noise), bool(comfy_c2), bool(cfg_pp)
        self.stochastic = eta > 0 and s_noise > 0
        # with noise the previous D was made on the path before the noise was added: the multistep correction no
        # longer follows one trajectory and the law converges at weak order 1 (refdiff order)
        self.order, self.weak_order = (None, 1) if self.stochastic else (2, None)
        self.name = f"RESMultistep(eta={eta:g})" + ("(Comfy c2)" if comfy_c2 else "") + ("(CFG++)" if cfg_pp else "")

    def step_order(self, state, grid):
        return 1 if state.step == 0 or grid.levels[state.step + 1].is_data else 2

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic and self.comfy_c2:
            raise NotImplementedError("the Comfy c2 reads the previous step's sigma_down, kept in the state")
        x = _ve(ctx.x, cur)
        s = cur.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        D_u = ctx.uncond_denoised() if self.cfg_pp else D
        up, down = _ancestral(s, nxt.sigma_ve, self.eta)
        keep = {"sigma_down": down, "D_u": D_u}
        if nxt.is_data or state.step == 0:
            x = D + (x - D_u) / s * down
            order = 1
        else:
            h = np.log(s) - np.log(down)
            prev = ctx.grid.levels[state.step - 1].sigma_ve
            ref = state.extra["sigma_down"] if self.comfy_c2 else s
            c2 = (np.log(ref) - np.log(prev)) / h            # t_prev - t_ref over h, t = -log sigma
            b2 = _phi2(h) / (h * c2)
            b1 = _phi1(h) / h - b2
            if self.cfg_pp:
                x = (x + D - D_u) * np.exp(-h) + (D_u * b1 + state.extra["D_u"] * b2) * h
            else:
                x = x * np.exp(-h) + (D * b1 + ctx.history[0] * b2) * h
            order = 2
        if self.stochastic and not nxt.is_data:
            x = x + ctx.noise() * (up * self.s_noise)
        return _from_ve(x, nxt), {"order": order, **keep}


class SEEDS(Sampler):
    """SEEDS-2 / SEEDS-3 (Gonzalez et al. 2023) as ComfyUI runs them, in data prediction on lambda:

    stages: x_j = (sigma_j / sigma_s) e^{-r_j eta h} x - alpha_j [a_j1 D + a_j2 D_prev_stage] + noise_j,
    SEEDS-2 (r = 1/2): x' = ... - alpha_t phi_1 lerp(D, D_2, 1/(2r)) ("phi_1") or - alpha_t (b1 D + b2 D_2) with
    b2 = phi_2 / r ("phi_2"); SEEDS-3 (r1 = 1/3, r2 = 2/3): a3_2 = (r2 / r1) phi_2(r2 H), b3 = phi_2(H) / r2.
    eta = 0, r = 1, "phi_2" is the exponential Heun method (``exp_heun_2_x0``). The step into the data returns D.
    Each stage adds its exact OU increment (module docstring): 2 or 3 draws per step, the earlier ones re-read, so
    there is no per-stage coefficient form."""

    history_needed = 0

    def __init__(self, stages: int = 2, eta: float = 1.0, s_noise: float = 1.0, r: float | None = None,
                 solver_type: str = "phi_1"):
        if stages not in (2, 3):
            raise ValueError(f"SEEDS has 2 or 3 stages, got {stages}")
        check_noise_scale(eta, s_noise)
        if solver_type not in SEEDS_SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SEEDS_SOLVER_TYPES}, got {solver_type!r}")
        r = 0.5 if r is None else float(r)
        if stages == 2 and not 0.0 < r <= 1.0:
            raise ValueError(f"SEEDS-2's r must lie in (0, 1], got {r}")
        self.stages, self.eta, self.s_noise, self.r, self.solver_type = stages, float(eta), float(s_noise), r, \
            solver_type
        self.stochastic = eta > 0 and s_noise > 0
        # the stages' exact OU increments leave the law's error to the drift; on the exact Gaussian law it is
        # O(h^2) for both SEEDS-2 and SEEDS-3 (refdiff order)
        self.order, self.weak_order = (None, 2) if self.stochastic else (stages, None)
        self.name = f"SEEDS-{stages}(eta={eta:g}" + (f",{solver_type},r={r:g})" if stages == 2 else ")")

    def step_order(self, state, grid):
        return 1 if grid.levels[state.step + 1].is_data else self.stages

    def _level(self, ctx, cur, nxt, frac):
        lam = (1.0 - frac) * np.asarray(cur.log_snr, dtype=np.float64) + frac * np.asarray(nxt.log_snr)
        return ctx.grid.level_at(lam)

    def _carry(self, ctx, noise, seg):
        """The previous stage's OU increment decayed over the segment, plus this segment's fresh one."""
        return noise * np.exp(seg) + ctx.noise() * np.sqrt(-np.expm1(2.0 * seg))

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic and self.stochastic:
            raise NotImplementedError("SEEDS re-reads each stage's noise in the next stage: no per-stage coefficients")
        x, D = ctx.x, ctx.denoise(ctx.x, cur)
        if nxt.is_data:
            return D * nxt.alpha, {"order": 1}
        h = _h(cur, nxt)
        H = h * (1.0 + self.eta)
        inj = self.stochastic
        decay = lambda lv, frac: x * (lv.sigma / cur.sigma * np.exp(-frac * h * self.eta))  # noqa: E731

        def first_stage(r):
            """The exponential Euler stage to the fraction r of the step, its noise and the model there."""
            l1 = self._level(ctx, cur, nxt, r)
            x2 = decay(l1, r) - D * (l1.alpha * np.expm1(-r * H))
            noise = 0.0
            if inj:
                noise = ctx.noise() * np.sqrt(-np.expm1(-2.0 * r * h * self.eta))
                x2 = x2 + noise * (l1.sigma * self.s_noise)
            return noise, ctx.denoise(x2, l1)
        if self.stages == 2:
            r = self.r
            noise, D2 = first_stage(r)
            if self.solver_type == "phi_1":
                fac = 0.5 / r
                out = decay(nxt, 1.0) + (D * (1.0 - fac) + D2 * fac) * (nxt.alpha * _phi1(H))
            else:
                b2 = _phi2(H) / r
                out = decay(nxt, 1.0) + (D * (_phi1(H) - b2) + D2 * b2) * nxt.alpha
            if inj:
                out = out + self._carry(ctx, noise, (r - 1.0) * h * self.eta) * (nxt.sigma * self.s_noise)
            return out, {"order": 2}
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        noise, D2 = first_stage(r1)
        l2 = self._level(ctx, cur, nxt, r2)
        a32 = (r2 / r1) * _phi2(r2 * H)
        a31 = _phi1(r2 * H) - a32
        x3 = decay(l2, r2) + (D * a31 + D2 * a32) * l2.alpha
        if inj:
            noise = self._carry(ctx, noise, (r1 - r2) * h * self.eta)
            x3 = x3 + noise * (l2.sigma * self.s_noise)
        D3 = ctx.denoise(x3, l2)
        b3 = _phi2(H) / r2
        out = decay(nxt, 1.0) + (D * (_phi1(H) - b3) + D3 * b3) * nxt.alpha
        if inj:
            out = out + self._carry(ctx, noise, (r2 - 1.0) * h * self.eta) * (nxt.sigma * self.s_noise)
        return out, {"order": 3}
