"""Noise schedules and sampling time grids, in float64.

Symbols (README, "Conventions")
----------------------
beta_i        discrete noise increments; index i in {0..T-1} is the paper's x_{i+1}
alpha_bar_i   alphas_cumprod = prod_{j<=i} (1 - beta_j) = exp(sum log1p(-beta_j))
alpha, sigma  marginal x_t = alpha x_0 + sigma eps (VP: alpha^2 + sigma^2 = 1)
log_snr       lambda = log(alpha^2 / sigma^2), the *full* log-SNR (DPM-Solver's lambda is half of it)
t             continuous time in [0, 1] (EDM: t = sigma in [0, inf))

Discrete tables: ``linear_betas`` (Ho et al. 2020), ``scaled_linear_betas`` (Rombach et al. 2022),
``cosine_betas`` (Nichol & Dhariwal 2021, Eq. 17), ``betas_from_alpha_bar``, ``rescale_zero_terminal_snr``
(Lin et al. 2023, Alg. 1) and ``DiscreteSchedule``.
Continuous families: ``VPLinear`` (Song et al. 2021), ``Cosine`` (Nichol & Dhariwal 2021), ``Sigmoid``
(Chen 2023), ``ShiftedVP`` / ``shift_log_snr`` (Hoogeboom et al. 2023), ``VE`` (Song et al. 2021),
``EDM`` (Karras et al. 2022), ``RectifiedFlow`` (Liu et al. 2022; Esser et al. 2024 shift).
Grids: ``timesteps`` (diffusers' spacings), ``karras_sigmas``, ``exponential_sigmas``, ``log_snr_uniform_times``,
``time_uniform``, ``time_quadratic``.

Every formula is arranged so that it agrees with a 50-digit mpmath evaluation to a few ulp over the whole
domain: differences of nearly equal quantities are rewritten with trig identities, expm1 / log1p, or
sigmoid(a) - sigmoid(b) = -expm1(b - a) sigmoid(a) sigmoid(-b).
"""

from __future__ import annotations

import warnings

import numpy as np

from ._math import log1mexp, log_sigmoid, sigmoid, softplus, two_prod, two_sum
from ._validate import as_f64, as_index, compensated_cumsum, positive_int

__all__ = [
    "linear_betas",
    "scaled_linear_betas",
    "cosine_betas",
    "betas_from_alpha_bar",
    "rescale_zero_terminal_snr",
    "DiscreteSchedule",
    "ContinuousSchedule",
    "VPLinear",
    "Cosine",
    "Sigmoid",
    "ShiftedVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "LinearLogSNR",
    "shift_log_snr",
    "resolution_shift",
    "timesteps",
    "karras_sigmas",
    "exponential_sigmas",
    "log_snr_uniform_times",
    "time_uniform",
    "time_quadratic",
    "validate_grid",
]

HALF_PI = 0.5 * np.pi
COSINE_S = 0.008           # Nichol & Dhariwal offset s
COSINE_MAX_BETA = 0.999    # Nichol & Dhariwal clip that keeps beta_T < 1
BISECTION_STEPS = 64       # halvings of a float64 bit interval: enough to reach adjacent floats
LOW_PRECISION = (np.float16,)


# ------------------------------------------------------------------------------------------------
# discrete beta tables
# ------------------------------------------------------------------------------------------------

def _check_beta_range(b0: float, b1: float) -> None:
    if not (0.0 < b0 < 1.0 and 0.0 < b1 < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {b0} and {b1}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """DDPM linear schedule beta_i = linspace(beta_start, beta_end, T) (Ho et al. 2020, §4), float64, shape (T,)."""
    T = positive_int(T, "T")
    _check_beta_range(beta_start, beta_end)
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def scaled_linear_betas(T: int, beta_start: float = 8.5e-4, beta_end: float = 1.2e-2) -> np.ndarray:
    """LDM / Stable Diffusion schedule beta_i = linspace(sqrt(beta_start), sqrt(beta_end), T)^2, shape (T,)."""
    T = positive_int(T, "T")
    _check_beta_range(beta_start, beta_end)
    return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T, dtype=np.float64) ** 2


def cosine_betas(T: int, s: float = COSINE_S, max_beta: float = COSINE_MAX_BETA) -> np.ndarray:
    """iDDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17): beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).

    abar(t) = cos^2(phi(t)), phi(t) = (t + s) / (1 + s) * pi / 2. The textbook ratio cancels for small
    beta and cos(phi) cancels near pi/2, so with a = phi(i/T), b = phi((i+1)/T) and the complements
    d(t) = pi/2 - phi(t) = (1 - t) pi / (2 (1 + s)):

        1 - cos^2 b / cos^2 a = sin(b - a) sin(b + a) / cos^2 a = sin(b - a) sin(d_a + d_b) / sin^2 d_a

    with sin(a + b) evaluated at whichever of a + b, d_a + d_b lies below pi/2 (near pi a rounded argument
    costs |x| eps / sin(x) relative). The result agrees with mpmath to a few ulp.
    """
    T = positive_int(T, "T")
    if not (0.0 < max_beta <= 1.0):
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0, got {s}")
    if not np.isfinite(s):
        raise ValueError(f"s = {s!r} makes the schedule degenerate (alpha_bar = 0 everywhere); iDDPM uses 0.008")
    i = np.arange(T, dtype=np.float64)
    scale = np.pi / (2.0 * (1.0 + s))
    d_a = (T - i) / T * scale                  # pi/2 - phi(i/T)
    d_b = (T - i - 1.0) / T * scale            # pi/2 - phi((i+1)/T)
    a_plus_b = ((2.0 * i + 1.0) / T + 2.0 * s) * scale
    width = scale / T                          # b - a
    # sin(a + b) = sin(d_a + d_b): take whichever argument is below pi/2, where sin is well conditioned
    sin_sum = np.where(a_plus_b <= HALF_PI, np.sin(a_plus_b), np.sin(d_a + d_b))
    denom = np.sin(d_a) ** 2
    if np.any(denom == 0):
        raise ValueError(f"s = {s!r} makes the schedule degenerate: alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)) "
                         "underflows to 0 (s must be finite and small; iDDPM uses 0.008)")
    betas = np.sin(width) * sin_sum / denom
    return np.minimum(betas, max_beta)


