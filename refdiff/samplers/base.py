"""The shared sampler interface (README, "The sampler interface"): noise levels, explicit state, paper-form steps and their
coefficient form.

Every explicit sampler stage is an affine map

    m      = m_u + w (m_c - m_u)                           (classifier-free guidance, optional)
    D      = c_x x + c_m m                                 (model output -> data prediction x0_hat)
    x_next = a x + b D + c1 D_prev1 + c2 D_prev2 + d z

where D_prev1, D_prev2 are the two most recently evaluated data predictions (across stages and steps) and z a
standard normal draw. A sampler writes its step ONCE, in the paper's form, against a context:

* ``NumericContext`` runs it on float64 arrays: that is the reference sampler;
* ``SymbolicContext`` runs the same code on ``Affine`` expressions; ``step_coeffs`` then reads the stages off
  and eliminates the step's start point, giving ``StepCoeffs`` per stage (what the Triton kernel applies).

A test proves that ``apply`` of the coefficients reproduces the paper form to ~1e-14.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np

from .._math import log_sigmoid
from .._validate import as_f64, broadcast_rows
from ..parametrization import PREDICTIONS
from ..schedules import ContinuousSchedule, DiscreteSchedule, validate_grid

__all__ = ["Level", "Grid", "AffineAlgebra", "Affine", "StepCoeffs", "State", "Sampler", "NumericContext",
           "SymbolicContext", "model_coeffs", "apply", "step_coeffs", "check_noise_scale", "ELIMINATION_RTOL"]

ELIMINATION_RTOL = 1e-11       # old noise must cancel when a stage is rewritten in its own input


# ------------------------------------------------------------------------------------------------
# noise levels and grids
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Level:
    """One noise level: time t (or discrete index), alpha, sigma and the full log-SNR; scalars or per-row (B,)."""

    t: object
    alpha: object
    sigma: object
    log_snr: object

    @property
    def lam(self):
        """DPM-Solver's lambda = log(alpha / sigma) = log_snr / 2."""
        return 0.5 * np.asarray(self.log_snr, dtype=np.float64)

    @property
    def sigma_ve(self):
        """sigma / alpha: the VE / EDM noise level of the same marginal (inf at SNR 0, alpha = 0)."""
        with np.errstate(divide="ignore"):
            return np.asarray(self.sigma, dtype=np.float64) / np.asarray(self.alpha, dtype=np.float64)

    @property
    def is_data(self) -> bool:
        return bool(np.all(np.asarray(self.sigma) == 0))


