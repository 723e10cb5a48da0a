"""SDEdit and DDIM inversion; progressive-distillation and guided-distillation targets."""

import numpy as np
import pytest

from refdiff import convergence as CV
from refdiff import distill as DS
from refdiff import editing as E
from refdiff import schedules as S
from refdiff.parametrization import from_x0_eps
from refdiff.samplers import DDIM, DDPM, DPMSolverPP, Grid
from bad_inputs import bad, refused
from refdiff.solve import sample


GMM = CV.default_problem().data          # the 2-D, 3-component mixture of the convergence problem
SCHED = S.Cosine()


def model(x, level):
    return GMM.eps(x, level.alpha, level.sigma)


def data_grid(n):
    d = S.DiscreteSchedule(S.cosine_betas(1000))
    return Grid.from_discrete(d, S.timesteps(1000, n, "trailing"), final="data")


def test_sdedit_strength_zero_is_the_identity():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2))
    res = E.sdedit(DDPM(), model, data_grid(10), x, 0.0, rng.standard_normal((3, 2)), noise=rng)
    np.testing.assert_array_equal(res.x, x)


def test_sdedit_strength_one_is_sampling_from_the_first_level():
    rng = np.random.default_rng(2)
    x, eps = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    noise = rng.standard_normal((20, 3, 2))
    grid = data_grid(10)
    res = E.sdedit(DDPM(), model, grid, x, 1.0, eps, noise=noise)
    lvl = grid.levels[0]
    ref = sample(DDPM(), model, grid, lvl.alpha * x + lvl.sigma * eps, noise=noise)
    np.testing.assert_array_equal(res.x, ref.x)


def test_sdedit_start_follows_diffusers_get_timesteps():
    assert [E.sdedit_start(50, s) for s in (0.0, 0.3, 0.75, 1.0)] == [50, 35, 13, 0]


def test_inversion_then_sampling_returns_the_input_at_first_order():
    x = GMM.sample(4, np.random.default_rng(3)) * 0.5
    errs, Ns = [], [16, 32, 64, 128]
    for n in Ns:
        grid = Grid.from_times(SCHED, S.log_snr_uniform_times(SCHED, n, 0.9, 0.02))
        start = SCHED.alpha(0.02) * x                       # a clean-ish latent at the least noisy level
        inv = E.ddim_invert(model, grid, start)
        back = sample(DDIM(), model, grid, inv.x)
        errs.append(np.abs(back.x - start).max())
    slope = -np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope - 1.0) <= 0.1, errs


def test_progressive_distillation_target_reproduces_two_teacher_steps():
    rng = np.random.default_rng(4)
    times = np.array([0.7, 0.6, 0.5])
    lv = Grid.from_times(SCHED, times).levels
    z = rng.standard_normal((5, 2))

    def denoise(x, level):
        return GMM.denoise(x, level.alpha, level.sigma)

    z2 = DS.teacher_two_ddim_steps(denoise, z, *lv)
    target = DS.progressive_distillation_target(z, z2, lv[0], lv[2])
    # one student DDIM step from t to t'' with x0_hat = target
    student = sample(DDIM(), lambda x, l: from_x0_eps(target, (x - l.alpha * target) / l.sigma, "eps", l.alpha,
                                                      l.sigma), Grid([lv[0], lv[2]]), z).x
    np.testing.assert_allclose(student, z2, rtol=0, atol=1e-12 * max(1.0, np.abs(z2).max()))


def test_progressive_distillation_target_at_the_data_level_is_the_teacher_output():
    d = S.DiscreteSchedule(S.linear_betas(1000))
    grid = Grid.from_discrete(d, np.array([500, 250]), final="data")
    z, z2 = np.ones((2, 2)), np.full((2, 2), 0.3)
    np.testing.assert_array_equal(DS.progressive_distillation_target(z, z2, grid.levels[0], grid.levels[2]), z2)


def test_guided_distillation_target():
    rng = np.random.default_rng(5)
    mu, mc = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    np.testing.assert_array_equal(DS.guided_target(mu, mc, 0.0), mc)
    w = DS.guidance_weights(np.array([0.0, 0.5, 1.0]), 0.0, 14.0)
    np.testing.assert_array_equal(w, [0.0, 7.0, 14.0])
    out = DS.guided_target(mu, mc, w)
    np.testing.assert_allclose(out, (1 + w[:, None]) * mc - w[:, None] * mu, rtol=1e-15)


GRID100 = Grid.from_discrete(S.DiscreteSchedule(S.linear_betas(100)), np.array([90, 50]), final="data")

BAD = [
    bad(lambda: E.sdedit_start(10, 1.5), ValueError, "strength", "strength-above-1"),
    bad(lambda: E.sdedit_start(10, np.nan), ValueError, "strength", "strength-nan"),
    bad(lambda: E.sdedit_start(0, 0.5), ValueError, ">= 1", "no-steps"),
    bad(lambda: E.ddim_invert(model, GRID100, np.zeros((1, 2))), ValueError, "noisy level", "invert-to-data"),
    bad(lambda: E.sdedit(DPMSolverPP(), model, GRID100, np.zeros((2, 2)), 0.5, np.zeros((3, 2))), ValueError,
        "noise_init", "sdedit-noise-shape"),
    bad(lambda: sample(DDIM(0.5), model, Grid.from_times(SCHED, [0.9, 0.5]).reversed(), np.zeros((1, 2)),
                       noise=np.zeros((5, 1, 2))), ValueError, "inversion needs eta = 0", "stochastic-inversion"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)