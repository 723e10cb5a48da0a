"""Convergence orders of the samplers, measured against ground truth (``refdiff order``, the tests, the report).

One table, one case per sampler and kind of measurement (``specs()``):

* "ODE": global error at t_end of runs with N steps (log-SNR-uniform grids on the VP-linear schedule, or grids
  uniform in sigma / alpha for the fixed-weight multistep methods, or rectified-flow levels), a 2-D Gaussian-mixture
  oracle as the exact denoiser, against solve_ivp(DOP853, rtol = 1e-13); the order is the fitted slope of log
  error against log N. Methods whose cold start limits the run below their steps' order are measured from an exact
  warm-up (``warmup_limited``).
* "SDE strong": Euler-Maruyama's strong error on a shared Brownian path (nested grids summing the finest
  increments).
* "SDE weak": the exact output law on Gaussian data (refdiff.samplers.exact_law: mean and covariance propagated
  through the sampler's affine run, no Monte Carlo) against the exact marginal; the order of its error.
* "exact law": consistency samplers with the exact consistency function (refdiff.oracles.ConsistencyOracle): their
  output law must equal the data law at 1, 2, 4 and 8 steps; no order.
* "adaptive": DPM-adaptive's achieved global error against its tolerance (the slope of log error against log rtol),
  not an order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import schedules as S
from ._io import check_output_dir, write_text
from ._plot import pyplot, styles
from .oracles import ConsistencyOracle, GaussianData, GaussianMixture
from .parametrization import from_x0_eps
from .samplers import (DDIM, DDPM, DEIS, DPM2, Churn, IPNDM, LCM, LMS, PNDM, RK4, SEEDS, TCD, CMMultistep, DPM2Ancestral,
                       DPMFast, DPMSolver, DPMSolverPP, DPMSolverPP2MCFGpp, DPMSolverPP2MSDE, DPMSolverPP2SAncestral,
                       DPMSolverPP3MSDE, DPMSolverPP3S, DPMSolverPPSDE, DPMSolverPPSinglestep, ERSDE, Euler, EulerAncestral,
                       EulerCFGpp, FlowEuler, FlowHeun, FlowStochastic, GradientEstimation, Grid, Heun, HeunPP2, Level,
                       RESMultistep, ReverseEulerMaruyama, SASolver, SDEDPMSolverPP2M, UniPC, dpm_adaptive,
                       pf_ode_solve)
from .samplers.exact_law import gaussian_marginal, output_law_by_map
from .solve import sample

__all__ = ["KINDS", "ODE_NS", "SDE_NS", "WEAK_NS", "ORDER_TOL", "STRONG_TOL", "EXACT_LAW_RTOL", "ADAPTIVE_TOL", "Problem",
           "Spec", "default_problem", "flow_problem", "gaussian_problem", "oracle_model", "guided_oracle_model",
           "fitted_order", "ode_errors", "warmup_limited", "strong_errors", "weak_errors",
           "consistency_setup", "exact_law_errors", "adaptive_errors", "ode_samplers", "specs", "run_spec",
           "order_table", "write_order"]

ODE_NS = (64, 128, 256, 512)     # past diffusers' lower_order_final threshold, in the asymptotic range
SDE_NS = (16, 32, 64, 128, 256)
# the exact law has no sampling noise, only pre-asymptotic terms: 3M SDE's local slopes are 2.2, 2.1, 2.05 from 64
# steps, so the weak fits start at 128
WEAK_NS = (128, 256, 512, 1024)
# SA-Solver's fourth-order errors reach ~1e-11 at 512 steps, where DOP853's own global error (rtol 1e-13) starts to
# bend the slope (4.26, then 4.76): its fit stops at 256
SA_NS = (32, 64, 128, 256)
SDE_FINE = 2 ** 13
ORDER_TOL = 0.1                  # |measured - declared| for ODE samplers and exact laws (README, "Tests and tolerances")
STRONG_TOL = 0.2                 # for the strong order of SDE samplers
# the exact law of a consistency sampler: every operation of the run is a float64 affine map of the inputs, so the
# law's error is a few hundred roundings of O(1) quantities at most
EXACT_LAW_RTOL = 1e-12
CONSISTENCY_STEPS = (1, 2, 4, 8)
# from 3e-3 down: at rtol 1e-2 the run takes 7 steps and its error is the few steps' (slope 1.3 there)
ADAPTIVE_RTOLS = (3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
# a local-error controller makes the global error proportional to the tolerance (the step count grows as
# tol^(-1/(p+1)) while each step's error is held at tol h / h); the arctan limiter's rejections perturb the fit
ADAPTIVE_TOL = 0.25
SCHEMA = "refdiff.order/2"
KINDS = ("ODE", "SDE strong", "SDE weak", "exact law", "adaptive")


class Problem:
    """A convergence problem: oracle data, schedule, time interval and starting points."""

    def __init__(self, data, schedule, t0: float, t1: float, x, name: str = "VP-linear"):
        self.data, self.schedule, self.t0, self.t1, self.x, self.name = data, schedule, t0, t1, x, name
        self._ref = None

    def grid(self, n: int, kind: str = "log_snr") -> Grid:
        """n steps from t0 to t1: uniform in log-SNR (``log_snr``) or in the VE sigma = sigma / alpha (``sigma``,
        the variable fixed-weight multistep methods integrate in)."""
        sch = self.schedule
        if kind == "log_snr":
            return Grid.from_times(sch, S.log_snr_uniform_times(sch, n, self.t0, self.t1))
        if kind == "sigma":
            ve = np.linspace(sch.sigma(self.t0) / sch.alpha(self.t0), sch.sigma(self.t1) / sch.alpha(self.t1), n + 1)
            times = sch.t_of_log_snr(-2.0 * np.log(ve))
            times[0], times[-1] = self.t0, self.t1
            return Grid.from_times(sch, times)
        raise ValueError(f"grid kind must be 'log_snr' or 'sigma', got {kind!r}")

    @property
    def reference(self):
        if self._ref is None:
            self._ref = pf_ode_solve(self.schedule, self.data.denoise, self.x, self.t0, self.t1, method="DOP853",
                                     rtol=1e-13)
        return self._ref


def _mixture(rng):
    covs = np.stack([B @ B.T + 0.2 * np.eye(2) for B in rng.standard_normal((3, 2, 2)) * 0.5])
    return GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-2, 2, (3, 2)), covs, labels=[0, 1, 1])


def default_problem(seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    data = _mixture(rng)
    sch = S.VPLinear()
    t0, t1 = 0.8, 0.05
    return Problem(data, sch, t0, t1, rng.standard_normal((4, 2)) * sch.sigma(t0))


def flow_problem(seed: int = 0, shift: float = 3.0) -> Problem:
    """The same mixture on rectified-flow levels (SD3's shift 3), flow time 0.8 -> 0.05."""
    rng = np.random.default_rng(seed)
    data = _mixture(rng)
    sch = S.RectifiedFlow(shift)
    return Problem(data, sch, 0.8, 0.05, rng.standard_normal((4, 2)) * sch.sigma(0.8),
                   name=f"rectified flow (shift {shift:g})")


def gaussian_problem(seed: int = 0) -> Problem:
    """2-D Gaussian data on VP-linear levels, t 0.8 -> 0.05: the exact output law of affine samplers."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((2, 2))
    data = GaussianData(np.array([0.5, -1.0]), B @ B.T + 0.3 * np.eye(2))
    sch = S.VPLinear()
    return Problem(data, sch, 0.8, 0.05, rng.standard_normal((4, 2)) * sch.sigma(0.8), name="Gaussian, VP-linear")


def oracle_model(data, prediction: str = "eps"):
    """The exact model of an oracle, as a model of the given prediction type: (x, level) -> output."""
    def model(x, level):
        a, s = level.alpha, level.sigma
        return from_x0_eps(data.denoise(x, a, s), data.eps(x, a, s), prediction, a, s)
    return model


def guided_oracle_model(data, y: int = 0, prediction: str = "eps"):
    """(unconditional, conditional) exact outputs of a labelled mixture, the condition class y (for guidance)."""
    cond = data.conditional(y)
    uncond_m, cond_m = oracle_model(data, prediction), oracle_model(cond, prediction)
    return lambda x, level: (uncond_m(x, level), cond_m(x, level))


def fitted_order(Ns, errs) -> float:
    """Slope of log error against log step size (= minus the slope against log N)."""
    return float(-np.polyfit(np.log(Ns), np.log(errs), 1)[0])


def ode_errors(sampler, problem: Problem, Ns=ODE_NS, exact_warmup: bool = False, grid: str = "log_snr"):
    """Global errors at t_end for each N. ``exact_warmup``: the first order - 1 steps (a multistep method's
    lower-order start) are each followed by a reset to the exact trajectory, so the error measures the order of the
    method's own steps (a cold start's first-order step alone limits the run to global order 2). ``sampler`` may be
    a callable N -> sampler (DPM-fast: N is its evaluation budget, the grid has the sampler's own step count)."""
    model = oracle_model(problem.data)
    errs = []
    for n in Ns:
        smp = sampler(n) if callable(sampler) and not hasattr(sampler, "step") else sampler
        g, x, state = problem.grid(len(getattr(smp, "orders", ())) or n, grid), problem.x, None
        if exact_warmup:
            for j in range((smp.order or 1) - 1):
                state = sample(smp, model, g, x, state=state, steps=1, progress=False).state
                x = pf_ode_solve(problem.schedule, problem.data.denoise, problem.x, problem.t0,
                                 float(g.levels[j + 1].t), method="DOP853", rtol=1e-13)
        errs.append(float(np.abs(sample(smp, model, g, x, state=state, progress=False).x
                                   - problem.reference).max()))
    return errs


def warmup_limited(sampler) -> bool:
    """True when a cold start limits the run below the order of the method's steps (``global_order`` < ``order``)."""
    return sampler.global_order is not None and sampler.order is not None and sampler.global_order < sampler.order


def strong_errors(problem: Problem, Ns=SDE_NS, n_fine: int = SDE_FINE, n_paths: int = 64, seed: int = 4):
    """RMS strong error of reverse-SDE Euler-Maruyama against its own run on the finest grid, one Brownian path
    per sample shared by every grid (time-uniform, nested grids)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(problem.t0, problem.t1, n_fine + 1)
    D = problem.x.shape[1]
    dW = rng.standard_normal((n_fine, n_paths, D)) * np.sqrt(np.abs(np.diff(t)))[:, None, None]
    x = rng.standard_normal((n_paths, D)) * problem.schedule.sigma(problem.t0)
    model = oracle_model(problem.data)

    def run(n):
        k = n_fine // n
        z = dW.reshape(n, k, n_paths, D).sum(axis=1) / np.sqrt(np.abs(np.diff(t[::k])))[:, None, None]
        return sample(ReverseEulerMaruyama(), model, Grid.from_times(problem.schedule, t[::k]), x, noise=z,
                      progress=False).x

    ref = run(n_fine)
    return [float(np.sqrt(np.mean(np.sum((run(n) - ref) ** 2, axis=1)))) for n in Ns]


def weak_errors(sampler, problem: Problem, Ns=WEAK_NS):
    """Error of the exact output law (max abs over mean and covariance entries) against the exact marginal at t_end,
    Gaussian data, log-SNR-uniform grids."""
    sch = problem.schedule
    target = gaussian_marginal(problem.data, sch.alpha(problem.t1), sch.sigma(problem.t1))
    errs = []
    for n in Ns:
        law = output_law_by_map(sampler, problem.data, problem.grid(n))
        errs.append(float(max(np.abs(law.mean - target.mean).max(), np.abs(law.cov - target.cov).max())))
    return errs


def consistency_setup(sampler, n: int, data: GaussianData, log_snr_error: float = 0.0):
    """(grid, model, prediction, boundary (alpha, sigma)) of a consistency sampler's natural setting: CM on EDM's
    Karras sigmas 80 -> 0.002 (the boundary), LCM / TCD on SD's scaled-linear table with LCM's timesteps, the
    stochastic flow sampler on rectified-flow times 1 -> 0."""
    if isinstance(sampler, CMMultistep) and sampler.boundary == "trigflow":
        # sCM: TrigFlow levels alpha = cos t, sigma = s_d sin t from t = pi/2 (pure noise) down to the data
        sd = sampler.scaling_kw.get("sigma_data", 0.5)
        ts = np.concatenate([[np.pi / 2], np.linspace(1.3, 0.2, n - 1)]) if n > 1 else np.array([np.pi / 2])
        with np.errstate(divide="ignore"):
            lv = [Level(t, np.cos(t), sd * np.sin(t), 2.0 * np.log(np.cos(t) / (sd * np.sin(t)))) for t in ts]
        grid = Grid(lv + [Level(0.0, 1.0, 0.0, np.inf)])
        boundary, prediction, scal = (1.0, 0.0), "x0", sampler.scalings
    elif isinstance(sampler, CMMultistep):
        sig = S.karras_sigmas(n, 0.002, 80.0) if n > 1 else np.array([80.0])
        grid = Grid.from_sigmas(np.append(sig, 0.002) if n > 1 else np.array([80.0, 0.002]))
        boundary, prediction, scal = (1.0, 0.002), "x0", sampler.scalings
    elif isinstance(sampler, (LCM, TCD)):
        table = S.DiscreteSchedule(S.scaled_linear_betas(1000))
        ts = (999 - np.arange(n) * (1000 // n)).astype(np.int64)      # LCM's skipping steps from the top
        grid = Grid.from_discrete(table, ts, final="data")
        boundary, prediction = (1.0, 0.0), "eps"
        scal = sampler.scalings if isinstance(sampler, LCM) else None
    elif isinstance(sampler, FlowStochastic):
        grid = Grid.from_times(S.RectifiedFlow(3.0), np.linspace(1.0 - 1e-3, 0.0, n + 1))
        boundary, prediction, scal = (1.0, 0.0), "flow", None
    else:
        raise ValueError(f"no consistency setting for {sampler!r}")
    oracle = ConsistencyOracle(data, boundary, log_snr_error)
    return grid, oracle.model(prediction, scal), prediction, boundary


def exact_law_errors(sampler, problem: Problem, steps=CONSISTENCY_STEPS):
    """Relative error of the output law (mean and covariance, max abs over the data law's scale) at each step count,
    with the exact consistency function."""
    errs = []
    for n in steps:
        grid, model, prediction, boundary = consistency_setup(sampler, n, problem.data)
        law = output_law_by_map(sampler, problem.data, grid, model=model, prediction=prediction)
        target = gaussian_marginal(problem.data, *boundary)
        scale = max(1.0, float(np.abs(target.cov).max()), float(np.abs(target.mean).max()))
        errs.append(float(max(np.abs(law.mean - target.mean).max(), np.abs(law.cov - target.cov).max()) / scale))
    return errs


def adaptive_errors(problem: Problem, order: int = 3, rtols=ADAPTIVE_RTOLS):
    """(nfe, global error) of DPM-adaptive runs from t0 to t1 at each rtol (atol in k-diffusion's ratio to rtol)."""
    sch = problem.schedule
    smax, smin = (float(sch.sigma(t) / sch.alpha(t)) for t in (problem.t0, problem.t1))
    out = []
    for rtol in rtols:
        r = dpm_adaptive(oracle_model(problem.data), problem.x, smax, smin, schedule=sch, order=order, rtol=rtol,
                         atol=rtol * 0.0078 / 0.05)
        out.append((r.nfe, float(np.abs(r.x - problem.reference).max())))
    return out


@dataclass
class Spec:
    """One row of the order table: what is measured, on which problem and grid, and against which declaration."""

    sampler: object                  # a Sampler; a callable N -> Sampler (DPM-fast); the adaptive order (2 or 3)
    kind: str = "ODE"                # ODE | SDE strong | SDE weak | exact law | adaptive
    problem: str = "default"         # default | flow | gaussian
    grid: str = "log_snr"
    Ns: tuple = ODE_NS
    name: str = ""
    declared: float | None = None    # overrides the sampler's own declaration (DPM-fast's budget-indexed runs)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        where = {"flow": " [rectified flow]"}.get(self.problem, "") + (" [sigma grid]" if self.grid == "sigma" else "")
        return getattr(self.sampler, "name", str(self.sampler)) + where


def ode_samplers():
    """The ODE samplers measured on the default problem's log-SNR-uniform grids."""
    return [DDIM(), Euler(), Heun(), DPM2(), LMS(4), DPMSolver(2), DPMSolver(3), DPMSolverPPSinglestep(),
            DPMSolverPP3S(),
            DPMSolverPP(2), DPMSolverPP(3), DEIS(2), DEIS(3), UniPC(1), UniPC(2, "bh1"), UniPC(2, "bh2"), UniPC(3, "bh2"),
            RK4(),
            FlowEuler(), FlowHeun(), RESMultistep(), SEEDS(2, eta=0.0), SEEDS(3, eta=0.0), GradientEstimation(),
            HeunPP2(), IPNDM(variable=True), DPMSolverPP2MSDE(eta=0.0, solver_type="heun"), DPMSolverPP3MSDE(eta=0.0),
            DPMSolverPPSDE(eta=0.0),
            EulerCFGpp(), DPMSolverPP2MCFGpp(), RESMultistep(cfg_pp=True)]


def weak_samplers():
    """Stochastic samplers judged by the weak order of their exact Gaussian output law."""
    return [DDPM(), EulerAncestral(), Heun(Churn(5.0)),
            DPM2Ancestral(), DPMSolverPP2SAncestral(), DPMSolverPPSDE(), SDEDPMSolverPP2M(), DPMSolverPP2MSDE(),
            DPMSolverPP2MSDE(solver_type="heun"), DPMSolverPP3MSDE(), RESMultistep(eta=1.0), SEEDS(2), SEEDS(3),
            ERSDE(), SASolver(3, 4, tau=1.0), EulerCFGpp(eta=1.0)]


def specs(kinds=None) -> list:
    """Every row of the order table (``kinds``: a subset of the kinds to keep)."""
    out = [Spec(s) for s in ode_samplers()]
    out.append(Spec(lambda n: DPMFast(n), Ns=(3 * 24 + 2, 3 * 48 + 2, 3 * 96 + 2, 3 * 192 + 2),
                    name="DPM-fast (nfe = 3m + 2)", declared=3))
    out.append(Spec(lambda n: DPMFast(n), Ns=(3 * 24, 3 * 48, 3 * 96, 3 * 192), name="DPM-fast (nfe = 3m)",
                    declared=2))
    out += [Spec(s, grid="sigma") for s in (PNDM("plms"), PNDM("prk"), IPNDM())]
    out += [Spec(s, problem="flow") for s in (FlowEuler(), FlowHeun(), DPMSolverPP(2), UniPC(2, "bh2"))]
    out.append(Spec(ReverseEulerMaruyama(), kind="SDE strong", Ns=SDE_NS))
    out += [Spec(s, kind="SDE weak", problem="gaussian", Ns=WEAK_NS) for s in weak_samplers()]
    out.append(Spec(SASolver(3, 4), Ns=SA_NS))
    out += [Spec(s, kind="exact law", problem="gaussian", Ns=CONSISTENCY_STEPS)
            for s in (CMMultistep(), CMMultistep("trigflow"), LCM(), TCD(0.3), FlowStochastic())]
    out += [Spec(o, kind="adaptive", Ns=ADAPTIVE_RTOLS, name=f"DPM-adaptive (order {o})") for o in (3, 2)]
    if kinds is None:
        return out
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {list(KINDS)}")
    return [s for s in out if s.kind in kinds]


_PROBLEMS = {"default": default_problem, "flow": flow_problem, "gaussian": gaussian_problem}


def run_spec(spec: Spec, problems: dict | None = None) -> dict:
    """Measure one row: the case dict of the table (declared, measured, errors, rule, verdict)."""
    problems = {} if problems is None else problems
    if spec.problem not in problems:
        problems[spec.problem] = _PROBLEMS[spec.problem]()
    prob = problems[spec.problem]
    smp = spec.sampler
    case = {"sampler": spec.label, "kind": spec.kind, "problem": prob.name, "grid": spec.grid, "steps": list(spec.Ns)}
    if spec.kind == "ODE":
        probe = smp(spec.Ns[0]) if callable(smp) and not hasattr(smp, "step") else smp
        warm = warmup_limited(probe) and spec.declared is None
        errs = ode_errors(smp, prob, spec.Ns, exact_warmup=warm, grid=spec.grid)
        want = spec.declared if spec.declared is not None else (probe.order if warm else probe.convergence_order)
        case.update(kind="ODE, exact warm-up" if warm else "ODE", declared_step_order=probe.order,
                    global_order_cold_start=probe.convergence_order, tol=ORDER_TOL)
    elif spec.kind == "SDE strong":
        errs, want = strong_errors(prob, spec.Ns), smp.strong_order
        case.update(declared_step_order=want, tol=STRONG_TOL)
    elif spec.kind == "SDE weak":
        errs, want = weak_errors(smp, prob, spec.Ns), smp.weak_order
        case.update(declared_step_order=want, tol=ORDER_TOL)
    elif spec.kind == "exact law":
        errs = exact_law_errors(smp, prob, spec.Ns)
        worst = max(errs)
        case.update(problem="Gaussian data on the sampler's own levels (consistency_setup)", declared="exact",
                    declared_step_order="exact", measured=worst, errors=errs,
                    rule=f"law error / scale <= {EXACT_LAW_RTOL:g} at {list(spec.Ns)} steps",
                    verdict="pass" if worst <= EXACT_LAW_RTOL else "fail")
        return case
    elif spec.kind == "adaptive":
        rows = adaptive_errors(prob, smp, spec.Ns)
        errs = [e for _, e in rows]
        slope = float(np.polyfit(np.log(spec.Ns), np.log(errs), 1)[0])
        case.update(declared=1.0, declared_step_order=1.0, measured=slope, errors=errs, nfe=[n for n, _ in rows],
                    steps=[f"rtol {r:g}" for r in spec.Ns],
                    rule=f"error proportional to rtol: |slope of log error against log rtol - 1| <= {ADAPTIVE_TOL}",
                    verdict="pass" if abs(slope - 1.0) <= ADAPTIVE_TOL else "fail")
        return case
    else:
        raise ValueError(f"unknown kind {spec.kind!r}")
    measured = fitted_order(spec.Ns, errs)
    tol = case.pop("tol")
    case.update(declared=want, measured=measured, errors=errs, rule=f"|measured - declared| <= {tol}",
                verdict="pass" if want is not None and abs(measured - want) <= tol else "fail")
    return case


def order_table(problem: Problem | None = None, samplers=None, Ns=ODE_NS, include_sde: bool = True,
                progress=None, kinds=None) -> list:
    """One case per row of ``specs(kinds)`` (``include_sde=False``: the ODE rows only). ``samplers`` replaces the
    table with ODE rows of those samplers on ``problem`` (default: the default problem) with ``Ns``."""
    if samplers is not None:
        rows = [Spec(s, Ns=tuple(Ns)) for s in samplers]
    else:
        rows = specs(kinds if include_sde else ("ODE",))
    problems = {} if problem is None else {"default": problem}
    cases = []
    for spec in rows:
        cases.append(run_spec(spec, problems))
        if progress is not None:
            progress(spec.label)
    return cases


def _fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"


def order_markdown(cases) -> str:
    lines = ["| sampler | kind | problem | declared | measured | errors (N = steps; adaptive: rtol, nfe) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        errs = ", ".join(f"{e:.2e}" for e in c["errors"])
        if "nfe" in c:
            errs = ", ".join(f"{e:.2e} ({s}, {n} nfe)" for e, s, n in zip(c["errors"], c["steps"], c["nfe"]))
        decl = f"{c['declared']}" + (f" (steps of order {c['declared_step_order']})"
                                     if c["declared_step_order"] != c["declared"] else "")
        cold = c.get("global_order_cold_start")
        if cold is not None and cold != c["declared"]:
            decl += f" (global order {cold} from a cold start)"
        where = c.get("problem", "") + (", sigma-uniform grid" if c.get("grid") == "sigma" else "")
        lines.append(f"| {c['sampler']} | {c['kind']} | {where} | {decl} | {_fmt(c['measured'])} | {errs} | "
                     f"{c['verdict']} |")
    return "\n".join(lines)


PANELS = (("ODE, order <= 2", lambda c: c["kind"].startswith("ODE") and c["declared"] <= 2),
          ("ODE, order >= 3", lambda c: c["kind"].startswith("ODE") and c["declared"] > 2),
          ("SDE: weak (exact Gaussian law) and strong", lambda c: c["kind"].startswith("SDE")),
          ("DPM-adaptive: error against evaluations", lambda c: c["kind"] == "adaptive"))


def plot_orders(cases, path: Path):
    """Log-log error against steps in four panels (low- and high-order ODE rows, SDE rows, the adaptive runs' error
    against their evaluations), one line per row with its fitted order; the exact-law rows have no curve."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(18, 13))
    for ax, (title, keep) in zip(axes.ravel(), PANELS):
        rows = [c for c in cases if keep(c)]
        for c, (color, marker, ls) in zip(rows, styles(len(rows))):
            x = c["nfe"] if "nfe" in c else c["steps"]
            ax.loglog(x, c["errors"], marker=marker, ms=4, ls=ls, color=color,
                      label=f"{c['sampler']} ({c['measured']:.2f}, declared {c['declared']})")
        ax.set_title(title)
        ax.set_xlabel("model evaluations" if "adaptive" in title else "steps N")
        ax.set_ylabel("global error (max abs)" if "SDE" not in title else "error (law or path)")
        ax.grid(alpha=0.3, which="both")
        if rows:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle("convergence against ground truth (fitted order, declared order)")
    fig.tight_layout()
    from ._io import save_figure

    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_order(cases, out_dir, env: dict) -> list:
    from . import __version__

    out = check_output_dir(out_dir)
    verdict = "fail" if any(c["verdict"] == "fail" for c in cases) else "pass"
    doc = {"schema": SCHEMA, "refdiff_version": __version__, "env": env, "verdict": verdict, "cases": cases}
    paths = [out / "order.json", out / "order.md"]
    write_text(paths[0], json.dumps(doc, indent=2))
    md = [f"# refdiff order — {verdict.upper()}", "", order_markdown(cases), ""]
    png = plot_orders(cases, out / "order.png")
    if png is not None:
        md += ["![log-log convergence](order.png)", ""]
        paths.append(png)
    write_text(paths[1], "\n".join(md))
    return paths
