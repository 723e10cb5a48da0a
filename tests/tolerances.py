"""Tolerances used by the tests, each derived once here."""

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

# Schedules vs 50-digit mpmath (README, "Tests and tolerances").
MAX_SCHEDULE_ULP = 8

# Round trip t -> log_snr -> t, in units of ulp(t) + eps |lambda / lambda'| (see selfcheck.roundtrip_errors).
ROUNDTRIP_UNITS = 4.0

# Monte-Carlo checks: fixed seeds, and a bound such that another seed fails with probability < 1e-6
# (refdiff.selfcheck.z_bound: Bonferroni over the comparisons a test makes; Student-t when the standard error is
# estimated from few draws).
from refdiff.selfcheck import FALSE_FAILURE, z_bound  # noqa: E402,F401

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


# -- kernels: the flash-attention rule (README, "Tests and tolerances"), one implementation in refdiff.check.rules ----------------

from refdiff.check.rules import (KERNEL_FLOOR_ULPS, KERNEL_RULE_FACTOR, dtype_ulp,  # noqa: E402,F401
                                 kernel_rule_violation)
