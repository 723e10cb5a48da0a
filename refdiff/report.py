"""``refdiff report``: every check that applies on this machine, written as report.md + report.json (+ plots).

Today: schedules against 50-digit mpmath, log-SNR round trips, oracle identities (Tweedie, importance-sampled
posterior means, exact PF-ODE vs solve_ivp), objectives (Kingma & Gao's weighting table, the VDM bound's 1/T
approach to the continuous ELBO), PF-ODE likelihoods (exact divergence and Hutchinson), sampler convergence orders,
conformance of diffusers' schedulers and pipelines (findings explained), Philox known answers and Triton's own generator.
Each case records its measured numbers, the rule it is judged by, and a verdict: pass / fail / not run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import schedules as S
from . import selfcheck as C
from ._env import env_info
from ._io import check_output_dir, write_text
from ._plot import finish, pyplot, styles
from ._progress import progress_bar, ticker
from .oracles import FiniteAtoms, GaussianData, GaussianMixture

__all__ = ["SCHEMA", "run_report", "write_report", "continuous_families", "discrete_tables"]

SCHEMA = "refdiff.report/1"
TWEEDIE_RTOL = 1e-12          # Tweedie's identity holds exactly; the residual is a few roundings of O(1) terms
PF_ODE_RTOL = 1e-9            # exact Gaussian PF-ODE map vs solve_ivp(DOP853, rtol=1e-12)
ROUNDTRIP_UNITS = 4.0         # round trip within 4 attainable units (ulp(t) + eps |lambda / lambda'|)
NORMAL_MAX_ULP = 2            # tl.randn may differ by a few ulp on a GPU (libdevice log / cos)
KG_RTOL = 1e-12               # implied weighting / table entry constant to rounding
LIKELIHOOD_NATS = 1e-8        # exact-divergence PF-ODE likelihood vs the exact log density


def continuous_families() -> dict:
    return {
        "VPLinear": S.VPLinear(),
        "Cosine": S.Cosine(),
        "Sigmoid": S.Sigmoid(),
        "Sigmoid(tau=0.7)": S.Sigmoid(-3.0, 3.0, 0.7),
        "Cosine(s=0)": S.Cosine(0.0),
        "Cosine shifted 64->256": S.shift_log_snr(S.Cosine(), S.resolution_shift(64, 256)),
        "LinearLogSNR (VDM)": S.LinearLogSNR(),
        "VE": S.VE(),
        "EDM": S.EDM(),
        "RectifiedFlow(shift=3)": S.RectifiedFlow(3.0),
    }


def discrete_tables(T: int = 1000) -> dict:
    return {
        "linear": S.linear_betas(T),
        "scaled_linear": S.scaled_linear_betas(T),
        "cosine": S.cosine_betas(T),
        "scaled_linear + zero terminal SNR": S.rescale_zero_terminal_snr(S.scaled_linear_betas(T)),
    }


def _case(group, name, metric, rule, ok):
    return {"group": group, "name": name, "metric": metric, "rule": rule,
            "verdict": "pass" if ok else "fail"}


def _schedule_cases():
    for name, sch in continuous_families().items():
        err = C.schedule_ulp_errors(sch)
        yield _case("schedules", f"{name} vs mpmath", err, f"max ulp <= {C.MAX_SCHEDULE_ULP}",
                    max(err.values()) <= C.MAX_SCHEDULE_ULP)
        t = C.EDM_T_GRID[1:-1] if isinstance(sch, S.EDM) else C.T_GRID[1:-1]
        rt = float(C.roundtrip_errors(sch, t).max())
        yield _case("schedules", f"{name} t_of_log_snr round trip", {"max_units": rt},
                    f"<= {ROUNDTRIP_UNITS} x (ulp(t) + eps |lambda/lambda'|)", rt <= ROUNDTRIP_UNITS)
    for name, betas in discrete_tables().items():
        err = C.discrete_ulp_errors(betas)
        yield _case("schedules", f"discrete {name} (T=1000) vs mpmath", err, f"max ulp <= {C.MAX_SCHEDULE_ULP}",
                    max(err.values()) <= C.MAX_SCHEDULE_ULP)


def _oracles(rng):
    D = 3
    A = rng.standard_normal((D, D))
    gauss = GaussianData(rng.standard_normal(D), A @ A.T + 0.5 * np.eye(D))
    covs = np.stack([np.diag(rng.uniform(0.2, 1.0, D)) for _ in range(3)])
    gmm = GaussianMixture([0.5, 0.3, 0.2], 2.0 * rng.standard_normal((3, D)), covs)
    atoms = FiniteAtoms(rng.standard_normal((5, D)))
    return {"GaussianData": gauss, "GaussianMixture": gmm, "FiniteAtoms": atoms}


def _oracle_cases(rng):
    oracles = _oracles(rng)
    for name, o in oracles.items():
        x = rng.standard_normal((16, o.D))
        alpha, sigma = rng.uniform(0.1, 1.0, 16), rng.uniform(0.1, 1.0, 16)
        r = C.tweedie_residual(o, x, alpha, sigma)
        yield _case("oracles", f"{name} Tweedie identity", {"relative_residual": r}, f"<= {TWEEDIE_RTOL}",
                    r <= TWEEDIE_RTOL)
        z = C.denoiser_mc_zscore(o, rng.standard_normal((4, o.D)), 0.8, 0.6, rng, n=100_000)
        z_max = C.z_bound(4 * o.D)                    # 4 rows x D coordinates, each a comparison
        yield _case("oracles", f"{name} denoiser vs importance-sampled posterior mean", {"max_abs_z": z},
                    f"|z| <= {z_max:.2f} (false failure < {C.FALSE_FAILURE:g})", z <= z_max)
    g = oracles["GaussianData"]
    for sname, sch, t0, t1 in (("VPLinear", S.VPLinear(), 1.0, 1e-3), ("Cosine", S.Cosine(), 0.99, 0.01),
                               ("VE", S.VE(), 1.0, 0.0), ("RectifiedFlow", S.RectifiedFlow(), 0.99, 0.01)):
        e = C.pf_ode_error(g, sch, t0, t1, rng.standard_normal((4, g.D)))
        yield _case("oracles", f"GaussianData exact PF-ODE ({sname}) vs solve_ivp DOP853",
                    {"relative_error": e}, f"<= {PF_ODE_RTOL}", e <= PF_ODE_RTOL)


def _objective_cases(rng):
    lam = np.linspace(-12.0, 12.0, 49)
    for name, row in C.kingma_gao_table(lam).items():
        spread = C.kingma_gao_ratio_spread(*row, lam)
        yield _case("objectives", f"Kingma & Gao weighting: {name}", {"ratio_spread": spread},
                    f"w / table constant to {KG_RTOL}", spread <= KG_RTOL)
    data = _oracles(rng)["GaussianData"]
    x0 = data.sample(2, rng)
    bounds, cont, slopes = C.vdm_gap_slopes(S.LinearLogSNR(), data, x0)
    ok = bool(np.all(np.diff(bounds, axis=0) < 0) and np.all(bounds > cont) and np.all(np.abs(slopes + 1) <= 0.1))
    yield _case("objectives", "VDM bound (T = 10..10000) decreases to the continuous ELBO, gap ~ 1/T",
                {"bound_T10": float(bounds[0, 0]), "elbo": float(cont[0]), "max_slope_dev": float(np.max(np.abs(
                    slopes + 1)))}, "monotone, above the limit, |slope + 1| <= 0.1", ok)


def _likelihood_cases(rng):
    from .likelihood import hutchinson_probes
    from .sde import VESDE, VPSDE

    oracles = _oracles(rng)
    for dname in ("GaussianData", "GaussianMixture"):
        data = oracles[dname]
        for sname, sde in (("VP", VPSDE()), ("VE", VESDE())):
            x0 = data.sample(3, rng)
            err, _ = C.pf_likelihood_error(data, sde, x0)
            yield _case("likelihood", f"PF-ODE log-likelihood, exact divergence ({dname}, {sname})",
                        {"max_abs_error_nats": err}, f"<= {LIKELIHOOD_NATS} nats", err <= LIKELIHOOD_NATS)
        x0 = data.sample(2, rng)
        _, z = C.pf_likelihood_error(data, VPSDE(), x0, probes=hutchinson_probes(32, x0.shape, rng), rtol=1e-9,
                                     atol=1e-11)
        z_max = C.z_bound(len(x0), dof=32 - 1)         # the standard error comes from the 32 probes
        yield _case("likelihood", f"PF-ODE log-likelihood, Hutchinson ({dname}, VP)", {"max_abs_z": z},
                    f"|z| <= {z_max:.2f} (false failure < {C.FALSE_FAILURE:g})", z <= z_max)


def _sampler_cases(store: dict, progress=None):
    from .convergence import order_table, specs

    bar = progress_bar(len(specs()), "  samplers", progress, leave=False)
    table = order_table(progress=ticker(bar))
    if bar is not None:
        bar.close()
    store["orders"] = table
    for c in table:
        yield _case("samplers", f"convergence order: {c['sampler']} ({c['kind']})",
                    {"declared": c["declared"] if isinstance(c["declared"], str) else float(c["declared"]),
                     "measured": c["measured"]}, c["rule"], c["verdict"] == "pass")


def _conformance_cases(store: dict, progress=None):
    """diffusers' schedulers against the reference (quick grid). A discrepancy explained by a confirmed hypothesis
    (a known diffusers bug) is a finding, reported; an unexplained one is a verification failure."""
    bar = None
    try:
        from .check.runner import case_label, run_check

        bar = progress_bar(0, "  conformance", progress, leave=False)
        doc = run_check("diffusers", quick=True, progress=ticker(bar),
                        on_total=None if bar is None else (lambda n: bar.reset(total=n)))
        store["conformance"] = [{k: c.get(k) for k in ("scheduler", "variant", "beta_schedule", "timestep_spacing",
                                                        "steps", "prediction_type", "dtype", "per_step_ratio",
                                                        "end_to_end_max_abs", "nonfinite", "verdict", "findings")}
                                for c in doc["cases"]]
    except Exception as exc:                       # diffusers / torch absent
        yield {"group": "conformance", "name": "diffusers schedulers", "metric": {}, "rule": "refdiff check",
               "verdict": "not run", "detail": f"{type(exc).__name__}: {exc}"}
        return
    finally:
        if bar is not None:
            bar.close()
    for name in dict.fromkeys(case_label(c) for c in doc["cases"]):
        cs = [c for c in doc["cases"] if case_label(c) == name]
        agree = sum(c["verdict"] == "pass" for c in cs)
        known = [c for c in cs if c["verdict"] == "known"]
        findings = "; ".join(dict.fromkeys(f"[{f['id']}] {f['summary']}" for c in known for f in c["findings"]))
        case = _case("conformance", f"diffusers {name}", {"cases": len(cs), "agree": agree,
                                                          "explained_findings": len(known)},
                     "agree to float32 rounding, or the discrepancy explained by a confirmed hypothesis",
                     agree + len(known) == len(cs))
        if findings:
            case["detail"] = findings
        yield case
    yield from _pipeline_cases(store)


def _pipeline_cases(store: dict):
    """Whole diffusers pipelines (SD, SD img2img, SDXL, SD3, Flux; quick grid) judged from their traces."""
    try:
        from .check.runner import run_check

        doc = run_check("diffusers-pipeline", quick=True)
    except Exception as exc:                       # transformers absent (diffusers' pipeline modules import it)
        yield {"group": "conformance", "name": "diffusers pipelines", "metric": {}, "rule": "refdiff check",
               "verdict": "not run", "detail": f"{type(exc).__name__}: {exc}"}
        return
    store.setdefault("conformance", []).extend(
        {k: c.get(k) for k in ("scheduler", "variant", "beta_schedule", "timestep_spacing", "steps",
                               "prediction_type", "dtype", "per_step_ratio", "end_to_end_max_abs", "verdict",
                               "findings")} for c in doc["cases"])
    for name in dict.fromkeys(c["scheduler"] for c in doc["cases"]):
        cs = [c for c in doc["cases"] if c["scheduler"] == name]
        agree = sum(c["verdict"] == "pass" for c in cs)
        known = [c for c in cs if c["verdict"] == "known"]
        case = _case("conformance", name, {"cases": len(cs), "agree": agree, "explained_findings": len(known)},
                     "every model call, step and the result within the rounding rule, or explained",
                     agree + len(known) == len(cs))
        findings = "; ".join(dict.fromkeys(f"[{f['id']}] {f['summary']}" for c in known for f in c["findings"]))
        if findings:
            case["detail"] = findings
        yield case


def _kernel_cases():
    """Kernel equivalence (interpreter on CPU, native on a GPU) by the error rule."""
    try:
        from .check.targets.kernels import kernel_cases

        results, backend = kernel_cases()
    except Exception as exc:                       # torch / triton absent
        yield {"group": "kernels", "name": "Triton kernels", "metric": {}, "rule": "error rule",
               "verdict": "not run", "detail": f"{type(exc).__name__}: {exc}"}
        return
    for name, ratio in results:
        yield _case("kernels", f"{name} ({backend})", {"ratio_to_rule": ratio},
                    "|kernel - ref64| <= 2 |naive - ref64| + 2 ulp", ratio <= 1.0)


def _rng_cases():
    bad = C.philox_kat_mismatches()
    yield _case("rng", "Philox4x32-10 known-answer vectors (Random123)", {"mismatches": bad}, "0 mismatches",
                bad == 0)
    try:
        from kernels._launch import select_backend

        backend = select_backend()
        import kernels.rng_probe  # noqa: F401
    except Exception as exc:     # torch / triton absent, or no device the kernels can use
        yield {"group": "rng", "name": "refdiff.rng vs Triton tl.rand / tl.randn", "metric": {},
               "rule": "uniforms bit-exact", "verdict": "not run", "detail": f"{type(exc).__name__}: {exc}"}
        return
    device = "cuda" if backend == "cuda" else "cpu"
    offsets = np.array([0, 1, 2, 3, 1000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 2 ** 40 + 3,
                        2 ** 62 + 7], dtype=np.int64)
    try:
        res = C.rng_vs_triton([0, 1, 12345, 2 ** 32 + 7], offsets, device)
    except RuntimeError as exc:
        yield {"group": "rng", "name": "refdiff.rng vs Triton tl.rand / tl.randn", "metric": {},
               "rule": "uniforms bit-exact", "verdict": "not run", "detail": str(exc)}
        return
    ok = res["uniform_mismatches"] == 0 and res["word_mismatches"] == 0 and res["normal_max_ulp"] <= NORMAL_MAX_ULP
    yield _case("rng", f"refdiff.rng vs Triton tl.rand / tl.randn ({backend})", res,
                f"uniforms and words bit-exact, normals <= {NORMAL_MAX_ULP} ulp", ok)


def run_report(seed: int = 0, progress: bool | None = None) -> dict:
    """Run every applicable check; returns the report dict (see ``SCHEMA``)."""
    _select_kernel_backend()
    rng = np.random.default_rng(seed)
    extra = {}
    groups = [("schedules", _schedule_cases), ("oracles", lambda: _oracle_cases(rng)),
              ("objectives", lambda: _objective_cases(rng)), ("likelihood", lambda: _likelihood_cases(rng)),
              ("samplers", lambda: _sampler_cases(extra, progress)),
              ("conformance", lambda: _conformance_cases(extra, progress)),
              ("kernels", _kernel_cases),
              ("rng", _rng_cases)]
    cases, seconds = [], {}
    bar = progress_bar(len(groups), "refdiff report", progress)
    for name, fn in groups:             # one bar over the groups; the long groups show their own, cleared after
        if bar is not None:
            bar.set_postfix_str(name)
        t0 = time.perf_counter()
        cases.extend(fn())
        seconds[name] = round(time.perf_counter() - t0, 3)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    verdict = "fail" if any(c["verdict"] == "fail" for c in cases) else "pass"
    return {"schema": SCHEMA, "refdiff_version": env_info()["refdiff"], "env": env_info(), "seed": seed,
            "verdict": verdict, "seconds": seconds, "cases": cases, **extra}


def _select_kernel_backend():
    """Choose CUDA or Triton's interpreter before anything imports triton: diffusers (conformance) pulls it in,
    and triton fixes interpreter-or-compiler when its own jit functions are decorated."""
    try:
        from kernels._launch import select_backend
    except ImportError:
        return None
    try:
        return select_backend()
    except ImportError:                 # torch absent: the kernel cases report 'not run'
        return None


def _fmt(metric: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metric.items())


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes in rules such as |kernel - ref| would split the cell."""
    return str(text).replace("|", "\\|")


