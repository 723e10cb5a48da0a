"""Judge a recorded run of an adaptive DPM-Solver (k-diffusion's ``sample_dpm_adaptive``) attempt by attempt.

The function chooses its steps from the sample: each attempt from s to t = min(t_end, s + h) (t = -log sigma) runs
a low- and a high-order DPM-Solver step sharing their first evaluations (order 3: DPM-Solver-2 with r1 = 1/3 and
DPM-Solver-3; order 2: DPM-Solver-1 and -2), forms the scaled error E, and its PID controller accepts or rejects and
rescales h (refdiff.samplers.dpm_adaptive). Its callback reports every attempt: the sample after it, s, E, h and the
accept count. Each attempt is judged on its own, from the target's reported state (sample, s, h):

* the model calls: their number (order per attempt), their levels against s, s + r1 h, s + r2 h (the float32 level
  rule) and the stage inputs they were given against the reference's (the rounding rule);
* the reference's low and high steps, on ``Bounded`` values with the target's model outputs; an accepted attempt's
  sample against x_high (+ the ancestral noise with eta > 0), under |target - refdiff| <= R u (e + level terms), the
  level terms the sensitivity of the attempt to the float32 error of its two levels (central differences);
* E against the reference's E, within its propagated bound (the difference of the two steps cancels: its bound is
  the difference's running bound over the scale);
* the controller: fed the target's own E, refdiff's PID must make the same decision (unless the factor lies within
  its float32 error of the acceptance threshold) and the same new h to float32 rounding of its few operations.
"""

from __future__ import annotations

import numpy as np

from ..samplers import Grid, Level
from ..samplers.base import NumericContext
from ..samplers.dpm_adaptive import END_SLACK, PIDController
from ..samplers.dpm_solver import dpm_solver_step
from ..samplers.karras import _ancestral
from .findings import Finding
from .replay import R, perturbed_grids
from .rounding import Bounded, BoundedContext, exact

__all__ = ["judge_adaptive", "Attempt"]


class Attempt:
    """One attempt as the target reported it: the sample after it, its s, E, h and whether it was accepted."""

    def __init__(self, x, s, error, h, accepted):
        self.x, self.s, self.error, self.h, self.accepted = x, float(s), float(error), float(h), bool(accepted)


def _ve(sigma) -> Level:
    s = float(sigma)
    return Level(s, 1.0, s, -2.0 * np.log(s))


def _t32(v) -> float:
    return float(np.float32(v))


def _stage_levels(cur: Level, nxt: Level, order: int):
    """The levels the attempt evaluates the model at after cur: r1 (and r2) of the way in t = -log sigma."""
    h = 0.5 * (nxt.log_snr - cur.log_snr)
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    return [_ve(np.exp(-(-np.log(cur.sigma) + r * h))) for r in rs]


def _attempt(ctx, x, cur, target, order):
    """(x_low, x_high) of one attempt, the model at cur evaluated first (k-diffusion's order)."""
    D = ctx.denoise(x, cur)
    if order == 2:
        return dpm_solver_step(ctx, x, D, cur, target, 1), dpm_solver_step(ctx, x, D, cur, target, 2, 0.5)
    return dpm_solver_step(ctx, x, D, cur, target, 2, 1.0 / 3.0), dpm_solver_step(ctx, x, D, cur, target, 3)


