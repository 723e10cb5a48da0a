"""refdiff.vlb: KL and decoder terms against quadrature, the DDPM / VDM bounds against their exact expectations for
Gaussian data, the approach to the continuous-time ELBO, and the same bound relations for a mixture by Monte Carlo."""

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from refdiff import schedules as S
from refdiff import selfcheck as C
from refdiff import vlb as V
from refdiff.oracles import GaussianData, GaussianMixture
from bad_inputs import bad, refused
from tolerances import z_bound

QUAD_TOL = 1e-10


@pytest.mark.parametrize("m1,lv1,m2,lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, 2.0, 0.0, -3.0),
                                           (0.0, 1e-8, 0.0, 0.0), (0.1, -0.3, 0.1, -0.3 + 1e-6), (2.0, -5.0, 0.0, 0.0)])
def test_normal_kl_matches_quadrature(m1, lv1, m2, lv2):
    p, q = norm(m1, np.exp(0.5 * lv1)), norm(m2, np.exp(0.5 * lv2))
    s = np.exp(0.5 * lv1)
    kl_quad = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 40 * s, m1 + 40 * s,
                             epsabs=1e-15, epsrel=1e-13, limit=400)[0]
    assert abs(V.normal_kl(m1, lv1, m2, lv2) - kl_quad) <= QUAD_TOL


def test_normal_kl_of_nearly_equal_variances_keeps_its_digits():
    d = 1e-7
    assert V.normal_kl(0.0, d, 0.0, 0.0) == pytest.approx(d * d / 4, rel=1e-9)     # (e^d - 1 - d) / 2 ~ d^2 / 4


# levels -1 + 2k / 255 (k = 0 .. 255): 0.0 is not one of them (k = 127.5), the middle levels are k = 127, 128
DISC_CASES = [(x, m, s) for x in (-1.0, -1 + 2 / 255 * 3, -1 + 2 / 255 * 127, -1 + 2 / 255 * 128, 2 / 255 * 100 - 1,
                                  1.0)
              for m, s in ((0.0, 0.5), (0.3, 0.02), (-0.9, 0.1), (0.95, 0.05), (0.0, 3.0))]


def _bin_probability_log(x, mean, scale):
    """log of the density integrated over the bin: scipy quad of the standard normal pdf over [a, b] from the side
    where the mass is small (relative accuracy kept); for bins whose probability underflows float64 (< 1e-300),
    the same integral in 60-digit mpmath through the tail CDF (1 - Phi loses everything at these magnitudes)."""
    import mpmath

    h = 1 / 255
    lo = -np.inf if x <= -1 + h / 2 else x - h
    hi = np.inf if x >= 1 - h / 2 else x + h
    a, b = (lo - mean) / scale, (hi - mean) / scale
    if a + b > 0:                                  # mirror into the lower tail: P = Phi(-a) - Phi(-b)
        a, b = -b, -a
    if b < -37.0:                                  # Phi(-37) ~ 6e-300: below this quad's answer underflows
        mpmath.mp.dps = 60
        return float(mpmath.log(mpmath.ncdf(b) - (mpmath.ncdf(a) if np.isfinite(a) else 0)))
    if np.isfinite(a):
        return np.log(integrate.quad(norm.pdf, a, b, epsabs=0, epsrel=1e-13, limit=200)[0])
    return np.log(integrate.quad(norm.pdf, -np.inf, b, epsabs=0, epsrel=1e-13, limit=200)[0])


@pytest.mark.parametrize("x,mean,scale", DISC_CASES)
def test_discretized_gaussian_matches_quadrature(x, mean, scale):
    ll = V.discretized_gaussian_log_likelihood(x, mean, np.log(scale))
    assert abs(ll - _bin_probability_log(x, mean, scale)) <= QUAD_TOL * max(1.0, abs(ll))


def test_discretized_likelihood_sums_to_one_over_the_grid():
    grid = np.linspace(-1, 1, 256)
    p = np.exp(V.discretized_gaussian_log_likelihood(grid, 0.2, np.log(0.3)))
    assert abs(p.sum() - 1.0) <= 1e-13