class Grid:
    """A sequence of noise levels; ``levels[i]`` to ``levels[i+1]`` is step i.

    Sampling grids run from noise to data (log-SNR strictly increasing); ``inversion=True`` grids run the other
    way (DDIM inversion). ``schedule`` (optional) supplies intermediate levels for multi-stage samplers.
    """

    def __init__(self, levels, schedule=None, inversion: bool = False):
        self.levels = list(levels)
        self.schedule = schedule
        self.inversion = bool(inversion)
        if len(self.levels) < 2:
            raise ValueError("a sampling grid needs at least 2 levels (1 step); 0 steps is not a sampler run")
        lam = np.array([np.mean(l.log_snr) for l in self.levels])
        d = -np.diff(lam) if inversion else np.diff(lam)
        if np.any(~(d > 0)):
            k = int(np.flatnonzero(~(d > 0))[0])
            kind = "duplicate" if lam[k] == lam[k + 1] else "non-monotone"
            raise ValueError(f"grid log-SNR must {'decrease' if inversion else 'increase'} strictly "
                             f"({'data -> noise' if inversion else 'noise -> data'}); {kind} levels {k} and {k + 1} "
                             f"have log_snr {lam[k]} and {lam[k + 1]}")

    def reversed(self) -> "Grid":
        """The same levels in the opposite direction (a sampling grid becomes an inversion grid)."""
        return Grid(self.levels[::-1], self.schedule, not self.inversion)

    def level_at(self, log_snr) -> Level:
        """An intermediate level at the given log-SNR, with the time the model is told:

        * continuous schedule: its own t (``t_of_log_snr``);
        * discrete schedule: the fractional index interpolated in log-SNR between table entries (k-diffusion's
          ``sigma_to_t``), alpha^2 = sigmoid(lambda);
        * VE grid (alpha = 1 throughout): t = sigma, as its levels carry.
        A VP grid without a schedule cannot name the time of a level between its entries: ValueError (a model
        given t = NaN there would be silently wrong)."""
        lam = np.asarray(log_snr, dtype=np.float64)
        if isinstance(self.schedule, ContinuousSchedule):
            t = self.schedule.t_of_log_snr(lam)
            return Level(t, self.schedule.alpha(t), self.schedule.sigma(t), lam)
        if all(np.all(np.asarray(l.alpha) == 1.0) for l in self.levels):
            s = np.exp(-0.5 * lam)
            return Level(s, np.ones_like(s), s, lam)
        if isinstance(self.schedule, DiscreteSchedule):
            return Level(self.schedule.fractional_index(lam), np.exp(0.5 * log_sigmoid(lam)),
                         np.exp(0.5 * log_sigmoid(-lam)), lam)
        raise ValueError("this sampler evaluates the model between grid levels, and a VP grid without a schedule "
                         "cannot name the time there: build it with Grid.from_times / Grid.from_discrete, or pass "
                         "schedule=")

    def __len__(self):
        return len(self.levels) - 1

    @property
    def n_steps(self) -> int:
        return len(self.levels) - 1

    @classmethod
    def from_times(cls, schedule: ContinuousSchedule, times) -> "Grid":
        """Levels of a continuous schedule at descending times (validated: strictly decreasing, >= 2 entries)."""
        times = validate_grid(as_f64(times, "times"), name="times")
        return cls((Level(t, schedule.alpha(t), schedule.sigma(t), schedule.log_snr(t)) for t in times), schedule)

    @classmethod
    def from_discrete(cls, schedule: DiscreteSchedule, timesteps, final: str = "data") -> "Grid":
        """Levels at descending integer timesteps of a discrete table, then a final level.

        final = "data": alpha = 1, sigma = 0 (diffusers ``set_alpha_to_one=True``); "first": the table's index 0
        (``set_alpha_to_one=False``); "none": stop at the last timestep.
        """
        ts = validate_grid(np.asarray(timesteps), name="timesteps")
        if not np.issubdtype(ts.dtype, np.integer):
            raise ValueError("discrete timesteps must be integers")
        levels = [Level(int(i), schedule.alpha(i), schedule.sigma(i), schedule.log_snr(i)) for i in ts]
        if final == "data":
            levels.append(Level(-1, 1.0, 0.0, np.inf))
        elif final == "first":
            if ts[-1] == 0:
                raise ValueError("final='first' needs the last timestep above 0")
            levels.append(Level(0, schedule.alpha(0), schedule.sigma(0), schedule.log_snr(0)))
        elif final != "none":
            raise ValueError(f"final must be 'data', 'first' or 'none', got {final!r}")
        return cls(levels, schedule)

    @classmethod
    def from_sigmas(cls, sigmas) -> "Grid":
        """VE / EDM levels (alpha = 1) at descending sigmas; a final 0 is the data level."""
        sig = validate_grid(as_f64(sigmas, "sigmas"), name="sigmas")
        if np.any(sig < 0):
            raise ValueError("sigmas must be non-negative")
        with np.errstate(divide="ignore"):
            return cls(Level(s, 1.0, s, -2.0 * np.log(s)) for s in sig)


# ------------------------------------------------------------------------------------------------
# affine expressions: the symbolic side of a paper-form step
# ------------------------------------------------------------------------------------------------

class AffineAlgebra:
    """The operations a paper-form step may apply to x and D: sums (with 0), negation and scaling by coefficients.
    Subclasses define ``__add__`` (for their own kind and 0), ``__neg__`` and ``_scaled(c)``; the rest follows.
    ``Affine`` (symbolic coefficients) and ``refdiff.check.rounding.Bounded`` (running rounding bounds) are the two."""

    __slots__ = ()
    __array_priority__ = 1000          # numpy scalars and arrays defer to our reflected operators

    def __radd__(self, other):
        return self + other

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, c):
        if isinstance(c, AffineAlgebra):
            raise TypeError("a step is affine: x and D are only scaled by coefficients, never multiplied together")
        return self._scaled(np.asarray(c, dtype=np.float64) if np.ndim(c) else float(c))

    def __rmul__(self, c):
        return self * c

    def __truediv__(self, c):
        return self * (1.0 / (np.asarray(c, dtype=np.float64) if np.ndim(c) else float(c)))


