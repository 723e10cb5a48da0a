"""The k-diffusion / ComfyUI samplers and the flow / consistency families in the shared interface: paper form ==
coefficient form wherever a step is affine, reductions to known samplers at eta = 0 / without guidance, PNDM / PLMS
against diffusers' PNDMScheduler, DPM-fast's order sequence, DPM-adaptive's controller and step limit, CFG++'s
non-vanishing guidance step, the name registry and bad input."""

import numpy as np
import pytest

from refdiff import convergence as CV
from refdiff import grids as G
from refdiff import schedules as S
from refdiff.samplers import (DDIM, IPNDM, LCM, PNDM, SEEDS, TCD, CMMultistep, DPM2Ancestral, DPMFast, DPMSolver,
                              DPMSolverPP, DPMSolverPP2MCFGpp, DPMSolverPP2MSDE, DPMSolverPP2SAncestral,
                              DPMSolverPP3MSDE, DPMSolverPPSDE, DPMSolverPPSinglestep, ERSDE, Euler, EulerAncestral,
                              EulerCFGpp, FlowEuler, FlowHeun, FlowStochastic, GradientEstimation, Grid, HeunPP2,
                              RESMultistep, SAMPLER_NAMES, SASolver, StepLimitError, dpm_adaptive, dpm_fast_orders,
                              dpm_fast_sigmas, sampler, step_coeffs)
from refdiff.samplers.base import Level, State
from refdiff.samplers.dpm_adaptive import PIDController
from refdiff.solve import sample
from bad_inputs import bad, refused

PROBLEM = CV.default_problem()
GMM, SCHED = PROBLEM.data, PROBLEM.schedule


def _grid(n, t0=0.8, t1=0.05):
    return Grid.from_times(SCHED, S.log_snr_uniform_times(SCHED, n, t0, t1))


# every new sampler whose steps are affine: the kernel runs these (tests/test_kernels_sampler_step.py)
COEFF_SAMPLERS = [FlowEuler(), FlowHeun(), FlowStochastic(), DPM2Ancestral(), DPM2Ancestral(eta=0.0),
                  DPMSolverPP2SAncestral(), DPMSolverPP2MSDE(), DPMSolverPP2MSDE(solver_type="heun"),
                  DPMSolverPP2MSDE(eta=0.0), DPMSolverPP3MSDE(), DPMSolverPP3MSDE(eta=0.0), RESMultistep(),
                  RESMultistep(eta=1.0), SEEDS(2, eta=0.0), SEEDS(2, eta=0.0, solver_type="phi_2"), SEEDS(3, eta=0.0),
                  DPMFast(26), DPMFast(26, eta=1.0), ERSDE(), ERSDE(max_stage=2), DPMSolverPPSDE(eta=0.0),
                  DPMSolver(2, r1=1.0 / 3.0), TCD(0.3)]
PAPER_ONLY = [RESMultistep(comfy_c2=True), RESMultistep(cfg_pp=True), SEEDS(2), SEEDS(3), SASolver(3, 4),
              EulerCFGpp(), DPMSolverPP2MCFGpp(), GradientEstimation(), HeunPP2(), PNDM(), PNDM("prk"), IPNDM(),
              IPNDM(variable=True), DPMSolverPPSDE()]


def _grid_for(s, n=9):
    return _grid(len(s.orders)) if isinstance(s, DPMFast) else (
        Grid.from_discrete(S.DiscreteSchedule(S.linear_betas(1000)), np.arange(999, 0, -111)) if isinstance(s, TCD)
        else _grid(n))


@pytest.mark.parametrize("smp", COEFF_SAMPLERS, ids=lambda s: s.name)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_paper_form_equals_coefficient_form(smp, prediction):
    rng = np.random.default_rng(1)
    grid = _grid_for(smp)
    x, noise = rng.standard_normal((4, 2)), rng.standard_normal((60, 4, 2))
    model = CV.oracle_model(GMM, prediction)
    a = sample(smp, model, grid, x, noise=noise, prediction=prediction, mode="paper")
    b = sample(smp, model, grid, x, noise=noise, prediction=prediction, mode="coeffs")
    # the same affine combination in another association: a few roundings of O(|x|) terms (as test_samplers)
    assert np.abs(a.x - b.x).max() <= 1e-12 * max(1.0, np.abs(a.x).max())
    assert [r.nfe for r in a.record] == [r.nfe for r in b.record]