# -- DDPM bound: Monte Carlo against the exact expectation ----------------------------------------------

def _gauss():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3))
    return GaussianData(0.3 * rng.standard_normal(3), 0.2 * A @ A.T + 0.05 * np.eye(3))


GAUSS = _gauss()
DDPM10 = S.DiscreteSchedule(S.linear_betas(10, 1e-3, 0.2))        # iDDPM's linear schedule rescaled to T = 10


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_vlb_terms_match_exact_expectation(variance):
    rng = np.random.default_rng(1)
    n = 20_000
    x0 = np.repeat(GAUSS.sample(1, rng), n, axis=0)
    eps = rng.standard_normal((10, n, 3))
    d = DDPM10

    def model(x, i):
        return GAUSS.eps(x, d.alpha(i), d.sigma(i))                 # the exact denoiser, as eps prediction

    mc = V.ddpm_vlb_terms(d, x0, model, eps, variance=variance, decoder="gaussian")
    exact = V.gaussian_ddpm_vlb(d, GAUSS, x0[:1], variance=variance)
    np.testing.assert_array_equal(mc.prior, exact.prior[0])        # deterministic given x0
    cols = np.column_stack([mc.kl, mc.decoder])
    want = np.concatenate([exact.kl[0], exact.decoder])
    se = cols.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(cols.mean(axis=0) - want) <= z_bound(cols.shape[1]) * se)


def test_learned_range_interpolates_the_fixed_variances():
    rng = np.random.default_rng(2)
    x0 = np.round((rng.uniform(-1, 1, (4, 3)) + 1) * 127.5) / 127.5 - 1     # on the 8-bit grid -1 + 2k / 255
    eps = rng.standard_normal((10, 4, 3))
    d = DDPM10
    base = lambda x, i: GAUSS.eps(x, d.alpha(i), d.sigma(i))  # noqa: E731
    small = V.ddpm_vlb_terms(d, x0, base, eps, variance="fixed_small")
    large = V.ddpm_vlb_terms(d, x0, base, eps, variance="fixed_large")
    for frac_value, ref in ((-1.0, small), (1.0, large)):
        lr = V.ddpm_vlb_terms(d, x0, lambda x, i: (base(x, i), np.full_like(x, frac_value)), eps,
                              variance="learned_range")
        np.testing.assert_allclose(lr.total, ref.total, rtol=1e-12)


# -- VDM: the discrete-T bound approaches the continuous ELBO like 1/T ----------------------------------

VDM = S.LinearLogSNR()          # VDM's fixed schedule, lambda from 13.3 to -5


def test_vdm_bound_decreases_to_the_continuous_elbo_like_one_over_T():
    x0 = GAUSS.sample(3, np.random.default_rng(3))
    bounds, cont, slopes = C.vdm_gap_slopes(VDM, GAUSS, x0)
    assert np.all(np.diff(bounds, axis=0) < 0)                      # more steps: a tighter bound
    assert np.all(bounds > cont)                                    # the continuous ELBO is the limit from above
    # slope fitted over T = 10 .. 10000; T = 10 is slightly pre-asymptotic (e^lambda spans e^18), giving ~ -1.09
    assert np.all(np.abs(slopes + 1.0) <= 0.1)


def test_vdm_estimators_are_unbiased_for_gaussian_data():
    rng = np.random.default_rng(4)
    n = 40_000
    x0 = np.repeat(GAUSS.sample(1, rng), n, axis=0)
    eps = rng.standard_normal((n, 3))

    def eps_hat(z, t):
        return GAUSS.eps(z, VDM.alpha(t), VDM.sigma(t))

    exact_c = V.gaussian_vdm_elbo(VDM, GAUSS, x0[:1])
    exact_10 = V.gaussian_vdm_elbo(VDM, GAUSS, x0[:1], 10)
    checks = [
        (V.vdm_diffusion_term(VDM, x0, rng.uniform(size=n), eps, eps_hat), exact_c.diffusion[0]),
        (V.vdm_discrete_diffusion_term(VDM, x0, rng.integers(1, 11, n), 10, eps, eps_hat), exact_10.diffusion[0]),
        (V.vdm_reconstruction_term(VDM, x0, eps), exact_c.reconstruction[0]),
    ]
    for est, want in checks:
        assert abs(est.mean() - want) <= z_bound(len(checks)) * est.std(ddof=1) / np.sqrt(n)


