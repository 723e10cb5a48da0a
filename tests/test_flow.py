"""Flow matching: the rectified-flow PF ODE solved exactly in flow form, the flow samplers' updates, SD3 / Flux
sigmas (static shift, Flux's resolution-dependent mu, linear / exponential time shifts, terminal stretch, Karras /
exponential / beta spacing) against diffusers' FlowMatchEulerDiscreteScheduler and calculate_shift."""

import ast
import inspect

import numpy as np
import pytest

from refdiff import convergence as CV
from refdiff import grids as G
from refdiff import schedules as S
from refdiff.oracles import GaussianData
from refdiff.parametrization import from_x0_eps, to_x0_eps
from refdiff.samplers import RK4, DDIM, FlowEuler, FlowHeun, Grid, pf_ode_solve
from refdiff.samplers.flow import flow_time
from refdiff.solve import sample
from bad_inputs import bad, refused

U32 = 2.0 ** -24          # float32 unit roundoff
# diffusers builds the grid in numpy float64 from float32 table entries / float32 sigmas and casts the result to a
# float32 tensor: the cast is 0.5 u, the float32 inputs (the table's sigma_min, a pipeline's float32 sigmas) carry
# 0.5 u each through the shift (whose condition number is <= 1 on (0, 1]), and the spacing options add a log / exp
# or a quantile in float64: 4 u covers the chain (1.3 u measured at worst)
GRID_RTOL = 4.0 * U32


def _gauss(seed=3, D=3):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((D, D))
    return GaussianData(rng.standard_normal(D), A @ A.T + 0.2 * np.eye(D))


# -- the flow PF ODE -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_gaussian_flow_ode_is_solved_exactly_in_flow_form(shift):
    """On rectified-flow levels the PF ODE is dx/dt = v(x, t) with v the flow prediction; for Gaussian data its
    solution is closed-form (GaussianData.pf_ode_solution). scipy's DOP853 on v (through the parametrization), RK4
    at 400 steps and the closed form agree; FlowHeun converges to it at order 2."""
    data, sch = _gauss(), S.RectifiedFlow(shift)
    rng = np.random.default_rng(0)
    t0, t1 = 0.95, 0.02
    x = rng.standard_normal((5, 3)) * sch.sigma(t0) + sch.alpha(t0) * data.mean
    exact = data.pf_ode_solution(x, sch.alpha(t0), sch.sigma(t0), sch.alpha(t1), sch.sigma(t1))

    def v(t, y):
        a, s = sch.alpha(t), sch.sigma(t)
        y = y.reshape(5, 3)
        D = data.denoise(y, a, s)
        return from_x0_eps(D, (y - a * D) / s, "flow", a, s).ravel()

    if shift == 1.0:                                      # flow time is the schedule's time: dx/dt = v exactly
        from scipy.integrate import solve_ivp

        sol = solve_ivp(v, (t0, t1), x.ravel(), method="DOP853", rtol=1e-12, atol=1e-14)
        assert np.abs(sol.y[:, -1].reshape(5, 3) - exact).max() <= 1e-9
    ref = pf_ode_solve(sch, data.denoise, x, t0, t1, rtol=1e-12)
    assert np.abs(ref - exact).max() <= 1e-9
    model = CV.oracle_model(data, "flow")
    grid = Grid.from_times(sch, np.linspace(t0, t1, 401))
    assert np.abs(sample(RK4(), model, grid, x, prediction="flow").x - exact).max() <= 1e-9
    errs = [np.abs(sample(FlowHeun(), model, Grid.from_times(sch, np.linspace(t0, t1, n + 1)), x,
                          prediction="flow").x - exact).max() for n in (32, 64, 128, 256)]
    assert abs(CV.fitted_order((32, 64, 128, 256), errs) - 2.0) <= CV.ORDER_TOL, errs


