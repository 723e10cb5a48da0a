"""refdiff.losses: unbiased training losses, weighting limits, samplers, and Kingma & Gao's weighting table."""

import numpy as np
import pytest
from scipy import integrate

from refdiff import losses as L
from refdiff import schedules as S
from refdiff import selfcheck as C
from refdiff.oracles import GaussianData
from bad_inputs import bad, refused
from tolerances import z_bound



def _data():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3))
    return GaussianData(rng.standard_normal(3), 0.5 * A @ A.T + 0.2 * np.eye(3))


DATA = _data()
M = np.array([[0.6, 0.1, -0.2], [0.0, 0.8, 0.1], [0.3, -0.1, 0.5]])   # a linear model M x_t + b (not the optimum)
b = np.array([0.1, -0.2, 0.05])
TARGET = {"eps": lambda a, s: (0.0, 1.0), "x0": lambda a, s: (1.0, 0.0), "v": lambda a, s: (-s, a),
          "flow": lambda a, s: (-1.0, 1.0), "score": lambda a, s: (0.0, -1.0 / s)}


def expected_mse(pred, a, s):
    """E_{x0, eps} mean_d (M x_t + b - target)^2 in closed form: target = c1 x0 + c2 eps, so the error is
    (a M - c1) x0 + (s M - c2) eps + b with x0 ~ N(mu, C), eps ~ N(0, I)."""
    c1, c2 = TARGET[pred](a, s)
    P, Q = a * M - c1 * np.eye(3), s * M - c2 * np.eye(3)
    mean = P @ DATA.mean + b
    return (mean @ mean + np.trace(P @ DATA.cov @ P.T) + np.trace(Q @ Q.T)) / 3


CASES = [
    ("eps", "constant", S.VPLinear(), L.UniformTime(1e-3, 1.0)),
    ("v", "min_snr", S.Cosine(), L.UniformTime(0.0, 0.999)),
    ("x0", "edm", S.EDM(), L.LogNormalSigma()),
    ("flow", "constant", S.RectifiedFlow(3.0), L.LogitNormalTime()),
    ("eps", "sigmoid", S.VPLinear(), L.UniformTime(1e-3, 1.0)),
    ("x0", "truncated_snr", S.Sigmoid(), L.StratifiedTime(0.01, 0.99)),
    ("score", "elbo", S.VE(), L.UniformTime()),
]