def test_gmm_bound_relations_by_monte_carlo():
    """For a mixture (no closed form) the T-step bound still decreases in T toward the continuous ELBO: paired
    estimates on shared (x, eps) paths, each difference significantly above 0 (z_bound: these are one-sided claims
    about differences far larger than their standard errors, so the fixed seed carries no borderline case)."""
    rng = np.random.default_rng(5)
    gmm = GaussianMixture([0.6, 0.4], [[-1.0, 0.5], [1.0, -0.5]], [np.diag([0.1, 0.3]), np.diag([0.2, 0.05])])
    n = 2000
    x, eps = gmm.sample(n, rng), rng.standard_normal((n, 2))

    def path_bound(T):
        i = np.arange(1, T + 1)
        t, s = i / T, (i - 1) / T
        lam_t = VDM.log_snr(t)
        gap = np.exp(lam_t) * np.expm1(VDM.log_snr(s) - lam_t)
        total = np.zeros(n)
        for k in range(T):
            z = VDM.alpha(t[k]) * x + VDM.sigma(t[k]) * eps
            total += 0.5 * gap[k] * ((x - gmm.denoise(z, VDM.alpha(t[k]), VDM.sigma(t[k]))) ** 2).sum(axis=1)
        return total

    b10, b100, b1000 = path_bound(10), path_bound(100), path_bound(1000)
    for hi, lo in ((b10, b100), (b100, b1000)):
        diff = hi - lo
        assert diff.mean() >= z_bound(4) * diff.std(ddof=1) / np.sqrt(n)
    t = rng.uniform(size=n)
    cont = V.vdm_diffusion_term(VDM, x, t, eps, lambda z, tt: gmm.eps(z, VDM.alpha(tt), VDM.sigma(tt)))
    se = np.hypot(cont.std(ddof=1), b1000.std(ddof=1)) / np.sqrt(n)
    assert b10.mean() - cont.mean() >= z_bound(4) * se                # the limit lies below the coarse bound
    assert abs(b1000.mean() - cont.mean()) <= z_bound(4) * se + (b100.mean() - b1000.mean())   # and T = 1000 is close


def test_bits_per_dim():
    assert V.bits_per_dim(0.0, 3) == pytest.approx(7.0)              # 8-bit data in [-1, 1]: 7 bits offset
    assert V.bits_per_dim(3 * np.log(2.0), 3, n_levels=1, data_range=1) == pytest.approx(1.0)


X0 = np.zeros((2, 3))
ZERO_MODEL = lambda x, i: np.zeros_like(x)  # noqa: E731
ON_GRID = -1 + 2 / 255 * 100