def test_flow_euler_is_ddim_and_the_flow_prediction_is_the_velocity():
    """FlowEuler's update x' = x + (t' - t) v on flow levels is DDIM's (the same affine map in other coordinates), and
    the flow prediction is v = eps - x0."""
    data, sch = _gauss(), S.RectifiedFlow(3.0)
    rng = np.random.default_rng(1)
    grid = Grid.from_times(sch, np.linspace(0.9, 0.1, 9))
    x = rng.standard_normal((4, 3))
    m = CV.oracle_model(data, "flow")
    a = sample(FlowEuler(), m, grid, x, prediction="flow").x
    b = sample(DDIM(), m, grid, x, prediction="flow").x
    assert np.abs(a - b).max() <= 1e-12 * max(1.0, np.abs(a).max())
    lv = grid.levels[3]
    out = m(x, lv)
    x0, eps = to_x0_eps(out, "flow", x, lv.alpha, lv.sigma)
    np.testing.assert_allclose(out, eps - x0, rtol=1e-12, atol=1e-12)
    assert flow_time(lv) == pytest.approx(sch.sigma(lv.t) / (sch.alpha(lv.t) + sch.sigma(lv.t)))


# -- SD3 / Flux sigmas against diffusers ------------------------------------------------------------------------

def _diffusers_calculate_shift():
    """diffusers' calculate_shift, compiled from its own source: importing the Flux pipeline module pulls in
    transformers, which the test extra does not install; the function itself needs nothing."""
    pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm

    path = inspect.getsourcefile(fm).replace("schedulers/scheduling_flow_match_euler_discrete.py",
                                             "pipelines/flux/pipeline_flux.py")
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    ns = {}
    exec(compile(ast.Module([fn], type_ignores=[]), path, "exec"), ns)
    return ns["calculate_shift"]


SEQ_LENS = (256, 1024, 1536, 2304, 4096)        # 512^2 to 1024^2 images in Flux's packed latents, and the ends


def test_flux_mu_equals_diffusers_calculate_shift():
    calc = _diffusers_calculate_shift()
    for seq in list(SEQ_LENS) + [300, 3000, 8192]:
        assert G.flux_mu(seq) == pytest.approx(calc(seq), rel=1e-15, abs=1e-15)
    assert G.flux_mu(256) == pytest.approx(0.5) and G.flux_mu(4096) == pytest.approx(1.15)


def _scheduler(**config):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler(**config)


def _close(ours, theirs):
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    bad = np.abs(ours - theirs) > GRID_RTOL * np.abs(ours)
    assert not bad.any(), (np.flatnonzero(bad), ours[bad], theirs[bad])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 20, 28, 50])
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_flux_sigmas_equal_the_pipelines(n, seq):
    """FluxPipeline: sigmas = linspace(1, 1/n, n) passed to set_timesteps with mu = calculate_shift(seq)."""
    sch = _scheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096, shift=3.0)
    sch.set_timesteps(n, sigmas=np.linspace(1.0, 1.0 / n, n), mu=_diffusers_calculate_shift()(seq))
    _close(G.flux_sigmas(n, seq), sch.sigmas.numpy())


CONFIGS = [
    ("sd3", {"shift": 3.0}, {"shift": 3.0}),
    ("shift1", {"shift": 1.0}, {"shift": 1.0}),
    ("mu", {"use_dynamic_shifting": True}, {"mu": 0.8}),
    ("mu-linear", {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 0.8, "time_shift_type": "linear"}),
    ("karras", {"shift": 3.0, "use_karras_sigmas": True}, {"shift": 3.0, "spacing": "karras"}),
    ("exponential", {"shift": 3.0, "use_exponential_sigmas": True}, {"shift": 3.0, "spacing": "exponential"}),
    ("beta", {"shift": 3.0, "use_beta_sigmas": True}, {"shift": 3.0, "spacing": "beta"}),
    ("terminal", {"use_dynamic_shifting": True, "shift_terminal": 0.1}, {"mu": 1.15, "shift_terminal": 0.1}),  # LTX
]
# one step with a terminal stretch divides 0 by 0 in diffusers: refused here (the test after this one)
CASES = [pytest.param(n, config, kw, id=f"{name}-{n}") for name, config, kw in CONFIGS
         for n in (1, 2, 5, 13, 28, 50) if not (name == "terminal" and n == 1)]


