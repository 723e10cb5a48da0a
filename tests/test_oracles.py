"""refdiff.oracles: exact scores and denoisers against Monte Carlo, finite differences, quadrature and ODE solvers."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate

from refdiff import schedules as S
from refdiff import selfcheck as C
from refdiff.oracles import FiniteAtoms, GaussianData, GaussianMixture
from strategies import spd_matrices
from bad_inputs import bad, refused
from tolerances import EPS64, fd_tolerance, z_bound

TWEEDIE_RTOL = 1e-12
PF_ODE_RTOL = 1e-9


def make_oracles():
    rng = np.random.default_rng(7)
    D = 3
    A = rng.standard_normal((D, D))
    gauss = GaussianData(rng.uniform(-1, 1, D), A @ A.T + 0.5 * np.eye(D))
    covs = np.stack([B @ B.T + 0.2 * np.eye(D) for B in rng.standard_normal((3, D, D)) * 0.5])
    gmm = GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-2, 2, (3, D)), covs, labels=[0, 1, 0])
    atoms = FiniteAtoms(rng.uniform(-2, 2, (6, D)), weights=rng.uniform(0.5, 1.5, 6))
    return {"gaussian": gauss, "gmm": gmm, "atoms": atoms}


ORACLES = make_oracles()


@pytest.mark.parametrize("name", ORACLES)
@pytest.mark.parametrize("alpha,sigma", [(0.9, 0.45), (0.6, 0.8), (0.3, 1.2)])
def test_denoiser_matches_importance_sampled_posterior_mean(name, alpha, sigma):
    o = ORACLES[name]
    rng = np.random.default_rng(11)
    x = o.sample(3, rng) * alpha + sigma * rng.standard_normal((3, o.D))
    assert C.denoiser_mc_zscore(o, x, alpha, sigma, rng, n=200_000) <= z_bound(x.size)     # 3 rows x D coordinates


@pytest.mark.parametrize("name", ORACLES)
def test_score_is_the_gradient_of_log_prob(name):
    o = ORACLES[name]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, o.D))
    alpha, sigma = rng.uniform(0.3, 1.0, 5), rng.uniform(0.5, 1.0, 5)
    score = o.score(x, alpha, sigma)
    h = 1e-5
    fd = np.empty_like(x)
    for j in range(o.D):
        e = np.zeros(o.D)
        e[j] = h
        fd[:, j] = (o.log_prob(x + e, alpha, sigma) - o.log_prob(x - e, alpha, sigma)) / (2 * h)
    # components have means within +-2 and noisy variances >= 0.25: |d^3 log p| <= (4 / 0.25)^3 < 1e4; |log p| < 50
    assert np.abs(fd - score).max() <= fd_tolerance(h, 1e4, 50.0)


@pytest.mark.parametrize("name", ORACLES)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_tweedie_links_score_denoiser_eps_and_v(name, seed):
    o = ORACLES[name]
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal((4, o.D))
    alpha, sigma = rng.uniform(0.05, 1.0, 4), rng.uniform(0.05, 2.0, 4)
    assert C.tweedie_residual(o, x, alpha, sigma) <= TWEEDIE_RTOL
    eps, score = o.eps(x, alpha, sigma), o.score(x, alpha, sigma)
    np.testing.assert_allclose(eps, -sigma[:, None] * score, rtol=1e-13, atol=1e-13 * np.abs(eps).max())
    v = o.v(x, alpha, sigma)
    np.testing.assert_allclose(v, alpha[:, None] * eps - sigma[:, None] * o.denoise(x, alpha, sigma), rtol=0,
                               atol=0)


@given(cov=spd_matrices(3), seed=st.integers(0, 2 ** 32 - 1))
def test_gaussian_denoiser_is_the_conditioning_formula(cov, seed):
    """E[x0|x] = mu + alpha C (alpha^2 C + sigma^2 I)^{-1} (x - alpha mu), by a direct solve."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(3)
    g = GaussianData(mu, cov)
    x, alpha, sigma = rng.standard_normal((2, 3)), 0.7, 0.4
    S_ = alpha ** 2 * cov + sigma ** 2 * np.eye(3)
    direct = mu + (alpha * cov @ np.linalg.solve(S_, (x - alpha * mu).T)).T
    cond = np.linalg.cond(S_)
    np.testing.assert_allclose(g.denoise(x, alpha, sigma), direct, rtol=0,
                               atol=64 * EPS64 * cond * max(1.0, np.abs(direct).max()))