@pytest.mark.parametrize("pred,weighting,schedule,sampler", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_training_loss_is_unbiased(pred, weighting, schedule, sampler):
    rng = np.random.default_rng(1)
    n = 40_000
    t = sampler.sample(rng.uniform(1e-12, 1.0, n), schedule)
    x0 = DATA.sample(n, rng)
    eps = rng.standard_normal((n, 3))
    res = L.training_loss(lambda x, tt: x @ M.T + b, x0, t, eps, schedule, prediction=pred, weighting=weighting)

    def integrand(u):                      # E over t through the sampler's inverse CDF
        tt = sampler.sample(np.array([u]), schedule)[0] if not isinstance(sampler, L.StratifiedTime) else \
            sampler.t_min + u * (sampler.t_max - sampler.t_min)
        a, s = schedule.alpha(tt), schedule.sigma(tt)
        w = L.loss_weight(weighting, pred, a, s, dlog_snr_dt=schedule.d_log_snr_dt(tt))
        return float(w * expected_mse(pred, a, s))

    # quad to 1e-7 relative (its error estimate joins the bound): the Monte-Carlo standard error is ~1e-2 relative,
    # and tighter requests hit quad's roundoff limit on EDM's log-normal tail (integrand ~ e^{2.4 Phi^-1(u)}, u -> 1)
    exact, quad_err = integrate.quad(integrand, 1e-12, 1 - 1e-12, limit=400, epsrel=1e-7)
    se = res.loss.std(ddof=1) / np.sqrt(n)
    assert abs(res.loss.mean() - exact) <= z_bound() * se + quad_err


def test_discrete_training_loss_is_unbiased():
    rng = np.random.default_rng(2)
    d = S.DiscreteSchedule(S.linear_betas(1000))
    n = 40_000
    i = L.DiscreteUniformTime(1000).sample(rng.uniform(size=n))
    res = L.training_loss(lambda x, tt: x @ M.T + b, DATA.sample(n, rng), i, rng.standard_normal((n, 3)), d)
    exact = np.mean([expected_mse("eps", d.alpha(k), d.sigma(k)) for k in range(1000)])
    assert abs(res.loss.mean() - exact) <= z_bound() * res.loss.std(ddof=1) / np.sqrt(n)


def test_targets_are_the_parametrizations():
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    sch = S.RectifiedFlow()
    t = np.array([0.1, 0.4, 0.6, 0.9])
    res = L.training_loss(lambda x, tt: np.zeros_like(x), x0, t, eps, sch, prediction="flow")
    np.testing.assert_array_equal(res.target, eps - x0)
    np.testing.assert_allclose(res.x_t, (1 - t)[:, None] * x0 + t[:, None] * eps, rtol=1e-15)
    np.testing.assert_allclose(res.loss, ((eps - x0) ** 2).mean(axis=1), rtol=1e-15)


def test_min_snr_limits_and_forms():
    """Hang et al.: x0 min(SNR, g), eps min(SNR, g) / SNR, v min(SNR, g) / (SNR + 1); finite at SNR 0 and inf."""
    g = 5.0
    a = np.array([0.0, 0.1, 0.6, 0.99, 1.0])
    s = np.sqrt(1 - a * a)
    inner = slice(1, 4)
    snr = a[inner] ** 2 / s[inner] ** 2
    x0 = L.loss_weight("min_snr", "x0", a, s, gamma=g)
    eps = L.loss_weight("min_snr", "eps", a, s, gamma=g)
    v = L.loss_weight("min_snr", "v", a, s, gamma=g)
    np.testing.assert_allclose(x0[inner], np.minimum(snr, g), rtol=1e-14)
    np.testing.assert_allclose(eps[inner], np.minimum(snr, g) / snr, rtol=1e-14)
    np.testing.assert_allclose(v[inner], np.minimum(snr, g) / (snr + 1), rtol=1e-14)
    assert (x0[0], x0[-1]) == (0.0, g)          # SNR = 0 and SNR = inf
    assert (eps[0], eps[-1]) == (1.0, 0.0)
    assert (v[0], v[-1]) == (0.0, 0.0)
    assert np.all(np.isfinite(L.loss_weight("min_snr", "flow", a, s)))


def test_edm_weighting_matches_karras_lambda():
    sig = np.array([0.002, 0.5, 80.0])                   # EDM: alpha = 1, sigma = sigma
    w = L.loss_weight("edm", "x0", np.ones(3), sig)
    np.testing.assert_allclose(w, (sig ** 2 + 0.25) / (sig * 0.5) ** 2, rtol=1e-14)


LAM = np.linspace(-12.0, 12.0, 49)
KG_TABLE = C.kingma_gao_table(LAM)


@pytest.mark.parametrize("name", KG_TABLE)
def test_weighting_map_reproduces_kingma_gao_table(name):
    # the table gives w up to a constant factor: the ratio must be constant
    assert C.kingma_gao_ratio_spread(*KG_TABLE[name], LAM) <= 1e-12


def test_log_snr_densities_integrate_to_one():
    for sampler, sch in ((L.UniformTime(), S.Cosine()), (L.LogNormalSigma(), S.EDM()),
                         (L.LogitNormalTime(), S.RectifiedFlow(3.0))):
        total = integrate.quad(lambda lam: float(sampler.log_snr_density(np.array(lam), sch)), -60, 60,
                               limit=400)[0]
        assert abs(total - 1.0) <= 1e-8


def test_samplers():
    u = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(L.StratifiedTime().sample(u), (np.arange(3) + u) / 3, rtol=1e-15)
    np.testing.assert_allclose(L.AntitheticTime().sample([0.25], n=4), [0.25, 0.5, 0.75, 0.0], atol=1e-15)
    assert L.DiscreteUniformTime(10).sample(np.array([0.0, 0.95, 1 - 1e-16])).tolist() == [0, 9, 9]
    t = L.LogNormalSigma().sample(np.array([0.5]), S.EDM())
    assert t[0] == pytest.approx(np.exp(-1.2), rel=1e-14)
    assert L.LogitNormalTime().sample(np.array([0.5]))[0] == 0.5


def test_nan_in_model_output_propagates_and_is_reported():
    rng = np.random.default_rng(4)
    x0, eps = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))

    def model(x, t):
        out = np.zeros_like(x)
        out[2, 1] = np.nan
        return out

    res = L.training_loss(model, x0, np.array([0.2, 0.4, 0.6, 0.8]), eps, S.VPLinear())
    assert np.isnan(res.loss[2]) and np.all(np.isfinite(res.loss[[0, 1, 3]]))
    assert res.nonfinite_rows.tolist() == [2]
    with pytest.raises(FloatingPointError, match=r"rows \[2\] at t = \[0.6\]"):
        L.training_loss(model, x0, np.array([0.2, 0.4, 0.6, 0.8]), eps, S.VPLinear(), strict=True)


