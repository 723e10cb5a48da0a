"""Convergence orders of the samplers, measured against ground truth (``refdiff order``, the tests, the report).

ODE samplers: global error at t_end of runs with N steps (log-SNR-uniform grids on the VP-linear schedule, a 2-D
Gaussian-mixture oracle as the exact denoiser) against solve_ivp(DOP853, rtol = 1e-13); the order is the fitted
slope of log error against log N. SDE samplers: strong error of Euler-Maruyama on a shared Brownian path, whose
increments on the finest grid are summed for the coarser, nested grids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import schedules as S
from ._io import check_output_dir, write_text
from ._plot import finish, pyplot, styles
from .oracles import GaussianMixture
from .parametrization import from_x0_eps
from .samplers import (DDIM, DEIS, DPM2, LMS, RK4, DPMSolver, DPMSolverPP, DPMSolverPPSinglestep, Euler, Grid, Heun,
                       ReverseEulerMaruyama, UniPC, pf_ode_solve)
from .solve import sample

__all__ = ["ODE_NS", "SDE_NS", "ORDER_TOL", "STRONG_TOL", "Problem", "default_problem", "oracle_model",
           "fitted_order", "ode_errors", "warmup_limited", "strong_errors", "ode_samplers", "order_table",
           "write_order"]

ODE_NS = (64, 128, 256, 512)     # past diffusers' lower_order_final threshold, in the asymptotic range
SDE_NS = (16, 32, 64, 128, 256)
SDE_FINE = 2 ** 13
ORDER_TOL = 0.1                  # |measured - declared| for ODE samplers (README, "Tests and tolerances")
STRONG_TOL = 0.2                 # for the strong order of SDE samplers
SCHEMA = "refdiff.order/1"


class Problem:
    """A convergence problem: oracle data, schedule, time interval and starting points."""

    def __init__(self, data, schedule, t0: float, t1: float, x):
        self.data, self.schedule, self.t0, self.t1, self.x = data, schedule, t0, t1, x
        self._ref = None

    def grid(self, n: int) -> Grid:
        return Grid.from_times(self.schedule, S.log_snr_uniform_times(self.schedule, n, self.t0, self.t1))

    @property
    def reference(self):
        if self._ref is None:
            self._ref = pf_ode_solve(self.schedule, self.data.denoise, self.x, self.t0, self.t1, method="DOP853",
                                     rtol=1e-13)
        return self._ref


def default_problem(seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    covs = np.stack([B @ B.T + 0.2 * np.eye(2) for B in rng.standard_normal((3, 2, 2)) * 0.5])
    data = GaussianMixture([0.5, 0.3, 0.2], rng.uniform(-2, 2, (3, 2)), covs)
    sch = S.VPLinear()
    t0, t1 = 0.8, 0.05
    return Problem(data, sch, t0, t1, rng.standard_normal((4, 2)) * sch.sigma(t0))


def oracle_model(data, prediction: str = "eps"):
    """The exact model of an oracle, as a model of the given prediction type: (x, level) -> output."""
    def model(x, level):
        a, s = level.alpha, level.sigma
        return from_x0_eps(data.denoise(x, a, s), data.eps(x, a, s), prediction, a, s)
    return model


def fitted_order(Ns, errs) -> float:
    """Slope of log error against log step size (= minus the slope against log N)."""
    return float(-np.polyfit(np.log(Ns), np.log(errs), 1)[0])


def ode_errors(sampler, problem: Problem, Ns=ODE_NS, exact_warmup: bool = False):
    """Global errors at t_end for each N. ``exact_warmup``: the first order - 1 steps (a multistep method's
    lower-order start) are each followed by a reset to the exact trajectory, so the error measures the order of the
    method's own steps (a cold start's first-order step alone limits the run to global order 2)."""
    model = oracle_model(problem.data)
    errs = []
    for n in Ns:
        grid, x, state = problem.grid(n), problem.x, None
        if exact_warmup:
            for j in range((sampler.order or 1) - 1):
                state = sample(sampler, model, grid, x, state=state, steps=1, progress=False).state
                x = pf_ode_solve(problem.schedule, problem.data.denoise, problem.x, problem.t0,
                                 float(grid.levels[j + 1].t), method="DOP853", rtol=1e-13)
        errs.append(float(np.abs(sample(sampler, model, grid, x, state=state, progress=False).x
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


def ode_samplers():
    return [DDIM(), Euler(), Heun(), DPM2(), LMS(4), DPMSolver(2), DPMSolver(3), DPMSolverPPSinglestep(),
            DPMSolverPP(2), DPMSolverPP(3), DEIS(2), DEIS(3), UniPC(1), UniPC(2, "bh1"), UniPC(2, "bh2"), RK4()]


def order_table(problem: Problem | None = None, samplers=None, Ns=ODE_NS, include_sde: bool = True,
                progress=None) -> list:
    """One case per sampler: declared order, measured order, errors per N, verdict."""
    problem = default_problem() if problem is None else problem
    samplers = ode_samplers() if samplers is None else samplers
    cases = []
    for smp in samplers:
        warm = warmup_limited(smp)
        errs = ode_errors(smp, problem, Ns, exact_warmup=warm)
        measured = fitted_order(Ns, errs)
        want = smp.order if warm else smp.convergence_order
        cases.append({"sampler": smp.name, "kind": "ODE, exact warm-up" if warm else "ODE",
                      "declared_step_order": smp.order, "declared": want,
                      "global_order_cold_start": smp.convergence_order,
                      "measured": measured, "steps": list(Ns), "errors": errs,
                      "rule": f"|measured - declared| <= {ORDER_TOL}",
                      "verdict": "pass" if abs(measured - want) <= ORDER_TOL else "fail"})
        if progress is not None:
            progress(smp.name)
    if include_sde:
        errs = strong_errors(problem)
        if progress is not None:
            progress("ReverseEulerMaruyama")
        measured = fitted_order(SDE_NS, errs)
        want = ReverseEulerMaruyama.strong_order
        cases.append({"sampler": "ReverseEulerMaruyama", "kind": "SDE strong", "declared_step_order": want,
                      "declared": want, "measured": measured, "steps": list(SDE_NS), "errors": errs,
                      "rule": f"|measured - declared| <= {STRONG_TOL}",
                      "verdict": "pass" if abs(measured - want) <= STRONG_TOL else "fail"})
    return cases


def order_markdown(cases) -> str:
    lines = ["| sampler | kind | declared | measured | errors (N = steps) | verdict |", "|---|---|---|---|---|---|"]
    for c in cases:
        errs = ", ".join(f"{e:.2e}" for e in c["errors"])
        decl = f"{c['declared']}" + (f" (steps of order {c['declared_step_order']})"
                                     if c["declared_step_order"] != c["declared"] else "")
        cold = c.get("global_order_cold_start")
        if cold is not None and cold != c["declared"]:
            decl += f" (global order {cold} from a cold start)"
        lines.append(f"| {c['sampler']} | {c['kind']} | {decl} | {c['measured']:.3f} | {errs} | {c['verdict']} |")
    return "\n".join(lines)


def plot_orders(cases, path: Path):
    """Log-log error against steps, one line per sampler with its fitted order (distinct colour, marker, style)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(11, 6))
    for c, (color, marker, ls) in zip(cases, styles(len(cases))):
        ax.loglog(c["steps"], c["errors"], marker=marker, ms=4, ls=ls, color=color,
                  label=f"{c['sampler']} ({c['measured']:.2f}, declared {c['declared']})")
    return finish(fig, ax, path, "steps N", "global error (max abs)",
                  "convergence against solve_ivp DOP853 (fitted order, declared order)", outside=True)


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