def judge_adaptive(x_T, calls, attempts, draws, *, sigma_min, sigma_max, order=3, rtol=0.05, atol=0.0078,
                   h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0,
                   u=float(np.finfo(np.float32).eps) / 2.0):
    """Findings and per-attempt ratios for a recorded adaptive run. ``calls``: [(x, sigma, out)] in call order;
    ``attempts``: [Attempt] in order; ``draws``: the noise of accepted attempts (eta > 0) in draw order."""
    findings, step_ratio, call_ratio, level_ratio, err_ratio = [], [], [], [], []
    references = []                  # (attempt, reference value, bound) of every accepted attempt (for reproducers)
    stochastic = eta > 0 and s_noise > 0
    pid = PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if stochastic else order, accept_safety)
    t_end = _t32(-np.log(np.float32(sigma_min)))
    x, s = np.asarray(x_T, dtype=np.float64), _t32(-np.log(np.float32(sigma_max)))
    x_prev = x
    k = 0                                        # the next model call
    draws = list(draws)
    for i, att in enumerate(attempts):
        if not s < t_end - END_SLACK:
            findings.append(Finding("structure", f"attempt {i} runs past the end (t = {s:.6g} >= t_end - 1e-5)"))
            break
        t = _t32(min(np.float32(t_end), np.float32(s) + np.float32(pid.h)))
        cur, nxt = _ve(np.exp(-s)), _ve(np.exp(-t))
        target, up = nxt, 0.0
        if stochastic:
            down = _ancestral(cur.sigma, nxt.sigma, eta)[1]
            t_ = min(t_end, -np.log(down))
            target = _ve(np.exp(-t_))
            up = np.sqrt(max(nxt.sigma ** 2 - target.sigma ** 2, 0.0))
        mine = calls[k:k + order]
        if len(mine) < order:
            findings.append(Finding("structure", f"attempt {i} made {len(mine)} model calls, an order-{order} "
                                                 f"attempt makes {order}"))
            break
        want = [cur] + _stage_levels(cur, target, order)
        for j, ((_, sig, _), lv) in enumerate(zip(mine, want)):
            rel = R * u * (2.0 + abs(np.log(lv.sigma)) + abs(np.log(target.sigma)))
            level_ratio.append(abs(sig - lv.sigma) / (rel * lv.sigma))
        served = {}

        def denoise(xin, lvl, mine=mine, want=want, served=served):
            j = int(np.argmin([abs(np.log(lvl.sigma) - np.log(w.sigma)) for w in want]))
            served[j] = xin
            return exact(mine[j][2])
        grid = Grid([cur, target])
        ctx = BoundedContext(exact(x), denoise, lambda: None, (), grid)
        lo, hi = _attempt(ctx, ctx.x, cur, target, order)
        # the level terms: the attempt's sensitivity to the float32 error of its two levels' log-SNR
        terms = {"lo": 0.0, "hi": 0.0, 1: 0.0, 2: 0.0}
        for weight, grids in perturbed_grids(grid, 0):
            outs = []
            for g in grids:
                got = {}

                def plain(xin, lvl, g=g, got=got):
                    j = int(np.argmin([abs(lvl.log_snr - w.log_snr) for w in [g.levels[0]] + _stage_levels(
                        g.levels[0], g.levels[1], order)]))
                    got[j] = np.asarray(xin, dtype=np.float64)
                    return mine[j][2]
                nctx = NumericContext(x, plain, None, (), g)
                a, b = _attempt(nctx, x, g.levels[0], g.levels[1], order)
                outs.append({"lo": a, "hi": b, **{j: v for j, v in got.items() if j}})
            for key in terms:
                if key in outs[0] and key in outs[1]:
                    terms[key] = terms[key] + np.abs(outs[0][key] - outs[1][key]) * weight
        for j, xin in served.items():                      # the stage inputs the target evaluated at
            if j == 0:
                continue
            bound = R * u * (xin.e + terms.get(j, 0.0))
            with np.errstate(invalid="ignore"):
                call_ratio.append(float(np.max(np.abs(mine[j][0] - xin.v) / (bound + 1e-300))))
        k += order
        # the scaled error, its bound: the difference's running bound (and level terms) over the scale
        delta = np.maximum(atol, rtol * np.maximum(np.abs(lo.v), np.abs(x_prev)))
        diff = lo - hi
        n = x.size
        E = float(np.linalg.norm(diff.v / delta) / np.sqrt(n))
        E_bound = R * u * (float(np.linalg.norm((diff.e + terms["lo"] + terms["hi"]) / delta) / np.sqrt(n))
                           + E * (4.0 + float(np.max(lo.e / np.maximum(np.abs(lo.v), 1e-300)))))
        err_ratio.append(abs(att.error - E) / (E_bound + 1e-300))
        # the controller fed the target's own E: the decision and the new h
        h_before = pid.h
        accept = pid.propose(att.error)
        logs = sum(abs(b) * abs(np.log(abs(e))) for b, e in zip((pid.b1, pid.b2, pid.b3), pid.errs))
        h_rel = R * u * (8.0 + logs)
        factor = pid.h / h_before
        near = abs(factor - accept_safety) <= h_rel * max(1.0, abs(factor))
        if accept != att.accepted and not near:
            findings.append(Finding("step", f"attempt {i}: the controller {'accepts' if accept else 'rejects'} "
                                            f"E = {att.error:.4g} (factor {factor:.6g} against accept_safety "
                                            f"{accept_safety:g}); the target {'accepted' if att.accepted else 'rejected'}",
                                    evidence={"attempt": i, "error": att.error, "factor": factor}))
            break
        if abs(att.h - pid.h) > h_rel * abs(pid.h) + 1e-300:
            findings.append(Finding("step", f"attempt {i}: the new step size is {att.h:.9g} where the controller "
                                            f"gives {pid.h:.9g} from the target's E = {att.error:.6g} (relative "
                                            f"bound {h_rel:.2g})", evidence={"attempt": i}))
            break
        pid.h = att.h                                          # carry on from the target's h
        if att.accepted:
            out = hi
            if stochastic:
                z = draws.pop(0) if draws else None
                if z is None:
                    findings.append(Finding("structure", f"attempt {i} was accepted with eta > 0 but drew no noise"))
                    break
                out = out + exact(z) * (up * s_noise)
                # su = sqrt(sigma_t^2 - sigma_t_^2) formed in float32: the difference cancels
                s2, d2 = nxt.sigma ** 2, target.sigma ** 2
                if up > 0:
                    terms["hi"] = terms["hi"] + np.abs(z) * up * s_noise * ((s2 + d2) / (2.0 * (s2 - d2)) + 2.0)
            bound = R * u * (out.e + terms["hi"])
            references.append((i, np.asarray(out.v, dtype=np.float64), np.broadcast_to(bound, np.shape(out.v)).copy()))
            with np.errstate(invalid="ignore"):
                step_ratio.append(float(np.max(np.abs(att.x - out.v) / (bound + 1e-300))))
            x_prev = lo.v
            x, s = np.asarray(att.x, dtype=np.float64), t
        elif not np.array_equal(att.x, x):
            findings.append(Finding("step", f"attempt {i} was rejected but the sample changed",
                                    evidence={"attempt": i}))
            break
    if not findings:
        if k != len(calls):
            findings.append(Finding("structure", f"{len(calls)} model calls where the {len(attempts)} attempts "
                                                 f"make {k}"))
        elif attempts and s < t_end - END_SLACK:
            findings.append(Finding("structure", f"the run stops at t = {s:.6g}, before t_end = {t_end:.6g}"))
    for name, ratios, what in (("the accepted samples", step_ratio, "step"),
                               ("the stage inputs of the model calls", call_ratio, "call"),
                               ("the model calls' levels", level_ratio, "call"),
                               ("the error estimates", err_ratio, "step")):
        bad = [j for j, r in enumerate(ratios) if not r <= 1.0]
        if bad and not findings:
            findings.append(Finding(what, f"{name} disagree beyond the rounding rule from number {bad[0]} on "
                                          f"(ratio {ratios[bad[0]]:.3g})", evidence={"ratios": ratios}))
    judge_adaptive.references = references
    return findings, {"per_step_ratio": step_ratio, "per_call_ratio": call_ratio, "level_ratio": level_ratio,
                      "error_ratio": err_ratio}
