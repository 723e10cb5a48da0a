"""refdiff._math and the compensated sums: direct tests against mpmath, with both sides of every switch point
(scipy's test_mpmath style: one line states function, high-precision formula and domain)."""

import math
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest

from refdiff._math import LN2, SERIES_SWITCH, exp_remainder, log1mexp, log_sigmoid, softplus, two_prod, two_sum
from refdiff._validate import compensated_cumsum

# exp_remainder's bound: the series branch forms x^k / k! in double-double and S = 1 + x/(k+1)(...) by Horner with
# |x / (k+1)| <= 1/6, so S carries <= u + (1/6)(3u) / (1 - 1/6) = 1.6u, and the two products of the final rounding
# add 1u: 2.6u < 3 ulp. The direct branch is exact to ~2^-74 before a cancellation of at most ~2^10 and one final
# rounding: < 1 ulp. (Measured 1.7; the README promises 4.)
EXP_REMAINDER_ULPS = 3
# log1mexp: expm1 / exp within 1 ulp, one log or log1p (0.5 ulp) whose argument's relative error becomes an
# absolute one, divided by |log1mexp| >= ln 2 / ... on the near branch (x > -ln 2, |result| >= 0.37): < 2 ulp
LOG1MEXP_ULPS = 2
# softplus / log_sigmoid are numpy's logaddexp and scipy's log_expit: documented within 1 ulp; measured 0.9
SOFTPLUS_ULPS = 1


def ulps(got, exact) -> float:
    """|got - exact| in units of the last place of exact rounded to float64."""
    ef = float(exact)
    return float(abs(mp.mpf(float(got)) - exact)) / float(np.spacing(abs(ef)))


def _r_exact(x: float, k: int):
    with mp.workdps(60):
        xm = mp.mpf(x)
        return mp.exp(xm) - mp.fsum(xm ** j / mp.factorial(j) for j in range(k))


SWITCH = [SERIES_SWITCH, np.nextafter(SERIES_SWITCH, 0), np.nextafter(SERIES_SWITCH, 1)]
MAGNITUDES = np.concatenate([np.geomspace(1e-8, 50.0, 400), SWITCH, [1.0, 2.0, 5.0, 10.0]])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["x>0", "x<0"])
def test_exp_remainder_is_within_a_few_ulp_of_mpmath(k, sign):
    xs = sign * MAGNITUDES
    got = exp_remainder(xs, k)
    worst = max(ulps(g, _r_exact(float(x), k)) for g, x in zip(got, xs))
    assert worst <= EXP_REMAINDER_ULPS


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["x>0", "x<0"])
def test_exp_remainder_has_no_jump_at_the_series_switch(k, sign):
    """The last series point and the first direct point are both accurate (scipy's loggamma transition test)."""
    below, above = sign * np.nextafter(SERIES_SWITCH, 0), sign * SERIES_SWITCH
    for x in (below, above):
        assert ulps(exp_remainder(x, k), _r_exact(float(x), k)) <= EXP_REMAINDER_ULPS


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exp_remainder_scalar_and_array_paths_agree_bitwise(k):
    xs = np.concatenate([-MAGNITUDES, MAGNITUDES, [0.0, -0.0]])
    arr = exp_remainder(xs, k)
    for x, a in zip(xs, arr):
        assert exp_remainder(float(x), k) == a


@pytest.mark.parametrize("k, at_minus_inf", [(1, -1.0), (2, np.inf), (3, -np.inf), (4, np.inf)])
def test_exp_remainder_limits(k, at_minus_inf):
    """R_k(+inf) = inf; R_k(-inf) is the polynomial's limit -x^(k-1)/(k-1)! (k >= 2), -1 for expm1; e^x overflowing
    at x = 710 gives inf, not a NaN from inf - inf."""
    assert exp_remainder(np.inf, k) == np.inf
    assert exp_remainder(-np.inf, k) == at_minus_inf
    assert exp_remainder(710.0, k) == np.inf
    np.testing.assert_array_equal(exp_remainder(np.array([np.inf, -np.inf, np.nan]), k), [np.inf, at_minus_inf, np.nan])


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_exp_remainder_refuses_a_bad_order(k):
    with pytest.raises(ValueError, match="integer >= 1"):
        exp_remainder(0.1, k)


def test_log1mexp_is_within_a_few_ulp_on_both_branches():
    xs = np.concatenate([-np.geomspace(1e-300, 745.0, 500), [-LN2, np.nextafter(-LN2, 0), np.nextafter(-LN2, -1)]])
    got = log1mexp(xs)
    worst = 0.0
    for g, x in zip(got, xs):
        with mp.workdps(int(-x / 2.3) + 40):             # 1 - e^x keeps e^x's digits only at this precision
            worst = max(worst, ulps(g, mp.log(-mp.expm1(mp.mpf(float(x))))))
    assert worst <= LOG1MEXP_ULPS
    assert log1mexp(0.0) == -np.inf


@pytest.mark.parametrize("fn, exact", [(softplus, lambda x: mp.log1p(mp.exp(x))),
                                       (log_sigmoid, lambda x: -mp.log1p(mp.exp(-x)))], ids=["softplus", "log_sigmoid"])
def test_softplus_and_log_sigmoid_in_both_tails(fn, exact):
    xs = np.linspace(-700.0, 700.0, 701)
    with mp.workdps(50):
        worst = max(ulps(g, exact(mp.mpf(float(x)))) for g, x in zip(fn(xs), xs) if exact(mp.mpf(float(x))) != 0)
    assert worst <= SOFTPLUS_ULPS


def test_two_sum_and_two_prod_are_exact():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200) * np.exp2(rng.integers(-60, 60, 200))
    b = rng.standard_normal(200) * np.exp2(rng.integers(-60, 60, 200))
    s, e = two_sum(a, b)
    p, f = two_prod(a, b)
    for i in range(200):
        assert Fraction(s[i]) + Fraction(e[i]) == Fraction(a[i]) + Fraction(b[i])
        assert Fraction(p[i]) + Fraction(f[i]) == Fraction(a[i]) * Fraction(b[i])


def test_compensated_cumsum_is_the_rounded_exact_prefix():
    """Within 1 ulp of math.fsum of every prefix, where a plain cumsum of 1000 log1p terms drifts by tens of ulp."""
    x = np.log1p(-np.linspace(1e-4, 2e-2, 1000))
    got = compensated_cumsum(x)
    exact = [math.fsum(x[:n + 1]) for n in range(len(x))]
    assert np.max(np.abs(got - exact) / np.spacing(np.abs(exact))) <= 1.0