PF_CASES = {
    "VPLinear down": (S.VPLinear(), 1.0, 1e-3), "VPLinear up": (S.VPLinear(), 1e-3, 1.0),
    "Cosine": (S.Cosine(), 0.99, 0.01), "Sigmoid": (S.Sigmoid(), 0.95, 0.02),
    "VE": (S.VE(), 1.0, 0.0), "EDM": (S.EDM(), 80.0, 0.002), "RectifiedFlow(3)": (S.RectifiedFlow(3.0), 0.99, 0.01),
}


@pytest.mark.parametrize("case", PF_CASES)
def test_gaussian_pf_ode_solution_matches_solve_ivp(case):
    sch, t0, t1 = PF_CASES[case]
    g = ORACLES["gaussian"]
    x = np.random.default_rng(5).standard_normal((3, g.D)) * (sch.sigma(t0) + sch.alpha(t0))
    assert C.pf_ode_error(g, sch, t0, t1, x) <= PF_ODE_RTOL


def test_pf_ode_solution_composes_and_inverts():
    g, sch = ORACLES["gaussian"], S.Cosine()
    x = np.random.default_rng(1).standard_normal((4, g.D))
    lv = [(sch.alpha(t), sch.sigma(t)) for t in (0.9, 0.5, 0.1)]
    mid = g.pf_ode_solution(x, *lv[0], *lv[1])
    end = g.pf_ode_solution(mid, *lv[1], *lv[2])
    np.testing.assert_allclose(end, g.pf_ode_solution(x, *lv[0], *lv[2]), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(g.pf_ode_solution(end, *lv[2], *lv[0]), x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.3), (0.5, 0.9)])
def test_log_prob_integrates_to_one_1d(alpha, sigma):
    gmm = GaussianMixture([0.2, 0.5, 0.3], [[-2.0], [0.5], [3.0]], [[[0.3]], [[1.0]], [[0.1]]])
    atoms = FiniteAtoms([[-1.0], [0.0], [2.0]], weights=[1.0, 2.0, 1.0])
    for o in (gmm, atoms):
        f = lambda u: float(np.exp(o.log_prob(np.array([[u]]), alpha, sigma))[0])  # noqa: E731
        total, err = integrate.quad(f, -np.inf, np.inf, points=None, epsabs=1e-13, epsrel=1e-12, limit=200)
        assert abs(total - 1.0) <= 1e-10


def test_log_prob_integrates_to_one_2d():
    gmm = GaussianMixture([0.6, 0.4], [[-1.0, 0.5], [1.5, -1.0]],
                          [[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]])
    alpha, sigma = 0.8, 0.5

    def f(y, x):
        return float(np.exp(gmm.log_prob(np.array([[x, y]]), alpha, sigma))[0])

    total, _ = integrate.dblquad(f, -9, 9, -9, 9, epsabs=1e-11, epsrel=1e-10)
    # the +-9 box leaves out < 1e-12 of the mass (the widest marginal std is ~0.8)
    assert abs(total - 1.0) <= 1e-9


def test_class_posterior_is_a_distribution_and_its_gradient_is_the_guidance_term():
    gmm = ORACLES["gmm"]
    rng = np.random.default_rng(2)
    x, alpha, sigma = rng.standard_normal((6, gmm.D)), 0.7, 0.6
    lp = gmm.log_class_posterior(x, alpha, sigma)
    assert lp.shape == (6, 2)
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-14)
    for y in (0, 1):
        g = gmm.class_log_prob_grad(x, alpha, sigma, y)
        h = 1e-5
        fd = np.stack([(gmm.log_class_posterior(x + h * e, alpha, sigma)[:, y]
                        - gmm.log_class_posterior(x - h * e, alpha, sigma)[:, y]) / (2 * h) for e in np.eye(gmm.D)], 1)
        assert np.abs(fd - g).max() <= fd_tolerance(h, 1e4, 50.0)
        # Bayes: score of p_t(x|y) = score of p_t(x) + grad log p_t(y|x)
        np.testing.assert_allclose(gmm.conditional(y).score(x, alpha, sigma), gmm.score(x, alpha, sigma) + g,
                                   rtol=1e-12, atol=1e-12)


