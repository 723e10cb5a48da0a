"""UniPC (Zhao et al. 2023): the multistep predictor UniP and corrector UniC in data-prediction form, B(h) = -h (bh1)
or e^{-h} - 1 (bh2), as diffusers' ``UniPCMultistepScheduler`` runs it.

One model evaluation per step: at the predicted point x^p_i the model gives D_i; UniC corrects the previous step,
x^c_i = C(x^c_{i-1}, D_{i-1}, D_i, ...), and UniP predicts x^p_{i+1} from x^c_i, D_i, D_{i-1}. The corrector is
skipped on the first step; the last step is not corrected (no model call after it), so a run of N steps costs N
evaluations. Predictor order <= 2, which keeps every step within the kernel's slots (D_i, D_{i-1}, D_{i-2}).

The paper form keeps x^c_{i-1} in the state. The coefficient form has no slot for it and recovers it from the
carried x^p_i by inverting the previous predictor (its x coefficient sigma_i / sigma_{i-1} is never 0).
"""

from __future__ import annotations

import math

import numpy as np

from .._math import exp_remainder
from .base import Affine, Level, Sampler, State
from .dpm_solver import multistep_order

__all__ = ["UniPC", "UNIPC_VARIANTS"]

UNIPC_VARIANTS = ("bh1", "bh2")


class UniPC(Sampler):
    """UniPC-p with corrector (p <= 2): declared order p + 1 (UniC raises the predictor's order by one)."""

    history_needed = 2

    def __init__(self, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
        if order not in (1, 2):
            raise ValueError(f"UniPC predictor order must be 1 or 2 here, got {order}")
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
        self.p, self.variant, self.lower_order_final = order, variant, lower_order_final
        self.order = order + 1
        self.name = f"UniPC-{order}({variant})"

    # -- the two updates (Zhao et al. 2023, Alg. 2-3 with diffusers' conventions) ----------------------
    def _coeffs(self, h):
        hh = -h
        B = hh if self.variant == "bh1" else np.expm1(hh)
        # b_k = k! R_{k+1}(hh) / (hh^k B(h)), the recursion h_phi_k of the paper without its cancellation
        b = [math.factorial(k) * exp_remainder(hh, k + 1) / (hh ** k * B) for k in (1, 2)]
        return np.expm1(hh), B, b

    def _order_at(self, i: int, n: int, grid) -> int:
        return multistep_order(self.p, i, n, grid.levels[i + 1].is_data, self.lower_order_final)

    def predict(self, x, D, D_prev, lv_prev, cur: Level, nxt: Level, order: int):
        """UniP from cur to nxt: x^p = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D - alpha_t B(h) rho D1."""
        if nxt.is_data:
            return D * nxt.alpha
        h = np.asarray(nxt.lam) - np.asarray(cur.lam)
        phi1, B, _ = self._coeffs(h)
        out = x * (nxt.sigma / cur.sigma) - D * (nxt.alpha * phi1)
        if order == 2:
            rk = (np.asarray(lv_prev.lam) - np.asarray(cur.lam)) / h
            out = out - (D_prev - D) / rk * (nxt.alpha * B * 0.5)       # diffusers' simplified rho_p = 1/2
        return out

    def correct(self, x_prev, D_prev, D_prev2, D_now, lv_prev2, prev: Level, cur: Level, order: int):
        """UniC on the step prev -> cur with the model output D_now at the predicted point."""
        h = np.asarray(cur.lam) - np.asarray(prev.lam)
        phi1, B, b = self._coeffs(h)
        out = x_prev * (cur.sigma / prev.sigma) - D_prev * (cur.alpha * phi1)
        if order == 1:
            return out - (D_now - D_prev) * (cur.alpha * B * 0.5)
        rk = (np.asarray(lv_prev2.lam) - np.asarray(prev.lam)) / h
        # rho_c solves [[1, 1], [rk, 1]] rho = b
        det = 1.0 - rk
        rho0 = (b[0] - b[1]) / det
        rho1 = (b[1] - rk * b[0]) / det
        return out - ((D_prev2 - D_prev) / rk * rho0 + (D_now - D_prev) * rho1) * (cur.alpha * B)

    def step_order(self, state, grid):
        return self._order_at(state.step, len(grid), grid)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        i, n, lv = state.step, len(ctx.grid), ctx.grid.levels
        x_p = ctx.x
        D = ctx.denoise(x_p, cur)
        if i == 0:
            x_c = x_p
        else:
            prev_order = self._order_at(i - 1, n, ctx.grid)
            H1 = ctx.history[0]
            H2 = ctx.history[1] if len(ctx.history) > 1 else None
            if ctx.symbolic:
                # recover x^c_{i-1} from x^p_i by inverting the previous predictor (linear in its input)
                y = Affine({"Y": 1.0})
                pred = self.predict(y, H1, H2, lv[i - 2] if i >= 2 else None, lv[i - 1], cur, prev_order)
                a = pred.coef("Y")
                x_prev = (x_p - (pred - y * a)) / a
            else:
                x_prev = state.extra["x_corrected"]
            corr_order = prev_order
            x_c = self.correct(x_prev, H1, H2, D, lv[i - 2] if i >= 2 else None, lv[i - 1], cur, corr_order)
        order = self._order_at(i, n, ctx.grid)
        H_prev = ctx.history[0] if ctx.history else None
        x_next = self.predict(x_c, D, H_prev, lv[i - 1] if i >= 1 else None, cur, nxt, order)
        return x_next, {"order": order, "x_corrected": x_c}
