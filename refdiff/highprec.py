"""50-digit mpmath evaluations of the schedules, straight from the papers' textbook formulas.

These are the ground truth that the float64 forms in ``refdiff.schedules`` (rewritten to avoid
cancellation) are checked against, in the tests and in ``refdiff report``. At 50 digits the textbook
cancellations cost nothing. mpmath is imported lazily (it is a test / report dependency, not a base one).
"""

from __future__ import annotations

import numpy as np

from . import schedules as S

__all__ = ["DPS", "mp_family", "mp_alphas_cumprod", "mp_cosine_betas", "mp_rescale_zero_terminal_snr",
           "ulp_error"]

DPS = 50


def _mp():
    import mpmath

    mpmath.mp.dps = DPS
    return mpmath


def _map(f, t):
    """Evaluate ``f`` per element with DPS digits beyond the magnitude of t, so that textbook forms like
    1 - exp(-B(t)) or 1 - cos^2(pi t / 2) keep 50 significant digits even at t = 1e-300."""
    mp = _mp()
    t = np.asarray(t, dtype=np.float64)
    out = []
    for x in t.ravel():
        # 1 - alpha_bar(t) can be as small as t^2 (cosine with s = 0): twice the decades of t, plus a margin
        extra = 2 * int(-np.log10(abs(x))) + 10 if 0.0 < abs(x) < 1.0 else 0
        with mp.workdps(DPS + extra):
            out.append(float(f(float(x))))
    return np.array(out).reshape(t.shape)


def mp_family(schedule: S.ContinuousSchedule):
    """Return (alpha, sigma, log_snr) as float64 vectorised functions evaluated at 50 digits."""
    mp = _mp()
    mpf = mp.mpf

    if isinstance(schedule, (S.VE, S.EDM, S.RectifiedFlow)):
        return _mp_non_vp(schedule)
    ab = _mp_ab(schedule)

    def alpha(t):
        return mp.sqrt(ab(mpf(t)))

    def sigma(t):
        return mp.sqrt(1 - ab(mpf(t)))

    def log_snr(t):
        a2 = ab(mpf(t))
        if a2 == 0:
            return -mp.inf
        if a2 == 1:
            return mp.inf
        return mp.log(a2 / (1 - a2))

    return (lambda t: _map(alpha, t), lambda t: _map(sigma, t), lambda t: _map(log_snr, t))


def _mp_ab(schedule):
    """alpha_bar(t) of a VP schedule as an mpmath function, from the paper's definition."""
    mp = _mp()
    mpf = mp.mpf
    if isinstance(schedule, S.VPLinear):
        b0, b1 = mpf(schedule.beta_min), mpf(schedule.beta_max)
        return lambda t: mp.exp(-(b0 * t + (b1 - b0) * t * t / 2))
    if isinstance(schedule, S.Cosine):
        s = mpf(schedule.s)
        f = lambda u: mp.cospi((u + s) / (1 + s) / 2) ** 2  # noqa: E731  (cospi: exact zero at t = 1)
        return lambda t: f(t) / f(0)
    if isinstance(schedule, S.Sigmoid):
        st, en, tau = mpf(schedule.start), mpf(schedule.end), mpf(schedule.tau)
        sig = lambda x: 1 / (1 + mp.exp(-x))  # noqa: E731
        return lambda t: (sig(en / tau) - sig((t * (en - st) + st) / tau)) / (sig(en / tau) - sig(st / tau))
    if isinstance(schedule, S.LinearLogSNR):
        l0, l1 = mpf(schedule.lam_max), mpf(schedule.lam_min)
        return lambda t: 1 / (1 + mp.exp(-(l0 + (l1 - l0) * t)))
    if isinstance(schedule, S.ShiftedVP):
        inner, q = _mp_ab(schedule.base), mp.exp(-mpf(schedule.shift))
        return lambda t: inner(t) / (inner(t) + (1 - inner(t)) * q)      # sigmoid(lambda + shift)
    raise TypeError(f"no mpmath alpha_bar for {schedule!r}")