@pytest.mark.parametrize("smp", PAPER_ONLY, ids=lambda s: s.name)
def test_paper_only_samplers_say_why(smp):
    with pytest.raises(NotImplementedError, match=r"\w"):
        step_coeffs(smp, _grid(6), State(step=3, history=(0, 0), extra={"d": 0, "sigma_down": 1.0}), "eps")


# -- reductions -----------------------------------------------------------------------------------------------

def _same(a, b, rel=1e-12):
    assert np.abs(a - b).max() <= rel * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("new,known", [
    (DPMSolverPP2MSDE(eta=0.0), DPMSolverPP(2, lower_order_final=False)),
    (RESMultistep(), DPMSolverPP2MSDE(eta=0.0, solver_type="heun")),
    (SEEDS(2, eta=0.0), DPMSolverPPSinglestep(0.5)),
    (DPMSolverPPSDE(eta=0.0), DPMSolverPPSinglestep(0.5)),
    (EulerCFGpp(), DDIM()),
    (DPMSolverPP2MCFGpp(), DPMSolverPP(2, lower_order_final=False)),
    (RESMultistep(cfg_pp=True), RESMultistep()),
    (GradientEstimation(cfg_pp=True), GradientEstimation()),
    (EulerCFGpp(eta=1.0), EulerAncestral()),
    (IPNDM(max_order=1), Euler()),
    (TCD(0.0), DDIM()),
], ids=lambda s: s.name)
def test_reductions_to_known_samplers(new, known):
    """eta = 0 and no guidance turn the new samplers into ones refdiff already verifies (two implementations)."""
    rng = np.random.default_rng(4)
    grid = _grid(20) if not isinstance(new, TCD) else Grid.from_discrete(S.DiscreteSchedule(S.linear_betas(1000)),
                                                                          np.arange(999, 0, -50))
    x, noise = rng.standard_normal((4, 2)), rng.standard_normal((40, 4, 2))
    model = CV.oracle_model(GMM)
    _same(sample(new, model, grid, x, noise=noise).x, sample(known, model, grid, x, noise=noise).x)


def test_cfgpp_guidance_moves_x_by_a_step_independent_amount():
    """The finding of refdiff.samplers.cfgpp: a CFG++ step from sigma to sigma' -> sigma moves x (VE) by
    w (D_c - D_u), not by O(sigma' - sigma): CFG++ under guidance is no ODE discretisation."""
    model = CV.guided_oracle_model(GMM)
    x = np.array([[0.3, -0.4], [1.0, 0.5]])
    w = 1.5
    sig = 0.8
    lv = Grid.from_sigmas([sig, 0.5]).levels[0]
    m_u, m_c = model(x, lv)
    D_u, D_c = x - sig * m_u, x - sig * m_c                    # VE eps prediction: D = x - sigma eps
    for gap in (1e-2, 1e-4, 1e-6):
        out = sample(EulerCFGpp(), model, Grid.from_sigmas([sig, sig - gap]), x, guidance=w).x
        np.testing.assert_allclose(out - x, w * (D_c - D_u), atol=10 * gap)
    assert np.abs(w * (D_c - D_u)).max() > 0.1


# -- starting at SNR 0 -------------------------------------------------------------------------------------------

FLOW = S.RectifiedFlow(3.0)
GAUSS = CV.gaussian_problem().data


def test_every_named_sampler_starts_at_snr_zero_or_says_it_cannot():
    """A grid whose first level is pure noise (flow time 1, a zero-terminal-SNR table's first timestep): samplers in
    VE coordinates (x / alpha) refuse it before computing; the rest run with finite values and no floating-point
    exception (the conftest raises on any)."""
    grid = Grid.from_times(FLOW, np.linspace(1.0, 0.05, 9))
    x = np.random.default_rng(2).standard_normal((3, 2))
    for name in SAMPLER_NAMES:
        if name in ("dpm_fast", "dpm_adaptive"):
            continue
        smp = sampler(name)
        run = lambda: sample(smp, CV.oracle_model(GMM, "flow"), grid, x, prediction="flow",  # noqa: E731
                             noise=np.random.default_rng(3))
        if smp.snr_zero_start:
            assert np.all(np.isfinite(run().x)), name
        else:
            with pytest.raises(ValueError, match="cannot start at SNR 0"):
                run()