def betas_from_alpha_bar(T: int, alpha_bar, max_beta: float = COSINE_MAX_BETA) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1]: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta).

    ``alpha_bar`` is a vectorised callable, or a ``ContinuousSchedule`` (then the ratio is formed from its
    log-SNR as -expm1(log abar_{i+1} - log abar_i), free of the cancellation of the direct ratio).
    """
    T = positive_int(T, "T")
    if not (0.0 < max_beta <= 1.0):
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    t = np.arange(T + 1, dtype=np.float64) / T
    if isinstance(alpha_bar, ContinuousSchedule):
        if not alpha_bar.variance_preserving:
            raise ValueError(f"alpha_bar is defined for variance-preserving families only, got {alpha_bar!r}")
        with np.errstate(divide="ignore"):
            log_abar = 2.0 * np.log(alpha_bar.alpha(t))
        with np.errstate(invalid="ignore"):
            betas = -np.expm1(log_abar[1:] - log_abar[:-1])
        betas = np.where(np.isneginf(log_abar[1:]), 1.0, betas)
    else:
        ab = as_f64(alpha_bar(t), "alpha_bar(t)")
        if ab.shape != t.shape:
            raise ValueError(f"alpha_bar must be vectorised: expected shape {t.shape}, got {ab.shape}")
        bad = np.flatnonzero(~((ab[1:] < ab[:-1]) & (ab[:-1] > 0) & (ab[:-1] <= 1) & (ab[1:] >= 0)))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"alpha_bar must decrease strictly within [0, 1] (betas in (0, 1]): alpha_bar({k}/{T}) "
                             f"= {ab[k]!r}, alpha_bar({k + 1}/{T}) = {ab[k + 1]!r}")
        betas = 1.0 - ab[1:] / ab[:-1]
    return np.minimum(betas, max_beta)


def rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Rescale betas so that alpha_bar_{T-1} == 0 exactly and alpha_bar_0 is kept (Lin et al. 2023, Alg. 1).

    Alg. 1 shifts s_i = sqrt(alpha_bar_i) by s_last and scales by s_0 / (s_0 - s_last); the new betas are
    1 - r_i^2 with r_i = (s_i - s_last) / (s_{i-1} - s_last). Written as (1 - r)(1 + r) with
    1 - r_i = (s_{i-1} - s_i) / (s_{i-1} - s_last), where s_{i-1} - s_i = s_{i-1} beta_i / (1 + sqrt(1 - beta_i))
    and s_{i-1} - s_last is a compensated sum of those positive gaps, every new beta is accurate to a few ulp
    (the textbook form loses ~log10(s / gap) digits near the end). The last beta is exactly 1.
    """
    betas = _check_betas(betas, allow_terminal_one=False)
    if betas.shape[0] < 2:
        raise ValueError("rescale_zero_terminal_snr needs at least 2 betas")
    log_abar = compensated_cumsum(np.log1p(-betas))
    s = np.exp(0.5 * log_abar)
    gaps = s[:-1] * betas[1:] / (1.0 + np.sqrt(1.0 - betas[1:]))      # s_{i-1} - s_i, i = 1..T-1
    to_last = compensated_cumsum(gaps[::-1])[::-1]                    # s_{i-1} - s_last, i = 1..T-1
    one_minus_r = gaps / to_last
    new = np.empty_like(betas)
    new[0] = betas[0]
    new[1:] = one_minus_r * (2.0 - one_minus_r)
    new[-1] = 1.0
    return new


def _check_betas(betas, *, allow_terminal_one: bool) -> np.ndarray:
    raw = np.asarray(betas)
    if raw.dtype in LOW_PRECISION or str(raw.dtype) == "bfloat16":
        warnings.warn(f"betas given in {raw.dtype}: schedules should be built in float64 and cast at use",
                      RuntimeWarning, stacklevel=3)
    b = as_f64(raw, "betas", ndim=1, finite=True)
    if b.size == 0:
        raise ValueError("betas must not be empty (0 steps)")
    if b[0] == 0.0:
        raise ValueError("betas[0] == 0 gives alpha_bar_0 == 1: the first noisy step x_1 would carry no noise")
    inner = b[:-1] if allow_terminal_one else b
    bad = np.flatnonzero((inner <= 0.0) | (inner >= 1.0))
    if bad.size:
        raise ValueError(f"betas must lie in (0, 1); index {bad[0]} holds {inner[bad[0]]!r}"
                         + (" (beta == 1 is allowed only as the last entry: zero terminal SNR)"
                            if allow_terminal_one else ""))
    if allow_terminal_one and not (0.0 < b[-1] <= 1.0):
        raise ValueError(f"the last beta must lie in (0, 1], got {b[-1]!r}")
    return b


