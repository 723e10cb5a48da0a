"""Judge a recorded trace of a sampler run against the sampler's error-bounded paper-form step.

A target that owns its loop (a k-diffusion-style function, a pipeline) cannot be stepped by the check; it is run
once with the oracle as its model and everything it did is recorded in a ``Trace``: the sample, level and output of
every model call, every noise draw, the states it reports between steps (a callback's sample at each step start)
and its final sample. ``judge`` then replays the reference sampler over the same levels on ``Bounded`` values
(refdiff.check.rounding), feeding it the target's model outputs and noise in the order the target drew them:

* every model call is judged where it happens: the level the target passed against the sampler's stage level
  (relative to R u (2 + |log sigma| + |log sigma_next|), the float32 error of levels formed through logarithms), and
  the sample it passed against the stage input (R u times the running bound plus the level terms below);
* every reported state is judged against the reference's step output, and the reference continues from the
  target's state (a step is judged on its own); where no state is reported (no callback, or a churned step whose
  reported sample is x_hat), the reference continues from its own bounded value, which still bounds the rounding
  of the whole span;
* the level terms: a float32 implementation forms its coefficients from float32 levels (differences that cancel,
  logarithms); their effect is measured as in the step replay (refdiff.check.replay): |x - D| per Euler-type
  stage, and the sensitivity of the step to each level's log-SNR error by central finite differences.

A disagreement becomes a typed Finding with a diagnosis where one exists: a model call at another grid level names
the index it used ("off by one"); a step whose residual is one term of the affine step scaled (the start sample,
one model output, the model outputs together, the noise) names the term and the factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..samplers import Grid
from ..samplers.base import NumericContext, State
from ..samplers.karras import _ancestral
from .findings import Finding
from .replay import R, _unbounded, dt_stage_terms, level_sensitivity
from .rounding import Bounded, BoundedContext, exact

__all__ = ["Trace", "Call", "judge", "Judgement", "Reading"]


@dataclass
class Call:
    """One model evaluation: the sample and level (sigma) the target passed, the output it got (float64 copies of
    the target's values), and how many step-start states the target had reported before it."""

    x: np.ndarray
    sigma: float
    out: np.ndarray
    after_state: int = 0


@dataclass
class Trace:
    """What a target did in one run. ``states[i]`` is the sample the target reported at the start of step i (None
    where it reported none, or reported a churned sample); ``final`` its returned sample; ``draws`` its noise in
    draw order."""

    x_T: np.ndarray
    calls: list = field(default_factory=list)
    draws: list = field(default_factory=list)
    states: dict = field(default_factory=dict)
    final: np.ndarray | None = None


@dataclass
class Judgement:
    """The findings, the ratios to the rule (per reported step, per model call's sample, per call's level), and
    what a reproducer needs: the reference value and bound of each reported state (``reference[i]``: the state at
    the start of step i, the final one at n) and the level of each call."""

    findings: list
    per_step_ratio: list
    per_call_ratio: list
    level_ratio: list
    reference: dict = field(default_factory=dict)
    call_levels: list = field(default_factory=list)


class Reading:
    """How the judge reads a model call (the default: a k-diffusion denoiser, whose output is D itself).

    ``m(call)`` the model output the step uses (float64), ``m_bounded(call)`` the same as a Bounded value (a guided
    combination of several outputs carries the rounding of the combination); ``coeffs(level)`` (c_x, c_m) with
    D = c_x x + c_m m at the stage input x in the grid's coordinates; ``model_input(x, level)`` the sample the target
    should pass to the model for the stage input x (Bounded: scaled, duplicated for guidance)."""

    def m(self, call):
        return np.asarray(call.out, dtype=np.float64)

    def m_bounded(self, call):
        return exact(self.m(call))

    def coeffs(self, level):
        return 0.0, 1.0

    def model_input(self, x, level):
        return x


def _d(reading, x_in, level, m):
    c_x, c_m = reading.coeffs(level)
    return c_x * np.asarray(x_in, dtype=np.float64) + c_m * m


class _Structure(Exception):
    pass


def _level_bound(levels, u, eta=0.0):
    """Relative float32 error of a level the target derives from the step's levels: through log / exp
    (2 + |log sigma| + |log sigma_next|), and for ancestral steps (eta > 0) through sigma_down =
    sqrt(sigma_next^2 - sigma_up^2), a difference that cancels when sigma_up ~ sigma_next: its float32 relative
    error is u (sigma_next / sigma_down)^2 (DPM-2 ancestral evaluates at sqrt(sigma sigma_down))."""
    sig = [float(np.mean(lv.sigma_ve)) for lv in levels]
    logs = [abs(np.log(s)) for s in sig if 0 < s < np.inf]
    kappa = 0.0
    s, sn = sig[0], sig[-1]
    if eta > 0 and 0 < sn < s < np.inf:
        down = float(_ancestral(s, sn, eta)[1])
        kappa = (sn / down) ** 2 if down > 0 else np.inf
    return R * u * (2.0 + sum(logs) + kappa)


def _grid_index(grid_sigmas, sigma, rel):
    """The index of the grid level equal to sigma within the relative bound, or None."""
    if not np.isfinite(sigma):
        return None
    with np.errstate(invalid="ignore"):
        j = int(np.nanargmin(np.where(np.isfinite(grid_sigmas), np.abs(grid_sigmas - sigma), np.nan)))
    return j if abs(grid_sigmas[j] - sigma) <= rel * max(abs(sigma), 1e-300) else None


def _ratio(a, b, bound):
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (np.asarray(bound) + 1e-300)))


