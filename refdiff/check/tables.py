"""The schedule and the time grid a target should build for the configuration asked, and the float32 bounds within
which the target's own tables must agree with them.

A replay judges each step on the target's own levels; without this a target that builds the wrong betas or ignores
``timestep_spacing`` would agree step by step (its steps are right for the levels it chose). These comparisons run
before the replay and are findings of their own kinds ("schedule", "grid").

Bounds (first order, u = 2^-24 the float32 unit roundoff; a target computing in float64 is far inside them):

* alpha_bar_i from float32 betas by a float32 cumulative product: each beta rounded (u), each factor 1 - beta_j
  rounded (u, and beta's error scaled by beta_j / (1 - beta_j)), each product rounded (u):
  |d alpha_bar_i| / alpha_bar_i <= u (2 (i + 1) + sum_{j<=i} 2 beta_j / (1 - beta_j)).
  The zero-terminal-SNR rescale (Lin et al. 2024, Alg. 1) on float32: sqrt halves that error, the shift by
  sqrt(alpha_bar_T) turns it absolute and divides it by sqrt(alpha_bar_i) - sqrt(alpha_bar_T), the square doubles
  it, and the betas -> alpha_bar round trip adds another cumulative product.
* sigma = sqrt((1 - alpha_bar) / alpha_bar): alpha_bar's relative error becomes alpha_bar / (1 - alpha_bar) times
  larger in 1 - alpha_bar (large at small t), halved by the square root, plus three roundings; interpolation at a
  fractional timestep takes the larger neighbour's bound, and the float32 timestep itself moves sigma by its
  slope times u t; a final cast to float32 adds u.
* Karras / exponential sigmas between two endpoints inherit the endpoints' relative error (convex combination in
  sigma^(1/rho) or log sigma, then the inverse map), plus the float32 cast.
"""

from __future__ import annotations

import numpy as np

from .. import schedules as S
from .findings import Finding

__all__ = ["RefTable", "ZERO_SNR_CLAMP", "U32", "reference_betas", "reference_alphas_cumprod", "alphas_cumprod_bound", "snr_shifted", "compare_alphas_cumprod", "compare_timesteps",
           "compare_sigmas", "table_sigmas", "table_sigma_bound", "fractional_timesteps", "TABLE_RULE"]

U32 = float(np.finfo(np.float32).eps) / 2.0
TABLE_RULE = 2.0          # the bounds are first order: allow twice them (second-order terms, ulp rounding of inputs)
BETA_DEFAULTS = {"linear": (1e-4, 2e-2), "scaled_linear": (8.5e-4, 1.2e-2)}


def reference_betas(config: dict):
    """(betas, zero_snr, snr_shift) for a diffusers-style configuration (num_train_timesteps, beta_schedule,
    beta_start, beta_end, rescale_betas_zero_snr, snr_shift_scale): the configuration's betas before any SNR shift
    or zero-SNR rescale, whether that rescale is asked, and the shift (1: none). None for
    a schedule without a beta table (EDM, flow matching) or one refdiff does not define."""
    T = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule")
    start, end = config.get("beta_start"), config.get("beta_end")
    if kind in BETA_DEFAULTS:
        d0, d1 = BETA_DEFAULTS[kind]
        start, end = (d0 if start is None else start), (d1 if end is None else end)
        betas = S.linear_betas(T, start, end) if kind == "linear" else S.scaled_linear_betas(T, start, end)
    elif kind == "squaredcos_cap_v2":
        betas = S.cosine_betas(T)
    else:
        return None
    return betas, bool(config.get("rescale_betas_zero_snr", False)), float(config.get("snr_shift_scale", 1.0))