BAD = [
    bad(lambda: V.ddpm_vlb_terms(DDPM10, X0 + ON_GRID, ZERO_MODEL, np.zeros((9, 2, 3))), ValueError,
        "one draw per step", "ddpm-eps-steps"),
    bad(lambda: V.ddpm_vlb_terms(DDPM10, X0, ZERO_MODEL, np.zeros((10, 2, 3)), variance="learned"), ValueError,
        "variance", "ddpm-unknown-variance"),
    bad(lambda: V.ddpm_vlb_terms(DDPM10, X0, ZERO_MODEL, np.zeros((10, 2, 3)), variance="learned_range"),
        ValueError, "variance_values", "ddpm-learned-without-values"),
    bad(lambda: V.ddpm_vlb_terms(DDPM10, X0, ZERO_MODEL, np.zeros((10, 2, 3)), decoder="laplace"), ValueError,
        "decoder", "ddpm-unknown-decoder"),
    bad(lambda: V.ddpm_vlb_terms(DDPM10, X0 + 0.3, ZERO_MODEL, np.zeros((10, 2, 3))), ValueError,
        "between levels", "ddpm-off-grid-data"),
    bad(lambda: V.vdm_prior_term(S.VPLinear(), X0), ValueError, "finite log-SNR", "vdm-infinite-log-snr"),
    bad(lambda: V.vdm_prior_term(S.VE(), X0), ValueError, "variance-preserving", "vdm-of-VE"),
    bad(lambda: V.discretized_gaussian_log_likelihood(1.5, 0.0, 0.0), ValueError, "lie in", "decoder-outside"),
    bad(lambda: V.discretized_gaussian_log_likelihood(0.0, 0.0, 0.0), ValueError, "between levels",
        "decoder-off-grid"),
    bad(lambda: V.discretized_gaussian_log_likelihood(ON_GRID, 0.0, 0.0, half_bin=0.0), ValueError, "half_bin",
        "decoder-bin-0"),
    bad(lambda: V.vdm_discrete_diffusion_term(VDM, X0, np.array([0, 3]), 10, X0, ZERO_MODEL), ValueError,
        r"\[1, 10\]", "vdm-index-0"),
    bad(lambda: V.vdm_discrete_diffusion_term(VDM, X0, np.array([1, 2]), 2.5, X0, ZERO_MODEL), ValueError,
        "integer", "vdm-T-float"),
    bad(lambda: V.vdm_discrete_diffusion_term(VDM, X0, np.array([1.0, 2.0]), 10, X0, ZERO_MODEL), ValueError,
        "integers", "vdm-float-indices"),
    bad(lambda: V.vdm_diffusion_term(VDM, X0, np.array([0.5]), X0, ZERO_MODEL), ValueError, r"shape \(2,\)",
        "vdm-t-length"),
    bad(lambda: V.vdm_diffusion_term(VDM, X0[:, 0], np.array([0.5, 0.5]), X0[:, 0], ZERO_MODEL), ValueError,
        "data axis", "vdm-1-D-data"),
    bad(lambda: V.vdm_diffusion_term(VDM, X0, np.array([0.5, 0.5]), X0, lambda z, t: z[:, :1]), ValueError,
        "eps_hat returned shape", "vdm-eps_hat-shape"),
    bad(lambda: V.gaussian_vdm_elbo(VDM, GAUSS, X0, T=2.5), ValueError, "integer", "vdm-exact-T-float"),
    bad(lambda: V.normal_kl(np.zeros(2), 0.0, np.zeros(3), 0.0), ValueError, "broadcast", "kl-shapes"),
    bad(lambda: V.bits_per_dim(1.0, 0), ValueError, ">= 1", "bits-dims-0"),
    bad(lambda: V.bits_per_dim(1.0, 2.5), ValueError, "integer", "bits-dims-float"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_kl_against_a_point_mass_is_infinite_not_nan():
    """KL(N(m, v) || N(m2, 0)) = +inf (the formula's 0 * inf would be NaN when the means agree), 0 against the same
    point mass; NaN in stays NaN."""
    assert V.normal_kl(0.0, 0.0, 0.0, -np.inf) == np.inf
    assert V.normal_kl(1.0, 0.0, 0.0, -np.inf) == np.inf
    assert V.normal_kl(0.0, -np.inf, 0.0, 0.0) == np.inf
    assert V.normal_kl(0.5, -np.inf, 0.5, -np.inf) == 0.0
    assert V.normal_kl(0.5, -np.inf, 0.7, -np.inf) == np.inf
    assert np.isnan(V.normal_kl(np.nan, 0.0, 0.0, -np.inf))


def test_vdm_terms_of_an_empty_batch_are_empty():
    e = np.zeros((0, 3))
    assert V.vdm_diffusion_term(VDM, e, np.zeros(0), e, ZERO_MODEL).shape == (0,)
    assert V.vdm_discrete_diffusion_term(VDM, e, np.zeros(0, int), 10, e, ZERO_MODEL).shape == (0,)