class Affine(AffineAlgebra):
    """sum_k coef_k * symbol_k with float64 scalar or per-row (B,) coefficients."""

    __slots__ = ("terms",)

    def __init__(self, terms=None):
        self.terms = dict(terms or {})

    def __add__(self, other):
        if isinstance(other, Affine):
            out = dict(self.terms)
            for k, v in other.terms.items():
                out[k] = out[k] + v if k in out else v
            return Affine(out)
        if np.all(np.asarray(other) == 0):
            return self
        raise TypeError("only affine expressions (or 0) can be added to an affine expression")

    def __neg__(self):
        return Affine({k: -v for k, v in self.terms.items()})

    def _scaled(self, c):
        return Affine({k: v * c for k, v in self.terms.items()})

    def coef(self, symbol):
        return self.terms.get(symbol, 0.0)

    def __repr__(self):
        return " + ".join(f"{np.round(v, 6)}*{k}" for k, v in self.terms.items()) or "0"


# ------------------------------------------------------------------------------------------------
# state, contexts, sampler base
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class State:
    """Explicit sampler state: step index, the last two evaluated data predictions (newest first), the order
    each step actually used, and sampler-specific values (e.g. UniPC's corrected point)."""

    step: int = 0
    history: tuple = ()
    orders: tuple = ()
    extra: dict = field(default_factory=dict)


class NumericContext:
    """Runs a paper-form step on arrays: D from the model through the parametrization, noise from a queue."""

    symbolic = False

    def __init__(self, x, denoise: Callable, noise: Callable, history, grid: Grid, with_uncond: bool = False):
        self.x = x
        self.grid = grid
        self._denoise = denoise
        self._noise = noise
        self._with_uncond = with_uncond
        self.history = history
        self.evaluated = []
        self.uncond = []
        self.n_noise = 0

    def denoise(self, x, level: Level):
        """The (guided) data prediction at x; with ``with_uncond`` the denoise callable returns (D, D_uncond) and
        the unconditional one is kept for ``uncond_denoised`` (CFG++)."""
        if self._with_uncond:
            d, d_u = self._denoise(x, level)
        else:
            d = d_u = self._denoise(x, level)
        self.evaluated.append(d)
        self.uncond.append(d_u)
        return d

    def uncond_denoised(self):
        """The unconditional data prediction of the last model evaluation (the guided one without guidance)."""
        if not self.uncond:
            raise ValueError("no model evaluation yet in this step")
        return self.uncond[-1]

    def noise(self):
        self.n_noise += 1
        return self._noise()


class SymbolicContext:
    """Runs the same step on affine expressions over X (the step's start), H1, H2 (history), D_k, z_m."""

    symbolic = True

    def __init__(self, n_history: int, grid: Grid):
        self.x = Affine({"X": 1.0})
        self.grid = grid
        self.history = tuple(Affine({f"H{j + 1}": 1.0}) for j in range(n_history))
        self.stages = []                 # (input expression, level) per model evaluation
        self.evaluated = []
        self.n_noise = 0

    def denoise(self, x, level: Level):
        if not isinstance(x, Affine):
            raise TypeError("a symbolic step must pass affine expressions to denoise")
        d = Affine({f"D{len(self.stages)}": 1.0})
        self.stages.append((x, level))
        self.evaluated.append(d)
        return d

    def noise(self):
        z = Affine({f"z{self.n_noise}": 1.0})
        self.n_noise += 1
        return z

    def uncond_denoised(self):
        raise NotImplementedError("the step reads the unconditional prediction apart from the guided one (CFG++): "
                                  "the kernel's stage combines them first, so there is no coefficient form")


def check_noise_scale(eta, s_noise) -> None:
    """eta (the SDE / ancestral noise scale) and s_noise (the noise multiplier): finite and >= 0 (NaN refused)."""
    if not (0.0 <= eta < np.inf and 0.0 <= s_noise < np.inf):
        raise ValueError(f"eta and s_noise must be finite and >= 0, got eta {eta}, s_noise {s_noise}")


