"""Samplers: paper form == coefficient form, convergence orders against solve_ivp, strong order on a shared Brownian
path, the exact Gaussian output law, order lowering, NaN propagation and bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import convergence as CV
from refdiff import schedules as S
from refdiff.convergence import oracle_model
from refdiff.oracles import GaussianData
from refdiff.parametrization import PREDICTIONS, to_x0_eps
from refdiff.samplers import (DDIM, DDPM, DEIS, DPM2, LMS, RK4, Churn, DPMSolver, DPMSolverPP, DPMSolverPP3S,
                              DPMSolverPPSDE, DPMSolverPPSinglestep, Euler, EulerAncestral, Grid, Heun, Level, PredictorCorrector,
                              ReverseEulerMaruyama, SDEDPMSolverPP2M, StepCoeffs, UniPC, apply, model_coeffs,
                              pf_ode_solve, step_coeffs)
from refdiff.samplers.base import NumericContext, State
from refdiff.samplers.exact_law import gaussian_marginal, gaussian_output_law
from refdiff.solve import sample
from strategies import vp_levels
from bad_inputs import bad, refused
from tolerances import z_bound

ORDER_TOL = CV.ORDER_TOL      # |fitted slope - declared order| for ODE samplers and exact laws
STRONG_TOL = CV.STRONG_TOL    # strong order of SDE samplers
# step counts past diffusers' lower_order_final threshold (15) and into the asymptotic range: 3M's third-order
# steps still show at 32 steps (error ratio 4.85 where the run's order 2 gives 4), so the fit starts at 64
NS = list(CV.ODE_NS)


GMM = CV.default_problem().data          # the 2-D, 3-component mixture of the convergence problem
SCHED = S.VPLinear()
T0, T1 = 0.8, 0.05


AFFINE = [DDIM(), DDIM(0.6), DDPM(), DDPM("fixed_large"), Euler(), Heun(), Euler(Churn(5.0)),
          Heun(Churn(3.0, 0.1, 5.0)),
          EulerAncestral(), DPM2(), DPMSolver(1), DPMSolver(2), DPMSolver(3), DPMSolverPP(2), DPMSolverPP(3),
          DPMSolverPPSinglestep(), DPMSolverPPSinglestep(0.3),
          SDEDPMSolverPP2M(), UniPC(1), UniPC(2, "bh1"), UniPC(2, "bh2"), ReverseEulerMaruyama()]


def _grid(n, schedule=SCHED, t0=T0, t1=T1):
    return Grid.from_times(schedule, S.log_snr_uniform_times(schedule, n, t0, t1))


@pytest.mark.parametrize("sampler", AFFINE, ids=lambda s: s.name)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_paper_form_equals_coefficient_form(sampler, prediction):
    rng = np.random.default_rng(1)
    grid = _grid(9)
    x = rng.standard_normal((4, 2))
    noise = rng.standard_normal((40, 4, 2))
    model = oracle_model(GMM, prediction)
    a = sample(sampler, model, grid, x, noise=noise, prediction=prediction, mode="paper")
    b = sample(sampler, model, grid, x, noise=noise, prediction=prediction, mode="coeffs")
    # the two paths form the same affine combination in a different association: a few roundings of terms
    # that are O(|x|) after the coefficients (|a|, |b| <= ~20 here)
    assert np.abs(a.x - b.x).max() <= 1e-12 * max(1.0, np.abs(a.x).max())
    assert [r.nfe for r in a.record] == [r.nfe for r in b.record]


@pytest.mark.parametrize("sampler", [DDIM(), Heun(), DPMSolverPP(2), UniPC(2), EulerAncestral()], ids=lambda s: s.name)
def test_per_row_levels(sampler):
    """Per-sample timesteps: levels with one value per batch row give per-row coefficient vectors, and each row
    equals a run of that row alone."""
    rng = np.random.default_rng(2)
    t0 = np.array([0.9, 0.7, 0.8])
    t1 = np.array([0.1, 0.05, 0.2])
    times = np.stack([S.log_snr_uniform_times(SCHED, 6, a, b) for a, b in zip(t0, t1)], axis=1)   # (7, B)
    grid = Grid([Level(t, SCHED.alpha(t), SCHED.sigma(t), SCHED.log_snr(t)) for t in times], SCHED)
    x = rng.standard_normal((3, 2))
    noise = rng.standard_normal((20, 3, 2))
    model = oracle_model(GMM)
    a = sample(sampler, model, grid, x, noise=noise, mode="paper")
    b = sample(sampler, model, grid, x, noise=noise, mode="coeffs")
    assert np.abs(a.x - b.x).max() <= 1e-12 * max(1.0, np.abs(a.x).max())
    c = step_coeffs(sampler, grid, State(), "eps")
    assert np.shape(c[0].a) == (3,)
    for r in range(3):
        g1 = Grid.from_times(SCHED, times[:, r])
        one = sample(sampler, model, g1, x[r:r + 1], noise=noise[:, r:r + 1], mode="paper")
        assert np.abs(one.x[0] - a.x[r]).max() <= 1e-12 * max(1.0, np.abs(one.x).max())


@pytest.mark.parametrize("sampler,err", [(RK4(), ValueError), (PredictorCorrector(), NotImplementedError),
                                         (DDPM("learned_range", variance_fn=lambda x, l: np.zeros_like(x)),
                                          NotImplementedError), (LMS(), NotImplementedError),
                                         (DEIS(), NotImplementedError), (DPMSolverPPSDE(), NotImplementedError)],
                         ids=["RK4", "PC", "learned_range", "LMS", "DEIS", "DPM++SDE"])
def test_non_affine_samplers_refuse_coefficients(sampler, err):
    with pytest.raises(err):
        step_coeffs(sampler, _grid(4), State(history=(0, 0)), "eps")


@given(lv=vp_levels, seed=st.integers(0, 2 ** 32 - 1))
def test_model_coeffs_match_the_parametrization(lv, seed):
    a, s = lv
    rng = np.random.default_rng(seed)
    x, m = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    for pred in PREDICTIONS:
        cx, cm = model_coeffs(pred, a, s)
        ref = to_x0_eps(m, pred, x, a, s)[0]
        assert np.abs(cx * x + cm * m - ref).max() <= 1e-12 * max(1.0, np.abs(ref).max(), 1 / a)


# -- convergence orders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def problem():
    return CV.default_problem()


_PROBLEMS = {}                           # the order table's problems, built once for all rows


@pytest.mark.parametrize("spec", CV.specs(), ids=lambda s: f"{s.kind}:{s.label}")
def test_order_table_row(spec):
    """Every row of ``refdiff order`` at its declaration: ODE orders against DOP853, the strong order on a shared
    Brownian path, weak orders of the exact Gaussian law, consistency samplers' exact law, DPM-adaptive's
    tolerance proportionality (refdiff.convergence for the problems, grids and tolerances)."""
    case = CV.run_spec(spec, _PROBLEMS)
    assert case["verdict"] == "pass", case


def test_order_table_covers_the_samplers_in_use():
    rows = CV.specs()
    names = {s.label.split(" [")[0].split(" (nfe")[0] for s in rows}
    assert len(names) >= 35, sorted(names)
    assert {s.kind for s in rows} == set(CV.KINDS)
    with pytest.raises(ValueError, match="unknown kinds"):
        CV.specs(["ode"])


@pytest.mark.parametrize("sampler", [LMS(3), DPMSolverPP(3, halved_d2=True)], ids=lambda s: s.name)
def test_warm_up_limits_and_the_halved_d2_finding(sampler, problem):
    """Cold-started LMS-k and DPM-Solver++ 3M run at global order 2 (their first-order first step has local error
    O(h^2)), yet from an exact warm-up their steps show their own order (the order table measures LMS-4, DEIS-3 and 3M
    that way). The released DPM-Solver / diffusers 3M update (half the D'' term) stays at order 2 even then."""
    want = 2 if "halved" in sampler.name else sampler.order
    errs = CV.ode_errors(sampler, problem, exact_warmup=True)
    assert abs(CV.fitted_order(CV.ODE_NS, errs) - want) <= ORDER_TOL, errs
    assert sampler.convergence_order == 2 and CV.warmup_limited(sampler)


def test_ode_convergence_order_from_a_cold_start_settles_at_the_global_order(problem):
    """3M from a cold start: a third-order error ratio (>= 2^3) at 64 -> 128 steps gives way to the warm-up's order 2;
    from 512 steps on the fitted order is within ORDER_TOL of 2 (256 -> 512 is still pre-asymptotic: 1.82)."""
    ns = (64, 128, 512, 1024, 2048)
    errs = CV.ode_errors(DPMSolverPP(3), problem, Ns=ns)
    assert errs[0] / errs[1] > 8.0, errs
    assert abs(CV.fitted_order(ns[2:], errs[2:]) - 2.0) <= ORDER_TOL, errs


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmsolver_pp_sde_without_noise_is_dpmsolver_pp_2s(prediction):
    """eta = 0 removes the ancestral noise: k-diffusion's DPM-Solver++ SDE with r = 1/2 is then DPM-Solver++(2S) with
    its intermediate at the lambda midpoint (lambda = -log sigma_ve), two independent implementations."""
    rng = np.random.default_rng(5)
    grid, x = _grid(12), rng.standard_normal((4, 2))
    model = oracle_model(GMM, prediction)
    a = sample(DPMSolverPPSDE(eta=0.0), model, grid, x, prediction=prediction)
    b = sample(DPMSolverPPSinglestep(0.5), model, grid, x, prediction=prediction)
    assert np.abs(a.x - b.x).max() <= 1e-12 * max(1.0, np.abs(a.x).max())


def test_dpmsolver_pp_3m_steps_are_third_order_but_the_warm_up_limits_the_run_to_second():
    s = DPMSolverPP(3)
    assert s.order == 3 and s.convergence_order == 2
    res = sample(s, oracle_model(GMM), _grid(40), np.zeros((1, 2)))
    assert res.state.orders[:3] == (1, 2, 3) and set(res.state.orders[2:]) == {3}


# -- exact output law (Gaussian data) ---------------------------------------------------------------------

def _gauss():
    rng = np.random.default_rng(5)
    A = rng.standard_normal((3, 3))
    return GaussianData(rng.standard_normal(3), A @ A.T + 0.3 * np.eye(3))


GAUSS = _gauss()
LAW_SAMPLERS = [s for s in AFFINE if not isinstance(s, (DPM2, DPMSolver)) or s.order != 1]


@pytest.mark.parametrize("sampler", LAW_SAMPLERS, ids=lambda s: s.name)
def test_exact_law_covariance_error_shrinks_at_the_order(sampler):
    target = gaussian_marginal(GAUSS, SCHED.alpha(T1), SCHED.sigma(T1))
    errs = [np.abs(gaussian_output_law(sampler, GAUSS, _grid(n)).cov - target.cov).max() for n in NS]
    slope = -np.polyfit(np.log(NS), np.log(errs), 1)[0]
    order = sampler.convergence_order if not sampler.stochastic else sampler.weak_order
    assert abs(slope - order) <= ORDER_TOL, errs


def test_exact_law_of_ode_samplers_is_the_pushforward_of_their_map():
    """For a deterministic sampler the law is exact: its covariance equals J C J^T for the sampler's linear map."""
    grid = _grid(7)
    s = DPMSolverPP(2)
    law = gaussian_output_law(s, GAUSS, grid)
    start = gaussian_marginal(GAUSS, grid.levels[0].alpha, grid.levels[0].sigma)
    model = oracle_model(GAUSS)
    f = lambda x: sample(s, model, grid, x).x  # noqa: E731
    b = f(np.zeros((1, 3)))[0]
    J = np.stack([f(e[None])[0] - b for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(law.cov, J @ start.cov @ J.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(law.mean, J @ start.mean + b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler", [DDPM(), ReverseEulerMaruyama(), EulerAncestral()], ids=lambda s: s.name)
def test_exact_law_matches_monte_carlo(sampler):
    rng = np.random.default_rng(6)
    grid = _grid(12)
    law = gaussian_output_law(sampler, GAUSS, grid)
    start = gaussian_marginal(GAUSS, grid.levels[0].alpha, grid.levels[0].sigma)
    n = 40_000
    x0 = rng.multivariate_normal(start.mean, start.cov, size=n)
    out = sample(sampler, oracle_model(GAUSS), grid, x0, noise=rng).x
    se_mean = np.sqrt(np.diag(law.cov) / n)
    z = z_bound(3 + 3 * 3)                                                 # 3 means and 9 covariance entries
    assert np.all(np.abs(out.mean(0) - law.mean) <= z * se_mean)
    C = law.cov
    se_cov = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C * C) / n)       # Var of a Gaussian sample covariance
    assert np.all(np.abs(np.cov(out.T) - C) <= z * se_cov)


# -- orders used, edge cases, NaN --------------------------------------------------------------------------

def test_order_lowering_is_recorded():
    res = sample(DPMSolverPP(3), oracle_model(GMM), _grid(5), np.zeros((1, 2)))
    assert res.state.orders == (1, 2, 3, 2, 1)                # warm-up, then diffusers' lower_order_final (< 15)
    assert [r.order for r in res.record] == [1, 2, 3, 2, 1]
    data_grid = Grid.from_discrete(S.DiscreteSchedule(S.linear_betas(1000)), S.timesteps(1000, 4, "trailing"))
    res = sample(Heun(), oracle_model(GMM), data_grid, np.zeros((1, 2)))
    assert res.state.orders[-1] == 1 and res.record[-1].nfe == 1      # Heun's last step into sigma = 0: Euler


@pytest.mark.parametrize("sampler", [DDIM(), Heun(), DPMSolver(3), DPMSolverPP(3), UniPC(2), DPM2(), RK4()],
                         ids=lambda s: s.name)
def test_one_step_works(sampler):
    res = sample(sampler, oracle_model(GMM), _grid(1), np.ones((2, 2)))
    assert np.all(np.isfinite(res.x)) and len(res.record) == 1


def test_nan_in_model_output_propagates_and_is_recorded():
    def model(x, level):
        out = oracle_model(GMM)(x, level)
        if abs(float(level.t) - 0.3) < 0.15:
            out = out.copy()
            out[1, 0] = np.nan
        return out

    grid = Grid.from_times(SCHED, np.linspace(0.8, 0.05, 6))
    res = sample(DPMSolverPP(2), model, grid, np.ones((3, 2)))
    bad = [r.nonfinite for r in res.record]
    first = next(i for i, b in enumerate(bad) if b)
    assert bad[:first] == [0] * first and all(b > 0 for b in bad[first:])
    assert np.all(np.isfinite(res.x[[0, 2]])) and np.isnan(res.x[1]).any()       # only the poisoned row
    with pytest.raises(FloatingPointError, match=f"step {first}"):
        sample(DPMSolverPP(2), model, grid, np.ones((3, 2)), strict=True)


MODEL = oracle_model(GMM)
X4 = np.zeros((4, 2))
TABLE = S.DiscreteSchedule(S.linear_betas(10))
VP_NO_SCHEDULE = Grid([Level(i, 1 / np.hypot(1, s), s / np.hypot(1, s), -2 * np.log(s))
                       for i, s in ((9, 3.0), (5, 1.0), (1, 0.3))])


def _run(sampler=None, model=MODEL, grid=None, x=X4, **kw):
    return sample(sampler or DDIM(), model, grid or _grid(3), x, **kw)


BAD = [
    # grids
    bad(lambda: Grid.from_times(SCHED, [0.5]), ValueError, "at least 2 levels", "one-level-grid"),
    bad(lambda: Grid.from_times(SCHED, [0.5, 0.5, 0.1]), ValueError, "duplicate", "duplicate-times"),
    bad(lambda: Grid.from_times(SCHED, [0.1, 0.5]), ValueError, "decreasing", "increasing-times"),
    bad(lambda: Grid.from_times(SCHED, [1.5, 0.1]), ValueError, r"t must lie in \[0.0, 1.0\]", "time-outside"),
    bad(lambda: Grid.from_times(SCHED, [0.9, np.nan]), ValueError, "NaN", "nan-time"),
    bad(lambda: Grid.from_sigmas([1.0, -0.1]), ValueError, "non-negative", "negative-sigma"),
    bad(lambda: Grid.from_sigmas([1.0, 2.0]), ValueError, "decreasing", "increasing-sigmas"),
    bad(lambda: Grid.from_discrete(TABLE, np.array([5.0, 2.0])), ValueError, "integers", "float-timesteps"),
    bad(lambda: Grid.from_discrete(TABLE, [12, 2]), ValueError, r"\[0, 9\]", "timestep-past-table"),
    bad(lambda: Grid.from_discrete(TABLE, [5, 2], final="zero"), ValueError, "'data', 'first' or 'none'",
        "unknown-final"),
    bad(lambda: Grid.from_discrete(TABLE, [5, 5, 2]), ValueError, "duplicate", "duplicate-timesteps"),
    # the loop's arguments
    bad(lambda: _run(steps=0), ValueError, "steps must be >= 1", "steps-0"),
    bad(lambda: _run(steps=-1), ValueError, "steps must be >= 1", "steps-negative"),
    bad(lambda: _run(steps=2.0), ValueError, "steps must be an integer", "steps-float"),
    bad(lambda: _run(state=State(step=3)), ValueError, "the run it came from is finished", "finished-state"),
    bad(lambda: _run(state=State(step=-1)), ValueError, r"state.step must be an integer in \[0, 2\]",
        "negative-state"),
    bad(lambda: _run(DPMSolverPP(2), state=State(step=1, history=(np.zeros((1, 2)),))), ValueError,
        r"history\[0\] has shape \(1, 2\)", "history-of-another-batch"),
    bad(lambda: _run(mode="kernel"), ValueError, "mode", "unknown-mode"),
    bad(lambda: _run(prediction="noise"), ValueError, "prediction type", "unknown-prediction"),
    bad(lambda: _run("ddim"), ValueError, "refdiff Sampler", "sampler-not-a-sampler"),
    bad(lambda: _run(grid=[0.9, 0.1]), ValueError, "refdiff Grid", "grid-not-a-grid"),
    bad(lambda: _run(model=None), ValueError, "callable", "model-not-callable"),
    bad(lambda: _run(x=0.0), ValueError, "batch axis", "scalar-x_T"),
    # the model
    bad(lambda: _run(model=lambda x, lv: np.zeros((1, 2))), ValueError, r"model output has shape \(1, 2\)",
        "model-wrong-shape"),
    bad(lambda: _run(model=lambda x, lv: None), ValueError, "real numeric array", "model-returns-None"),
    bad(lambda: _run(model=lambda x, lv: x, guidance=2.0), ValueError, r"\(uncond, cond\)", "guidance-no-pair"),
    bad(lambda: _run(model=lambda x, lv: (x, x[:1]), guidance=2.0), ValueError, "conditional model output",
        "guidance-cond-shape"),
    bad(lambda: _run(model=lambda x, lv: (x, x), guidance=np.ones(3)), ValueError, r"shape \(4,\)",
        "guidance-per-row-length"),
    bad(lambda: _run(model=lambda x, lv: np.full_like(x, np.nan), strict=True), FloatingPointError,
        "non-finite values after step 0", "nan-strict"),
    # noise
    bad(lambda: _run(DDPM()), ValueError, "stochastic", "noise-missing"),
    bad(lambda: _run(DDPM(), noise=np.zeros((3, 2, 3))), ValueError, "noise draws must have shape", "noise-shape"),
    bad(lambda: _run(DDPM(), noise=np.zeros((1, 4, 2))), ValueError, "ran out of noise draws", "noise-too-few"),
    bad(lambda: _run(DDPM(), noise=lambda: np.zeros(2)), ValueError, r"callable returned shape \(2,\)",
        "noise-callable-shape"),
    # samplers' parameters
    bad(lambda: DDIM(1.5), ValueError, "eta", "ddim-eta-above-1"),
    bad(lambda: DDIM(np.nan), ValueError, "eta", "ddim-eta-nan"),
    bad(lambda: EulerAncestral(-1.0), ValueError, "eta", "ancestral-eta-negative"),
    bad(lambda: DPMSolverPPSDE(eta=np.nan), ValueError, "eta", "dpmpp-sde-eta-nan"),
    bad(lambda: DPMSolverPPSinglestep(r=1.0), ValueError, r"\(0, 1\)", "2s-r-1"),
    bad(lambda: Churn(np.nan), ValueError, "S_churn", "churn-nan"),
    bad(lambda: Churn(1.0, 2.0, 1.0), ValueError, "S_tmin <= S_tmax", "churn-window"),
    bad(lambda: DPMSolverPP(4), ValueError, "order", "dpmpp-order-4"),
    bad(lambda: DPMSolver(4), ValueError, "order", "dpm-order-4"),
    bad(lambda: UniPC(4), ValueError, "order", "unipc-order-4"),
    bad(lambda: DPMSolverPP3S(0.6, 0.4), ValueError, "r1 < r2", "dpmpp-3s-r-order"),
    bad(lambda: DPMSolverPP3S(second="heun"), ValueError, "second", "dpmpp-3s-second"),
    bad(lambda: UniPC(2, "bh3"), ValueError, "variant", "unipc-variant"),
    bad(lambda: LMS(5), ValueError, "order", "lms-order-5"),
    bad(lambda: DEIS(4), ValueError, "order", "deis-order-4"),
    bad(lambda: DDPM("learned"), ValueError, "variance", "ddpm-variance"),
    bad(lambda: DDPM("learned_range"), ValueError, "variance_fn", "ddpm-learned-without-fn"),
    bad(lambda: PredictorCorrector(snr=0.0), ValueError, "snr", "pc-snr-0"),
    bad(lambda: PredictorCorrector(n_corrector=1.5), ValueError, "integer", "pc-n-float"),
    # samplers on grids they cannot run
    bad(lambda: _run(RK4(), grid=Grid.from_discrete(TABLE, [9, 5, 1])), ValueError, "continuous schedule",
        "rk4-discrete-grid"),
    bad(lambda: _run(ReverseEulerMaruyama(), grid=Grid.from_discrete(TABLE, [9, 5, 1]),
                     noise=np.random.default_rng(0)), ValueError, "continuous schedule", "em-discrete-grid"),
    bad(lambda: _run(DPM2(), grid=VP_NO_SCHEDULE), ValueError, "cannot name the time", "intermediate-level-no-t"),
    bad(lambda: step_coeffs(LMS(2), _grid(3), State()), NotImplementedError, "past x_j", "lms-no-coeffs"),
    # coefficient form
    bad(lambda: model_coeffs("eps", 0.0, 1.0), ValueError, "SNR = 0", "eps-at-zero-snr"),
    bad(lambda: model_coeffs("noise", 1.0, 0.5), ValueError, "prediction", "coeffs-unknown-prediction"),
    bad(lambda: apply(StepCoeffs(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0), X4), ValueError, "pass its output m",
        "apply-without-m"),
    bad(lambda: apply(StepCoeffs(1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0), X4, X4, np.zeros((1, 2))), ValueError,
        r"D_prev1 has shape \(1, 2\)", "apply-history-shape"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_documented_results_for_unusual_but_valid_input():
    """float16 / integer x_T computes in float64 and returns float64; an empty batch returns an empty batch; a model
    returning a list of the right shape is read as an array; NaN from the model propagates (strict=True raises)."""
    assert _run(x=X4.astype(np.float16)).x.dtype == np.float64
    assert _run(x=X4.astype(np.int64)).x.dtype == np.float64
    assert _run(x=np.zeros((0, 2))).x.shape == (0, 2)
    np.testing.assert_array_equal(_run(model=lambda x, lv: MODEL(x, lv).tolist()).x, _run().x)
    assert np.isnan(_run(model=lambda x, lv: np.full_like(x, np.nan)).x).all()


def test_intermediate_levels_on_a_discrete_grid_name_their_fractional_timestep():
    """DPM-2's midpoint between table entries gets the index interpolated in log-SNR (k-diffusion's sigma_to_t),
    not NaN; at the grid's own levels the model sees the integer timesteps."""
    table = S.DiscreteSchedule(S.linear_betas(1000))
    grid = Grid.from_discrete(table, [999, 500, 100])
    seen = []
    sample(DPM2(), lambda x, lv: (seen.append(float(np.asarray(lv.t))), MODEL(x, lv))[1], grid, X4)
    assert seen[0] == 999 and seen[2] == 500 and seen[4] == 100
    for k, (hi, lo) in ((1, (999, 500)), (3, (500, 100))):
        assert lo < seen[k] < hi and seen[k] != round(seen[k])
        lam = table.log_snr(np.array([int(np.floor(seen[k])), int(np.ceil(seen[k]))]))
        frac = seen[k] - np.floor(seen[k])
        mid = 0.5 * (table.log_snr(hi) + table.log_snr(lo))             # DPM-2: the log-SNR midpoint
        assert abs((1 - frac) * lam[0] + frac * lam[1] - mid) <= 1e-12 * abs(mid)


@pytest.mark.parametrize("method,rtol", [("RK45", 1e-10), ("Radau", 1e-10)])
def test_solve_ivp_ground_truths_agree(method, rtol, problem):
    other = pf_ode_solve(SCHED, GMM.denoise, problem.x, T0, T1, method=method, rtol=rtol)
    # each solver meets its tolerance: the difference is within a few rtol of the solution's size
    assert np.abs(other - problem.reference).max() <= 100 * rtol * max(1.0, np.abs(problem.reference).max())


def test_ddpm_learned_range_interpolates_fixed_small_and_large():
    rng = np.random.default_rng(7)
    grid = _grid(6)
    x, noise = rng.standard_normal((3, 2)), rng.standard_normal((10, 3, 2))
    small = sample(DDPM("fixed_small"), oracle_model(GMM), grid, x, noise=noise).x
    large = sample(DDPM("fixed_large"), oracle_model(GMM), grid, x, noise=noise).x
    for v, ref in ((-1.0, small), (1.0, large)):
        lr = DDPM("learned_range", variance_fn=lambda u, l, v=v: np.full_like(u, v))
        np.testing.assert_allclose(sample(lr, oracle_model(GMM), grid, x, noise=noise).x, ref, rtol=1e-12,
                                   atol=1e-12)


def test_flow_euler_ancestral_reduces_to_flow_euler():
    """eta = 0 is FlowEuler (1e-12); with eta > 0 one step's noise term is the forward flow transition from t_down
    to t' (its variance t'^2 - t_down^2 (1 - t')^2 / (1 - t_down)^2, checked on a symbolic draw)."""
    from refdiff.grids import flow_sigmas
    from refdiff.samplers import FlowEuler, FlowEulerAncestral

    def lvl(t):
        with np.errstate(divide="ignore"):
            return Level(t, 1.0 - t, t, 2.0 * (np.log1p(-t) - np.log(t)))
    grid = Grid([lvl(t) for t in flow_sigmas(12, shift=3.0)])
    x = np.random.default_rng(2).standard_normal((3, 3))
    model = oracle_model(GAUSS, "x0")
    a = sample(FlowEulerAncestral(eta=0.0), model, grid, x, prediction="x0").x
    b = sample(FlowEuler(), model, grid, x, prediction="x0").x
    assert np.abs(a - b).max() <= 1e-12 * max(1.0, np.abs(b).max())
    cur, nxt = lvl(0.8), lvl(0.5)
    D = np.zeros((1, 3))
    ctx = NumericContext(np.zeros((1, 3)), lambda u, lv: D, lambda: np.ones((1, 3)), (), Grid([cur, nxt]))
    out = FlowEulerAncestral(eta=1.0).step(ctx, cur, nxt, State())[0]
    td = 0.5 * (1.0 + (0.5 / 0.8 - 1.0))
    assert np.allclose(out, np.sqrt(0.5 ** 2 - (td * 0.5 / (1.0 - td)) ** 2), rtol=1e-12)


def test_unipc_3_is_fourth_order_with_bh2_but_not_cleanly_with_bh1(problem):
    """From an exact warm-up UniPC-3 (bh2) halves its error 16x per halving (local slopes within ORDER_TOL of 4);
    with bh1 (B(h) = -h) the local slopes wander (4.15, 4.46, 3.72, 2.74 over 64 .. 1024 steps): no clean order,
    which is why the order table carries only the bh2 row."""
    ns = (64, 128, 256, 512, 1024)
    for variant, clean in (("bh2", True), ("bh1", False)):
        errs = CV.ode_errors(UniPC(3, variant), problem, Ns=ns, exact_warmup=True)
        slopes = [np.log2(errs[i] / errs[i + 1]) for i in range(len(ns) - 1)]
        if clean:
            assert all(abs(s - 4.0) <= ORDER_TOL for s in slopes), slopes
        else:
            assert max(slopes) - min(slopes) > 1.0, slopes


def test_unipc_3_cold_start_excess_is_third_order(problem):
    """UniPC-3's cold start (its first corrected step is only UniP-1 + UniC-1, local error O(h^3)) adds an error that
    shrinks as h^3: the global order is 3 (UniPC.global_order), though its constant is small enough that the cold
    run still measures order 4 up to 2048 steps."""
    ns = (256, 512, 1024)
    cold = CV.ode_errors(UniPC(3, "bh2"), problem, Ns=ns)
    warm = CV.ode_errors(UniPC(3, "bh2"), problem, Ns=ns, exact_warmup=True)
    excess = [c - w for c, w in zip(cold, warm)]
    slopes = [np.log2(excess[i] / excess[i + 1]) for i in range(len(ns) - 1)]
    # 0.2, twice ORDER_TOL: the excess is the difference of two errors that agree to 1e-3, so its slope carries
    # both fits' higher-order terms
    assert all(abs(s - 3.0) <= 2 * ORDER_TOL for s in slopes), (excess, slopes)
    assert UniPC(3).global_order == 3
