"""The one sampling loop: sample(sampler, model, grid, x_T, noise) -> SampleResult.

Runs a sampler either in its paper form (``mode="paper"``, the float64 reference) or through its per-stage
StepCoeffs and ``apply`` (``mode="coeffs"``, exactly what a fused kernel computes). Noise is explicit: an array of
draws consumed in order, a callable, or a numpy Generator. Each step is recorded (t, sigma, log_snr, order used,
model evaluations, non-finite count); NaN / Inf propagate as IEEE does, ``strict=True`` raises at the first one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np

from ._progress import progress_bar
from ._validate import as_f64, broadcast_rows, positive_int
from .parametrization import to_x0_eps
from .samplers.base import Grid, Level, NumericContext, Sampler, State, apply, step_coeffs

__all__ = ["StepRecord", "SampleResult", "sample", "noise_source"]

PROGRESS_MIN_STEPS = 50          # show a progress bar only for runs at least this long


class StepRecord(NamedTuple):
    step: int
    t: object
    sigma: object
    log_snr: object
    order: int
    nfe: int
    nonfinite: int


class SampleResult(NamedTuple):
    x: np.ndarray
    trajectory: list | None
    record: list
    state: State


def noise_source(noise, shape) -> Callable:
    """A callable returning the next standard-normal draw of ``shape``: from an array (n, *shape) consumed in
    order, a numpy Generator, or a callable. None gives a source that refuses (deterministic samplers only)."""
    if noise is None:
        def refuse():
            raise ValueError("this sampler is stochastic: pass noise (an array of draws, a callable or a Generator)")
        return refuse
    if isinstance(noise, np.random.Generator):
        return lambda: noise.standard_normal(shape)
    if callable(noise):
        def call():
            z = as_f64(noise(), "noise")
            if z.shape != tuple(shape):
                raise ValueError(f"the noise callable returned shape {z.shape}; each draw must have x's shape "
                                 f"{tuple(shape)} (a smaller draw would broadcast over the batch)")
            return z
        return call
    arr = as_f64(noise, "noise")
    if arr.shape[1:] != tuple(shape):
        raise ValueError(f"noise draws must have shape (n, *{tuple(shape)}), got {arr.shape}")
    it = iter(arr)

    def take():
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"ran out of noise draws after {arr.shape[0]}") from None
    return take


def _shape(level: Level, x: np.ndarray) -> Level:
    """Per-row level values (B,) reshaped to (B, 1, ...) so that they broadcast against x in the paper form."""
    def f(v):
        v = np.asarray(v, dtype=np.float64)
        return v.reshape((v.shape[0],) + (1,) * (x.ndim - 1)) if v.ndim == 1 else v
    return replace(level, alpha=f(level.alpha), sigma=f(level.sigma), log_snr=f(level.log_snr))


def _flat(level: Level) -> Level:
    """The model sees scalars or per-row (B,) values, whatever shape the paper form used internally (a Level
    subclass, e.g. a TCD TargetLevel, keeps its extra fields)."""
    def f(v):
        v = np.asarray(v, dtype=np.float64)
        return v.reshape(v.shape[0]) if v.ndim > 1 else v[()]
    return replace(level, alpha=f(level.alpha), sigma=f(level.sigma), log_snr=f(level.log_snr))


def _model_fn(model, prediction, guidance):
    """The model as the loop calls it: outputs converted to float64 arrays and shape-checked against x (an output
    of another shape would broadcast silently); NaN / Inf pass through as IEEE values."""
    def output(o, x, what):
        o = as_f64(o, what)
        if o.shape != x.shape:
            raise ValueError(f"the {what} has shape {o.shape}, x has shape {x.shape}")
        return o

    def call(x, level):
        """(the guided output, the unconditional one): they are the same output without guidance."""
        out = model(x, _flat(level))
        if guidance is not None:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError("with guidance the model must return (uncond, cond) outputs")
            mu, mc = output(out[0], x, "unconditional model output"), output(out[1], x, "conditional model output")
            return mu + broadcast_rows(guidance, mu, "guidance") * (mc - mu), mu
        if isinstance(out, tuple):
            raise ValueError("the model returned a tuple (an (uncond, cond) pair?): pass guidance= to combine it, or "
                             "return one array")
        m = output(out, x, "model output")
        return m, m
    return call


def _check_state(state: State, grid: Grid, x: np.ndarray, steps) -> int:
    """The step to stop before; a resumed state must point inside the grid and carry history of x's shape."""
    if not isinstance(state, State):
        raise ValueError(f"state must be a refdiff.samplers.State, got {type(state).__name__}")
    if isinstance(state.step, bool) or not isinstance(state.step, (int, np.integer)) or not \
            0 <= state.step < len(grid):
        raise ValueError(f"state.step must be an integer in [0, {len(grid) - 1}] (the step to run next on this "
                         f"{len(grid)}-step grid), got {state.step!r}" +
                         ("; the run it came from is finished" if state.step == len(grid) else ""))
    for j, h in enumerate(state.history):
        if np.shape(h) != x.shape:
            raise ValueError(f"state.history[{j}] has shape {np.shape(h)}, x has shape {x.shape}: a history of "
                             "another batch would broadcast")
    if steps is None:
        return len(grid)
    steps = positive_int(steps, "steps")
    return min(len(grid), state.step + steps)