class Sampler:
    """Base class. Subclasses set ``name``, ``order`` (ODE), ``strong_order`` / ``weak_order`` (SDE) and
    implement ``step(ctx, cur, nxt, state) -> (x_next, extra)`` in the paper's form. ``convergence_order`` is the
    global order a convergence test must measure: ``global_order`` when set, else ``order``.

    ``history_needed`` is how many past data predictions a step reads (0, 1 or 2).
    """

    name = "sampler"
    order = None
    global_order = None          # the order of the whole run when it differs from ``order`` (see DPMSolverPP)
    strong_order = None
    weak_order = None
    stochastic = False
    history_needed = 0
    # whether the first level may be at SNR 0 (alpha = 0: pure noise, a zero-terminal-SNR table's first timestep,
    # flow time 1). Samplers in VE coordinates (x / alpha, sigma / alpha) are infinite there and refuse
    snr_zero_start = False

    def step(self, ctx, cur: Level, nxt: Level, state: State):
        raise NotImplementedError

    @property
    def convergence_order(self):
        return self.global_order if self.global_order is not None else self.order

    def step_order(self, state: State, grid: Grid) -> int:
        """The order the next step uses (lowered at the start / end as documented by the sampler)."""
        return self.order or 1

    def __repr__(self):
        return self.name


# ------------------------------------------------------------------------------------------------
# coefficient form
# ------------------------------------------------------------------------------------------------

class StepCoeffs(NamedTuple):
    """One affine stage. ``evaluate`` is False for a model-free stage (e.g. EDM churn noise)."""

    c_x: object
    c_m: object
    a: object
    b: object
    c1: object
    c2: object
    d: object
    evaluate: bool = True
    level: Level | None = None