def _terms(smp, grid, state, x, outputs, draws, i, reading):
    """The affine step split into its terms: {name: contribution} (start sample, each model output of this step,
    each history output, each noise draw); they sum to the step (the model outputs are replayed values)."""
    names = (["the start sample x"] + [f"the model output of stage {k}" for k in range(len(outputs))]
             + [f"the model output of step {i - 1 - j} (history)" for j in range(len(state.history))]
             + [f"noise draw {m}" for m in range(len(draws))])
    out = {}
    for which, name in enumerate(names):
        k = which - 1
        xs = x if which == 0 else np.zeros_like(x)
        outs = [o if k == n else np.zeros_like(o) for n, o in enumerate(outputs)]
        h0 = which - 1 - len(outputs)
        hist = tuple(h if h0 == n else np.zeros_like(h) for n, h in enumerate(state.history))
        z0 = which - 1 - len(outputs) - len(state.history)
        zs = [z if z0 == n else np.zeros_like(z) for n, z in enumerate(draws)]
        it, dr = iter(outs), iter(zs)
        ctx = NumericContext(xs, lambda x_in, level: _d(reading, x_in, level, next(it)), lambda: next(dr), hist, grid)
        out[name] = np.asarray(smp.step(ctx, grid.levels[i], grid.levels[i + 1], replace(state, history=hist))[0],
                               dtype=np.float64)
    return out


def _diagnose(terms, residual, bound):
    """The single term (or group: all model outputs, all noise) whose scaling by 1 + c explains the residual under
    the rule, as (name, c); None when none does."""
    groups = dict(terms)
    model_terms = [v for n, v in terms.items() if "model output" in n]
    noise_terms = [v for n, v in terms.items() if n.startswith("noise")]
    if len(model_terms) > 1:
        groups["the model outputs together (the data-prediction part)"] = sum(model_terms)
    if len(noise_terms) > 1:
        groups["the noise"] = sum(noise_terms)
    best = None
    for name, T in groups.items():
        tt = float(np.sum(T * T))
        if tt == 0.0:
            continue
        c = float(np.sum(residual * T) / tt)
        left = _ratio(residual, c * T, bound)
        if left <= 1.0 and (best is None or left < best[2]):
            best = (name, c, left)
    return None if best is None else best[:2]