class DiscreteSchedule:
    """A discrete VP schedule from its betas (Ho et al. 2020, Eq. 4).

    alphas_cumprod = exp(compensated_cumsum(log1p(-betas))) (a plain cumprod drifts by 15-25 ulp over
    1000 steps). Index i in {0..T-1} is the paper's x_{i+1}. A final beta of exactly 1 (zero terminal
    SNR, e.g. from ``rescale_zero_terminal_snr``) gives alpha_bar_{T-1} = 0, sigma = 1, log_snr = -inf.

    Attributes
    ----------
    betas, alphas_cumprod, log_alphas_cumprod : ndarray (T,), float64
    T : int
    """

    def __init__(self, betas):
        self.betas = _check_betas(betas, allow_terminal_one=True)
        self.betas.setflags(write=False)
        self.T = int(self.betas.shape[0])
        with np.errstate(divide="ignore"):
            self.log_alphas_cumprod = compensated_cumsum(np.log1p(-self.betas))
        self.alphas_cumprod = np.exp(self.log_alphas_cumprod)
        for a in (self.log_alphas_cumprod, self.alphas_cumprod):
            a.setflags(write=False)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteSchedule":
        """Build from a user's alpha_bar table; low-precision tables get a warning per defect found.

        fp16 / bf16 tables collapse: alpha_bar rounds to 1 at small t > 0, neighbours become equal, and
        sigma / alpha overflows (diffusers PR #3005, AUTOMATIC1111 #14071). Each defect is warned about,
        then an invalid table raises ValueError.
        """
        raw = np.asarray(alphas_cumprod)
        low = raw.dtype in LOW_PRECISION or str(raw.dtype) == "bfloat16"
        ab = as_f64(raw, "alphas_cumprod", ndim=1, finite=True)
        findings = audit_alphas_cumprod(ab)
        if low:
            for f in findings:
                warnings.warn(f"{raw.dtype} alphas_cumprod: {f}", RuntimeWarning, stacklevel=2)
        if findings:
            raise ValueError("invalid alphas_cumprod: " + "; ".join(findings))
        prev = np.concatenate(([1.0], ab[:-1]))
        return cls(1.0 - ab / prev)

    # -- per-index quantities --------------------------------------------------------------------
    def _L(self, i):
        return self.log_alphas_cumprod[as_index(i, self.T)]

    def alpha(self, i):
        """sqrt(alpha_bar_i) = exp(L_i / 2), L the cumulative log."""
        return np.exp(0.5 * self._L(i))

    def sigma(self, i):
        """sqrt(1 - alpha_bar_i) = sqrt(-expm1(L_i)): no cancellation when alpha_bar is close to 1."""
        return np.sqrt(-np.expm1(self._L(i)))

    def log_snr(self, i):
        """log(alpha_bar / (1 - alpha_bar)) = L - log(-expm1(L)); -inf at zero terminal SNR."""
        L = self._L(i)
        with np.errstate(invalid="ignore"):
            out = L - log1mexp(L)
        return np.where(np.isneginf(L), -np.inf, out)[()]

    def fractional_index(self, log_snr):
        """The continuous timestep of a level between table entries: the index interpolated linearly in log-SNR
        between the two entries around it (k-diffusion's ``DiscreteSchedule.sigma_to_t``, linear in log sigma).
        Exact at the entries; log-SNR outside the table's range -> ValueError."""
        lam = as_f64(log_snr, "log_snr")
        table = self.log_snr(np.arange(self.T))                  # decreasing in the index
        finite = np.isfinite(table)
        lo, hi = table[finite][-1], table[finite][0]
        if np.any(np.isnan(lam)) or np.any((lam < lo) | (lam > hi)):
            raise ValueError(f"log_snr must lie within the table's range [{lo:.6g}, {hi:.6g}] to name a timestep")
        idx = np.arange(self.T)[finite]
        return np.interp(-lam, -table[finite], idx.astype(np.float64))[()]

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.betas[-1] == 1.0)

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={self.T}, beta[0]={self.betas[0]:.3g}, beta[-1]={self.betas[-1]:.3g})"


def audit_alphas_cumprod(ab: np.ndarray) -> list[str]:
    """Defects of an alpha_bar table that make a schedule invalid (empty list when valid)."""
    out = []
    if ab.size == 0:
        return ["empty table (0 steps)"]
    if ab[0] >= 1.0:
        out.append("alpha_bar_0 == 1 (the first step carries no noise)")
    ones = np.flatnonzero(ab[1:] >= 1.0) + 1
    if ones.size:
        out.append(f"alpha_bar == 1 at t > 0 (indices {ones[:5].tolist()})")
    dup = np.flatnonzero(np.diff(ab) >= 0.0)
    if dup.size:
        out.append(f"not strictly decreasing / duplicate values at indices {dup[:5].tolist()}")
    zeros = np.flatnonzero(ab[:-1] <= 0.0)
    if zeros.size:
        out.append(f"alpha_bar <= 0 before the last index (sigma / alpha = inf at {zeros[:5].tolist()})")
    if ab[-1] < 0.0:
        out.append("alpha_bar < 0 at the last index")
    return out


# ------------------------------------------------------------------------------------------------
# continuous families
# ------------------------------------------------------------------------------------------------

