"""Argument checks shared by the reference (README, "Bad input"): clear errors before any compute.

Every public function converts its inputs here, so the rules (float64, finite where required, shapes named
in the message) are written once.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "as_f64",
    "as_index",
    "broadcast_rows",
    "check_same_shape",
    "positive_int",
    "compensated_cumsum",
]


def as_f64(x, name: str, *, ndim: int | None = None, finite: bool = False) -> np.ndarray:
    """Return ``x`` as a float64 array; reject object / complex input and, if asked, non-finite values."""
    try:
        arr = np.asarray(x)
    except ValueError as exc:                       # ragged nested sequences
        raise ValueError(f"{name} must be a real numeric array: {exc}") from None
    if arr.dtype.kind not in "iuf":                  # object, complex, string, bool, datetime ...
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int(np.count_nonzero(~np.isfinite(arr)))} non-finite value(s)")
    return arr


def positive_int(n, name: str, *, minimum: int = 1) -> int:
    """Return ``n`` as an int >= ``minimum``; reject bools, floats with a fraction and smaller values."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {n!r}")
    n = int(n)
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def as_index(i, size: int, name: str = "index") -> np.ndarray:
    """Integer index (scalar or array) into a table of ``size`` entries; negative or out-of-range -> ValueError."""
    arr = np.asarray(i)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= size):
        raise ValueError(f"{name} must lie in [0, {size - 1}], got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def broadcast_rows(coef, x: np.ndarray, name: str) -> np.ndarray:
    """Shape a scalar or per-row (B,) coefficient so it broadcasts against ``x`` of shape (B, ...).

    A per-row vector must have exactly B entries; anything else is a ValueError naming both shapes.
    """
    c = as_f64(coef, name)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or x.ndim == 0 or c.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0] if x.ndim else '?'},) to match "
                         f"x of shape {x.shape}, got shape {c.shape}")
    return c.reshape((c.shape[0],) + (1,) * (x.ndim - 1))


def compensated_cumsum(x: np.ndarray) -> np.ndarray:
    """Cumulative sum along the last axis with Neumaier compensation.

    A plain ``np.cumsum`` of n terms carries up to (n - 1) eps relative error in each prefix (15-25 ulp
    at n = 1000 in alphas_cumprod); the compensated running sum is within ~1 ulp of the exact prefix.
    The loop runs over the time axis only (length T), vectorised over any leading axes.
    Non-finite terms (e.g. log1p(-1) = -inf at zero terminal SNR) give the plain IEEE prefix from there on.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    s = np.zeros(x.shape[:-1])
    c = np.zeros(x.shape[:-1])
    with np.errstate(invalid="ignore"):
        for k in range(x.shape[-1]):
            v = x[..., k]
            t = s + v
            # Neumaier: recover the low-order bits lost in s + v from whichever operand is larger.
            big = np.abs(s) >= np.abs(v)
            c = c + np.where(big, (s - t) + v, (v - t) + s)
            s = t
            out[..., k] = s + c
    plain = np.cumsum(x, axis=-1)
    return np.where(np.isfinite(plain), out, plain)