def snr_shifted(alphas_cumprod, shift: float) -> np.ndarray:
    """alpha_bar / (s + (1 - s) alpha_bar): the table whose SNR is the original's divided by s (CogVideoX's
    ``snr_shift_scale``, applied before any zero-SNR rescale)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return ab / (shift + (1.0 - shift) * ab)


def _betas_of(alphas_cumprod) -> np.ndarray:
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    return 1.0 - ab / np.concatenate([[1.0], ab[:-1]])


def reference_alphas_cumprod(betas, zero_snr: bool = False, snr_shift: float = 1.0) -> np.ndarray:
    if snr_shift != 1.0:
        betas = _betas_of(snr_shifted(S.DiscreteSchedule(betas).alphas_cumprod, snr_shift))
    return S.DiscreteSchedule(S.rescale_zero_terminal_snr(betas) if zero_snr else betas).alphas_cumprod


def _cumprod_bound(betas) -> np.ndarray:
    b = np.minimum(np.asarray(betas, dtype=np.float64), 1.0 - 1e-12)
    i = np.arange(b.size)
    return U32 * (2.0 * (i + 1) + np.cumsum(2.0 * b / (1.0 - b)))


def alphas_cumprod_bound(betas, zero_snr: bool = False, snr_shift: float = 1.0) -> np.ndarray:
    """Relative bound (T,) of a float32 computation of alpha_bar from the configuration's ``betas`` (before the
    zero-SNR rescale when ``zero_snr``; see the module docstring). A zero-SNR table's last entry is exactly 0 on both
    sides: its bound is 0. ``snr_shift`` s: the float32 table is then divided by s + (1 - s) alpha_bar (den), which
    scales its relative error by d log f / d log alpha_bar = s / den and adds the roundings of (1 - s) alpha_bar
    (relative to den), of the sum and of the division."""
    betas = np.asarray(betas, dtype=np.float64)
    e = _cumprod_bound(betas)
    ab = S.DiscreteSchedule(betas).alphas_cumprod
    if snr_shift != 1.0:
        den = snr_shift + (1.0 - snr_shift) * ab
        e = e * snr_shift / den + U32 * (abs(1.0 - snr_shift) * ab / den + 2.0)
        ab = snr_shifted(ab, snr_shift)
        betas = _betas_of(ab)
    if not zero_snr:
        return e
    a = np.sqrt(ab)
    a_0, a_T = a[0], a[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = (a * (e / 2 + U32) + a_T * (e[-1] / 2 + U32)) / (a - a_T) + 2.0 * U32     # sqrt(abar) - a_T
        scale = (a_0 * (e[0] / 2 + U32) + a_T * (e[-1] / 2 + U32)) / (a_0 - a_T) + 3.0 * U32  # a_0 / (a_0 - a_T)
    out = 2.0 * (shifted + scale) + U32 + _cumprod_bound(S.rescale_zero_terminal_snr(betas))
    out[-1] = 0.0
    return out


ZERO_SNR_CLAMP = 2.0 ** -24      # diffusers' alpha_bar_T under rescale_betas_zero_snr in its sigma-based schedulers


class RefTable:
    """The configuration's alpha_bar table and its float32 relative bound; ``clamped()`` is the same table with
    alpha_bar_T = 2^-24 (diffusers' zero-SNR convention: a finite first sigma of 4096)."""

    _cache: dict = {}             # (betas bytes, zero_snr, snr_shift) -> (alpha_bar, bound): a check builds the same few tables

    def __init__(self, betas, zero_snr: bool = False, snr_shift: float = 1.0, clamp: bool = False):
        self.betas, self.zero_snr, self.clamp = np.asarray(betas, dtype=np.float64), bool(zero_snr), bool(clamp)
        self.snr_shift = float(snr_shift)
        key = (self.betas.tobytes(), self.zero_snr, self.snr_shift)
        if key not in RefTable._cache:
            RefTable._cache[key] = (reference_alphas_cumprod(self.betas, self.zero_snr, self.snr_shift),
                                    alphas_cumprod_bound(self.betas, self.zero_snr, self.snr_shift))
        ab, bound = RefTable._cache[key]
        self.alphas_cumprod, self.bound = ab.copy(), bound.copy()
        if clamp:
            self.alphas_cumprod[-1] = ZERO_SNR_CLAMP
            self.bound[-1] = 0.0                  # the clamp is exact in float32

    def clamped(self) -> "RefTable":
        return RefTable(self.betas, self.zero_snr, self.snr_shift, clamp=True)


def compare_alphas_cumprod(target, table: "RefTable"):
    """A 'schedule' Finding when the target's alphas_cumprod differs from the configuration's table beyond the
    bound (or has another length); None when it agrees."""
    target = np.asarray(target, dtype=np.float64)
    ref = table.alphas_cumprod
    if target.shape != ref.shape:
        return Finding("schedule", f"alphas_cumprod has {target.size} entries, the configuration asks for {ref.size}",
                       evidence={"target_length": int(target.size), "reference_length": int(ref.size)})
    bound = TABLE_RULE * table.bound * ref
    bad = ~(np.abs(target - ref) <= bound)
    if not np.any(bad):
        return None
    i = int(np.argmax(bad))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, np.abs(target - ref) / bound, np.where(target == ref, 0.0, np.inf))
    return Finding("schedule", f"alphas_cumprod differs from the configuration's table from index {i} on "
                               f"({target[i]:.9g} vs {ref[i]:.9g}; the float32 bound is {bound[i]:.3g}), "
                               f"{int(np.sum(bad))} of {ref.size} entries off",
                   evidence={"first_index": i, "target": float(target[i]), "reference": float(ref[i]),
                             "bound": float(bound[i]), "max_ratio_to_bound": float(np.max(ratio)),
                             "entries_off": int(np.sum(bad))})