class ContinuousSchedule:
    """Interface of a continuous family: alpha(t), sigma(t), log_snr(t), t_of_log_snr(lam) and derivatives.

    Subclasses set ``t_min`` / ``t_max`` (the domain) and ``variance_preserving``.
    """

    t_min = 0.0
    t_max = 1.0
    variance_preserving = True

    def _t(self, t) -> np.ndarray:
        t = as_f64(t, "t")
        if np.any(np.isnan(t)):
            raise ValueError(f"t must lie in [{self.t_min}, {self.t_max}] for {type(self).__name__}, got NaN")
        if np.any((t < self.t_min) | (t > self.t_max)):
            raise ValueError(f"t must lie in [{self.t_min}, {self.t_max}] for {type(self).__name__}, "
                             f"got values in [{np.min(t)}, {np.max(t)}]")
        return t

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def log_snr(self, t):
        raise NotImplementedError

    def d_log_snr_dt(self, t):
        raise NotImplementedError

    def dalpha_dt(self, t):
        raise NotImplementedError

    def dsigma_dt(self, t):
        raise NotImplementedError

    def t_of_log_snr(self, lam):
        raise NotImplementedError

    def sigma_ve(self, t):
        """sigma / alpha, the VE / EDM noise level of the same marginal (Karras et al. 2022, Eq. 4)."""
        return np.exp(-0.5 * self.log_snr(t))

    # -- shared inverse machinery ----------------------------------------------------------------
    def _lam(self, lam) -> np.ndarray:
        lam = as_f64(lam, "lam")
        if np.any(np.isnan(lam)):
            raise ValueError("lam must not be NaN")
        return lam

    def _clip_domain(self, t: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """Clip a few-ulp excursion past the domain; a real excursion means lam is out of range."""
        slack = 8.0 * np.spacing(np.maximum(np.abs(t), 1.0))
        if np.any((t < self.t_min - slack) | (t > self.t_max + slack)):
            lo, hi = self.log_snr(self.t_max), self.log_snr(self.t_min)
            raise ValueError(f"lam outside the log-SNR range [{lo}, {hi}] of {type(self).__name__}")
        return np.clip(t, self.t_min, self.t_max)

    def _invert_by_bisection(self, lam: np.ndarray) -> np.ndarray:
        """t with log_snr(t) == lam, by bisection over the bit patterns of non-negative float64 t.

        For t >= 0 the int64 view of a float is monotone in its value, so 64 halvings of the bit interval
        [t_min, t_max] land on adjacent floats around the crossing; the closer of the two is returned. This
        needs only a monotone, accurate forward log_snr: the inverse is then as accurate as the forward
        allows (an error d in lambda moves t by d / |lambda'(t)|). Vectorised over lam.
        """
        lam = np.asarray(lam, dtype=np.float64)
        lo = np.full(lam.shape, np.float64(self.t_min)).view(np.int64)
        hi = np.full(lam.shape, np.float64(self.t_max)).view(np.int64)
        with np.errstate(all="ignore"):
            for _ in range(BISECTION_STEPS):
                mid = lo + (hi - lo) // 2
                above = self.log_snr(mid.view(np.float64)) > lam      # lambda decreases in t
                lo = np.where(above, mid, lo)
                hi = np.where(above, hi, mid)
            t_lo, t_hi = lo.view(np.float64), hi.view(np.float64)
            closer_lo = np.abs(self.log_snr(t_lo) - lam) <= np.abs(self.log_snr(t_hi) - lam)
        t = np.where(closer_lo, t_lo, t_hi)
        return np.where(np.isposinf(lam), self.t_min, np.where(np.isneginf(lam), self.t_max, t))

    def _vp_derivatives(self, t):
        """alpha' and sigma' of a VP family from lambda': alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
        a, s, dl = self.alpha(t), self.sigma(t), self.d_log_snr_dt(t)
        return 0.5 * a * s * s * dl, -0.5 * s * a * a * dl


class VPLinear(ContinuousSchedule):
    """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, Eq. 11, 33).

    B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2; alpha = exp(-B/2),
    sigma = sqrt(-expm1(-B)), log_snr = -log(expm1(B)); inverse B = softplus(-lambda), solved for t in
    the cancellation-free quadratic form t = 2B / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) B)).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0.0 < beta_min <= beta_max) or not np.isfinite(beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max < inf, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.beta_d = self.beta_max - self.beta_min

    def B(self, t):
        """The integrated rate B(t) as a double-double (hi, lo), hi + lo = B(t) to ~1e-32 relative.

        alpha = exp(-B/2) turns an absolute error in B into a relative one, and B reaches ~10, so one
        rounding of B alone costs ~5 ulp; the low word removes that (first-order corrections below).
        """
        t = self._t(t)
        d_hi, d_lo = two_sum(self.beta_max, -self.beta_min)        # beta_max - beta_min, exactly
        t2_hi, t2_lo = two_prod(t, t)
        q_hi, q_lo = two_prod(d_hi, t2_hi)
        q_lo = q_lo + d_hi * t2_lo + d_lo * t2_hi                   # (beta_max - beta_min) t^2
        l_hi, l_lo = two_prod(self.beta_min, t)                     # beta_min t
        hi, lo = two_sum(l_hi, 0.5 * q_hi)
        lo = lo + l_lo + 0.5 * q_lo
        hi, lo = two_sum(hi, lo)
        return hi, lo

    def beta(self, t):
        t = self._t(t)
        return self.beta_min + self.beta_d * t

    def alpha(self, t):
        hi, lo = self.B(t)
        return np.exp(-0.5 * hi) * (1.0 - 0.5 * lo)

    def sigma(self, t):
        hi, lo = self.B(t)
        # 1 - exp(-B) = -expm1(-hi) + exp(-hi) lo + O(lo^2)
        return np.sqrt(-np.expm1(-hi) + np.exp(-hi) * lo)

    def log_snr(self, t):
        hi, lo = self.B(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            em = np.expm1(hi)
            # -log(expm1(hi + lo)) = -log(expm1(hi)) - lo e^hi / expm1(hi) + O(lo^2)
            corr = np.where(lo == 0.0, 0.0, lo * np.exp(hi) / em)
            return -np.log(em) - corr

    def d_log_snr_dt(self, t):
        with np.errstate(divide="ignore"):
            return -self.beta(t) / self.sigma(t) ** 2

    def dalpha_dt(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def dsigma_dt(self, t):
        with np.errstate(divide="ignore"):
            return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def t_of_log_snr(self, lam):
        B = softplus(-self._lam(lam))
        with np.errstate(invalid="ignore"):
            t = 2.0 * B / (self.beta_min + np.sqrt(self.beta_min ** 2 + 2.0 * self.beta_d * B))
        t = np.where(np.isinf(B), np.inf, t)
        return self._clip_domain(t, lam)[()]

    def __repr__(self):
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max})"


class Cosine(ContinuousSchedule):
    """Continuous iDDPM cosine schedule: alpha(t) = cos(phi(t)) / cos(phi(0)), phi(t) = (t + s) pi / (2 (1 + s))
    (Nichol & Dhariwal 2021, Eq. 17, with alpha_bar = alpha^2 normalised so alpha(0) = 1).

    With psi = pi/2 - phi = (1 - t) c, theta = phi - phi(0) = t c, c = pi / (2 (1 + s)):
    alpha = sin(psi) / cos(phi0), sigma^2 = sin(theta) sin(phi + phi0) / cos^2(phi0),
    log_snr = 2 log sin(psi) - log sin(theta) - log sin(phi + phi0). alpha(1) = 0 (log_snr = -inf).
    """

    def __init__(self, s: float = COSINE_S):
        if not (0.0 <= s < 1.0):
            raise ValueError(f"s must lie in [0, 1), got {s}")
        self.s = float(s)
        self.c = np.pi / (2.0 * (1.0 + self.s))
        self.phi0 = self.s * self.c
        self.cos_phi0 = np.cos(self.phi0)

    def _parts(self, t):
        t = self._t(t)
        psi = (1.0 - t) * self.c
        theta = t * self.c
        return t, psi, theta, np.sin(theta + 2.0 * self.phi0)   # phi + phi0 = theta + 2 phi0

    def alpha(self, t):
        _, psi, _, _ = self._parts(t)
        return np.sin(psi) / self.cos_phi0

    def sigma(self, t):
        _, _, theta, sp = self._parts(t)
        # two square roots: with s = 0 the product sin(theta) sin(theta) underflows for t < 1e-154
        return np.sqrt(np.sin(theta)) * np.sqrt(sp) / self.cos_phi0

    def log_snr(self, t):
        _, psi, theta, sp = self._parts(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 2.0 * np.log(np.sin(psi)) - np.log(np.sin(theta)) - np.log(sp)
        return out

    def d_log_snr_dt(self, t):
        _, psi, theta, sp = self._parts(t)
        # lambda' = 2 alpha' / (alpha sigma^2), alpha'/alpha = -c cot(psi); divide factor by factor (no underflow)
        # cos(psi) = sin(phi) = sin(theta + phi0): cos of the rounded psi ~ pi/2 would lose it near t = 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return -2.0 * self.c * (np.sin(theta + self.phi0) / np.sin(psi)) / np.sin(theta) / sp * self.cos_phi0 ** 2

    def dalpha_dt(self, t):
        _, _, theta, _ = self._parts(t)
        return -self.c * np.sin(theta + self.phi0) / self.cos_phi0      # -c sin(phi) / cos(phi0)

    def dsigma_dt(self, t):
        with np.errstate(divide="ignore"):
            return -self.alpha(t) * self.dalpha_dt(t) / self.sigma(t)

    def t_of_log_snr(self, lam):
        # The closed form 1 - arcsin(cos(phi0) sqrt(sigmoid(lam))) / c cancels for t near 0; bisect instead.
        return self._invert_by_bisection(self._lam(lam))[()]

    def __repr__(self):
        return f"Cosine(s={self.s})"


class Sigmoid(ContinuousSchedule):
    """Chen (2023) sigmoid schedule: alpha_bar(t) = (v_e - sigmoid(z)) / (v_e - v_s), z = (t (end - start) + start) / tau,
    v_s = sigmoid(start / tau), v_e = sigmoid(end / tau) (Chen 2023, Alg. 1).

    sigmoid(a) - sigmoid(b) = -expm1(b - a) sigmoid(a) sigmoid(-b) removes both cancellations, giving
    log_snr = log1mexp(z - e) - log1mexp(s - z) - z + softplus(s) - softplus(-e), with s, e = start / tau, end / tau.
    """

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0):
        if not (start < end) or not tau > 0.0:
            raise ValueError(f"need start < end and tau > 0, got start={start}, end={end}, tau={tau}")
        self.start, self.end, self.tau = float(start), float(end), float(tau)
        self.s_, self.e_ = self.start / self.tau, self.end / self.tau
        self.k = (self.end - self.start) / self.tau           # dz/dt
        # v_e - v_s = -expm1(s - e) sigmoid(e) sigmoid(-s); each of alpha^2, sigma^2 cancels one sigmoid factor
        self._den_a = -np.expm1(self.s_ - self.e_) * sigmoid(-self.s_)
        self._den_s = -np.expm1(self.s_ - self.e_) * sigmoid(self.e_)

    def _parts(self, t):
        """z and the two gaps z - s = k t, e - z = k (1 - t), formed from t directly (z - s would cancel)."""
        t = self._t(t)
        u_s, u_e = self.k * t, self.k * (1.0 - t)
        return self.s_ + u_s, u_s, u_e

    def alpha(self, t):
        # alpha^2 = (-expm1(-(e - z))) sigmoid(-z) / ((-expm1(s - e)) sigmoid(-s)): a product of accurate
        # positive factors (going through log alpha^2 would magnify its rounding by |log alpha^2| near t = 1).
        z, _, u_e = self._parts(t)
        return np.sqrt(-np.expm1(-u_e) * sigmoid(-z) / self._den_a)

    def sigma(self, t):
        z, u_s, _ = self._parts(t)
        return np.sqrt(-np.expm1(-u_s) * sigmoid(z) / self._den_s)

    def log_snr(self, t):
        z, u_s, u_e = self._parts(t)
        with np.errstate(invalid="ignore"):
            return log1mexp(-u_e) - log1mexp(-u_s) - z + softplus(self.s_) - softplus(-self.e_)

    def _dlogs(self, t):
        z, u_s, u_e = self._parts(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            dla = self.k * (-1.0 / np.expm1(u_e) - sigmoid(z))
            dls = self.k * (1.0 / np.expm1(u_s) + sigmoid(-z))
        return dla, dls

    def d_log_snr_dt(self, t):
        dla, dls = self._dlogs(t)
        return dla - dls

    def dalpha_dt(self, t):
        return 0.5 * self.alpha(t) * self._dlogs(t)[0]

    def dsigma_dt(self, t):
        return 0.5 * self.sigma(t) * self._dlogs(t)[1]

    def t_of_log_snr(self, lam):
        # The closed form through logit(v_e - sigmoid(lam) (v_e - v_s)) cancels at both ends; bisect instead.
        return self._invert_by_bisection(self._lam(lam))[()]

    def __repr__(self):
        return f"Sigmoid(start={self.start}, end={self.end}, tau={self.tau})"


class LinearLogSNR(ContinuousSchedule):
    """VP family with log-SNR linear in t: lambda(t) = lam_max + (lam_min - lam_max) t (Kingma et al. 2021, VDM's
    fixed schedule with gamma = -lambda in [-13.3, 5]). alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda).

    Both ends have finite SNR, so the discrete-time ELBO and its continuous limit are defined over t in [0, 1].
    """

    def __init__(self, lam_max: float = 13.3, lam_min: float = -5.0):
        if not (np.isfinite(lam_max) and np.isfinite(lam_min) and lam_max > lam_min):
            raise ValueError(f"need finite lam_max > lam_min, got {lam_max}, {lam_min}")
        self.lam_max, self.lam_min = float(lam_max), float(lam_min)

    def log_snr(self, t):
        t = self._t(t)
        return self.lam_max + (self.lam_min - self.lam_max) * t

    def alpha(self, t):
        return np.exp(0.5 * log_sigmoid(self.log_snr(t)))

    def sigma(self, t):
        return np.exp(0.5 * log_sigmoid(-self.log_snr(t)))

    def d_log_snr_dt(self, t):
        return np.full_like(self._t(t), self.lam_min - self.lam_max)[()]

    def dalpha_dt(self, t):
        return self._vp_derivatives(t)[0]

    def dsigma_dt(self, t):
        return self._vp_derivatives(t)[1]

    def t_of_log_snr(self, lam):
        lam = self._lam(lam)
        return self._clip_domain((lam - self.lam_max) / (self.lam_min - self.lam_max), lam)[()]

    def __repr__(self):
        return f"LinearLogSNR(lam_max={self.lam_max}, lam_min={self.lam_min})"


class ShiftedVP(ContinuousSchedule):
    """A VP family with its log-SNR shifted by a constant: lambda'(t) = lambda(t) + shift (Hoogeboom et al. 2023, §3).

    alpha'^2 = sigmoid(lambda + shift) is formed from the base's alpha, sigma as
    alpha^2 / (alpha^2 + sigma^2 e^-shift), which avoids passing through lambda (and its rounding).
    """

    def __init__(self, base: ContinuousSchedule, shift: float):
        if not base.variance_preserving:
            raise ValueError(f"ShiftedVP needs a variance-preserving base, got {base!r}")
        if not np.isfinite(shift):
            raise ValueError(f"shift must be finite, got {shift}")
        self.base, self.shift = base, float(shift)
        self.t_min, self.t_max = base.t_min, base.t_max
        self._q = np.exp(-self.shift)

    def _den(self, t):
        a, s = self.base.alpha(t), self.base.sigma(t)
        return a, s, np.sqrt(a * a + s * s * self._q)

    def alpha(self, t):
        a, _, d = self._den(t)
        return a / d

    def sigma(self, t):
        _, s, d = self._den(t)
        return s * np.sqrt(self._q) / d

    def log_snr(self, t):
        return self.base.log_snr(t) + self.shift

    def d_log_snr_dt(self, t):
        return self.base.d_log_snr_dt(t)

    def dalpha_dt(self, t):
        return self._vp_derivatives(t)[0]

    def dsigma_dt(self, t):
        return self._vp_derivatives(t)[1]

    def t_of_log_snr(self, lam):
        return self.base.t_of_log_snr(self._lam(lam) - self.shift)

    def __repr__(self):
        return f"ShiftedVP({self.base!r}, shift={self.shift})"


class VE(ContinuousSchedule):
    """Variance-exploding schedule sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1 (Song et al. 2021, Eq. 30)."""

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0.0 < sigma_min < sigma_max < np.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_ratio = np.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return np.ones_like(self._t(t))[()]

    def sigma(self, t):
        # pow of the once-rounded ratio: relative error ~(t/2 + 2) ulp, where exp(t log ratio) costs ~|t log ratio| ulp
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** self._t(t)

    def log_snr(self, t):
        # -2 log sigma: log(sigma_min) + t log(ratio) would cancel where lambda crosses 0
        return -2.0 * np.log(self.sigma(t))

    def d_log_snr_dt(self, t):
        return np.full_like(self._t(t), -2.0 * self.log_ratio)[()]

    def dalpha_dt(self, t):
        return np.zeros_like(self._t(t))[()]

    def dsigma_dt(self, t):
        return self.sigma(t) * self.log_ratio

    def t_of_log_snr(self, lam):
        lam = self._lam(lam)
        t = (-0.5 * lam - np.log(self.sigma_min)) / self.log_ratio
        return self._clip_domain(t, lam)[()]

    def __repr__(self):
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDM(ContinuousSchedule):
    """EDM's schedule sigma(t) = t, alpha = 1 (Karras et al. 2022, §4). Time is the noise level, t in [0, inf)."""

    variance_preserving = False
    t_max = np.inf

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (0.0 < sigma_min < sigma_max < np.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha(self, t):
        return np.ones_like(self._t(t))[()]

    def sigma(self, t):
        return self._t(t)[()]

    def log_snr(self, t):
        with np.errstate(divide="ignore"):
            return -2.0 * np.log(self._t(t))

    def d_log_snr_dt(self, t):
        with np.errstate(divide="ignore"):
            return -2.0 / self._t(t)

    def dalpha_dt(self, t):
        return np.zeros_like(self._t(t))[()]

    def dsigma_dt(self, t):
        return np.ones_like(self._t(t))[()]

    def t_of_log_snr(self, lam):
        return np.exp(-0.5 * self._lam(lam))[()]

    def __repr__(self):
        return f"EDM(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class RectifiedFlow(ContinuousSchedule):
    """Rectified flow x_t = (1 - t') x_0 + t' eps with the time shift t' = s t / (1 + (s - 1) t)
    (Liu et al. 2022; Esser et al. 2024, Eq. 23 — SD3 / Flux ``shift``).

    alpha = (1 - t) / (1 + (s - 1) t), sigma = s t / (1 + (s - 1) t), log_snr = 2 (log1p(-t) - log t - log s):
    the shift is exactly a log-SNR shift by -2 log s. Inverse t = sigmoid(-lambda / 2 - log s).
    """

    variance_preserving = False

    def __init__(self, shift: float = 1.0):
        if not (0.0 < shift < np.inf):
            raise ValueError(f"shift must be positive and finite, got {shift}")
        self.shift = float(shift)
        self.log_shift = np.log(self.shift)

    def _den(self, t):
        t = self._t(t)
        return t, 1.0 + (self.shift - 1.0) * t

    def alpha(self, t):
        t, d = self._den(t)
        return (1.0 - t) / d

    def sigma(self, t):
        t, d = self._den(t)
        return self.shift * t / d

    def log_snr(self, t):
        t = self._t(t)
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log1p(-t) - np.log(t) - self.log_shift)

    def d_log_snr_dt(self, t):
        t = self._t(t)
        with np.errstate(divide="ignore"):
            return -2.0 / (t * (1.0 - t))

    def dsigma_dt(self, t):
        _, d = self._den(t)
        return self.shift / (d * d)

    def dalpha_dt(self, t):
        return -self.dsigma_dt(t)

    def t_of_log_snr(self, lam):
        return sigmoid(-0.5 * self._lam(lam) - self.log_shift)[()]

    def __repr__(self):
        return f"RectifiedFlow(shift={self.shift})"


def shift_log_snr(schedule: ContinuousSchedule, shift: float) -> ContinuousSchedule:
    """The same family with log_snr(t) + shift: ShiftedVP for VP families; for rectified flow the shift
    is the SD3 time shift s' = s e^{-shift/2} (exactly a log-SNR shift, see ``RectifiedFlow``)."""
    if isinstance(schedule, RectifiedFlow):
        return RectifiedFlow(schedule.shift * np.exp(-0.5 * shift))
    if schedule.variance_preserving:
        return ShiftedVP(schedule, shift)
    raise ValueError(f"no log-SNR shift defined for {schedule!r}: rescale sigma_min / sigma_max instead")


def resolution_shift(base_resolution: float, resolution: float) -> float:
    """Log-SNR shift 2 log(base / resolution) for training / sampling at a new resolution (Hoogeboom et al. 2023, Eq. 4)."""
    if not (base_resolution > 0 and resolution > 0):
        raise ValueError(f"resolutions must be positive, got {base_resolution}, {resolution}")
    return 2.0 * float(np.log(base_resolution / resolution))


# ------------------------------------------------------------------------------------------------
# time grids
# ------------------------------------------------------------------------------------------------

SPACINGS = ("linspace", "leading", "trailing")
SPACING_FAMILIES = ("ddim", "dpmsolver")


def timesteps(T: int, n: int, spacing: str = "leading", steps_offset: int = 0, family: str = "ddim") -> np.ndarray:
    """Integer sampling timesteps (descending) as diffusers builds them, shape (n,), int64.

    spacing: ``linspace`` | ``leading`` | ``trailing`` (Lin et al. 2023, Table 2). ``family`` selects which of
    diffusers' two conventions: ``ddim`` (DDIM / DDPM / PNDM / LCM: linspace includes t = 0) or ``dpmsolver``
    (DPM-Solver / UniPC / DEIS: n + 1 points with the last dropped, so t = 0 is excluded).
    """
    T = positive_int(T, "T")
    n = positive_int(n, "n (number of sampling steps)")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if family not in SPACING_FAMILIES:
        raise ValueError(f"family must be one of {SPACING_FAMILIES}, got {family!r}")
    if n > T:
        raise ValueError(f"n = {n} sampling steps exceed the T = {T} training steps")
    steps_offset = positive_int(steps_offset, "steps_offset", minimum=0)
    m = n if family == "ddim" else n + 1
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(m) * (T // m)).round()[::-1] + steps_offset
    else:
        ts = np.round(T - np.arange(n) * (T / n)) - 1          # = np.arange(T, 0, -T/n) with its length fixed
    ts = ts[:n].astype(np.int64)
    if ts.max() >= T:
        raise ValueError(f"steps_offset = {steps_offset} pushes a timestep to {ts.max()} >= T = {T}")
    return validate_grid(ts, name="timesteps")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, append_zero: bool = False):
    """Karras et al. (2022), Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    Descending, shape (n,) (n + 1 with a final 0 when ``append_zero``); n = 1 gives [sigma_max].
    """
    n = positive_int(n, "n")
    _check_sigma_range(sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return validate_grid(np.append(sig, 0.0) if append_zero else sig, name="sigmas")


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float, append_zero: bool = False):
    """Log-uniform sigmas from sigma_max down to sigma_min (k-diffusion ``get_sigmas_exponential``), shape (n,)."""
    n = positive_int(n, "n")
    _check_sigma_range(sigma_min, sigma_max)
    sig = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)) if n > 1 else np.array([sigma_max])
    return validate_grid(np.append(sig, 0.0) if append_zero else sig, name="sigmas")