def sample(sampler: Sampler, model: Callable, grid: Grid, x_T, noise=None, prediction: str = "eps",
           guidance=None, mode: str = "paper", return_trajectory: bool = False, progress: bool | None = None,
           strict: bool = False, state: State | None = None, steps: int | None = None) -> SampleResult:
    """Run ``sampler`` over ``grid`` from x_T.

    Parameters
    ----------
    model : (x, level) -> model output of type ``prediction`` (or (uncond, cond) with ``guidance``)
    guidance : classifier-free guidance scale s in m = m_u + s (m_c - m_u) (diffusers' convention; Ho & Salimans'
        w is s - 1, see refdiff.conventions.cfg_scale)
    mode : "paper" (the sampler's own step on arrays) or "coeffs" (its StepCoeffs through ``apply``)
    state, steps : resume from an explicit state (step index, history) and run only ``steps`` steps
    """
    if mode not in ("paper", "coeffs"):
        raise ValueError(f"mode must be 'paper' or 'coeffs', got {mode!r}")
    x = as_f64(x_T, "x_T")
    if x.ndim < 1:
        raise ValueError("x_T must have a batch axis")
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a refdiff Sampler, got {type(sampler).__name__}")
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a refdiff Grid (Grid.from_times / from_discrete / from_sigmas), got "
                         f"{type(grid).__name__}")
    if not callable(model):
        raise ValueError(f"model must be callable as model(x, level), got {type(model).__name__}")
    state = State() if state is None else state
    stop = _check_state(state, grid, x, steps)
    first = grid.levels[state.step]
    if not grid.inversion and not sampler.snr_zero_start and np.any(np.asarray(first.alpha) == 0):
        raise ValueError(f"{sampler.name} cannot start at SNR 0 (alpha = 0 at level {state.step}: pure noise, flow "
                         "time 1): it steps in VE coordinates x / alpha, sigma / alpha, infinite there. Start one "
                         "level later, or use a sampler that starts from pure noise (DDIM, DDPM, DPMSolverPP, "
                         "DPMSolverPP2MSDE, FlowEuler, FlowHeun, LCM, TCD, ...: snr_zero_start = True)")
    call = _model_fn(model, prediction, guidance)
    draw = noise_source(noise, x.shape)
    traj = [x] if return_trajectory else None
    record = []
    bar = _progress(len(grid), progress)
    # the paper form reads levels directly: per-row values shaped (B, 1, ...) so they broadcast against x
    shaped = Grid([_shape(lv, x) for lv in grid.levels], grid.schedule, grid.inversion) if mode == "paper" else grid
    for i in range(state.step, stop):
        cur, nxt = grid.levels[i], grid.levels[i + 1]
        order = sampler.step_order(state, grid)
        if mode == "paper":
            def denoise(u, level):
                flat = _flat(level)
                m, m_u = call(u, level)
                D = to_x0_eps(m, prediction, u, flat.alpha, flat.sigma)[0]
                D_u = D if m_u is m else to_x0_eps(m_u, prediction, u, flat.alpha, flat.sigma)[0]
                return D, D_u

            ctx = NumericContext(x, denoise, draw, state.history, shaped, with_uncond=True)
            x_new, extra = sampler.step(ctx, shaped.levels[i], shaped.levels[i + 1], state)
            evaluated = ctx.evaluated
            order = extra.get("order", order)
        else:
            evaluated, extra = [], {}
            hist = list(state.history)
            x_new = x
            for c in step_coeffs(sampler, grid, state, prediction):
                m = call(x_new, c.level)[0] if c.evaluate else None
                z = draw() if np.any(np.asarray(c.d) != 0) else None
                h1 = hist[0] if len(hist) > 0 else None
                h2 = hist[1] if len(hist) > 1 else None
                x_new, D = apply(c, x_new, m, h1, h2, z)
                if D is not None:
                    evaluated.append(D)
                    hist = [D] + hist[:1]
        history = tuple((list(reversed(evaluated)) + list(state.history))[:2])
        x = np.asarray(x_new, dtype=np.float64)
        bad = int(np.count_nonzero(~np.isfinite(x)))
        record.append(StepRecord(i, cur.t, cur.sigma, cur.log_snr, int(order), len(evaluated), bad))
        if strict and bad:
            raise FloatingPointError(f"{sampler.name}: {bad} non-finite values after step {i} (t = {cur.t} -> "
                                     f"{nxt.t})")
        state = replace(state, step=i + 1, history=history, orders=state.orders + (int(order),), extra=extra)
        if return_trajectory:
            traj.append(x)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return SampleResult(x, traj, record, state)


def _progress(total, enabled):
    if enabled is None and total < PROGRESS_MIN_STEPS:
        return None
    return progress_bar(total, "sampling", enabled)