def compare_timesteps(target, reference, what: str = "timesteps"):
    """A 'grid' Finding when integer timesteps differ (they are exact in any precision)."""
    t = np.asarray(target, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if t.shape == r.shape and np.array_equal(t, r):
        return None
    shown = lambda a: np.array2string(a[:8], precision=6, separator=", ") + (" ..." if a.size > 8 else "")  # noqa
    return Finding("grid", f"{what} {shown(t)} differ from the spacing asked, {shown(r)}",
                   evidence={"target": t.tolist(), "reference": r.tolist()})


def compare_sigmas(target, reference, rel_bound, what: str = "sigmas"):
    """A 'grid' Finding when sigmas differ beyond their float32 bound (zeros must match exactly)."""
    t = np.asarray(target, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if t.shape != r.shape:
        return Finding("grid", f"{what}: {t.size} levels where the configuration gives {r.size}",
                       evidence={"target": t.tolist(), "reference": r.tolist()})
    bound = TABLE_RULE * np.broadcast_to(rel_bound, r.shape) * np.abs(r)
    bad = ~(np.abs(t - r) <= bound)
    if not np.any(bad):
        return None
    i = int(np.argmax(bad))
    return Finding("grid", f"{what} differ from the configuration's from level {i} on ({t[i]:.9g} vs {r[i]:.9g}; "
                           f"the float32 bound is {bound[i]:.3g})",
                   evidence={"first_index": i, "target": t.tolist(), "reference": r.tolist(),
                             "bound": bound.tolist()})


def fractional_timesteps(T: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Timesteps of diffusers' sigma-based schedulers (Euler, Heun, KDPM2, LMS, DPM-Solver SDE): as the DDIM family,
    except that linspace is not rounded (fractional timesteps, sigma interpolated between table entries)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    return S.timesteps(T, n, spacing, steps_offset, family="ddim").astype(np.float64)


def table_sigmas(alphas_cumprod, timesteps) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at (fractional) timesteps, linear in sigma between entries
    (diffusers' interpolation_type='linear')."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sig = np.sqrt(-np.expm1(np.log(ab)) / ab)
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(ab.size), sig)


def table_sigma_bound(alphas_cumprod, ab_rel_bound, timesteps) -> np.ndarray:
    """Relative float32 bound of table_sigmas at the timesteps (see the module docstring)."""
    ab = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_entry = 0.5 * ab_rel_bound / (1.0 - ab) + 3.0 * U32
    t = np.asarray(timesteps, dtype=np.float64)
    lo = np.clip(np.floor(t).astype(np.int64), 0, ab.size - 1)
    hi = np.clip(lo + 1, 0, ab.size - 1)
    sig = table_sigmas(ab, np.arange(ab.size))
    here = table_sigmas(ab, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.abs(sig[hi] - sig[lo])
        t_term = np.where(here > 0, slope * U32 * np.abs(t) / here, 0.0)
    return np.maximum(per_entry[lo], per_entry[hi]) + t_term + U32