def write_report(report: dict, out_dir) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) schedules.png into out_dir; returns the paths."""
    out = check_output_dir(out_dir)
    paths = [out / "report.json", out / "report.md"]
    write_text(paths[0], json.dumps(report, indent=2, default=float))
    n_pass = sum(c["verdict"] == "pass" for c in report["cases"])
    lines = [f"# refdiff report — {report['verdict'].upper()}", "",
             f"refdiff {report['refdiff_version']}, Python {report['env']['python']}, numpy "
             f"{report['env']['numpy']}, scipy {report['env']['scipy']}, device {report['env']['device']}, "
             f"Triton interpreter {'on' if report['env']['triton_interpret'] else 'off'}.", "",
             f"{n_pass} of {len(report['cases'])} cases pass"
             + (f", {sum(c['verdict'] == 'not run' for c in report['cases'])} not run (their extra is not installed)"
                if any(c["verdict"] == "not run" for c in report["cases"]) else "") + ".", ""]
    for group in dict.fromkeys(c["group"] for c in report["cases"]):
        lines += [f"## {group}", "", "| case | measured | rule | verdict |", "|---|---|---|---|"]
        for c in report["cases"]:
            if c["group"] == group:
                detail = f" ({c['detail']})" if c.get("detail") else ""
                lines.append(f"| {_cell(c['name'])} | {_cell(_fmt(c['metric']) + detail)} | {_cell(c['rule'])} | "
                             f"{c['verdict']} |")
        lines.append("")
    png = _plot_schedules(out / "schedules.png")
    if png is not None:
        lines += ["## plots", "", "![log-SNR of the continuous families](schedules.png)", ""]
        paths.append(png)
    if report.get("orders"):
        from .convergence import order_markdown, plot_orders

        lines += ["## convergence orders", "", order_markdown(report["orders"]), ""]
        order_png = plot_orders(report["orders"], out / "order.png")
        if order_png is not None:
            lines += ["![log-log convergence of the samplers](order.png)", ""]
            paths.append(order_png)
    if report.get("conformance"):
        lines += _findings_markdown(report["conformance"])
        conf_png = _plot_findings(report["conformance"], out / "conformance.png")
        if conf_png is not None:
            lines += ["![per-step ratio to the rounding rule, diffusers against refdiff](conformance.png)", ""]
            paths.append(conf_png)
    write_text(paths[1], "\n".join(lines))
    return paths


def _findings_markdown(cases) -> list:
    """The diffusers discrepancies of the quick grid: configuration, worst per-step ratio to the rule, explanation."""
    from .check.runner import case_label

    bad = [c for c in cases if c["verdict"] != "pass"]
    lines = ["## diffusers findings", "",
             f"{len(cases) - len(bad)} of {len(cases)} scheduler configurations agree with refdiff to float32 "
             "rounding (rule: per step |diffusers - refdiff| <= 4 u x the running rounding bound of the step; the "
             "schedule and the grid within their float32 bounds; `refdiff check diffusers` runs the full grid).", ""]
    if not bad:
        return lines
    lines += ["| scheduler | configuration | worst step ratio | non-finite | finding |", "|---|---|---|---|---|"]
    for c in bad:
        name = case_label(c)
        ratios = [r for r in c.get("per_step_ratio") or [] if np.isfinite(r)]
        worst = f"{max(ratios):.3g}" if ratios else "nan"
        lines.append(f"| {name} | {c['beta_schedule']}, {c['timestep_spacing']}, {c['steps']} steps, "
                     f"{c['prediction_type']}, {c['dtype']} | {worst} | {c.get('nonfinite', 0)} | "
                     f"{_cell(_finding_text(c))} |")
    return lines + [""]


def _finding_text(case) -> str:
    return "; ".join(f"{'explained' if f['explained'] else 'UNEXPLAINED'} [{f['id']}] {f['summary']}"
                     for f in case.get("findings") or [])


def _plot_findings(cases, path: Path):
    """Per-step ratio to the rule (log scale): one representative (the longest run) of each kind of finding, against
    the agreeing cases' envelope; a non-finite step is marked at the top of the axis."""
    from .check.runner import findings_by_kind

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(14, 5.5))
    ok = [r for c in cases if c["verdict"] == "pass" for r in (c.get("per_step_ratio") or [])]
    if ok:
        ax.axhspan(1e-6, max(ok), color="0.85", label=f"agreeing cases (max {max(ok):.2g})")
    top = 1e7
    per_step = [c for c in cases if c.get("per_step_ratio") and
                any(f["kind"] in ("step", "nonfinite") for f in c.get("findings") or [])]
    groups = [(k, cs) for k, cs in findings_by_kind(per_step).items()
              if any(f["id"] == k[1] and f["kind"] in ("step", "nonfinite") for f in cs[0]["findings"])]
    for ((label, fid), cs), (color, marker, ls) in zip(groups, styles(len(groups))):
        c = max(cs, key=lambda c: len(c["per_step_ratio"]))
        ratios = np.asarray(c["per_step_ratio"], dtype=float)
        steps = np.arange(1, len(ratios) + 1)
        ax.semilogy(steps, np.clip(np.where(np.isfinite(ratios), ratios, np.nan), 1e-6, top), marker=marker, ms=4,
                    ls=ls, color=color, label=f"{label} [{fid}]: {len(cs)} cases, e.g. {c['timestep_spacing']} "
                                              f"{c['steps']} steps {c['prediction_type']}")
        bad = ~np.isfinite(ratios)
        if np.any(bad):
            ax.semilogy(steps[bad], np.full(bad.sum(), top), "x", ms=8, color=color)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    return finish(fig, ax, path, "step", "|diffusers - refdiff| / rounding bound (x: non-finite)",
                  "diffusers against refdiff, per step (ratio <= 1: float32 rounding)", legend_size=7, outside=True)


