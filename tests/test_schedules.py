"""refdiff.schedules against 50-digit mpmath, identities, diffusers' tables and spacings, and bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import highprec, schedules as S, selfcheck as C
from refdiff.report import continuous_families, discrete_tables
from strategies import times
from bad_inputs import bad, refused
from tolerances import EPS32, EPS64, MAX_SCHEDULE_ULP, ROUNDTRIP_UNITS, fd_tolerance, float32_cumprod_bound

FAMILIES = continuous_families()
VP_FAMILIES = {k: v for k, v in FAMILIES.items() if v.variance_preserving}
NON_EDM = {k: v for k, v in FAMILIES.items() if not isinstance(v, S.EDM)}


# -- high precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES, ids=list(FAMILIES))
def test_family_matches_mpmath_within_8_ulp(name):
    err = C.schedule_ulp_errors(FAMILIES[name])
    assert max(err.values()) <= MAX_SCHEDULE_ULP, err


@pytest.mark.parametrize("name", list(discrete_tables()), ids=list(discrete_tables()))
def test_discrete_schedule_matches_mpmath_within_8_ulp(name):
    err = C.discrete_ulp_errors(discrete_tables()[name])
    assert max(err.values()) <= MAX_SCHEDULE_ULP, err


@pytest.mark.parametrize("T", [1, 2, 10, 1000, 4000])
def test_cosine_betas_match_mpmath(T):
    assert highprec.ulp_error(S.cosine_betas(T), highprec.mp_cosine_betas(T)).max() <= MAX_SCHEDULE_ULP


@pytest.mark.parametrize("make", [S.linear_betas, S.scaled_linear_betas, S.cosine_betas], ids=["linear", "scaled", "cosine"])
@pytest.mark.parametrize("T", [2, 10, 1000])
def test_zero_terminal_snr_rescale_matches_mpmath(make, T):
    betas = make(T)
    got = S.rescale_zero_terminal_snr(betas)
    assert highprec.ulp_error(got, highprec.mp_rescale_zero_terminal_snr(betas)).max() <= MAX_SCHEDULE_ULP


def test_compensated_cumsum_beats_plain_cumprod():
    """The reason for exp(compensated cumsum(log1p)): np.cumprod over 1000 steps is measurably worse."""
    betas = S.linear_betas(1000)
    ref = highprec.mp_alphas_cumprod(betas)
    ours = highprec.ulp_error(S.DiscreteSchedule(betas).alphas_cumprod, ref).max()
    plain = highprec.ulp_error(np.cumprod(1.0 - betas), ref).max()
    assert ours <= MAX_SCHEDULE_ULP < plain


# -- identities -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VP_FAMILIES, ids=list(VP_FAMILIES))
@given(t=times)
def test_vp_alpha_sigma_unit_circle(name, t):
    sch = VP_FAMILIES[name]
    a, s = sch.alpha(t), sch.sigma(t)
    # each of alpha, sigma within 8 ulp: a^2 + s^2 - 1 within 2 * 2 * 8 ulp / 2 + rounding of the sum
    assert abs(a * a + s * s - 1.0) <= 20 * EPS64


@pytest.mark.parametrize("name", FAMILIES, ids=list(FAMILIES))
def test_log_snr_strictly_decreasing(name):
    sch = FAMILIES[name]
    t = np.linspace(0.0, 80.0 if isinstance(sch, S.EDM) else 1.0, 20001)
    lam = sch.log_snr(t)
    assert np.all(np.diff(lam) < 0)
    assert (lam[0] == np.inf) == (sch.sigma(0.0) == 0.0)      # noise-free start <=> infinite SNR


@pytest.mark.parametrize("name", list(discrete_tables()), ids=list(discrete_tables()))
def test_discrete_log_snr_strictly_decreasing(name):
    d = S.DiscreteSchedule(discrete_tables()[name])
    assert np.all(np.diff(d.log_snr(np.arange(d.T))) < 0)


@pytest.mark.parametrize("name", NON_EDM, ids=list(NON_EDM))
@given(t=times)
def test_t_of_log_snr_round_trip(name, t):
    assert C.roundtrip_errors(NON_EDM[name], np.array([t])).max() <= ROUNDTRIP_UNITS


@given(t=st.floats(min_value=1e-300, max_value=1e300, allow_subnormal=False))
def test_edm_round_trip(t):
    assert C.roundtrip_errors(FAMILIES["EDM"], np.array([t])).max() <= ROUNDTRIP_UNITS


@pytest.mark.parametrize("name", FAMILIES, ids=list(FAMILIES))
def test_round_trip_at_the_ends(name):
    sch = FAMILIES[name]
    t = C.EDM_T_GRID if isinstance(sch, S.EDM) else C.T_GRID
    assert C.roundtrip_errors(sch, t[1:-1]).max() <= ROUNDTRIP_UNITS
    assert sch.t_of_log_snr(np.inf) == sch.t_min
    if np.isfinite(sch.t_max) and sch.log_snr(sch.t_max) == -np.inf:
        assert sch.t_of_log_snr(-np.inf) == sch.t_max


@pytest.mark.parametrize("name", FAMILIES, ids=list(FAMILIES))
@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_derivatives_match_central_differences(name, t):
    sch = FAMILIES[name]
    h = 1e-5
    for f, df in ((sch.alpha, sch.dalpha_dt), (sch.sigma, sch.dsigma_dt), (sch.log_snr, sch.d_log_snr_dt)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        # third derivatives of these smooth families on [0.05, 0.95] stay below ~1e3; |f| below ~30
        assert abs(fd - df(t)) <= fd_tolerance(h, 1e3, 30.0) * max(1.0, abs(df(t)))


def test_zero_terminal_snr_endpoints():
    betas = S.scaled_linear_betas(1000)
    new = S.rescale_zero_terminal_snr(betas)
    d0, d1 = S.DiscreteSchedule(betas), S.DiscreteSchedule(new)
    assert d1.alphas_cumprod[-1] == 0.0 and d1.zero_terminal_snr
    assert d1.alphas_cumprod[0] == d0.alphas_cumprod[0]
    assert d1.log_snr(999) == -np.inf and d1.sigma(999) == 1.0 and d1.alpha(999) == 0.0


def test_betas_from_alpha_bar_reproduces_cosine_betas():
    T = 1000
    ours = S.cosine_betas(T)
    log_abar = 2 * np.log(S.Cosine().alpha(np.arange(T) / T))      # finite: abar(1) = 0 is excluded
    # the generic ratio -expm1(log abar_{i+1} - log abar_i) takes the absolute error of each log abar:
    # 2 * 8 ulp from alpha (squared) plus eps |log abar| from the log itself; two of them, plus rounding of beta
    tol = 2 * (2 * MAX_SCHEDULE_ULP * EPS64 + EPS64 * np.abs(log_abar)) + 2 * EPS64 * ours
    got = S.betas_from_alpha_bar(T, S.Cosine())
    assert np.all(np.abs(got - ours) <= tol)
    assert got[-1] == ours[-1] == S.COSINE_MAX_BETA
    fn = S.betas_from_alpha_bar(T, lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)
    assert np.all(np.abs(fn[:-1] - ours[:-1]) <= 1e-9 * ours[:-1])      # naive ratio: ~1e-12 here


def test_sd3_shift_is_a_log_snr_shift():
    t = np.linspace(0.01, 0.99, 99)
    rf, shifted = S.RectifiedFlow(1.0), S.shift_log_snr(S.RectifiedFlow(1.0), -2 * np.log(3.0))
    np.testing.assert_allclose(shifted.log_snr(t), rf.log_snr(t) - 2 * np.log(3.0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(shifted.sigma(t), 3 * t / (1 + 2 * t), rtol=1e-15)


def test_resolution_shift_moves_log_snr():
    base = S.Cosine()
    s = S.resolution_shift(64, 256)
    assert s == pytest.approx(2 * np.log(0.25), rel=1e-15)
    t = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(S.shift_log_snr(base, s).log_snr(t), base.log_snr(t) + s, rtol=1e-14)


# -- diffusers --------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name,ours,ends", [
    ("linear", S.linear_betas(1000), (1e-4, 2e-2)),
    ("scaled_linear", S.scaled_linear_betas(1000), (8.5e-4, 1.2e-2)),
    ("squaredcos_cap_v2", S.cosine_betas(1000), (1e-4, 2e-2)),         # the ends are unused by the cosine
])
def test_diffusers_alphas_cumprod_agree_to_float32_rounding(name, ours, ends):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=ends[0],
                                    beta_end=ends[1])
    theirs = sched.alphas_cumprod.double().numpy()
    ref = S.DiscreteSchedule(ours).alphas_cumprod
    # diffusers builds betas and the cumulative product in float32: relative error <= T eps32 (+ beta rounding)
    assert np.all(np.abs(theirs - ref) <= (float32_cumprod_bound(1000) + EPS32) * ref)
    # and it is float32 rounding, not a different formula: the error is far above float64 level
    assert np.abs(theirs - ref).max() > 100 * EPS64


SPACING_CASES = [(sp, n, off) for sp in ("linspace", "leading", "trailing") for n in (1, 2, 3, 7, 10, 25, 50, 999, 1000)
                 for off in ((0, 1) if sp == "leading" else (0,))]


@pytest.mark.parametrize("spacing,n,offset", SPACING_CASES)
def test_ddim_timesteps_match_diffusers(spacing, n, offset):
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    if offset + (1000 // n) * (n - 1) >= 1000:
        with pytest.raises(ValueError):
            S.timesteps(1000, n, spacing, offset)
        return
    sched.set_timesteps(n)
    np.testing.assert_array_equal(S.timesteps(1000, n, spacing, offset), sched.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 25, 50])
def test_dpmsolver_timesteps_match_diffusers(spacing, n):
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(n)
    np.testing.assert_array_equal(S.timesteps(1000, n, spacing, family="dpmsolver"), sched.timesteps.numpy())


def test_karras_sigmas_match_diffusers():
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                             beta_start=8.5e-4, beta_end=1.2e-2, use_karras_sigmas=True)
    sched.set_timesteps(25)
    theirs = sched.sigmas.double().numpy()
    d = S.DiscreteSchedule(S.scaled_linear_betas(1000))
    sig = np.exp(-0.5 * d.log_snr(np.arange(1000)))
    ours = S.karras_sigmas(25, sig.min(), sig.max(), append_zero=True)
    # diffusers computes in float64 numpy from float32 alphas_cumprod, then stores float32
    np.testing.assert_allclose(theirs, ours, rtol=(float32_cumprod_bound(1000) + 2 * EPS32), atol=0)


# -- grids ------------------------------------------------------------------------------------------

def test_grids_hit_their_end_points_and_spacing():
    k = S.karras_sigmas(10, 0.002, 80.0)
    assert k[0] == pytest.approx(80.0, rel=1e-15) and k[-1] == pytest.approx(0.002, rel=1e-14)
    np.testing.assert_allclose(np.diff(k ** (1 / 7)), np.diff(k ** (1 / 7))[0], rtol=1e-10)
    e = S.exponential_sigmas(10, 0.002, 80.0)
    np.testing.assert_allclose(np.diff(np.log(e)), np.diff(np.log(e))[0], rtol=1e-12)
    sch = S.VPLinear()
    t = S.log_snr_uniform_times(sch, 8, 1.0, 1e-3)
    lam = sch.log_snr(t)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-10)
    q = S.time_quadratic(8, 1.0, 1e-3)
    np.testing.assert_allclose(np.diff(np.sqrt(q)), np.diff(np.sqrt(q))[0], rtol=1e-10)
    assert S.time_uniform(4).tolist() == pytest.approx([1.0, 0.75025, 0.5005, 0.25075, 0.001])


def test_one_step_grids():
    assert S.karras_sigmas(1, 0.002, 80.0).tolist() == [80.0]
    assert S.timesteps(1000, 1, "trailing").tolist() == [999]
    assert len(S.time_uniform(1)) == 2


# -- bad input --------------------------------------------------------------------------------------

TABLE10 = S.DiscreteSchedule(S.linear_betas(10))

BAD = [
    # discrete betas and tables
    *[bad(lambda b=b: S.DiscreteSchedule(b), ValueError, m, i) for b, m, i in (
        ([0.1, 0.0, 0.2], "lie in", "beta-0-inside"), ([0.1, -0.1], "last beta", "negative-beta"),
        ([0.1, 1.5], "last beta", "beta-above-1"), ([0.1, 1.0, 0.2], "lie in", "beta-1-inside"),
        ([0.1, np.nan], "finite", "nan-beta"), ([], "empty", "no-betas"), ([0.0, 0.1], "alpha_bar_0 == 1",
                                                                             "first-beta-0"),
        ([[0.1, 0.2]], "dimension", "2-D-betas"), (["a", "b"], "real numeric", "string-betas"))],
    bad(lambda: S.DiscreteSchedule.from_alphas_cumprod([0.9, 0.95, 0.5]), ValueError, "strictly decreasing",
        "alpha_bar-increasing"),
    bad(lambda: S.DiscreteSchedule.from_alphas_cumprod([1.0, 0.9]), ValueError, "alpha_bar_0 == 1",
        "alpha_bar-0-is-1"),
    bad(lambda: S.DiscreteSchedule.from_alphas_cumprod([0.9, -0.1]), ValueError, "< 0", "alpha_bar-negative"),
    bad(lambda: S.betas_from_alpha_bar(4, lambda t: 0.5 + 0.1 * t), ValueError, "decrease strictly",
        "alpha_bar-fn-increasing"),
    bad(lambda: S.betas_from_alpha_bar(4, lambda t: 0.5), ValueError, "vectorised", "alpha_bar-fn-scalar"),
    bad(lambda: S.betas_from_alpha_bar(4, S.VE()), ValueError, "variance-preserving", "alpha_bar-of-VE"),
    bad(lambda: S.rescale_zero_terminal_snr([0.1, 1.0]), ValueError, "lie in", "rescale-terminal-one"),
    bad(lambda: S.rescale_zero_terminal_snr([0.1]), ValueError, "at least 2", "rescale-one-beta"),
    # beta families
    bad(lambda: S.linear_betas(0), ValueError, ">= 1", "linear-T-0"),
    bad(lambda: S.scaled_linear_betas(-3), ValueError, ">= 1", "scaled-T-negative"),
    bad(lambda: S.cosine_betas(True), ValueError, "integer", "cosine-T-bool"),
    bad(lambda: S.linear_betas(10.5), ValueError, "integer", "linear-T-float"),
    bad(lambda: S.linear_betas(10, 0.0, 0.1), ValueError, r"\(0, 1\)", "linear-beta_start-0"),
    bad(lambda: S.linear_betas(10, 1e-4, 1.5), ValueError, r"\(0, 1\)", "linear-beta_end-above-1"),
    bad(lambda: S.linear_betas(10, np.nan, 0.1), ValueError, r"\(0, 1\)", "linear-nan"),
    bad(lambda: S.cosine_betas(10, s=-0.1), ValueError, "s must be >= 0", "cosine-s-negative"),
    bad(lambda: S.cosine_betas(10, s=1e300), ValueError, "degenerate", "cosine-s-huge"),
    bad(lambda: S.cosine_betas(10, s=np.inf), ValueError, "degenerate", "cosine-s-inf"),
    bad(lambda: S.cosine_betas(10, max_beta=0.0), ValueError, "max_beta", "cosine-max_beta-0"),
    # continuous families
    bad(lambda: S.VPLinear().alpha(1.5), ValueError, r"t must lie in \[0.0, 1.0\]", "t-above-1"),
    bad(lambda: S.VPLinear().alpha(-0.1), ValueError, r"t must lie in \[0.0, 1.0\]", "t-negative"),
    bad(lambda: S.Cosine().sigma(np.nan), ValueError, "t must lie in", "t-nan"),
    bad(lambda: S.Cosine().t_of_log_snr(np.nan), ValueError, "NaN", "log-snr-nan"),
    bad(lambda: S.VE().t_of_log_snr(100.0), ValueError, "log-SNR range", "log-snr-outside"),
    bad(lambda: S.ShiftedVP(S.VE(), 1.0), ValueError, "variance-preserving", "shift-of-VE"),
    bad(lambda: S.RectifiedFlow(0.0), ValueError, "shift", "flow-shift-0"),
    bad(lambda: S.EDM(sigma_min=0.0), ValueError, "sigma_min", "edm-sigma_min-0"),
    bad(lambda: S.VPLinear(beta_min=-1.0), ValueError, "beta_min", "vp-beta_min-negative"),
    bad(lambda: S.Sigmoid(start=3, end=-3), ValueError, "start < end", "sigmoid-start-after-end"),
    # tables indexed
    bad(lambda: TABLE10.alpha(10), ValueError, "index", "index-past-table"),
    bad(lambda: TABLE10.alpha(-1), ValueError, "index", "index-negative"),
    bad(lambda: TABLE10.alpha(1.0), ValueError, "integer", "index-float"),
    bad(lambda: TABLE10.fractional_index(100.0), ValueError, "table's range", "fractional-index-outside"),
    # time grids
    *[bad(lambda g=g: S.validate_grid(g), ValueError, m, i) for g, m, i in (
        ([3, 2, 2, 1], "duplicate", "grid-duplicate"), ([3, 1, 2], "non-monotone", "grid-non-monotone"),
        ([], "empty", "grid-empty"), ([[3, 2]], "1-D", "grid-2-D"), ([1.0, np.nan], "NaN", "grid-nan"))],
    *[bad(c, ValueError, ">= 1", i) for c, i in (
        (lambda: S.timesteps(1000, 0), "timesteps-n-0"), (lambda: S.karras_sigmas(0, 0.1, 1.0), "karras-n-0"),
        (lambda: S.time_uniform(0), "time-uniform-n-0"), (lambda: S.exponential_sigmas(0, 0.1, 1.0), "exp-n-0"))],
    bad(lambda: S.timesteps(10, 11), ValueError, "exceed", "timesteps-n-past-T"),
    bad(lambda: S.timesteps(10, 5, "uniform"), ValueError, "spacing", "timesteps-unknown-spacing"),
    bad(lambda: S.timesteps(10.5, 5), ValueError, "integer", "timesteps-T-float"),
    bad(lambda: S.timesteps(1000, 10, "leading", -1), ValueError, "steps_offset", "timesteps-negative-offset"),
    bad(lambda: S.karras_sigmas(5, 1.0, 0.5), ValueError, "sigma_min < sigma_max", "karras-min-above-max"),
    bad(lambda: S.karras_sigmas(5, -0.1, 10.0), ValueError, "sigma_min", "karras-negative-min"),
    bad(lambda: S.karras_sigmas(5, 0.1, 10.0, rho=0.0), ValueError, "rho", "karras-rho-0"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_low_precision_alphas_cumprod_warn_then_raise():
    """A float16 table: each defect found is a warning (alpha_bar rounds to 1, neighbours collide), then the table
    is refused."""
    ab16 = S.DiscreteSchedule(S.linear_betas(1000)).alphas_cumprod.astype(np.float16)
    with pytest.warns(RuntimeWarning) as caught:
        with pytest.raises(ValueError, match="invalid alphas_cumprod"):
            S.DiscreteSchedule.from_alphas_cumprod(ab16)
    messages = [str(w.message) for w in caught]
    assert all(m.startswith("float16 alphas_cumprod") for m in messages)
    assert any("alpha_bar == 1 at t > 0" in m for m in messages) and any("duplicate" in m for m in messages)


def test_float64_alphas_cumprod_round_trip():
    d = S.DiscreteSchedule(S.scaled_linear_betas(1000))
    d2 = S.DiscreteSchedule.from_alphas_cumprod(d.alphas_cumprod)
    np.testing.assert_allclose(d2.alphas_cumprod, d.alphas_cumprod, rtol=1e-12)


def test_low_precision_betas_warn():
    with pytest.warns(RuntimeWarning, match="float16"):
        S.DiscreteSchedule(S.linear_betas(100).astype(np.float16))
