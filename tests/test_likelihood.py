"""refdiff.likelihood: PF-ODE log-likelihood with exact scores equals the exact log density."""

import numpy as np
import pytest

from refdiff import likelihood as LK
from refdiff import schedules as S
from refdiff import selfcheck as C
from refdiff import sde as SD
from refdiff.oracles import FiniteAtoms, GaussianData, GaussianMixture
from bad_inputs import bad, refused
from tolerances import z_bound

EXACT_NATS = 1e-8        # exact divergence to 1e-8 nats (DOP853 at rtol 1e-11 reaches ~1e-12)


def _data():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((2, 2))
    g = GaussianData(rng.standard_normal(2), A @ A.T + 0.3 * np.eye(2))
    covs = np.stack([B @ B.T + 0.2 * np.eye(2) for B in rng.standard_normal((3, 2, 2)) * 0.5])
    gmm = GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-2, 2, (3, 2)), covs)
    return {"gaussian": g, "gmm": gmm}


DATA = _data()
SDES = {"VP": SD.VPSDE(), "subVP": SD.SubVPSDE(), "VE": SD.VESDE(), "flow": SD.ScheduleSDE(S.RectifiedFlow(), T=0.999)}


def _fns(data, sde):
    score = lambda x, t: data.score(x, sde.alpha(t), sde.sigma(t))  # noqa: E731
    div = lambda x, t: data.score_divergence(x, sde.alpha(t), sde.sigma(t))  # noqa: E731
    hvp = lambda x, t, v: data.score_hvp(x, sde.alpha(t), sde.sigma(t), v)  # noqa: E731
    prior = lambda z: data.log_prob(z, sde.alpha(sde.T), sde.sigma(sde.T))  # noqa: E731  exact marginal at T
    return score, div, hvp, prior


@pytest.mark.parametrize("sde_name", SDES)
@pytest.mark.parametrize("data_name", DATA)
def test_exact_divergence_gives_the_exact_log_density(data_name, sde_name):
    data = DATA[data_name]
    err, _ = C.pf_likelihood_error(data, SDES[sde_name], data.sample(4, np.random.default_rng(1)))
    assert err <= EXACT_NATS


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("data_name", DATA)
def test_hutchinson_is_within_its_standard_error(data_name, kind):
    data = DATA[data_name]
    rng = np.random.default_rng(2)
    x0 = data.sample(3, rng)
    probes = LK.hutchinson_probes(24, x0.shape, rng, kind)
    _, z = C.pf_likelihood_error(data, SDES["VP"], x0, probes=probes, rtol=1e-9, atol=1e-11)
    assert z <= z_bound(len(x0), dof=24 - 1)              # 3 samples; the standard error from 24 probes


def test_finite_difference_jvp_path_agrees_with_exact_hvp():
    data, sde = DATA["gmm"], SDES["VP"]
    rng = np.random.default_rng(3)
    x0 = data.sample(2, rng)
    score, _, hvp, prior = _fns(data, sde)
    probes = LK.hutchinson_probes(4, x0.shape, rng)
    a = LK.pf_ode_log_likelihood(x0, sde, score, probes=probes, hvp_fn=hvp, prior_logp=prior, rtol=1e-9)
    b = LK.pf_ode_log_likelihood(x0, sde, score, probes=probes, prior_logp=prior, rtol=1e-9)
    # central differences with step 1e-4 carry O(1e-8) relative error in each Hessian-vector product
    np.testing.assert_allclose(a.per_probe, b.per_probe, rtol=0, atol=1e-6)


SCORE = _fns(DATA["gaussian"], SDES["VP"])[0]
ATOMS = FiniteAtoms(np.array([[0.0, 0.0], [1.0, 1.0]]))
XL = np.zeros((2, 2))

BAD = [
    bad(lambda: LK.pf_ode_log_likelihood(XL, SDES["VP"], SCORE), ValueError, "divergence_fn", "no-divergence"),
    bad(lambda: LK.pf_ode_log_likelihood(XL, SDES["VP"], SCORE, probes=np.zeros((3, 2))), ValueError,
        r"shape \(P, 2, 2\)", "probe-shape"),
    bad(lambda: LK.pf_ode_log_likelihood(np.array([[np.nan, 0.0]]), SDES["VP"], SCORE, probes=np.zeros((1, 1, 2))),
        ValueError, "finite", "nan-data"),
    bad(lambda: LK.pf_ode_log_likelihood(XL, SDES["VP"], SCORE, probes=np.zeros((1, 2, 2)), t0=0.5, t1=0.5),
        ValueError, "t1 > t0", "empty-interval"),
    bad(lambda: LK.hutchinson_probes(2, (1, 2), np.random.default_rng(0), "sobol"), ValueError, "probe kind",
        "unknown-probe"),
    bad(lambda: LK.pf_ode_log_likelihood(XL, SDES["VP"], lambda x, t: ATOMS.score(x, SDES["VP"].alpha(t),
                                                                                 SDES["VP"].sigma(t)),
                                         probes=np.ones((2, 2, 2))), ValueError, "t0=1e-5", "atoms-from-t0-0"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)