def _plot_schedules(path: Path):
    """log-SNR of every schedule the report lists: the continuous families against t (EDM, whose time is sigma, at
    sigma log-uniform between its range's ends, t = 0 at sigma_min) and the discrete tables against i / T."""
    plt = pyplot()
    if plt is None:
        return None
    t = np.linspace(1e-3, 1 - 1e-3, 400)
    fams, tables = continuous_families(), discrete_tables()
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for (name, sch), (color, _, ls) in zip(list(fams.items()) + list(tables.items()), styles(len(fams) + len(tables))):
        if isinstance(sch, S.EDM):
            sig = sch.sigma_min ** (1.0 - t) * sch.sigma_max ** t
            ax.plot(t, sch.log_snr(sig), color=color, ls=ls, label=f"{name} (t: log sigma from {sch.sigma_min:g} "
                                                                    f"to {sch.sigma_max:g})")
        elif isinstance(sch, np.ndarray):
            d = S.DiscreteSchedule(sch)
            i = np.arange(d.T)
            with np.errstate(divide="ignore"):
                ax.plot((i + 1) / d.T, d.log_snr(i), color=color, ls=ls, label=f"discrete {name} (t = (i + 1) / T)")
        else:
            ax.plot(t, sch.log_snr(t), color=color, ls=ls, label=name)
    return finish(fig, ax, path, "t", "log SNR  log(alpha^2 / sigma^2)", "schedules of the report's table",
                  outside=True)
