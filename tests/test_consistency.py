"""Consistency-style samplers (CM multistep, LCM, TCD, stochastic flow sampling) with the exact consistency function
of Gaussian data: the data law exactly at 1, 2, 4 and 8 steps; a consistency function at the wrong time gives the
bias an independent closed-form chain predicts; Monte Carlo agrees with the exact law; bad input."""

import numpy as np
import pytest
from scipy.linalg import sqrtm

from refdiff import convergence as CV
from refdiff.oracles import ConsistencyOracle, GaussianMixture
from refdiff.samplers import (LCM, TCD, CMMultistep, FlowStochastic, Grid, Level, TargetLevel, boundary_scalings,
                              step_coeffs)
from refdiff.samplers.base import State
from refdiff.samplers.exact_law import gaussian_marginal, output_law_by_map
from refdiff.solve import sample
from bad_inputs import bad, refused
from tolerances import z_bound

DATA = CV.gaussian_problem().data
SAMPLERS = [CMMultistep(), LCM(), TCD(0.0), TCD(0.3), TCD(1.0), FlowStochastic()]


def _law_error(law, target):
    scale = max(1.0, np.abs(target.cov).max(), np.abs(target.mean).max())
    return max(np.abs(law.mean - target.mean).max(), np.abs(law.cov - target.cov).max()) / scale


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", CV.CONSISTENCY_STEPS)
def test_exact_consistency_function_gives_the_data_law(sampler, n):
    grid, model, prediction, boundary = CV.consistency_setup(sampler, n, DATA)
    law = output_law_by_map(sampler, DATA, grid, model=model, prediction=prediction)
    assert _law_error(law, gaussian_marginal(DATA, *boundary)) <= CV.EXACT_LAW_RTOL


def _chain(grid, delta, e):
    """The law of CM multistep sampling with a consistency function taken at log-SNR + delta, by direct linear
    algebra: f(x) = mu + M_e M_src^-1 (x - a' mu) (M_l = (a_l^2 C + s_l^2 I)^(1/2), (a', s') the wrong level of
    the same scale), then re-noised to the next sigma."""
    mu, C, I = DATA.mean, DATA.cov, np.eye(DATA.D)

    def M(a, s):
        return np.real(sqrtm(a * a * C + s * s * I))

    sig = [float(lv.sigma) for lv in grid.levels]
    m, V = mu.copy(), C + sig[0] ** 2 * I
    Me = M(1.0, e)
    for i, s in enumerate(sig[:-1]):
        lam = -2.0 * np.log(s) + delta
        scale = np.hypot(1.0, s)
        a_w, s_w = scale / np.sqrt(1.0 + np.exp(-lam)), scale / np.sqrt(1.0 + np.exp(lam))
        A = Me @ np.linalg.inv(M(a_w, s_w))
        m, V = mu + A @ (m - a_w * mu), A @ V @ A.T
        if i < len(sig) - 2:
            V = V + (sig[i + 1] ** 2 - e * e) * I
    return m, V


