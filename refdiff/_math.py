"""Cancellation-free elementary functions used throughout the reference (DESIGN.md §2).

softplus(x) = log(1 + e^x), log_sigmoid(x) = -softplus(-x), log1mexp(x) = log(1 - e^x) for x <= 0.
"""

from __future__ import annotations

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


SERIES_SWITCH = 0.5      # below |x| = 0.5 the Taylor tail converges to eps within SERIES_TERMS terms
SERIES_TERMS = 20


def exp_remainder(x, k: int):
    """R_k(x) = e^x - sum_{j<k} x^j / j! (the phi-function numerators of exponential integrators; DPM-Solver's
    e^{-h} - 1, e^{-h} - 1 + h, ...). A Taylor series for |x| < 0.5 (the direct form loses ~k log10(1/|x|) digits),
    the direct form beyond. k = 1 is expm1. Infinite x follows the limit (R_k(-inf) = -inf for k >= 2 ...)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < SERIES_SWITCH
    xs = np.where(small, x, 0.0)
    fact = float(np.prod(np.arange(1, k + 1)))
    term = xs ** k / fact
    acc = np.zeros_like(xs)
    for j in range(k + 1, k + 1 + SERIES_TERMS):
        acc = acc + term
        term = term * xs / j
    with np.errstate(over="ignore", invalid="ignore"):
        direct = np.expm1(x)
        power, f = np.ones_like(x), 1.0
        for j in range(1, k):
            power = power * x
            f *= j
            direct = direct - power / f
    out = np.where(small, acc, direct)
    return out[()] if out.ndim == 0 else out


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