def test_sampling_moments():
    g = ORACLES["gaussian"]
    n = 200_000
    xs = g.sample(n, np.random.default_rng(0))
    se_mean = np.sqrt(np.diag(g.cov) / n)
    z = z_bound(2 * g.D + 1)                                          # D means, D variances, one proportion
    assert np.all(np.abs(xs.mean(0) - g.mean) <= z * se_mean)
    se_var = np.sqrt(2.0 / n) * np.diag(g.cov)                       # Gaussian: Var(s^2) = 2 sigma^4 / n
    assert np.all(np.abs(xs.var(0) - np.diag(g.cov)) <= z * se_var)
    _, labels = ORACLES["gmm"].sample(n, np.random.default_rng(1), return_labels=True)
    p0 = 0.5 + 0.2                                                    # components 0 and 2 carry class 0
    assert abs(np.mean(labels == 0) - p0) <= z * np.sqrt(p0 * (1 - p0) / n)


def test_atoms_denoiser_limits():
    atoms = ORACLES["atoms"]
    p = atoms.means
    np.testing.assert_allclose(atoms.denoise(p, 1.0, 1e-3), p, atol=1e-12)     # tiny noise: the nearest atom
    far = atoms.denoise(np.zeros((1, atoms.D)), 0.0, 1.0)                      # alpha = 0: the prior mean
    np.testing.assert_allclose(far[0], atoms.weights @ p, rtol=1e-14)


G3 = ORACLES["gaussian"]

BAD = [
    bad(lambda: GaussianData([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]]), ValueError, "positive definite", "cov-indefinite"),
    bad(lambda: GaussianData([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]]), ValueError, "symmetric", "cov-asymmetric"),
    bad(lambda: GaussianData(np.zeros((1, 2)), np.eye(2)), ValueError, "dimension", "mean-2-D"),
    bad(lambda: GaussianData(np.zeros(2), np.full((2, 2), np.nan)), ValueError, "finite", "cov-nan"),
    bad(lambda: GaussianMixture([0.5, 0.5], np.zeros((2, 3)), np.stack([np.eye(2)] * 2)), ValueError,
        r"shape \(2, 3, 3\)", "gmm-cov-shape"),
    bad(lambda: GaussianMixture([0.5, -0.5], np.zeros((2, 1)), np.ones((2, 1, 1))), ValueError, "positive",
        "gmm-negative-weight"),
    bad(lambda: GaussianMixture([0.0, 0.0], np.zeros((2, 1)), np.ones((2, 1, 1))), ValueError, "positive",
        "gmm-zero-weights"),
    bad(lambda: GaussianMixture([1.0], np.zeros((2, 1)), np.ones((2, 1, 1))), ValueError, "one entry per component",
        "gmm-weights-length"),
    bad(lambda: GaussianMixture([0.5, 0.5], np.zeros((2, 1)), np.ones((2, 1, 1)), labels=[0, 2]), ValueError,
        "every class", "gmm-missing-class"),
    bad(lambda: FiniteAtoms(np.zeros((0, 2))), ValueError, "at least one point", "atoms-empty"),
    bad(lambda: FiniteAtoms(np.zeros((2, 2)), weights=[1.0, -1.0]), ValueError, "positive", "atoms-negative-weight"),
    bad(lambda: G3.denoise(np.zeros((2, 2)), 1.0, 0.5), ValueError, r"shape \(B, 3\)", "denoise-dimension"),
    bad(lambda: G3.denoise(np.zeros(3), 1.0, 0.5), ValueError, r"shape \(B, 3\)", "denoise-1-D-x"),
    bad(lambda: G3.denoise(np.zeros((2, 3)), np.ones(3), 0.5), ValueError, r"shape \(2,\)", "denoise-alpha-length"),
    bad(lambda: ORACLES["atoms"].denoise(np.zeros((1, 3)), 1.0, 0.0), ValueError, "sigma > 0", "atoms-sigma-0"),
    bad(lambda: G3.score(np.zeros((1, 3)), -1.0, 0.5), ValueError, "non-negative", "score-negative-alpha"),
    bad(lambda: G3.sample(3, 0), ValueError, "Generator", "sample-int-rng"),
    bad(lambda: G3.sample(-1, np.random.default_rng(0)), ValueError, ">= 0", "sample-negative-n"),
    bad(lambda: G3.sample(2.5, np.random.default_rng(0)), ValueError, "integer", "sample-float-n"),
    bad(lambda: ORACLES["gmm"].conditional(5), ValueError, "class", "unknown-class"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_empty_batches():
    assert G3.denoise(np.zeros((0, 3)), 1.0, 0.5).shape == (0, 3)
    assert G3.sample(0, np.random.default_rng(0)).shape == (0, 3)