def judge(trace: Trace, smp, grid: Grid, u: float, dt_terms: bool = True, reading: Reading | None = None
          ) -> Judgement:
    """Replay ``smp`` over ``grid`` against the trace; Findings of kinds call / step / structure. ``reading``: how
    a call's output becomes the data prediction and what model input is expected (default: a denoiser)."""
    reading = reading or Reading()
    findings, step_ratios, call_ratios, level_ratios = [], [], [], []
    reference, call_levels = {}, []
    calls, draws = list(trace.calls), list(trace.draws)
    grid_sigmas = np.array([float(np.mean(lv.sigma_ve)) for lv in grid.levels])
    state = State()
    xb = exact(np.asarray(trace.x_T, dtype=np.float64))
    n_steps = len(grid)
    first_call = {}
    try:
        for i in range(n_steps):
            cur, nxt = grid.levels[i], grid.levels[i + 1]
            if i in trace.states and trace.states[i] is not None and i > 0:
                xb = exact(np.asarray(trace.states[i], dtype=np.float64))
            outputs, step_draws, stage_in, stage_lv = [], [], [], []

            def denoise(x_in, level):
                if not calls:
                    raise _Structure(f"the sampler evaluates the model more often than the target's {len(trace.calls)}"
                                     f" calls (step {i})")
                c = calls.pop(0)
                outputs.append(reading.m(c))
                stage_in.append((x_in, c))
                stage_lv.append(level)
                c_x, c_m = reading.coeffs(level)
                d = reading.m_bounded(c) * c_m
                return d if np.all(np.asarray(c_x) == 0) else x_in * c_x + d

            def noise():
                if not draws:
                    raise _Structure(f"the sampler draws more noise than the target's {len(trace.draws)} draws "
                                     f"(step {i})")
                z = np.asarray(draws.pop(0), dtype=np.float64)
                step_draws.append(z)
                return z
            ctx = BoundedContext(xb, denoise, noise, state.history, grid)
            out, extra = smp.step(ctx, cur, nxt, state)
            x_start = np.asarray(xb.v, dtype=np.float64)
            fstate = replace(state, history=_unbounded(state.history), extra=_unbounded(state.extra))
            sens_out, sens_stage = level_sensitivity(smp, grid, fstate, x_start, outputs, step_draws, i,
                                                     lambda x_in, level, m: _d(reading, x_in, level, m))
            dt = dt_stage_terms(ctx.stages) if dt_terms else []
            # the model calls of this step: level and sample
            lb = _level_bound([cur, nxt], u)
            lb_derived = _level_bound([cur, nxt], u, float(getattr(smp, "eta", 0.0) or 0.0))
            for k, ((x_in, c), level) in enumerate(zip(stage_in, stage_lv)):
                want = float(np.mean(level.sigma_ve))
                call_levels.append(want)
                on_grid = _grid_index(grid_sigmas, want, 0.0) is not None
                rel = lb if on_grid else lb_derived
                if c.sigma == want:                       # equal (SNR 0 and the data level included)
                    r_lv = 0.0
                elif 0 < want < np.inf:
                    r_lv = abs(c.sigma - want) / (rel * want)
                else:
                    r_lv = np.inf
                level_ratios.append(float(r_lv))
                if r_lv > 1.0 and "call" not in first_call:
                    hint = ""
                    j, jj = _grid_index(grid_sigmas, c.sigma, lb), _grid_index(grid_sigmas, want, lb)
                    if j is not None and jj is not None:
                        hint = f" (sigmas[{j}] for sigmas[{jj}]: a grid index off by {j - jj:+d})"
                    elif j is not None:
                        hint = f" (the target used the grid level sigmas[{j}])"
                    first_call["call"] = Finding(
                        "call", f"step {i}: the target evaluated the model at sigma {c.sigma:.9g} where stage {k} of "
                                f"the sampler evaluates at {want:.9g}{hint}",
                        evidence={"step": i, "stage": k, "target_sigma": c.sigma, "refdiff_sigma": want,
                                  "grid_sigmas": grid_sigmas.tolist()})
                extra_terms = sum(dt[:k]) if k else 0.0
                widened = Bounded(x_in.v, x_in.e + extra_terms + (sens_stage[k] if k < len(sens_stage) else 0.0))
                expect = reading.model_input(widened, level)
                if np.shape(c.x) != np.shape(expect.v):
                    raise _Structure(f"the target passed the model a sample of shape {np.shape(c.x)} at step {i} "
                                     f"stage {k}, where {np.shape(expect.v)} is expected")
                r_in = _ratio(c.x, expect.v, R * u * expect.e)
                call_ratios.append(r_in)
                if r_in > 1.0 and "call-input" not in first_call and "call" not in first_call:
                    first_call["call-input"] = Finding(
                        "call", f"step {i}: the sample passed to the model at stage {k} differs from the sampler's "
                                f"stage input beyond the rounding rule (ratio {r_in:.3g})",
                        evidence={"step": i, "stage": k, "ratio": r_in})
            bound = R * u * (out.e + sum(dt) + sens_out)
            target_next = trace.final if i == n_steps - 1 else trace.states.get(i + 1)
            if target_next is not None:
                target_next = np.asarray(target_next, dtype=np.float64)
                if target_next.shape != out.v.shape:
                    raise _Structure(f"the target's sample has shape {target_next.shape}, the sampler's "
                                     f"{out.v.shape}")
                r = _ratio(target_next, out.v, bound)
                step_ratios.append(r)
                reference[i + 1] = (np.asarray(out.v, dtype=np.float64), np.broadcast_to(bound, out.v.shape).copy())
                if r > 1.0 and "step" not in first_call:
                    terms = _terms(smp, grid, fstate, x_start, outputs, step_draws, i, reading)
                    got = _diagnose(terms, target_next - out.v, bound)
                    what = (f": {got[0]} scaled by 1 {'+' if got[1] >= 0 else '-'} {abs(got[1]):.3g} reproduces it"
                            if got else ": no single term of the step reproduces it")
                    first_call["step"] = Finding(
                        "step", f"step {i} disagrees with the sampler's paper form beyond the rounding rule (ratio "
                                f"{r:.3g}){what}",
                        evidence={"step": i, "ratio": r, "term": got[0] if got else None,
                                  "factor_minus_1": got[1] if got else None})
            else:
                step_ratios.append(float("nan"))          # not reported: the span continues to the next state
            history = tuple((list(reversed(ctx.evaluated)) + list(state.history))[:2])
            state = replace(state, step=i + 1, history=history, orders=state.orders + (extra.get("order", 0),),
                            extra=extra)
            xb = out
        if calls:
            raise _Structure(f"the target evaluated the model {len(trace.calls)} times, the sampler "
                             f"{len(trace.calls) - len(calls)}")
    except _Structure as exc:
        findings.append(Finding("structure", f"step structure differs: {exc}"))
    findings.extend(first_call[k] for k in ("call", "call-input", "step") if k in first_call)
    nonfinite = 0 if trace.final is None else int(np.count_nonzero(~np.isfinite(trace.final)))
    if nonfinite and not any(f.kind == "structure" for f in findings):
        findings.append(Finding("nonfinite", f"{nonfinite} non-finite values in the target's final sample"))
    return Judgement(findings, step_ratios, call_ratios, level_ratios, reference, call_levels)
