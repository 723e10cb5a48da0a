"""UniPC (Zhao et al. 2023): the multistep predictor UniP and corrector UniC in data-prediction form, B(h) = -h (bh1)
or e^{-h} - 1 (bh2), as diffusers' ``UniPCMultistepScheduler`` runs it.

One model evaluation per step: at the predicted point x^p_i the model gives D_i; UniC corrects the previous step,
x^c_i = C(x^c_{i-1}, D_{i-1}, D_i, ...), and UniP predicts x^p_{i+1} from x^c_i, D_i, D_{i-1}. The corrector is
skipped on the first step; the last step is not corrected (no model call after it), so a run of N steps costs N
evaluations. Predictor order <= 2 keeps every step within the kernel's slots (D_i, D_{i-1}, D_{i-2}); order 3
(ComfyUI's ``uni_pc``, diffusers' ``solver_order=3``) solves diffusers' linear systems for rho (R rho = b, the
predictor on the leading block) and carries D_{i-3} in the state: paper form only.

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
    """UniPC-p with corrector (p <= 3): declared order p + 1 (UniC raises the predictor's order by one). From a cold
    start the warm-up's first corrected step (UniP-1 + UniC-1, local error O(h^3)) limits p = 3 to global order 3;
    its constant is small: the cold run's excess over the exactly warmed-up one shrinks 8x per halving but is 1e-3 of
    the error at 256 steps (bh2). With bh1 (B(h) = -h) p = 3 is not a clean fourth-order method: local slopes 4.15,
    4.46, 3.72, 2.74 over 64 .. 1024 steps from an exact warm-up (bh2: 3.97 .. 4.00); it is kept out of the order
    table, and diffusers' bh1 order 3 agrees with it step by step."""

    history_needed = 2

    def __init__(self, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC predictor order must be 1, 2 or 3, got {order}")
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
        if lower_order_final not in (True, False, "always"):
            raise ValueError(f"lower_order_final must be True, False or 'always', got {lower_order_final!r}")
        self.p, self.variant, self.lower_order_final = order, variant, lower_order_final
        self.order = order + 1
        self.global_order = 3 if order == 3 else None
        self.name = f"UniPC-{order}({variant})"

    # -- the two updates (Zhao et al. 2023, Alg. 2-3 with diffusers' conventions) ----------------------
    def _coeffs(self, h, k_max: int = 2):
        hh = -h
        B = hh if self.variant == "bh1" else np.expm1(hh)
        # b_k = k! R_{k+1}(hh) / (hh^k B(h)), the recursion h_phi_k of the paper without its cancellation
        b = [math.factorial(k) * exp_remainder(hh, k + 1) / (hh ** k * B) for k in range(1, k_max + 1)]
        return np.expm1(hh), B, b

    @staticmethod
    def _rks(levels, ref: Level, h):
        """r_k = (lambda_k - lambda_ref) / h of the earlier levels (newest first)."""
        return [(float(np.asarray(lv.lam)) - float(np.asarray(ref.lam))) / float(np.asarray(h)) for lv in levels]

    def _order_at(self, i: int, n: int, grid) -> int:
        """min(p, i + 1) during the warm-up, 1 into the data; ``lower_order_final``: True, at most n - i when
        n < 15 (DPM-Solver's rule); "always", at most n - i whatever n (UniPC's own code and diffusers' UniPC)."""
        if self.lower_order_final == "always":
            return min(multistep_order(self.p, i, n, grid.levels[i + 1].is_data, False), n - i)
        return multistep_order(self.p, i, n, grid.levels[i + 1].is_data, bool(self.lower_order_final))

    def predict(self, x, D, D_prev, lv_prev, cur: Level, nxt: Level, order: int, D_prev2=None, lv_prev2=None):
        """UniP from cur to nxt: x^p = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D - alpha_t B(h) sum rho_k D1_k,
        D1_k = (D_{-k} - D) / r_k. Order 2: diffusers' rho = 1/2; order 3: R[:-1, :-1] rho = b[:-1] with
        R_ij = r_j^i over (r_1, r_2, 1)."""
        if nxt.is_data:
            return D * nxt.alpha
        h = np.asarray(nxt.lam) - np.asarray(cur.lam)
        phi1, B, b = self._coeffs(h, max(order, 2))
        out = x * (nxt.sigma / cur.sigma) - D * (nxt.alpha * phi1)
        if order == 2:
            rk = (np.asarray(lv_prev.lam) - np.asarray(cur.lam)) / h
            out = out - (D_prev - D) / rk * (nxt.alpha * B * 0.5)       # diffusers' simplified rho_p = 1/2
        elif order == 3:
            r1, r2 = self._rks([lv_prev, lv_prev2], cur, h)
            rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, r2]]), np.array([b[0], b[1]], dtype=np.float64))
            out = out - ((D_prev - D) / r1 * rho[0] + (D_prev2 - D) / r2 * rho[1]) * (nxt.alpha * B)
        return out

    def correct(self, x_prev, D_prev, D_prev2, D_now, lv_prev2, prev: Level, cur: Level, order: int, D_prev3=None,
                lv_prev3=None):
        """UniC on the step prev -> cur with the model output D_now at the predicted point: R rho = b over
        (r_1, .., r_{order-1}, 1), the last rho on D_now - D_prev."""
        h = np.asarray(cur.lam) - np.asarray(prev.lam)
        phi1, B, b = self._coeffs(h, max(order, 2))
        out = x_prev * (cur.sigma / prev.sigma) - D_prev * (cur.alpha * phi1)
        if order == 1:
            return out - (D_now - D_prev) * (cur.alpha * B * 0.5)
        if order == 2:
            rk = (np.asarray(lv_prev2.lam) - np.asarray(prev.lam)) / h
            # rho_c solves [[1, 1], [rk, 1]] rho = b
            det = 1.0 - rk
            rho0 = (b[0] - b[1]) / det
            rho1 = (b[1] - rk * b[0]) / det
            return out - ((D_prev2 - D_prev) / rk * rho0 + (D_now - D_prev) * rho1) * (cur.alpha * B)
        r1, r2 = self._rks([lv_prev2, lv_prev3], prev, h)
        R = np.array([[1.0, 1.0, 1.0], [r1, r2, 1.0], [r1 * r1, r2 * r2, 1.0]])
        rho = np.linalg.solve(R, np.array(b[:3], dtype=np.float64))
        return out - ((D_prev2 - D_prev) / r1 * rho[0] + (D_prev3 - D_prev) / r2 * rho[1]
                      + (D_now - D_prev) * rho[2]) * (cur.alpha * B)

    def step_order(self, state, grid):
        return self._order_at(state.step, len(grid), grid)

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        if self.p == 3 and ctx.symbolic:
            raise NotImplementedError("UniPC-3 reads D_{i-3} from the state: beyond the kernel's slots (paper form)")
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
            x_c = self.correct(x_prev, H1, H2, D, lv[i - 2] if i >= 2 else None, lv[i - 1], cur, corr_order,
                               state.extra.get("D_older"), lv[i - 3] if i >= 3 else None)
        order = self._order_at(i, n, ctx.grid)
        H_prev = ctx.history[0] if ctx.history else None
        H_prev2 = ctx.history[1] if len(ctx.history) > 1 else None
        x_next = self.predict(x_c, D, H_prev, lv[i - 1] if i >= 1 else None, cur, nxt, order, H_prev2,
                              lv[i - 2] if i >= 2 else None)
        return x_next, {"order": order, "x_corrected": x_c, "D_older": H_prev2}
