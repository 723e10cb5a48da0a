"""Sampling grids by name: the sigma schedules k-diffusion, ComfyUI and diffusers' flow-matching schedulers build,
through one entry point ``sigmas(name, n, ...)`` (descending, the final 0 included).

Symbols: sigma the VE / EDM noise level (sigma / alpha of a VP level; the flow time t of rectified flow), n the
number of steps (n + 1 levels). Schedules that pick levels of a model's own training table take a ``SigmaTable``:
the table's sigmas in ascending order, with the model's timestep <-> sigma maps (ComfyUI's ``model_sampling``).

===================  ====================================================================================  ======
name                 definition                                                                            source
===================  ====================================================================================  ======
karras               (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho                         Karras et al. 2022, Eq. 5
exponential          log-uniform from s_max to s_min                                                       k-diffusion
polyexponential      exp(ramp^rho (log s_max - log s_min) + log s_min), ramp from 1 to 0                   k-diffusion
vp                   sqrt(expm1(beta_d t^2 / 2 + beta_min t)), t linear from 1 to eps_s                     k-diffusion (Song et al. 2021)
kl_optimal           tan(i/(n-1) atan s_min + (1 - i/(n-1)) atan s_max)                                    Sabour et al. 2024 (A1111 #15608)
simple               the table read every T / n entries from the top                                       ComfyUI
normal / sgm_uniform the table's sigma at timesteps linear from t(s_max) to t(s_min) (sgm: n + 1 points, the  ComfyUI
                     last dropped)
ddim_uniform         every T // n-th table entry from index 1                                               ComfyUI
beta                 the table at Beta(alpha, beta) quantiles of 1 - linspace(0, 1, n) (duplicates merged)   Lee et al. 2024
linear_quadratic     1 - (linear ramp to a threshold, then quadratic to 1), times s_max                     Mochi (Genmo 2024)
ays                  Align-Your-Steps tables (SD1, SDXL, SVD), log-linear interpolation to n + 1 levels     Sabour et al. 2024
flow                 flow-matching times: static shift, Flux's resolution-dependent mu, exponential or     Esser et al. 2024;
                     linear time shift, terminal stretch, optional Karras / exponential / beta              diffusers
===================  ====================================================================================  ======
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv

from . import schedules as S
from ._validate import as_f64, positive_int

__all__ = ["SIGMA_SCHEDULES", "SigmaTable", "sigmas", "ays_sigmas", "AYS_NOISE_LEVELS", "flow_sigmas", "flux_sigmas",
           "flux_mu", "time_shift", "FLOW_TIME_SHIFTS", "loglinear_interp"]

# Align Your Steps noise levels (Sabour et al. 2024; NVIDIA's published 10-step schedules), descending
AYS_NOISE_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}
FLOW_TIME_SHIFTS = ("exponential", "linear")
LINEAR_QUADRATIC_THRESHOLD = 0.025          # Mochi's threshold noise
BETA_SCHEDULE_AB = (0.6, 0.6)               # Lee et al. 2024's alpha = beta = 0.6 (ComfyUI's default)
FLUX_SHIFT = dict(base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15)   # Flux.1 defaults


class SigmaTable:
    """A model's training noise levels, ascending, with its timestep <-> sigma maps (ComfyUI ``model_sampling``).

    kind "discrete": sigma of a VP table (``from_schedule``); timestep(sigma) is the nearest table index in log
    sigma, sigma(t) log-linear between entries. kind "flow": rectified-flow times (``flow``): sigma(t) = the shifted
    time at t / multiplier, timestep(sigma) = sigma * multiplier.
    """

    def __init__(self, sigmas, kind: str = "discrete", multiplier: float = 1000.0, shift_fn=None):
        s = as_f64(sigmas, "sigmas", ndim=1, finite=True)
        if s.size < 2 or np.any(~(np.diff(s) > 0)) or s[0] <= 0:
            raise ValueError("a sigma table needs at least 2 positive, strictly increasing sigmas")
        if kind not in ("discrete", "flow"):
            raise ValueError(f"kind must be 'discrete' or 'flow', got {kind!r}")
        self.sigmas, self.kind, self.multiplier, self._shift_fn = s, kind, float(multiplier), shift_fn
        self.log_sigmas = np.log(s)

    @classmethod
    def from_schedule(cls, schedule: S.DiscreteSchedule) -> "SigmaTable":
        """sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i) of a discrete VP table (index i = timestep)."""
        i = np.arange(schedule.T)
        return cls(schedule.sigma(i) / schedule.alpha(i), "discrete")

    @classmethod
    def flow(cls, shift: float = 1.0, T: int = 1000, mu: float | None = None) -> "SigmaTable":
        """The flow-matching table of SD3 (static ``shift``, T = 1000) or Flux (``mu``, T = 10000, timestep =
        sigma): sigma(t) = time_shift(t / T) for t = 1 .. T."""
        T = positive_int(T, "T")
        if mu is not None:
            fn = (lambda t: time_shift(t, mu=mu))
            mult = 1.0
        else:
            if not 0 < shift < np.inf:
                raise ValueError(f"shift must be positive and finite, got {shift}")
            fn = (lambda t: time_shift(t, shift=shift))
            mult = float(T)
        return cls(fn(np.arange(1, T + 1) / T), "flow", mult, fn)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma):
        s = as_f64(sigma, "sigma")
        if self.kind == "flow":
            return s * self.multiplier
        return np.abs(np.log(s)[..., None] - self.log_sigmas).argmin(axis=-1).astype(np.float64)

    def sigma(self, t):
        t = as_f64(t, "t")
        if self.kind == "flow":
            return self._shift_fn(t / self.multiplier)
        t = np.clip(t, 0.0, self.sigmas.size - 1)
        lo = np.floor(t).astype(np.int64)
        hi = np.ceil(t).astype(np.int64)
        w = t - lo
        return np.exp((1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])


def time_shift(t, shift: float | None = None, mu: float | None = None, kind: str = "exponential", power: float = 1.0):
    """Flow-matching time shift of t in (0, 1]: ``shift`` s gives s t / (1 + (s - 1) t) (SD3, Esser et al. 2024,
    Eq. 23); ``mu`` gives exp(mu) / (exp(mu) + (1/t - 1)^power) ("exponential", Flux) or mu / (mu + (1/t - 1)^power)
    ("linear") — the exponential kind at power 1 is the static shift with s = e^mu."""
    t = as_f64(t, "t")
    if (shift is None) == (mu is None):
        raise ValueError("give exactly one of shift (static) and mu (dynamic)")
    if np.any((t <= 0) | (t > 1)):
        raise ValueError("flow times must lie in (0, 1]")
    if shift is not None:
        if not 0 < shift < np.inf:
            raise ValueError(f"shift must be positive and finite, got {shift}")
        return shift * t / (1.0 + (shift - 1.0) * t)
    if kind not in FLOW_TIME_SHIFTS:
        raise ValueError(f"time_shift_type must be one of {FLOW_TIME_SHIFTS}, got {kind!r}")
    if kind == "linear" and not mu > 0:
        raise ValueError(f"a linear time shift needs mu > 0, got {mu}")
    base = (1.0 / t - 1.0) ** power
    return np.exp(mu) / (np.exp(mu) + base) if kind == "exponential" else mu / (mu + base)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift: mu linear in the image sequence length (the number of packed latent
    tokens, (H / 16)(W / 16)), from base_shift at base_seq_len to max_shift at max_seq_len (diffusers
    ``calculate_shift``)."""
    image_seq_len = positive_int(image_seq_len, "image_seq_len")
    if not max_seq_len > base_seq_len:
        raise ValueError(f"need max_seq_len > base_seq_len, got {base_seq_len}, {max_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_sigmas(n: int, shift: float | None = None, mu: float | None = None, time_shift_type: str = "exponential",
                shift_terminal: float | None = None, spacing: str | None = None, T: int = 1000,
                times=None) -> np.ndarray:
    """Flow-matching sigmas as diffusers' FlowMatchEulerDiscreteScheduler sets them (SD3, Flux, LTX), final 0.

    Static ``shift`` (SD3): n times linear from 1 to the table's smallest shifted sigma shift(1/T), each shifted
    (the lower end is shifted twice: the convention diffusers and ComfyUI run). Dynamic ``mu`` (Flux, LTX): times
    linear from 1 to 1/T, then time_shift(mu). ``times``: the n unshifted times a pipeline passes instead
    (``set_timesteps(sigmas=...)``; Flux passes linspace(1, 1/n, n), see ``flux_sigmas``). ``shift_terminal``:
    stretched so that the last sigma is it (LTX). ``spacing``: None, or "karras" / "exponential" / "beta" between
    the first and last shifted sigma."""
    n = positive_int(n, "n")
    T = positive_int(T, "T")
    if times is not None:
        times = validate_times(times, n)
    if mu is not None:
        sig = time_shift(np.linspace(1.0, 1.0 / T, n) if times is None else times, mu=mu, kind=time_shift_type)
    else:
        s = 1.0 if shift is None else shift
        if not 0 < s < np.inf:
            raise ValueError(f"shift must be positive and finite, got {s}")
        sig = time_shift(np.linspace(1.0, time_shift(1.0 / T, shift=s), n) if times is None else times, shift=s)
    if shift_terminal is not None:
        if not 0.0 < shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
        if n == 1:
            raise ValueError("shift_terminal stretches 1 - t by its last value, which is 0 for one step (1 - t at "
                             "t = 1): 0 / 0 (diffusers' FlowMatchEulerDiscreteScheduler returns NaN sigmas there)")
        one_minus = 1.0 - sig
        sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    if spacing is not None:
        lo, hi = float(sig[-1]), float(sig[0])
        if spacing == "karras":
            sig = S.karras_sigmas(n, lo, hi) if n > 1 else np.array([hi])
        elif spacing == "exponential":
            sig = np.exp(np.linspace(np.log(hi), np.log(lo), n))
        elif spacing == "beta":
            sig = _beta_between(n, lo, hi)
        else:
            raise ValueError(f"spacing must be None, 'karras', 'exponential' or 'beta', got {spacing!r}")
    return np.append(sig, 0.0)