@pytest.mark.parametrize("n,config,kw", CASES)
def test_flow_sigmas_equal_the_schedulers(n, config, kw):
    sch = _scheduler(**config)
    sch.set_timesteps(n, mu=kw.get("mu"))
    _close(G.flow_sigmas(n, **kw), sch.sigmas.numpy())


def test_one_step_terminal_stretch_is_refused_where_diffusers_returns_nan():
    sch = _scheduler(use_dynamic_shifting=True, shift_terminal=0.1)
    with np.errstate(all="ignore"):
        sch.set_timesteps(1, mu=1.0)
    assert np.isnan(sch.sigmas.numpy()[0])                 # the finding: 1 - t stretched by 0 / 0
    with pytest.raises(ValueError, match="0 / 0"):
        G.flow_sigmas(1, mu=1.0, shift_terminal=0.1)


def test_static_shift_is_a_log_snr_shift():
    """SD3's shift s is exactly a shift of the log-SNR by -2 log s (RectifiedFlow), and flow_sigmas at shift s are the
    rectified-flow sigma / (alpha + sigma) at the shifted times."""
    t = np.linspace(0.05, 0.95, 7)
    s = 3.0
    rf, rf1 = S.RectifiedFlow(s), S.RectifiedFlow(1.0)
    np.testing.assert_allclose(rf.log_snr(t), rf1.log_snr(t) - 2.0 * np.log(s), rtol=1e-13)
    np.testing.assert_allclose(G.time_shift(t, shift=s), rf.sigma(t) / (rf.alpha(t) + rf.sigma(t)), rtol=1e-14)
    np.testing.assert_allclose(G.time_shift(t, mu=np.log(s)), G.time_shift(t, shift=s), rtol=1e-14)


BAD = [
    bad(lambda: G.flow_sigmas(4, shift=0.0), ValueError, "shift must be positive", "shift-zero"),
    bad(lambda: G.flow_sigmas(4, shift=-1.0), ValueError, "shift must be positive", "shift-negative"),
    bad(lambda: G.time_shift(0.5, shift=np.inf), ValueError, "shift must be positive", "shift-inf"),
    bad(lambda: G.time_shift(0.5, mu=0.0, kind="linear"), ValueError, "needs mu > 0", "linear-mu-zero"),
    bad(lambda: G.time_shift(0.5, mu=1.0, kind="cubic"), ValueError, "time_shift_type", "shift-kind"),
    bad(lambda: G.time_shift(0.5), ValueError, "exactly one", "shift-none"),
    bad(lambda: G.time_shift(0.0, shift=2.0), ValueError, r"\(0, 1\]", "time-zero"),
    bad(lambda: G.flow_sigmas(4, shift=3.0, shift_terminal=1.0), ValueError, "shift_terminal", "terminal-one"),
    bad(lambda: G.flow_sigmas(4, shift=3.0, spacing="cosine"), ValueError, "spacing", "spacing-unknown"),
    bad(lambda: G.flow_sigmas(3, shift=3.0, times=[1.0, 0.5]), ValueError, "n = 3", "times-count"),
    bad(lambda: G.flow_sigmas(2, shift=3.0, times=[0.5, 1.0]), ValueError, "decrease", "times-increasing"),
    bad(lambda: G.flux_mu(0), ValueError, "image_seq_len", "seq-zero"),
    bad(lambda: G.flux_mu(1024, base_seq_len=4096, max_seq_len=256), ValueError, "max_seq_len", "seq-range"),
    bad(lambda: S.RectifiedFlow(0.0), ValueError, "shift must be positive", "rf-shift-zero"),
]


@pytest.mark.parametrize("call,error,match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)
