"""refdiff.guidance on class-conditional mixture oracles, where the conditional scores are exact."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import conventions as V
from refdiff import guidance as G
from refdiff.oracles import GaussianMixture
from bad_inputs import bad, refused
from tolerances import EPS64, fd_tolerance


def _gmm():
    rng = np.random.default_rng(0)
    covs = np.stack([B @ B.T + 0.2 * np.eye(2) for B in rng.standard_normal((4, 2, 2)) * 0.5])
    return GaussianMixture([0.3, 0.2, 0.3, 0.2], rng.uniform(-2, 2, (4, 2)), covs, labels=[0, 1, 0, 1])


GMM = _gmm()
X = np.random.default_rng(1).standard_normal((5, 2))
A, S_ = 0.7, 0.6


def test_cfg_at_scale_one_is_the_conditional_score():
    mu, mc = GMM.score(X, A, S_), GMM.conditional(1).score(X, A, S_)
    np.testing.assert_array_equal(G.cfg(mu, mc, 0.0, "ho_salimans"), mc)           # w = 0: (1 + 0) m_c - 0 m_u
    # diffusers' s = 1: m_u + 1 (m_c - m_u), one rounding of a sum away from m_c
    assert np.abs(G.cfg(mu, mc, 1.0, "diffusers") - mc).max() <= 2 * EPS64 * np.abs(mu).max()


@pytest.mark.parametrize("w", [0.5, 3.0, 7.5])
def test_three_conventions_agree_after_conversion(w):
    mu, mc = GMM.eps(X, A, S_), GMM.conditional(0).eps(X, A, S_)
    ref = G.cfg(mu, mc, w, "ho_salimans")
    for conv in ("diffusers", "diffusers_original"):
        out = G.cfg(mu, mc, V.cfg_scale(w, "ho_salimans", conv), conv)
        assert np.abs(out - ref).max() <= 8 * EPS64 * (1 + w) * np.abs([mu, mc]).max()


@pytest.mark.parametrize("y", [0, 1])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_score(y):
    eps, cond_eps = GMM.eps(X, A, S_), GMM.conditional(y).eps(X, A, S_)
    grad = GMM.class_log_prob_grad(X, A, S_, y)
    out = G.classifier_guidance_eps(eps, grad, S_, scale=1.0)
    np.testing.assert_allclose(out, cond_eps, rtol=0, atol=1e-12)
    # the gradient itself agrees with central differences of the exact log p_t(y | x)
    h = 1e-5
    fd = np.stack([(GMM.log_class_posterior(X + h * e, A, S_)[:, y] - GMM.log_class_posterior(X - h * e, A, S_)[:, y])
                   / (2 * h) for e in np.eye(2)], axis=1)
    assert np.abs(fd - grad).max() <= fd_tolerance(h, 1e4, 50.0)


def test_classifier_mean_shift():
    mean, var = np.zeros((5, 2)), 0.3
    grad = GMM.class_log_prob_grad(X, A, S_, 0)
    np.testing.assert_allclose(G.classifier_guidance_mean(mean, var, grad, 2.0), 2.0 * 0.3 * grad, rtol=1e-15)


def test_composition_and_negation():
    mu = GMM.eps(X, A, S_)
    c0, c1 = GMM.conditional(0).eps(X, A, S_), GMM.conditional(1).eps(X, A, S_)
    np.testing.assert_allclose(G.compose(mu, [c0], [1.0]), c0, atol=4 * EPS64 * np.abs(mu).max())
    out = G.compose(mu, [c0, c1], [2.0, -1.0])                           # AND c0 (weight 2), NOT c1
    np.testing.assert_allclose(out, mu + 2 * (c0 - mu) - (c1 - mu), rtol=1e-14, atol=1e-14)


def test_mixing_views():
    """Under a view the data distribution is invariant to (a reflection of a symmetric mixture), the mixed score
    equals the plain one; the identity view is a no-op."""
    sym = GaussianMixture([0.5, 0.5], [[1.0, 0.5], [-1.0, -0.5]], [np.eye(2) * 0.3] * 2)
    flip = (lambda x: -x, lambda m: -m)
    ident = (lambda x: x, lambda m: m)
    out = G.mix_views(X, [ident, flip], lambda k, vx: sym.score(vx, A, S_))
    np.testing.assert_allclose(out, sym.score(X, A, S_), rtol=1e-13, atol=1e-13)


def test_cfg_rescale_matches_its_definition():
    rng = np.random.default_rng(2)
    m_c, m_cfg = rng.standard_normal((3, 4, 5)), 3 * rng.standard_normal((3, 4, 5))
    out = G.cfg_rescale(m_cfg, m_c, phi=1.0)
    np.testing.assert_allclose(out.reshape(3, -1).std(axis=1, ddof=1), m_c.reshape(3, -1).std(axis=1, ddof=1),
                               rtol=1e-13)
    np.testing.assert_array_equal(G.cfg_rescale(m_cfg, m_c, phi=0.0), m_cfg)


@given(seed=st.integers(0, 2 ** 32 - 1), p=st.floats(0.5, 1.0))
def test_dynamic_threshold(seed, p):
    x0 = 3 * np.random.default_rng(seed).standard_normal((4, 16))
    out = G.dynamic_threshold(x0, p)
    assert np.all(np.abs(out) <= 1.0 + 1e-15)
    s = np.maximum(np.quantile(np.abs(x0), p, axis=1), 1.0)[:, None]
    np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-15)
    small = np.all(np.abs(x0) <= 1.0, axis=1)
    np.testing.assert_array_equal(out[small], x0[small])           # already within [-1, 1]: unchanged


BAD = [
    bad(lambda: G.cfg(np.zeros(3), np.zeros(4), 1.0), ValueError, "same shape", "cfg-shapes"),
    bad(lambda: G.cfg_rescale(np.ones((2, 3)), np.ones((2, 3)), phi=1.5), ValueError, "phi", "rescale-phi"),
    bad(lambda: G.cfg_rescale(np.ones((2, 3)), np.ones((2, 4))), ValueError, "same shape", "rescale-shapes"),
    bad(lambda: G.cfg_rescale(np.ones((2, 1)), np.ones((2, 1))), ValueError, "more than ddof", "rescale-1-element"),
    bad(lambda: G.compose(np.zeros(2), [np.zeros(2)], [1.0, 2.0]), ValueError, "weights", "compose-weights"),
    bad(lambda: G.compose(np.zeros(2), [np.zeros(3)], [1.0]), ValueError, "same shape", "compose-shapes"),
    bad(lambda: G.classifier_guidance_eps(np.zeros((2, 2)), np.zeros((2, 3)), 1.0), ValueError, "same shape",
        "classifier-shapes"),
    bad(lambda: G.classifier_guidance_mean(np.zeros((2, 2)), np.ones(3), np.zeros((2, 2))), ValueError,
        r"shape \(2,\)", "classifier-variance-length"),
    bad(lambda: G.mix_views(np.zeros((1, 2)), [], lambda k, v: v), ValueError, "at least one view", "no-views"),
    bad(lambda: G.dynamic_threshold(np.ones((2, 3)), max_value=-1.0), ValueError, "max_value", "threshold-negative"),
    bad(lambda: G.dynamic_threshold(np.ones((2, 3)), max_value=2.0, ceiling=1.0), ValueError, "ceiling",
        "threshold-ceiling"),
    bad(lambda: G.dynamic_threshold(np.ones((2, 3)), percentile=0.0), ValueError, "percentile",
        "threshold-percentile"),
    bad(lambda: G.dynamic_threshold(np.ones(3)), ValueError, r"\(B, ...\)", "threshold-1-D"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_documented_edge_results():
    """An empty batch thresholds to an empty batch; CFG-rescale of a constant m_cfg row is 0 / 0 = NaN there
    (IEEE, as diffusers' torch.std gives), other rows unaffected."""
    assert G.dynamic_threshold(np.ones((0, 3))).shape == (0, 3)
    m_cfg = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    out = G.cfg_rescale(m_cfg, m_cfg * 2.0, phi=1.0)
    assert np.isnan(out[0]).all() and np.all(np.isfinite(out[1]))