ZSNR = S.DiscreteSchedule(S.rescale_zero_terminal_snr(S.scaled_linear_betas(1000)))
X0 = np.zeros((2, 3))
IDENTITY = lambda x, t: x  # noqa: E731

BAD = [
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([10, 999]), X0, ZSNR, prediction="eps"), ValueError,
        "zero terminal SNR", "eps-at-zero-snr"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([1, 2]), np.zeros((2, 2)), ZSNR), ValueError, "same shape",
        "eps-shape"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([1, 2, 3]), X0, ZSNR), ValueError, r"shape \(2,\)",
        "t-length"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([1.5, 2.0]), X0, ZSNR), ValueError, "integer",
        "float-index-on-a-table"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([0.5, 1.5]), X0, S.VPLinear()), ValueError,
        "t must lie in", "t-outside-the-schedule"),
    bad(lambda: L.training_loss(lambda x, t: x[:, :2], X0, np.array([1, 2]), X0, ZSNR), ValueError,
        "model output shape", "model-output-shape"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([1, 2]), X0, ZSNR, reduction="max"), ValueError,
        "reduction", "unknown-reduction"),
    bad(lambda: L.training_loss(IDENTITY, X0, np.array([1, 2]), X0, "cosine"), ValueError, "schedule must be",
        "schedule-not-a-schedule"),
    bad(lambda: L.training_loss(IDENTITY, np.zeros((2, 0)), np.array([1, 2]), np.zeros((2, 0)), ZSNR), ValueError,
        "at least one element", "examples-without-elements"),
    bad(lambda: L.loss_weight("p2", "eps", 1.0, 1.0), ValueError, "weighting", "unknown-weighting"),
    bad(lambda: L.loss_weight("snr", "noise", 1.0, 1.0), ValueError, "prediction", "unknown-prediction"),
    bad(lambda: L.loss_weight("elbo", "eps", 1.0, 1.0), ValueError, "dlog_snr_dt", "elbo-without-derivative"),
    bad(lambda: L.loss_weight("min_snr", "eps", 0.6, 0.8, gamma=-1.0), ValueError, "gamma", "min-snr-gamma"),
    bad(lambda: L.UniformTime().sample([1.0]), ValueError, r"\[0, 1\)", "uniform-of-1"),
    bad(lambda: L.UniformTime(0.5, 0.2), ValueError, "t_max > t_min", "uniform-range"),
    bad(lambda: L.LogNormalSigma(p_std=0.0), ValueError, "p_std", "lognormal-std-0"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_zero_terminal_snr_trains_v_prediction():
    res = L.training_loss(IDENTITY, X0, np.array([10, 999]), X0, ZSNR, prediction="v")
    assert np.all(np.isfinite(res.loss))


def test_empty_batch_and_low_precision_inputs():
    """An empty batch gives an empty loss; float16 / integer data compute and return float64."""
    res = L.training_loss(IDENTITY, np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), S.VPLinear())
    assert res.loss.shape == (0,) and res.x_t.shape == (0, 3)
    x16 = np.ones((2, 3), dtype=np.float16)
    assert L.training_loss(IDENTITY, x16, np.array([0.3, 0.6]), x16, S.VPLinear()).loss.dtype == np.float64