def log_snr_uniform_times(schedule: ContinuousSchedule, n: int, t_start: float = 1.0, t_end: float = 1e-3):
    """n + 1 times from t_start down to t_end, uniform in log-SNR (DPM-Solver ``skip_type='logSNR'``, Lu et al. 2022, §3.3)."""
    n = positive_int(n, "n")
    lam = np.linspace(schedule.log_snr(t_start), schedule.log_snr(t_end), n + 1)
    if not np.all(np.isfinite(lam)):
        raise ValueError("log-SNR is infinite at an end point: choose t_start / t_end inside the domain")
    t = schedule.t_of_log_snr(lam)
    t[0], t[-1] = t_start, t_end
    return validate_grid(t, name="times")


def time_uniform(n: int, t_start: float = 1.0, t_end: float = 1e-3):
    """n + 1 times uniform from t_start down to t_end (DPM-Solver ``time_uniform``)."""
    n = positive_int(n, "n")
    _check_times(t_start, t_end)
    return validate_grid(np.linspace(t_start, t_end, n + 1), name="times")


def time_quadratic(n: int, t_start: float = 1.0, t_end: float = 1e-3):
    """n + 1 times uniform in sqrt(t) (DPM-Solver ``time_quadratic``: linspace(sqrt(t_T), sqrt(t_0), n+1)^2)."""
    n = positive_int(n, "n")
    _check_times(t_start, t_end)
    t = np.linspace(np.sqrt(t_start), np.sqrt(t_end), n + 1) ** 2
    t[0], t[-1] = t_start, t_end
    return validate_grid(t, name="times")