@pytest.mark.parametrize("n", [1, 2, 4])
def test_consistency_function_at_a_wrong_time_gives_the_predicted_bias(n):
    """A network's time-conditioning error: the oracle at log-SNR + 0.5. The sampler's exact law equals the chain
    computed independently, and is off the data law by far more than rounding."""
    smp = CMMultistep()
    grid, _, prediction, boundary = CV.consistency_setup(smp, n, DATA)
    oracle = ConsistencyOracle(DATA, boundary, log_snr_error=0.5)
    law = output_law_by_map(smp, DATA, grid, model=oracle.model(prediction, smp.scalings), prediction=prediction)
    m, V = _chain(grid, 0.5, boundary[1])
    np.testing.assert_allclose(law.mean, m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(law.cov, V, rtol=1e-10, atol=1e-12)
    assert _law_error(law, gaussian_marginal(DATA, *boundary)) > 1e-3


def test_a_denoiser_in_place_of_the_consistency_function_is_biased_at_every_step_count():
    """FlowStochastic with the posterior mean (a denoiser, not a consistency function): its law stays off the data
    law and does not converge as the steps shrink (re-noising forgets x except through D)."""
    smp = FlowStochastic()
    errs = []
    for n in (4, 16, 64):
        grid, _, _, boundary = CV.consistency_setup(smp, n, DATA)
        law = output_law_by_map(smp, DATA, grid)
        errs.append(_law_error(law, gaussian_marginal(DATA, *boundary)))
    assert min(errs) > 1e-2, errs


def test_monte_carlo_agrees_with_the_exact_law():
    smp = TCD(0.3)
    grid, model, prediction, _ = CV.consistency_setup(smp, 4, DATA)
    law = output_law_by_map(smp, DATA, grid, model=model, prediction=prediction)
    rng = np.random.default_rng(11)
    first = grid.levels[0]
    start = gaussian_marginal(DATA, float(first.alpha), float(first.sigma))
    n = 40_000
    x = rng.multivariate_normal(start.mean, start.cov, size=n)
    out = sample(smp, model, grid, x, noise=rng, prediction=prediction).x
    z = z_bound(2 + 4)                                              # 2 means, 4 covariance entries
    C = law.cov
    assert np.all(np.abs(out.mean(0) - law.mean) <= z * np.sqrt(np.diag(C) / n))
    assert np.all(np.abs(np.cov(out.T) - C) <= z * np.sqrt((np.outer(np.diag(C), np.diag(C)) + C * C) / n))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("times", [[np.pi / 2], [np.pi / 2, 1.1], [np.pi / 2, 1.3, 0.8, 0.3]])
def test_scm_trigflow_multistep_gives_the_data_law_from_pure_noise(times, sigma_data):
    """sCM (Lu & Song 2024) on TrigFlow levels alpha = cos t, sigma = s_d sin t, from t = pi/2 (pure noise; its
    2-step schedule passes t = 1.1), with the exact consistency function under the TrigFlow parametrization."""
    smp = CMMultistep("trigflow", sigma_data=sigma_data)
    with np.errstate(divide="ignore"):
        levels = [Level(t, np.cos(t), sigma_data * np.sin(t), 2.0 * np.log(np.cos(t) / (sigma_data * np.sin(t))))
                  for t in times]
    grid = Grid(levels + [Level(0.0, 1.0, 0.0, np.inf)])
    model = ConsistencyOracle(DATA).model("x0", smp.scalings)
    law = output_law_by_map(smp, DATA, grid, model=model, start=gaussian_marginal(DATA, 0.0, sigma_data))
    assert _law_error(law, gaussian_marginal(DATA, 1.0, 0.0)) <= CV.EXACT_LAW_RTOL


def test_boundary_scalings_satisfy_the_boundary_condition():
    """EDM's c_skip(eps) = 1, c_out(eps) = 0 at the boundary sigma_min (Song et al. 2023, Eq. 5); LCM's tend to it at
    timestep 0; none is (0, 1)."""
    lv = Level(0.002, 1.0, 0.002, -2.0 * np.log(0.002))
    assert boundary_scalings("edm", lv) == (pytest.approx(1.0), pytest.approx(0.0))
    lv0 = Level(0, 1.0, 1e-3, 2.0 * np.log(1e3))
    c_skip, c_out = boundary_scalings("lcm", lv0)
    assert c_skip == 1.0 and c_out == 0.0
    assert boundary_scalings("none", lv) == (0.0, 1.0)
    data_level = Level(0.0, 1.0, 0.0, np.inf)
    assert boundary_scalings("trigflow", data_level) == (1.0, 0.0)
    noise_level = Level(np.pi / 2, 0.0, 0.5, -np.inf)            # TrigFlow t = pi/2: f = -s_d F, no skip
    assert boundary_scalings("trigflow", noise_level) == (0.0, -0.5)


@pytest.mark.parametrize("sampler", [CMMultistep(), LCM(), TCD(0.3), FlowStochastic()], ids=lambda s: s.name)
def test_consistency_samplers_have_a_coefficient_form(sampler):
    grid, model, prediction, _ = CV.consistency_setup(sampler, 4, DATA)
    rng = np.random.default_rng(2)
    x, noise = rng.standard_normal((3, 2)), rng.standard_normal((8, 3, 2))
    a = sample(sampler, model, grid, x, noise=noise, prediction=prediction, mode="paper")
    b = sample(sampler, model, grid, x, noise=noise, prediction=prediction, mode="coeffs")
    assert np.abs(a.x - b.x).max() <= 1e-12 * max(1.0, np.abs(a.x).max())
    assert step_coeffs(sampler, grid, State(), prediction)


def test_tcd_asks_the_model_for_its_target():
    seen = []
    smp = TCD(0.5)
    grid, model, prediction, _ = CV.consistency_setup(smp, 2, DATA)

    def spy(x, level):
        seen.append(level)
        return model(x, level)
    sample(smp, spy, grid, np.zeros((1, 2)), noise=np.zeros((4, 1, 2)), prediction=prediction)
    assert all(isinstance(lv, TargetLevel) and lv.target is not None for lv in seen)
    assert int(seen[0].target.t) == int(np.floor(0.5 * int(grid.levels[1].t)))


BAD = [
    bad(lambda: TCD(-0.1), ValueError, r"gamma must lie in \[0, 1\]", "tcd-gamma-negative"),
    bad(lambda: TCD(1.5), ValueError, r"gamma must lie in \[0, 1\]", "tcd-gamma-above-one"),
    bad(lambda: TCD(float("nan")), ValueError, r"gamma must lie in \[0, 1\]", "tcd-gamma-nan"),
    bad(lambda: CMMultistep("karras"), ValueError, "boundary must be one of", "cm-boundary"),
    bad(lambda: ConsistencyOracle(GaussianMixture([1.0], [[0.0]], [[[1.0]]]), (1.0, 0.0)), ValueError,
        "closed-form for GaussianData", "oracle-not-gaussian"),
    bad(lambda: ConsistencyOracle(DATA, (0.0, 1.0)), ValueError, "alpha > 0", "oracle-boundary-alpha"),
    bad(lambda: ConsistencyOracle(DATA, (1.0, 0.0), log_snr_error=np.inf), ValueError, "finite", "oracle-error-inf"),
    bad(lambda: sample(TCD(0.3), lambda x, lv: x, Grid.from_sigmas([10.0, 1.0, 0.0]), np.zeros((1, 2)),
                       noise=np.zeros((4, 1, 2))), ValueError, "schedule's time", "tcd-grid-without-schedule"),
    bad(lambda: CV.consistency_setup(CV.DDIM(), 2, DATA), ValueError, "no consistency setting", "setup-unknown"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)