@pytest.mark.parametrize("smp", [DDIM(), DPMSolverPP(2), DPMSolverPP(3), FlowEuler(), FlowHeun()],
                         ids=lambda s: s.name)
def test_samplers_that_start_at_snr_zero_converge_from_there(smp):
    """From pure noise (alpha = 0) the exact PF map of Gaussian data is still closed-form; the samplers that accept
    that start reach it at their order (error ratios at 128 -> 256 steps >= 2^(order - 0.2))."""
    x = np.random.default_rng(0).standard_normal((4, 2))
    exact = GAUSS.pf_ode_solution(x, 0.0, 1.0, FLOW.alpha(0.05), FLOW.sigma(0.05))
    errs = [np.abs(sample(smp, CV.oracle_model(GAUSS, "x0"), Grid.from_times(FLOW, np.linspace(1.0, 0.05, n + 1)), x,
                          prediction="x0").x - exact).max() for n in (128, 256)]
    assert errs[0] / errs[1] >= 2.0 ** (smp.convergence_order - 0.2), errs


@pytest.mark.parametrize("smp", [FlowStochastic(), TCD(0.3), LCM()], ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_consistency_samplers_from_pure_noise_give_the_data_law(smp, n):
    from refdiff.oracles import ConsistencyOracle
    from refdiff.samplers.exact_law import gaussian_marginal, output_law_by_map

    grid = Grid.from_times(FLOW, np.linspace(1.0, 0.0, n + 1))
    model = ConsistencyOracle(GAUSS).model("x0", getattr(smp, "scalings", None))
    law = output_law_by_map(smp, GAUSS, grid, model=model, prediction="x0")
    target = gaussian_marginal(GAUSS, 1.0, 0.0)
    assert max(np.abs(law.mean - target.mean).max(), np.abs(law.cov - target.cov).max()) <= CV.EXACT_LAW_RTOL


# -- PNDM / PLMS against diffusers -----------------------------------------------------------------------------

@pytest.mark.parametrize("skip_prk", [True, False], ids=["plms", "prk"])
@pytest.mark.parametrize("n", [5, 10, 25])
def test_pndm_matches_diffusers_pndm_scheduler(skip_prk, n):
    """diffusers' PNDMScheduler (set_alpha_to_one=False, leading spacing, SD's steps_offset 1) drives the same eps model; refdiff's PNDM
    on the same discrete levels (the final level the table's index 0) gives the same sample."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    betas = S.scaled_linear_betas(1000)
    sch = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2,
                                  skip_prk_steps=skip_prk, set_alpha_to_one=False, steps_offset=1)
    sch.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float64)
    sch.final_alpha_cumprod = sch.alphas_cumprod[0]
    sch.set_timesteps(n)
    table = S.DiscreteSchedule(betas)
    model = CV.oracle_model(GMM)
    x = np.random.default_rng(3).standard_normal((3, 2))
    xt = torch.tensor(x)
    for t in sch.timesteps:
        i = int(t)
        eps = model(xt.numpy(), Level(i, table.alpha(i), table.sigma(i), table.log_snr(i)))
        xt = sch.step(torch.tensor(eps), t, xt).prev_sample
    steps = np.sort(np.asarray(sch._timesteps, dtype=np.int64))[::-1]
    ours = sample(PNDM("plms" if skip_prk else "prk"), model, Grid.from_discrete(table, steps, final="first"), x)
    assert len(sch.timesteps) == sum(r.nfe for r in ours.record)
    np.testing.assert_allclose(ours.x, xt.numpy(), rtol=1e-10, atol=1e-10)


# -- DPM-fast and DPM-adaptive ----------------------------------------------------------------------------------

def test_dpm_fast_orders_follow_k_diffusion():
    assert dpm_fast_orders(9) == [3, 3, 2, 1] and dpm_fast_orders(10) == [3, 3, 3, 1]
    assert dpm_fast_orders(11) == [3, 3, 3, 2] and dpm_fast_orders(1) == [1] and dpm_fast_orders(2) == [2]
    for nfe in range(1, 40):
        o = dpm_fast_orders(nfe)
        assert sum(o) == nfe and len(o) == nfe // 3 + 1 and set(o[:-2]) <= {3}


def test_dpm_fast_spends_its_budget_on_its_own_grid():
    smp = DPMFast(20)
    sig = dpm_fast_sigmas(20, 0.03, 14.6)
    assert len(sig) == len(smp.orders) + 1 and np.allclose(np.diff(np.log(sig)), np.diff(np.log(sig))[0])
    res = sample(smp, CV.oracle_model(GMM), Grid.from_sigmas(sig), np.ones((2, 2)) * 14.6)
    assert sum(r.nfe for r in res.record) == 20 and res.state.orders == tuple(smp.orders)


def test_dpm_adaptive_counts_evaluations_and_ends_at_sigma_min():
    model = CV.oracle_model(GMM)
    for order, per_attempt in ((3, 3), (2, 2)):
        r = dpm_adaptive(model, PROBLEM.x, 3.0, 0.2, schedule=SCHED, order=order, rtol=1e-3, atol=1e-4)
        assert r.nfe == per_attempt * (r.n_accept + r.n_reject)
        assert r.sigmas[0] == 3.0 and r.sigmas[-1] == pytest.approx(0.2, rel=1e-12)
        assert len(r.sigmas) == r.n_accept + 1 and len(r.errors) == r.n_accept + r.n_reject


def test_pid_controller_is_k_diffusions():
    """icoeff = 1 (the default): factor = limiter(E^(-1/k)), accepted when >= 0.81; limiter(f) = 1 + atan(f - 1)."""
    pid = PIDController(0.05, 0.0, 1.0, 0.0, order=3)
    assert pid.propose(1.0 / 8.0 - 1e-8)                          # E^(-1/3) = 2: grow by 1 + atan(1)
    assert pid.h == pytest.approx(0.05 * (1.0 + np.arctan(1.0)), rel=1e-6)
    h = pid.h
    assert not pid.propose(8.0 - 1e-8)                              # factor 1 + atan(-1/2) = 0.536 < 0.81
    assert pid.h == pytest.approx(h * (1.0 + np.arctan(-0.5)), rel=1e-6)


def test_dpm_adaptive_refuses_to_run_past_its_step_limit():
    with pytest.raises(StepLimitError, match="within max_steps = 5 attempts"):
        dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.05, schedule=SCHED, rtol=1e-9, atol=1e-11, max_steps=5)


def test_dpm_adaptive_with_noise_is_reproducible():
    model = CV.oracle_model(GMM)
    a = dpm_adaptive(model, PROBLEM.x, 3.0, 0.2, schedule=SCHED, eta=1.0, noise=np.random.default_rng(5))
    b = dpm_adaptive(model, PROBLEM.x, 3.0, 0.2, schedule=SCHED, eta=1.0, noise=np.random.default_rng(5))
    np.testing.assert_array_equal(a.x, b.x)
    assert np.all(np.isfinite(a.x))


# -- names --------------------------------------------------------------------------------------------------------

def test_every_registered_name_builds_its_sampler():
    for name in SAMPLER_NAMES:
        if name in ("dpm_fast", "dpm_adaptive"):
            continue
        assert sampler(name).step
    assert sampler("dpm_fast", nfe=12).orders == dpm_fast_orders(12)
    assert sampler("dpmpp_2m_sde", eta=0.5).eta == 0.5
    assert sampler("dpmpp_2m_sde_heun").solver_type == "heun"
    assert isinstance(sampler("lcm"), LCM) and isinstance(sampler("cm"), CMMultistep)


BAD = [
    bad(lambda: sampler("dpmpp_2m_sdee"), ValueError, r"did you mean 'dpmpp_2m_sde'\?\); known: \[", "name-typo"),
    bad(lambda: sampler("unipc"), ValueError, "known:", "name-unknown"),
    bad(lambda: sampler("dpm_fast"), ValueError, "pass nfe=", "dpm-fast-without-nfe"),
    bad(lambda: sampler("dpm_adaptive"), ValueError, "owns|own steps", "dpm-adaptive-by-name"),
    bad(lambda: G.sigmas("karass", 10, sigma_min=0.1, sigma_max=10), ValueError, "did you mean 'karras'",
        "schedule-typo"),
    bad(lambda: G.sigmas("karras", 10, sigma_min=0.1, sigma_max=10, rh0=7), ValueError, "takes no option 'rh0'",
        "schedule-option-typo"),
    bad(lambda: G.ays_sigmas(10, "SD3"), ValueError, "has tables for", "ays-unknown-family"),
    bad(lambda: G.sigmas("ays", 10, model="Flux"), ValueError, "has tables for", "ays-unknown-family-by-name"),
    bad(lambda: DPMFast(0), ValueError, "nfe", "dpm-fast-zero"),
    bad(lambda: DPMFast(10, eta=-1.0), ValueError, "eta", "dpm-fast-eta"),
    bad(lambda: sample(DPMFast(10), CV.oracle_model(GMM), _grid(6), np.zeros((1, 2))), ValueError,
        "dpm_fast_sigmas", "dpm-fast-wrong-grid"),
    bad(lambda: dpm_fast_sigmas(10, 0.0, 14.6), ValueError, "sigma_min", "dpm-fast-sigma-zero"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.0), ValueError, "0 < sigma_min", "adaptive-zero"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, order=4), ValueError, "order must be 2 or 3",
        "adaptive-order"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, rtol=0.0, atol=0.0), ValueError,
        "both be 0", "adaptive-zero-tolerance"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, rtol=-1.0), ValueError, "rtol",
        "adaptive-negative-rtol"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, eta=1.0), ValueError, "pass noise",
        "adaptive-noise-missing"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, max_steps=0), ValueError, "max_steps",
        "adaptive-max-steps"),
    bad(lambda: dpm_adaptive(CV.oracle_model(GMM), PROBLEM.x, 3.0, 0.1, schedule=S.DiscreteSchedule(
        S.linear_betas(10))), ValueError, "ContinuousSchedule", "adaptive-discrete-schedule"),
    bad(lambda: dpm_adaptive(lambda x, lv: x[:1], PROBLEM.x, 3.0, 0.1), ValueError, "model output has shape",
        "adaptive-model-shape"),
    bad(lambda: DPMSolver(2, r1=1.0), ValueError, "r1", "dpm-solver-r1"),
    bad(lambda: DPM2Ancestral(eta=-0.5), ValueError, "eta", "dpm2a-eta"),
    bad(lambda: DPMSolverPP2MSDE(solver_type="rk4"), ValueError, "solver_type", "2m-sde-solver-type"),
    bad(lambda: DPMSolverPP3MSDE(eta=np.nan), ValueError, "eta", "3m-sde-eta-nan"),
    bad(lambda: RESMultistep(s_noise=-1.0), ValueError, "s_noise", "res-s-noise"),
    bad(lambda: SEEDS(4), ValueError, "2 or 3 stages", "seeds-stages"),
    bad(lambda: SEEDS(2, r=0.0), ValueError, "r must lie", "seeds-r"),
    bad(lambda: SEEDS(2, solver_type="phi_3"), ValueError, "solver_type", "seeds-solver-type"),
    bad(lambda: ERSDE(max_stage=4), ValueError, "max_stage", "er-sde-stage"),
    bad(lambda: ERSDE(quadrature_points=0), ValueError, "quadrature_points", "er-sde-quadrature"),
    bad(lambda: SASolver(5, 4), ValueError, "predictor 1..4", "sa-order"),
    bad(lambda: SASolver(3, 4, tau=-1.0), ValueError, "tau", "sa-tau"),
    bad(lambda: PNDM("ab4"), ValueError, "variant", "pndm-variant"),
    bad(lambda: IPNDM(5), ValueError, "max_order", "ipndm-order"),
    bad(lambda: GradientEstimation(np.inf), ValueError, "gamma", "ge-gamma"),
    bad(lambda: EulerCFGpp(eta=-1.0), ValueError, "eta", "cfgpp-eta"),
    bad(lambda: sample(EulerCFGpp(), CV.guided_oracle_model(GMM), _grid(3), np.zeros((1, 2))), ValueError,
        "with guidance|uncond", "cfgpp-tuple-without-guidance"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)
