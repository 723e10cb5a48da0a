"""Cancellation-free elementary functions used throughout the reference (README, "Conventions").

softplus(x) = log(1 + e^x), log_sigmoid(x) = -softplus(-x), log1mexp(x) = log(1 - e^x) for x <= 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit, log_expit

__all__ = ["softplus", "log_sigmoid", "sigmoid", "log1mexp", "exp_remainder", "two_sum", "two_prod", "LN2"]

LN2 = float(np.log(2.0))
VELTKAMP = 134217729.0    # 2^27 + 1: splits a float64 into two 26-bit halves (Dekker 1971)


def softplus(x):
    """log(1 + e^x) without overflow for large x or cancellation for very negative x."""
    return np.logaddexp(0.0, x)


def log_sigmoid(x):
    """log(1 / (1 + e^-x)), accurate in both tails."""
    return log_expit(x)


def sigmoid(x):
    return expit(x)


def log1mexp(x):
    """log(1 - e^x) for x <= 0 (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) in the tail.

    The switch at -ln 2 keeps both branches within a few ulp. log1mexp(0) = -inf.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        near = np.log(-np.expm1(np.minimum(x, 0.0)))
        far = np.log1p(-np.exp(np.minimum(x, -LN2)))
    out = np.where(x > -LN2, near, far)
    return out[()] if out.ndim == 0 else out


SERIES_SWITCH = 0.5      # below |x| = 0.5 the float64 Taylor tail is within 3 ulp (terms shrink by >= 4x each)
SERIES_TERMS = 20        # 0.5^20 / 20! < 2^-120: the tail is below eps for every k
LN2_HI = 6.93147180369123816490e-01    # ln 2 with the low 32 bits zero: n * LN2_HI is exact for |n| < 2^20
LN2_LO = 1.90821492927058770002e-10    # ln 2 - LN2_HI (Cody & Waite 1980)
EXP_DD_TERMS = 17        # |r| <= ln2 / 2: r^17 / 17! < 2^-74, so e^r is exact to ~2^-74 (the cancellation costs < 2^10)