def _mp_non_vp(schedule):
    mp = _mp()
    mpf = mp.mpf
    if isinstance(schedule, S.VE):
        smin, smax = mpf(schedule.sigma_min), mpf(schedule.sigma_max)
        a = lambda t: mpf(1)  # noqa: E731
        s = lambda t: smin * (smax / smin) ** mpf(t)  # noqa: E731
    elif isinstance(schedule, S.EDM):
        a = lambda t: mpf(1)  # noqa: E731
        s = lambda t: mpf(t)  # noqa: E731
    else:
        sh = mpf(schedule.shift)
        tp = lambda t: sh * mpf(t) / (1 + (sh - 1) * mpf(t))  # noqa: E731
        a = lambda t: 1 - tp(t)  # noqa: E731
        s = tp

    def log_snr(t):
        al, si = a(t), s(t)
        if si == 0:
            return mp.inf
        if al == 0:
            return -mp.inf
        return 2 * mp.log(al / si)

    return (lambda t: _map(a, t), lambda t: _map(s, t), lambda t: _map(log_snr, t))


def mp_alphas_cumprod(betas) -> np.ndarray:
    """prod_{j<=i} (1 - beta_j) at 50 digits, rounded once to float64."""
    mp = _mp()
    out, acc = [], mp.mpf(1)
    for b in np.asarray(betas, dtype=np.float64):
        acc *= 1 - mp.mpf(float(b))
        out.append(float(acc))
    return np.array(out)


def mp_discrete(betas):
    """(alpha, sigma, log_snr) per index of a discrete schedule at 50 digits (textbook: sqrt(abar), sqrt(1 - abar))."""
    mp = _mp()
    acc = mp.mpf(1)
    a, s, l = [], [], []
    for b in np.asarray(betas, dtype=np.float64):
        acc *= 1 - mp.mpf(float(b))
        a.append(float(mp.sqrt(acc)))
        s.append(float(mp.sqrt(1 - acc)))
        l.append(float(mp.log(acc / (1 - acc))) if acc > 0 else -np.inf)
    return np.array(a), np.array(s), np.array(l)


def mp_cosine_betas(T: int, s: float = S.COSINE_S, max_beta: float = S.COSINE_MAX_BETA) -> np.ndarray:
    """iDDPM Eq. 17 as written: min(1 - abar((i+1)/T) / abar(i/T), max_beta), at 50 digits."""
    mp = _mp()
    sm = mp.mpf(s)
    f = lambda t: mp.cospi((t + sm) / (1 + sm) / 2) ** 2  # noqa: E731
    return np.array([float(min(1 - f(mp.mpf(i + 1) / T) / f(mp.mpf(i) / T), mp.mpf(max_beta))) for i in range(T)])


def mp_rescale_zero_terminal_snr(betas) -> np.ndarray:
    """Lin et al. 2023, Alg. 1 as written (shift and scale sqrt(alpha_bar)), at 50 digits."""
    mp = _mp()
    acc = mp.mpf(1)
    sq = []
    for b in np.asarray(betas, dtype=np.float64):
        acc *= 1 - mp.mpf(float(b))
        sq.append(mp.sqrt(acc))
    s0, sT = sq[0], sq[-1]
    sq = [(x - sT) * s0 / (s0 - sT) for x in sq]
    ab = [x * x for x in sq]
    out = [1 - ab[0]] + [1 - ab[i] / ab[i - 1] for i in range(1, len(ab))]
    return np.array([float(x) for x in out])


def ulp_error(x, ref, floor: float = 0.0) -> np.ndarray:
    """|x - ref| in units of the spacing of max(|ref|, floor); equal infinities count as 0.

    ``floor`` is the absolute scale below which relative accuracy is not attainable: a quantity formed as
    a difference of O(floor) terms (a log near 1, say) has absolute error ~eps * floor, however small it is.
    """
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    same = (x == ref) | (np.isnan(x) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        err = np.abs(x - ref) / np.spacing(np.maximum(np.abs(ref), floor))
    return np.where(same, 0.0, np.where(np.isfinite(err), err, np.inf))
