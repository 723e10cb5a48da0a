"""refdiff's DDIM and DPM-Solver++ 2M against diffusers' schedulers, step by step, under matching conventions.

Both sides get the same float32 input x_i and model output at every step, and refdiff uses diffusers' own float32
alphas_cumprod (converted to float64), so the only difference left is diffusers' float32 arithmetic: the tolerance
is ROUNDINGS float32 roundings of each term's magnitude (|a x|, |b c_x x|, |b c_m m|, |c1 D_prev1|).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from refdiff import schedules as S  # noqa: E402
from refdiff.oracles import GaussianMixture  # noqa: E402
from refdiff.samplers import DDIM, DPMSolverPP, Grid, step_coeffs  # noqa: E402
from refdiff.samplers.base import State  # noqa: E402
from refdiff.solve import sample  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
ROUNDINGS = 16          # ~10 float32 operations per step, each rounding a term of at most these magnitudes
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2)


def _gmm():
    rng = np.random.default_rng(0)
    covs = np.stack([B @ B.T + 0.2 * np.eye(4) for B in rng.standard_normal((3, 4, 4)) * 0.3])
    return GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-1, 1, (3, 4)), covs)


GMM = _gmm()


def model(x, level):
    return GMM.eps(x, level.alpha, level.sigma)


def _tolerance(c, x, m, h1):
    mag = np.abs(c.a * x) + np.abs(c.b * c.c_x * x) + np.abs(c.b * c.c_m * m)
    if h1 is not None:
        mag = mag + np.abs(c.c1 * h1)
    return ROUNDINGS * EPS32 * mag


def _run(scheduler, sampler, final, n, **step_kw):
    """Per step, max |diffusers - refdiff| / tolerance (<= 1 means agreement to float32 rounding)."""
    scheduler.set_timesteps(n)
    table = S.DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod.double().numpy())
    grid = Grid.from_discrete(table, scheduler.timesteps.numpy(), final=final)
    x = (np.random.default_rng(1).standard_normal((3, 4)) * float(grid.levels[0].sigma)).astype(np.float32)
    state, ratios = State(), []
    for i, t in enumerate(scheduler.timesteps):
        x64 = x.astype(np.float64)
        m = model(x64, grid.levels[i]).astype(np.float32)
        theirs = scheduler.step(torch.from_numpy(m), t, torch.from_numpy(x), **step_kw).prev_sample.numpy()
        res = sample(sampler, lambda u, lv: m.astype(np.float64), grid, x64, state=state, steps=1)
        c = step_coeffs(sampler, grid, state)[0]
        h1 = state.history[0] if state.history else None
        tol = _tolerance(c, x64, m.astype(np.float64), h1)
        ratios.append(float(np.max(np.abs(theirs - res.x) / tol)))
        state, x = res.state, theirs
    return ratios


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("n", [1, 10, 50])
def test_ddim_matches_diffusers_step_by_step(spacing, offset, n):
    sched = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False,
                                    clip_sample=False)
    assert max(_run(sched, DDIM(0.0), "first", n, eta=0.0)) <= 1.0


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("n", [1, 5, 20])
def test_dpmsolver_pp_2m_matches_diffusers_step_by_step(spacing, n):
    sched = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, algorithm_type="dpmsolver++",
                                                  solver_order=2, final_sigmas_type="zero")
    assert max(_run(sched, DPMSolverPP(2), "data", n)) <= 1.0


def test_ddim_linspace_reads_the_wrong_alpha_bar_prev():
    """diffusers #12633 / #11347: with linspace spacing DDIM's step uses prev_t = t - T // N, not the next grid
    timestep. refdiff (correct grid) and diffusers differ far beyond float32 rounding at the first step."""
    sched = diffusers.DDIMScheduler(**SD, timestep_spacing="linspace", set_alpha_to_one=True, clip_sample=False)
    ratios = _run(sched, DDIM(0.0), "data", 10, eta=0.0)
    assert ratios[0] > 1e3                  # 999 -> 899 instead of 999 -> 888
