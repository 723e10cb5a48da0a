"""refdiff.conventions: every converter round-trips to 1e-15 relative."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import conventions as V
from bad_inputs import bad, refused
from tolerances import CONVENTION_RTOL, EPS64


@pytest.mark.parametrize("T", [1, 10, 1000, 4096])
def test_index_time_round_trip(T):
    i = np.arange(T)
    np.testing.assert_array_equal(V.t_to_index(V.index_to_t(i, T), T), i)
    assert V.index_to_t(T - 1, T) == 1.0 and V.index_to_t(0, T) == 1.0 / T


@given(lam=st.floats(-50, 50, allow_subnormal=False))
def test_log_snr_conventions_round_trip(lam):
    assert V.dpm_lambda_to_log_snr(V.log_snr_to_dpm_lambda(lam)) == lam         # halving is exact
    assert V.vdm_gamma_to_log_snr(V.log_snr_to_vdm_gamma(lam)) == lam


# alpha = 1 / hypot(1, s) and sigma = s / hypot(1, s) each carry <= 1 ulp (hypot) + 0.5 ulp (division) = 3u; their
# squares 2 x 3u + u and the sum u: |alpha^2 + sigma^2 - 1| <= 8u = 4 eps. (Measured 2 eps at s ~ 1e-4, which an
# earlier bound of 4e-16 < 2 eps failed once in a few thousand draws.)
PYTHAGORAS_ATOL = 4 * EPS64


@given(s=st.floats(1e-8, 1e200))
def test_ve_vp_round_trip(s):
    a, sig = V.ve_to_vp(s)
    assert abs(V.vp_to_ve(a, sig) - s) <= CONVENTION_RTOL * s
    assert abs(a * a + sig * sig - 1.0) <= PYTHAGORAS_ATOL


def test_ve_vp_pythagoras_where_a_random_draw_once_failed():
    """s = 1.26605324689335e-4 gave alpha^2 + sigma^2 - 1 = 2 eps (random profile, a fresh clone)."""
    a, sig = V.ve_to_vp(0.000126605324689335)
    assert abs(a * a + sig * sig - 1.0) <= PYTHAGORAS_ATOL


@given(t=st.floats(1e-6, 1 - 1e-6))
def test_flow_vp_round_trip(t):
    a, s = V.flow_to_vp(t)
    assert abs(V.vp_to_flow(a, s) - t) <= CONVENTION_RTOL * t


@pytest.mark.parametrize("src", sorted(V.CFG_CONVENTIONS))
@pytest.mark.parametrize("dst", sorted(V.CFG_CONVENTIONS))
@given(w=st.floats(-10, 30))
def test_cfg_scale_round_trip_and_same_output(src, dst, w):
    back = V.cfg_scale(V.cfg_scale(w, src, dst), dst, src)
    assert abs(back - w) <= CONVENTION_RTOL * max(1.0, abs(w))
    rng = np.random.default_rng(0)
    mu, mc = rng.standard_normal(8), rng.standard_normal(8)
    a = V.cfg_combine(mu, mc, w, src)
    b = V.cfg_combine(mu, mc, V.cfg_scale(w, src, dst), dst)
    np.testing.assert_allclose(a, b, rtol=0, atol=64 * 2.2e-16 * (1 + abs(w)) * 4)


def test_cfg_known_values():
    assert V.cfg_scale(7.5, "diffusers", "ho_salimans") == 6.5
    assert V.cfg_scale(6.5, "ho_salimans", "diffusers_original") == 6.5
    np.testing.assert_array_equal(V.cfg_combine(np.zeros(2), np.ones(2), 1.0, "diffusers"), [1.0, 1.0])


BAD = [
    bad(lambda: V.t_to_index(0.1234, 10), ValueError, "grid", "t-off-the-index-grid"),
    bad(lambda: V.t_to_index(0.5, 0), ValueError, ">= 1", "T-0"),
    bad(lambda: V.index_to_t(10, 10), ValueError, r"\[0, 9\]", "index-past-T"),
    bad(lambda: V.index_to_t(-1, 10), ValueError, r"\[0, 9\]", "negative-index"),
    bad(lambda: V.cfg_scale(1.0, "ho", "diffusers"), ValueError, "convention", "unknown-convention"),
    bad(lambda: V.vp_to_ve(0.0, 1.0), ValueError, "alpha > 0", "ve-at-zero-snr"),
    bad(lambda: V.ve_to_vp(-1.0), ValueError, "non-negative", "negative-sigma_ve"),
    bad(lambda: V.vp_to_flow(-1.0, 0.5), ValueError, "alpha \\+ sigma > 0", "flow-of-negative-level"),
    bad(lambda: V.flow_to_vp(1.5), ValueError, r"\[0, 1\]", "flow-time-above-1"),
    bad(lambda: V.cfg_combine(np.zeros(2), np.zeros(3), 1.0), ValueError, "same shape", "cfg-shapes"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)