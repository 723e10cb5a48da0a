"""Pseudo linear multistep samplers: PNDM / PLMS (Liu et al. 2022; diffusers ``PNDMScheduler``) and iPNDM (Zhang &
Chen 2023, as in ComfyUI ``ipndm`` / ``ipndm_v``).

PNDM's transfer is the DDIM step phi(x_t, eps, t, s) = alpha_s (x_t - sigma_t eps) / alpha_t + sigma_s eps (exact for
constant eps); its gradient part is an Adams-Bashforth combination of past noise predictions with the fixed weights
of equal steps, (55, -59, 37, -9) / 24 at fourth order. PLMS warms up with a Heun step (the first step's two
evaluations averaged) and then AB2, AB3; F-PNDM warms up with three pseudo Runge-Kutta steps (four evaluations
each, the midpoint at half the step in the schedule's time: Liu et al. 2022, Eq. 13).

iPNDM is Adams-Bashforth on the Karras derivative d = (x - D) / sigma in VE sigma: fixed equal-step weights
(``variable=False``, ComfyUI ``ipndm``) or the variable-step weights for the grid's own spacing (``ipndm_v``).

Fixed weights assume equal steps in the variable the update integrates (sigma / alpha for PNDM, sigma for iPNDM):
on other grids the combination is off by O(h) and the method is first order. The order table runs them on grids
uniform in that variable, where they reach their declared order from an exact warm-up; a cold start's first-order
steps limit the run to global order 2 (PLMS warms up with Heun, so its cold start reaches 3).
"""

from __future__ import annotations

import numpy as np

from ..schedules import ContinuousSchedule, DiscreteSchedule
from .base import Level, Sampler, State
from .karras import _from_ve, _ve

__all__ = ["PNDM", "IPNDM", "AB_WEIGHTS", "PNDM_VARIANTS", "adams_bashforth"]

AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
PNDM_VARIANTS = ("plms", "prk")
PRK_STEPS = 3                 # F-PNDM's pseudo Runge-Kutta warm-up steps


def adams_bashforth(newest, past, weights):
    """sum_j w_j f_j over the newest value and the past ones (newest first), the weights' count of them."""
    out = newest * weights[0]
    for w, f in zip(weights[1:], past):
        out = out + f * w
    return out


def _transfer(x, eps, cur: Level, nxt: Level):
    """PNDM's phi: the DDIM step with a given noise prediction."""
    return (x - eps * cur.sigma) * (nxt.alpha / cur.alpha) + eps * nxt.sigma


def _time_midpoint(grid, cur: Level, nxt: Level) -> Level:
    """The level half-way in the schedule's time (an integer index on a discrete table: diffusers' t - T // N // 2)."""
    sch = grid.schedule
    if isinstance(sch, DiscreteSchedule):
        i = int(np.asarray(cur.t)) - (int(np.asarray(cur.t)) - max(int(np.asarray(nxt.t)), 0)) // 2
        return Level(i, sch.alpha(i), sch.sigma(i), sch.log_snr(i))
    if isinstance(sch, ContinuousSchedule):
        t = 0.5 * (np.asarray(cur.t, dtype=np.float64) + np.asarray(nxt.t, dtype=np.float64))
        return Level(t, sch.alpha(t), sch.sigma(t), sch.log_snr(t))
    return grid.level_at(0.5 * (np.asarray(cur.log_snr) + np.asarray(nxt.log_snr)))


