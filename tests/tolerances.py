"""Tolerances used by the tests, each derived once here."""

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

# Schedules vs 50-digit mpmath (issue acceptance, DESIGN.md §4).
MAX_SCHEDULE_ULP = 8

# Round trip t -> log_snr -> t, in units of ulp(t) + eps |lambda / lambda'| (see selfcheck.roundtrip_errors).
ROUNDTRIP_UNITS = 4.0

# Convention round trips: each direction is one or two roundings, so 1e-15 relative (~4.5 eps) holds.
CONVENTION_RTOL = 1e-15


def float32_cumprod_bound(n: int) -> float:
    """Relative error bound of a float32 cumulative product of n factors (1 - beta_i), each factor rounded once
    (1/2 eps32) and each product rounded once (1/2 eps32): (n + n) / 2 eps32 = n eps32, to first order."""
    return n * EPS32


def fd_tolerance(h: float, third_derivative: float, f_scale: float) -> float:
    """Error bound of a central difference (f(x+h) - f(x-h)) / 2h: truncation h^2 |f'''| / 6 plus rounding
    eps |f| / h (two evaluations, each with ~eps |f| absolute error, divided by 2h)."""
    return h * h * third_derivative / 6.0 + EPS64 * f_scale / h


# -- kernels: the flash-attention rule (DESIGN.md §4) ------------------------------------------------------

KERNEL_RULE_FACTOR = 2.0      # |kernel - ref64| <= 2 |naive same-dtype - ref64| + floor (3 for gradients)
KERNEL_FLOOR_ULPS = 2         # floor: 2 ulp of the storage dtype at the reference's magnitude


def dtype_ulp(values, torch_dtype):
    """Spacing of the storage dtype at |values| (float64 array): 2^floor(log2 |v|) * eps_dtype, with |v| clamped
    to the dtype's smallest normal."""
    import torch

    fi = torch.finfo(torch_dtype)
    mag = np.maximum(np.abs(values), fi.tiny)
    return np.exp2(np.floor(np.log2(mag))) * fi.eps


def kernel_rule_violation(kernel, naive, ref64, torch_dtype, factor: float = KERNEL_RULE_FACTOR,
                          floor_scale: float | None = None, extra_floor: float = 0.0) -> float:
    """max|kernel - ref| / (2 max|naive - ref| + 2 ulp(max|ref|)): the flash-attention rule on the whole tensor
    (FlashAttention's tests compare maxima; elementwise, a baseline that happens to be exact at one element would
    fail a kernel that is as accurate as it everywhere). <= 1 means the rule holds. NaN in the kernel output where
    the reference is finite counts as a violation (outputs are never left unwritten). ``floor_scale`` sets the
    magnitude of the 2-ulp floor when the result is a cancellation of larger terms (gradients); ``extra_floor`` adds
    an absolute term for errors the kernel inherits from its own fp32 intermediates (attention logits)."""
    k = kernel.detach().double().cpu().numpy()
    n = naive.detach().double().cpu().numpy()
    if k.size == 0:
        return 0.0
    if np.any(np.isnan(k) & np.isfinite(ref64)):
        return np.inf
    scale = float(np.max(np.abs(ref64))) if floor_scale is None else float(floor_scale)
    bound = (factor * np.max(np.abs(n - ref64)) + KERNEL_FLOOR_ULPS * float(dtype_ulp(scale, torch_dtype))
             + extra_floor)
    return float(np.max(np.abs(k - ref64)) / bound)