def _check_sigma_range(sigma_min, sigma_max):
    if not (0.0 < sigma_min < sigma_max < np.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")


def _check_times(t_start, t_end):
    if not (np.isfinite(t_start) and np.isfinite(t_end) and t_start > t_end >= 0.0):
        raise ValueError(f"need t_start > t_end >= 0 (sampling runs backwards), got {t_start}, {t_end}")


def validate_grid(grid, *, name: str = "grid", increasing: bool = False) -> np.ndarray:
    """Check a sampling grid: 1-D, at least one entry, no NaN, strictly monotone (no duplicates).

    Descending by default (sampling runs from noise to data); ``increasing=True`` for inversion grids.
    """
    g = np.asarray(grid)
    if g.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {g.shape}")
    if g.size == 0:
        raise ValueError(f"{name} is empty (0 steps)")
    if np.issubdtype(g.dtype, np.floating) and np.any(np.isnan(g)):
        raise ValueError(f"{name} contains NaN")
    d = np.diff(g.astype(np.float64))
    bad = np.flatnonzero(d <= 0) if increasing else np.flatnonzero(d >= 0)
    if bad.size:
        k = int(bad[0])
        kind = "duplicate" if d[k] == 0 else "non-monotone"
        raise ValueError(f"{name} must be strictly {'increasing' if increasing else 'decreasing'}: "
                         f"{kind} entries at {k}, {k + 1} ({g[k]!r}, {g[k + 1]!r})")
    return g