def validate_times(times, n: int) -> np.ndarray:
    """n flow times in (0, 1], strictly decreasing."""
    t = as_f64(times, "times", ndim=1, finite=True)
    if t.size != n:
        raise ValueError(f"times must hold n = {n} values, got {t.size}")
    if np.any((t <= 0) | (t > 1)) or np.any(np.diff(t) >= 0):
        raise ValueError("times must lie in (0, 1] and decrease strictly")
    return t


def flux_sigmas(n: int, image_seq_len: int, **shift_kw) -> np.ndarray:
    """The sigmas of diffusers' FluxPipeline for n steps at ``image_seq_len`` packed latent tokens: times
    linspace(1, 1/n, n) shifted by mu = flux_mu(image_seq_len, **shift_kw) (exponential time shift), final 0."""
    n = positive_int(n, "n")
    return flow_sigmas(n, mu=flux_mu(image_seq_len, **shift_kw), times=np.linspace(1.0, 1.0 / n, n))


def _beta_between(n: int, lo: float, hi: float, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """diffusers' beta sigmas: lo + ppf(1 - linspace(0, 1, n)) (hi - lo)."""
    q = betaincinv(a, b, 1.0 - np.linspace(0.0, 1.0, n))
    return lo + q * (hi - lo)


def loglinear_interp(levels, n_levels: int) -> np.ndarray:
    """A decreasing sequence resampled to ``n_levels`` points, linear in log sigma against an equispaced index
    (Align Your Steps' interpolation of its 10-step tables)."""
    levels = as_f64(levels, "levels", ndim=1)
    xs = np.linspace(0.0, 1.0, levels.size)
    ys = np.log(levels[::-1])
    return np.exp(np.interp(np.linspace(0.0, 1.0, n_levels), xs, ys))[::-1].copy()


def ays_sigmas(n: int, model: str = "SD1") -> np.ndarray:
    """Align-Your-Steps sigmas for ``model`` in SD1 / SDXL / SVD (Sabour et al. 2024): the published 11 levels,
    log-linearly interpolated to n + 1 when n != 10, the last level set to 0."""
    n = positive_int(n, "n")
    if model not in AYS_NOISE_LEVELS:
        raise ValueError(f"Align Your Steps has tables for {sorted(AYS_NOISE_LEVELS)}, got {model!r}")
    lv = np.asarray(AYS_NOISE_LEVELS[model], dtype=np.float64)
    if n + 1 != lv.size:
        lv = loglinear_interp(lv, n + 1)
    out = lv.copy()
    out[-1] = 0.0
    return out


def _needs_table(name, table):
    if not isinstance(table, SigmaTable):
        raise ValueError(f"the {name!r} schedule picks levels of the model's training table: pass "
                         "table=SigmaTable.from_schedule(...) or SigmaTable.flow(...)")
    return table


def _range(name, table, sigma_min, sigma_max):
    if sigma_min is None or sigma_max is None:
        if table is None:
            raise ValueError(f"the {name!r} schedule needs sigma_min and sigma_max, or a table to take them from")
        sigma_min = table.sigma_min if sigma_min is None else sigma_min
        sigma_max = table.sigma_max if sigma_max is None else sigma_max
    if not (0.0 < sigma_min < sigma_max < np.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    return float(sigma_min), float(sigma_max)


def _simple(n, table, **_):
    t = _needs_table("simple", table)
    ss = t.sigmas.size / n
    return np.append([t.sigmas[-(1 + int(x * ss))] for x in range(n)], 0.0)


def _normal(n, table, sgm=False, **_):
    t = _needs_table("sgm_uniform" if sgm else "normal", table)
    start, end = t.timestep(t.sigma_max), t.timestep(t.sigma_min)
    if sgm:
        ts = np.linspace(start, end, n + 1)[:-1]
        return np.append(t.sigma(ts), 0.0)
    if np.isclose(float(t.sigma(end)), 0.0, atol=1e-5):       # a table that reaches 0 ends there itself
        return t.sigma(np.linspace(start, end, n + 1))
    return np.append(t.sigma(np.linspace(start, end, n)), 0.0)


def _ddim_uniform(n, table, **_):
    t = _needs_table("ddim_uniform", table)
    x, steps = 1, n
    if np.isclose(float(t.sigmas[x]), 0.0, atol=1e-5):
        steps, sig = steps + 1, []
    else:
        sig = [0.0]
    ss = max(t.sigmas.size // steps, 1)
    while x < t.sigmas.size:
        sig.append(float(t.sigmas[x]))
        x += ss
    return np.asarray(sig[::-1])


def _beta(n, table, alpha=BETA_SCHEDULE_AB[0], beta=BETA_SCHEDULE_AB[1], **_):
    t = _needs_table("beta", table)
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"the beta schedule needs alpha, beta > 0, got {alpha}, {beta}")
    total = t.sigmas.size - 1
    ts = np.rint(betaincinv(alpha, beta, 1.0 - np.linspace(0.0, 1.0, n, endpoint=False)) * total)
    out, last = [], -1.0
    for k in ts:                       # consecutive duplicates merged (the run has fewer steps then)
        if k != last:
            out.append(float(t.sigmas[int(k)]))
        last = k
    return np.append(out, 0.0)


def _linear_quadratic(n, table=None, sigma_max=None, threshold_noise=LINEAR_QUADRATIC_THRESHOLD, linear_steps=None,
                      **_):
    top = sigma_max if sigma_max is not None else _needs_table("linear_quadratic", table).sigma_max
    if n == 1:
        sched = [1.0, 0.0]
    else:
        ls = n // 2 if linear_steps is None else positive_int(linear_steps, "linear_steps")
        if not ls < n:
            raise ValueError(f"linear_steps must be < n = {n}, got {ls}")
        lin = [i * threshold_noise / ls for i in range(ls)]
        diff = ls - threshold_noise * n
        qs = n - ls
        qc = diff / (ls * qs ** 2)
        lc = threshold_noise / ls - 2.0 * diff / (qs ** 2)
        const = qc * ls ** 2
        quad = [qc * i ** 2 + lc * i + const for i in range(ls, n)]
        sched = [1.0 - v for v in lin + quad + [1.0]]
    return np.asarray(sched) * top


def _kl_optimal(n, table=None, sigma_min=None, sigma_max=None, **_):
    lo, hi = _range("kl_optimal", table, sigma_min, sigma_max)
    w = np.arange(n) / (n - 1) if n > 1 else np.zeros(1)
    return np.append(np.tan(w * np.arctan(lo) + (1.0 - w) * np.arctan(hi)), 0.0)


def _karras(n, table=None, sigma_min=None, sigma_max=None, rho=7.0, **_):
    lo, hi = _range("karras", table, sigma_min, sigma_max)
    return S.karras_sigmas(n, lo, hi, rho, append_zero=True)


def _exponential(n, table=None, sigma_min=None, sigma_max=None, **_):
    lo, hi = _range("exponential", table, sigma_min, sigma_max)
    return S.exponential_sigmas(n, lo, hi, append_zero=True)


def _polyexponential(n, table=None, sigma_min=None, sigma_max=None, rho=1.0, **_):
    lo, hi = _range("polyexponential", table, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return np.append(np.exp(ramp * (np.log(hi) - np.log(lo)) + np.log(lo)), 0.0)


def _vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, **_):
    if not (beta_d > 0 and beta_min > 0 and 0 < eps_s < 1):
        raise ValueError(f"need beta_d, beta_min > 0 and 0 < eps_s < 1, got {beta_d}, {beta_min}, {eps_s}")
    t = np.linspace(1.0, eps_s, n)
    return np.append(np.sqrt(np.expm1(beta_d * t ** 2 / 2.0 + beta_min * t)), 0.0)


def _ays(n, model="SD1", **_):
    return ays_sigmas(n, model)


def _flow(n, table=None, shift=None, mu=None, time_shift_type="exponential", shift_terminal=None, spacing=None,
          T=1000, times=None, **_):
    return flow_sigmas(n, shift, mu, time_shift_type, shift_terminal, spacing, T, times)


def _sgm_uniform(n, table, **_):
    return _normal(n, table, sgm=True)


SIGMA_SCHEDULES = {
    "karras": _karras, "exponential": _exponential, "polyexponential": _polyexponential, "vp": _vp,
    "kl_optimal": _kl_optimal, "simple": _simple, "normal": _normal, "sgm_uniform": _sgm_uniform,
    "ddim_uniform": _ddim_uniform, "beta": _beta, "linear_quadratic": _linear_quadratic, "ays": _ays, "flow": _flow,
}


def _options(fn) -> list:
    import inspect

    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("n", "table", "sgm")]


def sigmas(name: str, n: int, table: SigmaTable | None = None, **kw) -> np.ndarray:
    """The sampling sigmas of schedule ``name`` for n steps: descending, the final 0 included (n + 1 levels; the
    beta schedule merges duplicate picks, and a table reaching 0 may end earlier). See the module docstring for
    each schedule; ``table`` is the model's SigmaTable where a schedule reads it (and the default sigma range)."""
    if name not in SIGMA_SCHEDULES:
        import difflib

        close = difflib.get_close_matches(str(name), list(SIGMA_SCHEDULES), n=1)
        raise ValueError(f"unknown sigma schedule {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"known: {sorted(SIGMA_SCHEDULES)}")
    n = positive_int(n, "n")
    unknown = sorted(set(kw) - set(_options(SIGMA_SCHEDULES[name])))
    if unknown:          # a misspelt option must not be dropped silently
        raise ValueError(f"the {name!r} schedule takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{_options(SIGMA_SCHEDULES[name]) or 'none'}")
    if table is not None and not isinstance(table, SigmaTable):
        raise ValueError(f"table must be a SigmaTable, got {type(table).__name__}")
    return np.asarray(SIGMA_SCHEDULES[name](n, table=table, **kw), dtype=np.float64)