def model_coeffs(prediction: str, alpha, sigma):
    """(c_x, c_m) with x0_hat = c_x x + c_m m for a model output m of type ``prediction`` at (alpha, sigma).

    eps: (1/alpha, -sigma/alpha); x0: (0, 1); v: (alpha, -sigma) / (alpha^2 + sigma^2);
    flow: (1, -sigma) / (alpha + sigma); score: (1/alpha, sigma^2/alpha). eps / score at alpha = 0 -> ValueError.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    a = np.asarray(alpha, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    if prediction in ("eps", "score") and np.any(a == 0):
        raise ValueError(f"{prediction} prediction at alpha = 0 (SNR = 0) cannot give x0; use v or x0 prediction")
    if prediction == "eps":
        return 1.0 / a, -s / a
    if prediction == "x0":
        return np.zeros_like(a), np.ones_like(a)
    if prediction == "v":
        n = a * a + s * s
        return a / n, -s / n
    if prediction == "flow":
        n = a + s
        return 1.0 / n, -s / n
    return 1.0 / a, s * s / a


def apply(coeffs: StepCoeffs, x, m=None, D_prev1=None, D_prev2=None, z=None, m_cond=None, guidance=None):
    """Apply one stage in float64: returns (x_next, D) (D is None for a model-free stage).

    With ``m_cond`` and ``guidance`` w the model output is first combined as m_u + w (m_c - m_u) (``m`` = m_u).
    """
    x = as_f64(x, "x")

    def term(c, v, name):
        """c v, where a zero coefficient (a row's, or the whole slot's) contributes exactly 0 whatever v holds: an
        unused slot is not read, so NaN / Inf left in an unused buffer cannot leak in as 0 * NaN."""
        if np.all(np.asarray(c) == 0):
            return 0.0
        if v is None:
            raise ValueError(f"this stage needs {name}")
        v = as_f64(v, name)
        if v.shape != x.shape:
            raise ValueError(f"{name} has shape {v.shape}, x has shape {x.shape}")
        cb = broadcast_rows(c, x, name)
        with np.errstate(invalid="ignore"):
            return np.where(cb != 0, cb * v, 0.0)

    D = None
    if coeffs.evaluate:
        if m is None:
            raise ValueError("this stage evaluates the model: pass its output m")
        m = as_f64(m, "model output")
        if m.shape != x.shape:
            raise ValueError(f"model output has shape {m.shape}, x has shape {x.shape}")
        if m_cond is not None:
            m_cond = as_f64(m_cond, "conditional model output")
            if m_cond.shape != m.shape:
                raise ValueError(f"m_uncond and m_cond must have the same shape, got {m.shape} and {m_cond.shape}")
            m = m + broadcast_rows(guidance, x, "guidance") * (m_cond - m)
        D = term(coeffs.c_x, x, "x") + broadcast_rows(coeffs.c_m, x, "c_m") * m
    x_next = (term(coeffs.a, x, "x") + term(coeffs.b, D, "D") + term(coeffs.c1, D_prev1, "D_prev1")
              + term(coeffs.c2, D_prev2, "D_prev2") + term(coeffs.d, z, "z"))
    return np.broadcast_to(x_next, x.shape).copy() if np.ndim(x_next) == 0 else x_next, D


def _close_to_zero(c, scale):
    return np.all(np.abs(np.asarray(c)) <= ELIMINATION_RTOL * np.maximum(1.0, np.abs(np.asarray(scale))))


def _rewrite(target: Affine, current: Affine, k: int, evaluated_now: bool, name: str):
    """Express ``target`` in (current stage input, D_k, D_{k-1}, D_{k-2}, one new noise): returns a, b, c1, c2, d."""
    A = current.coef("X")
    if np.any(np.asarray(A) == 0):
        raise ValueError(f"{name}: the stage input carries no multiple of the step's start; cannot rewrite")
    rho = target.coef("X") / A
    rest = target - current * rho                                  # X cancels by construction
    # evaluation order, newest first: D_k, ..., D_0 of this step, then the history H1, H2 of earlier steps
    newest = [f"D{j}" for j in range(k, -1, -1)] + ["H1", "H2", None, None]
    if evaluated_now:
        slots = {"b": newest[0], "c1": newest[1], "c2": newest[2]}
    else:
        slots = {"b": None, "c1": newest[0], "c2": newest[1]}
    out = {"a": rho}
    used = {"X"}
    for key in ("b", "c1", "c2"):
        sym = slots[key]
        out[key] = rest.coef(sym) if sym else 0.0
        used.add(sym)
    new_noise = [s for s in rest.terms if s.startswith("z") and s not in current.terms]
    if len(new_noise) > 1:
        raise ValueError(f"{name}: a stage may draw at most one new noise, got {new_noise}")
    out["d"] = rest.coef(new_noise[0]) if new_noise else 0.0
    used.update(new_noise)
    for sym, c in rest.terms.items():
        if sym not in used and not _close_to_zero(c, rho):
            raise ValueError(f"{name}: stage {k} reads {sym}, which is not one of the kernel's slots "
                             f"(x, D, D_prev1, D_prev2, z)")
    return out


def step_coeffs(sampler: Sampler, grid: Grid, state: State, prediction: str = "eps"):
    """The StepCoeffs of every stage of step ``state.step``, read off the sampler's own paper-form step."""
    i = state.step
    cur, nxt = grid.levels[i], grid.levels[i + 1]
    ctx = SymbolicContext(len(state.history), grid)
    sym_state = replace(state, history=ctx.history)
    x_next, _ = sampler.step(ctx, cur, nxt, sym_state)
    stages = ctx.stages
    out = []
    starts_at_x = bool(stages) and set(stages[0][0].terms) == {"X"} and np.all(stages[0][0].coef("X") == 1.0)
    if not starts_at_x:
        first = stages[0][0] if stages else x_next
        r = _rewrite(first, ctx.x, -1, False, sampler.name)
        out.append(StepCoeffs(0.0, 0.0, r["a"], 0.0, r["c1"], r["c2"], r["d"], evaluate=False))
        if not stages:
            return out
    for k, (inp, level) in enumerate(stages):
        target = stages[k + 1][0] if k + 1 < len(stages) else x_next
        r = _rewrite(target, inp, k, True, sampler.name)
        c_x, c_m = model_coeffs(prediction, level.alpha, level.sigma)
        out.append(StepCoeffs(c_x, c_m, r["a"], r["b"], r["c1"], r["c2"], r["d"], True, level))
    return out
