"""refdiff.parametrization: conversion round trips, EDM preconditioning, and refusals at singular points."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import parametrization as P
from refdiff import schedules as S
from bad_inputs import bad, refused
from strategies import batches, levels
from tolerances import EPS64

KINDS = P.PREDICTIONS


@pytest.mark.parametrize("kind", KINDS)
@given(x0=batches(), lv=levels, seed=st.integers(0, 2 ** 32 - 1))
def test_round_trip_through_every_parametrization(kind, x0, lv, seed):
    alpha, sigma = lv
    eps = np.random.default_rng(seed).standard_normal(x0.shape)
    x = alpha * x0 + sigma * eps
    pred = P.from_x0_eps(x0, eps, kind, alpha, sigma)
    x0_back, eps_back = P.to_x0_eps(pred, kind, x, alpha, sigma)
    # each path divides by alpha, sigma or their sum after forming x: the error is a few eps times
    # max(|x0|, |eps|) times the conditioning (alpha + sigma) (1 / alpha + 1 / sigma)
    cond = (alpha + sigma) * (1 / alpha + 1 / sigma)
    scale = max(np.abs(x0).max(), np.abs(eps).max(), 1.0)
    tol = 16 * EPS64 * cond * scale
    assert np.abs(x0_back - x0).max() <= tol
    assert np.abs(eps_back - eps).max() <= tol


def test_convert_matches_definitions():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    a, s = np.array([0.9, 0.6, 0.3, 0.1]), np.array([0.2, 0.8, 0.95, 1.5])
    x = a[:, None] * x0 + s[:, None] * eps
    v = P.convert(eps, "eps", "v", x, a, s)
    np.testing.assert_allclose(v, a[:, None] * eps - s[:, None] * x0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(P.convert(eps, "eps", "score", x, a, s), -eps / s[:, None], rtol=1e-13)
    np.testing.assert_allclose(P.convert(v, "v", "flow", x, a, s), eps - x0, rtol=1e-12, atol=1e-12)


def test_zero_terminal_snr_rules():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="SNR = 0"):
        P.to_x0_eps(x, "eps", x, 0.0, 1.0)
    with pytest.raises(ValueError, match="SNR = 0"):
        P.to_x0_eps(x, "eps", x, np.array([0.5, 0.0]), np.array([0.5, 1.0]))
    x0, eps = P.to_x0_eps(np.full((2, 3), 0.5), "v", x, 0.0, 1.0)       # v is defined at SNR = 0
    np.testing.assert_array_equal(x0, -0.5)
    np.testing.assert_array_equal(eps, 1.0)
    with pytest.raises(ValueError, match="sigma = 0"):
        P.to_x0_eps(x, "x0", x, 1.0, 0.0)


X = np.ones((2, 3))

BAD = [
    bad(lambda: P.to_x0_eps(X, "epsilon", X, 1.0, 1.0), ValueError, "prediction type", "unknown-prediction"),
    bad(lambda: P.to_x0_eps(np.ones((2, 2)), "eps", X, 1.0, 1.0), ValueError, "same shape", "output-shape"),
    bad(lambda: P.to_x0_eps(X, "eps", X, np.ones(3), 1.0), ValueError, r"shape \(2,\)", "per-row-alpha-length"),
    bad(lambda: P.to_x0_eps(X, "eps", X, 0.0, 1.0), ValueError, "SNR = 0", "eps-at-zero-snr"),
    bad(lambda: P.to_x0_eps(X, "score", X, 0.0, 1.0), ValueError, "SNR = 0", "score-at-zero-snr"),
    bad(lambda: P.to_x0_eps(X, "x0", X, 1.0, 0.0), ValueError, "sigma = 0", "x0-at-sigma-0"),
    bad(lambda: P.to_x0_eps(X, "flow", X, 0.0, 0.0), ValueError, "not both zero", "flow-alpha-sigma-0"),
    bad(lambda: P.from_x0_eps(X, X, "v", -1.0, 1.0), ValueError, "alpha >= 0", "negative-alpha"),
    bad(lambda: P.from_x0_eps(X, X, "score", 1.0, 0.0), ValueError, "sigma = 0", "score-target-at-sigma-0"),
    bad(lambda: P.convert(X, "eps", "noise", X, 0.6, 0.8), ValueError, "prediction type", "convert-unknown"),
    bad(lambda: P.edm_precond(0.0), ValueError, "positive", "edm-sigma-0"),
    bad(lambda: P.edm_precond(1.0, sigma_data=0.0), ValueError, "sigma_data", "edm-sigma_data-0"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_conversions_return_float64_for_any_real_input():
    x = np.ones((2, 3), dtype=np.float16)
    assert P.to_x0_eps(x, "v", x, 0.6, 0.8)[0].dtype == np.float64
    assert P.from_x0_eps(x.astype(np.int64), x, "flow", 0.6, 0.8).dtype == np.float64


def test_edm_preconditioning_table_1():
    sd = P.EDM_SIGMA_DATA
    pc = P.edm_precond(np.array([sd, 1.0, 80.0]))
    np.testing.assert_allclose(pc.c_skip, sd ** 2 / (np.array([sd, 1.0, 80.0]) ** 2 + sd ** 2), rtol=1e-15)
    assert pc.c_skip[0] == pytest.approx(0.5, rel=1e-15)
    assert pc.c_out[0] == pytest.approx(sd / np.sqrt(2), rel=1e-15)
    assert pc.c_noise[1] == 0.0
    # training target F = (x0 - c_skip x) / c_out has unit variance for x0 ~ N(0, sd^2) (Karras et al. Eq. 8-9)
    sig = np.array([0.01, 0.3, 2.0, 50.0])
    pc = P.edm_precond(sig)
    var_F = ((1 - pc.c_skip) ** 2 * sd ** 2 + pc.c_skip ** 2 * sig ** 2) / pc.c_out ** 2
    np.testing.assert_allclose(var_F, 1.0, rtol=1e-14)
    # and the input to the network has unit variance
    np.testing.assert_allclose(pc.c_in ** 2 * (sd ** 2 + sig ** 2), 1.0, rtol=1e-14)


def test_vp_and_ve_preconditioning():
    sig = np.array([0.01, 1.0, 100.0])
    ve = P.ve_precond(sig)
    np.testing.assert_array_equal(ve.c_out, sig)
    np.testing.assert_allclose(ve.c_noise, np.log(sig / 2))
    vp = P.vp_precond(sig)
    np.testing.assert_allclose(vp.c_in, 1 / np.sqrt(sig ** 2 + 1), rtol=1e-15)
    t = vp.c_noise / 999
    np.testing.assert_allclose(S.VPLinear(0.1, 20.0).sigma_ve(t), sig, rtol=1e-12)