class PNDM(Sampler):
    """PNDM: ``variant="plms"`` (PLMS, diffusers ``skip_prk_steps=True``: Heun, AB2, AB3, then AB4 on eps) or
    ``"prk"`` (F-PNDM: three pseudo-RK4 steps, then AB4). One evaluation per step after the warm-up; a step into the
    data is the same transfer (alpha' = 1, sigma' = 0: x0 = (x - sigma eps') / alpha), as in the paper and diffusers.
    Past eps values travel in ``State.extra``: paper form only."""

    history_needed = 0

    def __init__(self, variant: str = "plms"):
        if variant not in PNDM_VARIANTS:
            raise ValueError(f"PNDM variant must be one of {PNDM_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.order = 4
        self.global_order = 3 if variant == "plms" else 4
        self.name = "PLMS" if variant == "plms" else "F-PNDM"

    def step_order(self, state, grid):
        if self.variant == "prk":
            return 4 if state.step < PRK_STEPS else min(state.step + 1, 4)
        return min(state.step + 2, 4) if state.step > 0 else 2

    def _eps(self, ctx, x, level):
        return (x - ctx.denoise(x, level) * level.alpha) / level.sigma

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("PNDM combines up to four past noise predictions: beyond the kernel's slots")
        x = ctx.x
        past = tuple(state.extra.get("eps", ()))
        i = state.step
        eps = self._eps(ctx, x, cur)
        if self.variant == "prk" and i < PRK_STEPS:
            mid = _time_midpoint(ctx.grid, cur, nxt)
            e2 = self._eps(ctx, _transfer(x, eps, cur, mid), mid)
            e3 = self._eps(ctx, _transfer(x, e2, cur, mid), mid)
            e4 = self._eps(ctx, _transfer(x, e3, cur, nxt), nxt)
            combo = (eps + e2 * 2.0 + e3 * 2.0 + e4) / 6.0
            return _transfer(x, combo, cur, nxt), {"order": 4, "eps": (eps,) + past[:2]}
        if self.variant == "plms" and i == 0:           # Heun: the eps at the Euler point averaged in
            e2 = self._eps(ctx, _transfer(x, eps, cur, nxt), nxt)
            return _transfer(x, (eps + e2) * 0.5, cur, nxt), {"order": 2, "eps": (eps,)}
        k = min(len(past) + 1, 4)
        combo = adams_bashforth(eps, past, AB_WEIGHTS[k])
        return _transfer(x, combo, cur, nxt), {"order": k, "eps": (eps,) + past[:2]}


class IPNDM(Sampler):
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth of order min(max_order, step + 1) on d = (x - D) / sigma in VE
    sigma, x' = x + (sigma' - sigma) sum_j w_j d_j, the step into sigma = 0 included (as ComfyUI runs it: no
    special last step). ``variable=False``: the fixed
    equal-step weights (ComfyUI ``ipndm``); ``True``: the weights for the grid's own steps (``ipndm_v``, exact
    Adams-Bashforth for variable steps up to order 4). Past d values travel in ``State.extra``: paper form only."""

    history_needed = 0

    def __init__(self, max_order: int = 4, variable: bool = False):
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"iPNDM max_order must be 1..4, got {max_order}")
        self.max_order, self.variable = max_order, bool(variable)
        self.order = max_order
        self.global_order = min(max_order, 2)
        self.name = f"iPNDM{'-v' if variable else ''}-{max_order}"

    def step_order(self, state, grid):
        return min(self.max_order, state.step + 1)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if ctx.symbolic:
            raise NotImplementedError("iPNDM combines past derivatives (x_j - D_j) / sigma_j: beyond the kernel's slots")
        x = _ve(ctx.x, cur)
        s, sn = cur.sigma_ve, nxt.sigma_ve
        D = ctx.denoise(ctx.x, cur)
        d = (x - D) / s
        past = tuple(state.extra.get("d", ()))
        sig = (s,) + tuple(state.extra.get("sigmas", ()))
        keep = {"d": ((d,) + past)[:self.max_order - 1], "sigmas": sig[:self.max_order]}
        k = min(self.max_order, len(past) + 1)
        slope = adams_bashforth(d, past, self._weights(k, sig, sn) if self.variable else AB_WEIGHTS[k])
        return _from_ve(x + slope * (sn - s), nxt), {"order": k, **keep}

    @staticmethod
    def _weights(k, sig, s_next):
        """Variable-step Adams-Bashforth weights: w_j = (1 / h) int_s^{s'} L_j(u) du over the nodes sig[0..k-1]
        (the newest first), by 4-point Gauss-Legendre (exact for the degree <= 3 bases)."""
        nodes = [np.asarray(v, dtype=np.float64) for v in sig[:k]]
        s = nodes[0]
        h = s_next - s
        gl_u, gl_w = np.polynomial.legendre.leggauss(4)
        out = []
        for j in range(k):
            acc = 0.0
            for q in range(4):
                tau = s + 0.5 * h * (gl_u[q] + 1.0)
                basis = 1.0
                for m in range(k):
                    if m != j:
                        basis = basis * (tau - nodes[m]) / (nodes[j] - nodes[m])
                acc = acc + gl_w[q] * basis
            out.append(0.5 * acc)
        return out