def exp_remainder(x, k: int):
    """R_k(x) = e^x - sum_{j<k} x^j / j! (the phi-function numerators of exponential integrators; DPM-Solver's
    e^{-h} - 1, e^{-h} - 1 + h, ...), within 2 ulp for k = 1..4 (tests/test_math.py, against mpmath).

    k = 1 is expm1. For |x| < 0.5 the Taylor tail sum_{j>=k} x^j / j! (the direct form loses ~k log10(1/|x|)
    digits there). Beyond, the direct form in double-double arithmetic: e^x to ~2^-75 (Cody-Waite reduction and a
    double-double Taylor series), minus the polynomial, rounded once. The cancellation e^x / |R_k(x)| is at most
    ~600 for |x| >= 0.5 (k = 4 at x = 0.5), far inside the double-double's precision. Infinite x follows the limit:
    R_k(+inf) = inf, R_1(-inf) = -1, R_k(-inf) = (-1)^k inf for k >= 2.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    x = np.asarray(x, dtype=np.float64)
    if k == 1:
        with np.errstate(over="ignore"):              # e^x past ~709.78 overflows to inf, as R_1 does
            out = np.expm1(x)
        return out[()] if out.ndim == 0 else out
    if x.ndim == 0:
        # the same operations on a Python float: the steps' scalar coefficients, ~50x faster than 0-d arrays
        v = float(x)
        if math.isinf(v):
            return np.float64(np.inf if v > 0 or k % 2 == 0 else -np.inf)
        if math.isnan(v):
            return np.float64(np.nan)
        return np.float64(_series(v, k) if abs(v) < SERIES_SWITCH else _direct_dd(v, k))
    out = np.full(x.shape, np.nan)
    small = np.abs(x) < SERIES_SWITCH
    if np.any(small):
        out[small] = _series(x[small], k)
    big = np.isfinite(x) & ~small
    if np.any(big):
        out[big] = _direct_dd(x[big], k)
    out[np.isposinf(x)] = np.inf
    out[np.isneginf(x)] = np.inf if k % 2 == 0 else -np.inf
    return out


def _series(x, k: int):
    """x^k / k! * S(x), S = sum_{j>=0} x^j k! / (k + j)! = 1 + x/(k+1) (1 + x/(k+2) (1 + ...)) for |x| < 0.5.

    x^k / k! is formed in double-double (its k roundings would otherwise add up to ~2 ulp); S by Horner in float64
    (|x / (k + 1)| <= 1/6, so S's rounding errors are damped) and the product rounded once. x: float or array."""
    S = 1.0
    for j in range(k + SERIES_TERMS, k, -1):
        S = 1.0 + S * (x / j)
    p_hi, p_lo = x, 0.0
    for _ in range(k - 1):
        p_hi, p_lo = _dd_mul(p_hi, p_lo, x, 0.0)
    p_hi, p_lo = _dd_div_int(p_hi, p_lo, math.factorial(k))
    return p_hi * S + p_lo * S


def _direct_dd(x, k: int):
    """e^x - sum_{j<k} x^j / j! in double-double (hi, lo pairs), rounded once; |x| >= 0.5 and finite; x: float or
    array (only operators, so the same code serves both)."""
    scalar = isinstance(x, float)
    n = float(round(x / LN2)) if scalar else np.rint(x / LN2)
    # r = x - n ln 2 in double-double: n LN2_HI is exact, the rest carries the rounding
    r_hi, r_lo = two_sum(x - n * LN2_HI, -n * LN2_LO)
    # e^r = sum_j r^j / j! (Horner from the tail, double-double)
    e_hi, e_lo = 1.0, 0.0
    for j in range(EXP_DD_TERMS, 0, -1):
        e_hi, e_lo = _dd_mul(e_hi, e_lo, r_hi, r_lo)
        e_hi, e_lo = _dd_div_int(e_hi, e_lo, j)
        e_hi, e_lo = _dd_add(e_hi, e_lo, 1.0, 0.0)
    # the polynomial sum_{j<k} x^j / j! by Horner in double-double: 1 + x (1 + x/2 (1 + x/3 ...))
    p_hi, p_lo = 1.0, 0.0
    for j in range(k - 1, 0, -1):
        p_hi, p_lo = _dd_mul(p_hi, p_lo, x, 0.0)
        p_hi, p_lo = _dd_div_int(p_hi, p_lo, j)
        p_hi, p_lo = _dd_add(p_hi, p_lo, 1.0, 0.0)
    # scale e^r by 2^n in two halves, so that 2^n itself cannot overflow before the product does
    n1 = n // 2
    if scalar:
        try:
            e_hi = math.ldexp(math.ldexp(e_hi, int(n1)), int(n - n1))
        except OverflowError:                          # e^x overflows (x > ~709.78): so does R_k(x)
            return math.inf
        e_lo = math.ldexp(math.ldexp(e_lo, int(n1)), int(n - n1))
        hi, lo = _dd_add(e_hi, e_lo, -p_hi, -p_lo)
        return hi + lo
    with np.errstate(over="ignore", invalid="ignore"):
        e_hi = np.ldexp(np.ldexp(e_hi, n1.astype(np.int64)), (n - n1).astype(np.int64))
        e_lo = np.ldexp(np.ldexp(e_lo, n1.astype(np.int64)), (n - n1).astype(np.int64))
        hi, lo = _dd_add(e_hi, e_lo, -p_hi, -p_lo)
        return np.where(np.isposinf(e_hi), np.inf, hi + lo)


def _dd_add(a_hi, a_lo, b_hi, b_lo):
    s, e = two_sum(a_hi, b_hi)
    e = e + (a_lo + b_lo)
    return _fast_two_sum(s, e)


def _dd_mul(a_hi, a_lo, b_hi, b_lo):
    p, e = two_prod(a_hi, b_hi)
    e = e + (a_hi * b_lo + a_lo * b_hi)
    return _fast_two_sum(p, e)


def _dd_div_int(a_hi, a_lo, j: int):
    """(a_hi + a_lo) / j for a small positive integer j: one long-division correction step."""
    q = a_hi / j
    p, e = two_prod(q, float(j))
    r = ((a_hi - p) - e + a_lo) / j
    return _fast_two_sum(q, r)


def _fast_two_sum(a, b):
    """a + b = s + e exactly when |a| >= |b| (Dekker's Fast2Sum)."""
    s = a + b
    return s, b - (s - a)


def two_sum(a, b):
    """a + b = s + e exactly (Knuth's TwoSum): s the rounded sum, e its rounding error."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a, b):
    """a * b = p + e exactly (Dekker's TwoProduct with Veltkamp splitting; no FMA needed)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _split(a):
    c = VELTKAMP * a
    hi = c - (c - a)
    return hi, a - hi
