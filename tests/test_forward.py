"""refdiff.forward: marginals, transitions and posteriors against their defining identities."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import forward as F
from refdiff import schedules as S
from bad_inputs import bad, refused
from strategies import batches
from tolerances import EPS64, MAX_SCHEDULE_ULP

SCHED = S.VPLinear()


def _levels(t):
    return SCHED.alpha(t), SCHED.sigma(t), SCHED.log_snr(t)


def test_q_sample_per_row_coefficients():
    x0 = np.arange(6.0).reshape(3, 2)
    eps = np.ones((3, 2))
    alpha, sigma = np.array([1.0, 0.5, 0.25]), np.array([0.0, 0.5, 0.75])
    out = F.q_sample(x0, alpha, sigma, eps)
    np.testing.assert_array_equal(out, alpha[:, None] * x0 + sigma[:, None] * eps)   # dyadic: exact


@given(x0=batches(), s=st.floats(0.01, 0.98), gap=st.floats(1e-6, 0.5))
def test_transition_composes_to_the_marginal(x0, s, gap):
    """alpha_{t|s} alpha_s = alpha_t and sigma_{t|s}^2 + alpha_{t|s}^2 sigma_s^2 = sigma_t^2 (VDM Eq. 2-3)."""
    t = min(s + gap, 1.0)
    a_s, s_s, l_s = _levels(s)
    a_t, s_t, l_t = _levels(t)
    q = (a_t / a_s) ** 2 * s_s ** 2 / s_t ** 2          # alpha_{t|s}^2 sigma_s^2 / sigma_t^2 = e^{lambda_t - lambda_s}
    for kw in ({}, {"log_snr_s": l_s, "log_snr_t": l_t}):
        tr = F.transition(x0, a_s, s_s, a_t, s_t, **kw)
        np.testing.assert_allclose(tr.mean, (a_t / a_s) * x0, rtol=0, atol=0)
        total = tr.var + (a_t / a_s) ** 2 * s_s ** 2
        # from (alpha, sigma) alone both terms use the same inputs: only roundings, ~3 eps on the q-term (r and its
        # square, the test's own product) and ~2 eps on the variance term and the sum: (3 q + 2) eps, 2x margin.
        bound = (6.0 * q + 4.0) * EPS64
        if kw:
            # the log-SNRs are separate schedule evaluations (each within MAX_SCHEDULE_ULP of its value), so
            # e^{l_t - l_s} and the q-term computed from alpha, sigma agree only to the schedule's accuracy:
            # |d log q| <= MAX_SCHEDULE_ULP eps (|l_t| + |l_s| + 4) (two log-SNRs and the four alpha, sigma factors
            # counted twice through the square)
            bound += q * MAX_SCHEDULE_ULP * EPS64 * (abs(l_t) + abs(l_s) + 8.0)
        assert abs(total - s_t ** 2) <= bound * s_t ** 2


def test_log_snr_form_is_accurate_for_nearby_times():
    """With log-SNRs given, sigma_{t|s}^2 for a tiny step keeps full precision (mpmath reference)."""
    import mpmath

    mpmath.mp.dps = 50
    s, t = 0.5, 0.5 + 1e-9
    a_s, s_s, l_s = _levels(s)
    a_t, s_t, l_t = _levels(t)
    B = lambda u: mpmath.mpf(0.1) * u + (mpmath.mpf(20) - mpmath.mpf(0.1)) * u * u / 2  # noqa: E731
    exact = float(1 - mpmath.exp(-(B(mpmath.mpf(t)) - B(mpmath.mpf(s)))))      # sigma_{t|s}^2 of the VP SDE
    got = F.transition(np.zeros(1), a_s, s_s, a_t, s_t, log_snr_s=l_s, log_snr_t=l_t).var
    naive = F.transition(np.zeros(1), a_s, s_s, a_t, s_t).var
    # lambda carries ~|lambda| eps absolute error each; their difference (~1e-8 here) keeps ~8 digits, far
    # better than the naive 1 - r^2 which keeps ~|log r| / eps ~ 7 digits less
    assert abs(got - exact) <= 1e-7 * exact
    assert abs(got - exact) < abs(naive - exact) or abs(naive - exact) <= 1e-7 * exact


@given(x=batches(), s=st.floats(0.01, 0.9), gap=st.floats(1e-3, 0.09))
def test_posterior_marginalises_to_q_xs_given_x0(x, s, gap):
    """E over x_t ~ q(x_t|x0) of the posterior gives q(x_s|x0): mean alpha_s x0, variance sigma_s^2."""
    t = s + gap
    a_s, s_s, l_s = _levels(s)
    a_t, s_t, l_t = _levels(t)
    x0 = x
    kw = {"log_snr_s": l_s, "log_snr_t": l_t}
    c_t = F.posterior(np.ones((1, 1)), np.zeros((1, 1)), a_s, s_s, a_t, s_t, **kw).mean    # coefficient of x_t
    post = F.posterior(np.zeros_like(x0), x0, a_s, s_s, a_t, s_t, **kw)                   # x0 part and variance
    mean = c_t * a_t * x0 + post.mean
    # the posterior uses -expm1(lambda_t - lambda_s); lambda carries ~|lambda| eps absolute error, so the
    # identities written with alpha, sigma hold to ~eps (|lambda_s| + |lambda_t|) plus a few roundings
    rel = 16 * EPS64 * (1.0 + abs(l_s) + abs(l_t))
    assert np.abs(mean - a_s * x0).max() <= rel * max(1.0, np.abs(x0).max())
    assert abs(post.var + c_t.flat[0] ** 2 * s_t ** 2 - s_s ** 2) <= rel


def test_posterior_matches_ddpm_equation_7():
    d = S.DiscreteSchedule(S.linear_betas(1000))
    i = np.arange(1, 1000)
    ab, ab_prev, beta = d.alphas_cumprod[i], d.alphas_cumprod[i - 1], d.betas[i]
    x_t, x0 = np.ones((999, 1)), np.zeros((999, 1))
    p = F.posterior(x_t, x0, d.alpha(i - 1), d.sigma(i - 1), d.alpha(i), d.sigma(i),
                    log_snr_s=d.log_snr(i - 1), log_snr_t=d.log_snr(i))
    coef_xt = (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab)                 # Ho et al. 2020, Eq. 7
    var = (1 - ab_prev) / (1 - ab) * beta
    np.testing.assert_allclose(p.mean[:, 0], coef_xt, rtol=1e-12)
    np.testing.assert_allclose(p.var.ravel(), var, rtol=1e-9)               # textbook 1 - ab_prev cancels at i = 1
    p0 = F.posterior(np.ones((1, 1)), np.full((1, 1), 3.0), 1.0, 0.0, d.alpha(0), d.sigma(0))
    assert p0.mean[0, 0] == 3.0 and p0.var == 0.0                            # s = 0: point mass at x0


X = np.zeros((3, 2))
A_S, S_S, L_S = _levels(0.5)
A_T, S_T, L_T = _levels(0.3)

BAD = [
    bad(lambda: F.q_sample(X, 1.0, 0.0, np.zeros((3, 3))), ValueError, "same shape", "q_sample-eps-shape"),
    bad(lambda: F.q_sample(X, np.ones(2), 0.0, X), ValueError, r"shape \(3,\)", "q_sample-per-row-alpha-length"),
    bad(lambda: F.q_sample(X, 1.0, np.ones((3, 2)), X), ValueError, r"shape \(3,\)", "q_sample-2-D-sigma"),
    bad(lambda: F.q_sample(X + 0j, 1.0, 0.5, X), ValueError, "real numeric", "q_sample-complex"),
    bad(lambda: F.q_sample(X.astype(bool), 1.0, 0.5, X), ValueError, "real numeric", "q_sample-bool"),
    bad(lambda: F.q_moments(X, np.ones(4), 1.0), ValueError, r"shape \(3,\)", "q_moments-per-row-length"),
    bad(lambda: F.transition(X, A_S, S_S, A_T, S_T, log_snr_s=L_S, log_snr_t=L_T), ValueError, "s < t",
        "transition-backwards-log-snr"),
    bad(lambda: F.transition(X, A_S, S_S, A_T, S_T), ValueError, "s < t", "transition-backwards"),
    bad(lambda: F.transition(X, A_T, S_T, A_S, S_S, log_snr_s=L_T), ValueError, "both", "transition-one-log-snr"),
    bad(lambda: F.transition(X, A_T, S_T, A_S, S_S, log_snr_s=L_S, log_snr_t=L_T), ValueError, "contradicts",
        "transition-swapped-log-snrs"),
    bad(lambda: F.posterior(X, np.zeros((2, 2)), A_T, S_T, A_S, S_S), ValueError, "same shape", "posterior-shapes"),
    bad(lambda: F.posterior(X, X, A_T, S_T, A_S, S_S, log_snr_s=L_T + 1.0, log_snr_t=L_S), ValueError,
        "contradicts", "posterior-contradicting-log-snr"),
    bad(lambda: F.posterior(X, X, 1.0, 0.0, 1.0, 0.0), ValueError, "sigma_t > 0", "posterior-sigma_t-0"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int32])
def test_low_precision_and_integer_inputs_compute_in_float64(dtype):
    """Inputs of any real dtype are converted once; every result is float64 (README, "Conventions")."""
    x = np.arange(6).reshape(3, 2).astype(dtype)
    assert F.q_sample(x, 0.6, 0.8, x).dtype == np.float64
    assert F.posterior(x, x, A_T, S_T, A_S, S_S).mean.dtype == np.float64


def test_empty_batches_give_empty_results():
    e = np.zeros((0, 2))
    assert F.q_sample(e, 0.6, 0.8, e).shape == (0, 2)
    assert F.q_sample(e, np.ones(0), np.ones(0), e).shape == (0, 2)
    assert F.posterior(e, e, A_T, S_T, A_S, S_S).mean.shape == (0, 2)