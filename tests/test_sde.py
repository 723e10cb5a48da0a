"""refdiff.sde: each SDE's marginal solves its moment ODEs; the reverse SDE and PF ODE have the right drifts."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from refdiff import schedules as S
from refdiff import sde as SD
from refdiff.oracles import GaussianData
from bad_inputs import bad, refused

SDES = {"VP": SD.VPSDE(), "subVP": SD.SubVPSDE(), "VE": SD.VESDE(), "Cosine": SD.ScheduleSDE(S.Cosine(), T=0.99),
        "EDM": SD.ScheduleSDE(S.EDM(), t_min=0.002, T=80.0), "Flow": SD.ScheduleSDE(S.RectifiedFlow(), T=0.99)}


@pytest.mark.parametrize("name", SDES)
def test_marginal_solves_the_moment_odes(name):
    """d mean / dt = f mean, d var / dt = 2 f var + g^2 (Sarkka & Solin 2019, Eq. 5.51 for linear SDEs)."""
    sde = SDES[name]
    t0 = max(sde.t_min, 1e-3)
    y0 = [sde.alpha(t0), sde.sigma(t0) ** 2]
    sol = solve_ivp(lambda t, y: [sde.f(t) * y[0], 2 * sde.f(t) * y[1] + sde.g2(t)], (t0, sde.T), y0,
                    method="DOP853", rtol=1e-12, atol=1e-14, dense_output=True)
    for t in np.linspace(t0, sde.T, 7)[1:]:
        m, v = sol.sol(t)
        assert m == pytest.approx(sde.alpha(t), rel=1e-9, abs=1e-12)
        assert v == pytest.approx(sde.sigma(t) ** 2, rel=1e-9)


def test_vp_sde_is_the_vp_linear_schedule():
    t = np.linspace(0.01, 1.0, 11)
    vp, gen = SD.VPSDE(), SD.ScheduleSDE(S.VPLinear())
    np.testing.assert_allclose(vp.f(t), gen.f(t), rtol=1e-13)
    np.testing.assert_allclose(vp.g2(t), gen.g2(t), rtol=1e-12)


def test_subvp_diffusion_matches_song_et_al():
    sde, t = SD.SubVPSDE(), np.linspace(0.01, 1.0, 11)
    B = 0.1 * t + 0.5 * 19.9 * t * t
    np.testing.assert_allclose(sde.g2(t), (0.1 + 19.9 * t) * (1 - np.exp(-2 * B)), rtol=1e-13)
    np.testing.assert_allclose(sde.sigma(t), 1 - np.exp(-B), rtol=1e-13)


def test_reverse_and_probability_flow_drifts():
    rng = np.random.default_rng(0)
    g = GaussianData(np.zeros(2), np.diag([0.5, 2.0]))
    sde, t = SD.VPSDE(), 0.4
    x = rng.standard_normal((3, 2))
    score = g.score(x, sde.alpha(t), sde.sigma(t))
    np.testing.assert_allclose(sde.reverse_drift(x, t, score), sde.f(t) * x - sde.g2(t) * score, rtol=1e-15)
    pf = sde.pf_drift(x, t, score)
    # the PF-ODE velocity is E[d(alpha x0 + sigma eps)/dt | x] = alpha' E[x0|x] + sigma' E[eps|x]
    sch = S.VPLinear()
    want = sch.dalpha_dt(t) * g.denoise(x, sch.alpha(t), sch.sigma(t)) + sch.dsigma_dt(t) * g.eps(x, sch.alpha(t),
                                                                                                    sch.sigma(t))
    np.testing.assert_allclose(pf, want, rtol=1e-12, atol=1e-12)


def test_prior():
    sde = SD.VPSDE()
    z = np.random.default_rng(1).standard_normal((4, 3))
    s = sde.sigma(1.0)
    np.testing.assert_allclose(sde.prior_sample(z), s * z, rtol=1e-15)
    want = -0.5 * (3 * np.log(2 * np.pi * s * s) + (z * z).sum(1) / (s * s))
    np.testing.assert_allclose(sde.prior_logp(z), want, rtol=1e-14)
    assert SD.VESDE().prior_logp(z).shape == (4,)


BAD = [
    bad(lambda: SD.ScheduleSDE(S.Cosine(), t_min=0.5, T=0.5), ValueError, "T > t_min", "empty-interval"),
    bad(lambda: SD.ScheduleSDE("cosine"), ValueError, "ContinuousSchedule", "not-a-schedule"),
    bad(lambda: SD.VPSDE(beta_min=-1.0), ValueError, "beta_min", "vp-negative-beta"),
    bad(lambda: SD.VESDE(sigma_min=10.0, sigma_max=1.0), ValueError, "sigma_min < sigma_max", "ve-min-above-max"),
    bad(lambda: SD.VPSDE().f(1.5), ValueError, "t must lie in", "time-outside"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)