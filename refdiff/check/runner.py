"""``refdiff check TARGET``: resolve the target, run its cases, write JSON + markdown, return an exit code.

Targets (refdiff.check.targets): ``kernels`` (our Triton kernels against the reference), ``diffusers`` (every mapped
scheduler), ``diffusers:NAME`` (one scheduler), ``kdiffusion[:NAME]`` / ``PATH.py[:NAME]`` (k-diffusion-style
sampler functions, judged from their traces), ``module:Object`` (a target object: ``cases`` and ``run_case``),
``module:function`` with k-diffusion's signature, or ``module:callable`` following the step protocol:

    callable(config: dict) -> scheduler
        config holds diffusers-style keys: num_train_timesteps, beta_schedule, beta_start, beta_end,
        prediction_type ("epsilon" | "v_prediction"), timestep_spacing, steps_offset
    scheduler.set_timesteps(n)              then scheduler.timesteps: descending integer indices into
    scheduler.alphas_cumprod                the training table alpha_bar (length num_train_timesteps)
    scheduler.step(model_output, t, sample, generator=None) -> object with .prev_sample, or a tensor
        (torch tensors, as diffusers; a stochastic step draws torch.randn(sample.shape, generator=generator,
        dtype=sample.dtype))
    scheduler.refdiff_sampler               the refdiff sampler it implements: a key of PROTOCOL_SAMPLERS
                                            ("ddim", "ddpm", "dpmsolver++2m", ...); its last step goes to the data

An object without these exits 2 naming the protocol methods found and missing; a target that raises mid-run fails
that case (the exception recorded) and the rest still run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

import numpy as np

from .._io import check_output_dir, write_text
from .findings import EXIT_AGREE, EXIT_KNOWN, EXIT_UNEXPLAINED, Finding, case_verdict, exit_code, headline

__all__ = ["PROTOCOL_METHODS", "run_check", "run_targets", "protocol_target", "write_check", "resolve", "rerun_case", "CASE_KEYS", "case_label",
           "findings_by_kind"]

CASE_KEYS = ("variant", "beta_schedule", "timestep_spacing", "steps", "prediction_type", "dtype")

PROTOCOL_METHODS = ("set_timesteps", "step", "timesteps", "alphas_cumprod", "refdiff_sampler")
SCHEMA = "refdiff.check/1"


_NOT_MAPPED: dict = {}          # functions of a sampling file the check does not run, with the reason (filled by resolve)

CASE_TIMEOUT = 120.0           # seconds per case: a diffusers case takes ~0.1 s, a hung target must not hang the run


class UsageError(Exception):
    pass


class CaseTimeout(BaseException):
    """A case ran past its time limit. A BaseException, so that a target's own ``except Exception`` cannot swallow
    it (as for KeyboardInterrupt)."""


@contextmanager
def _time_limit(seconds):
    """Interrupt the enclosed code after ``seconds`` (SIGALRM; main thread on POSIX only, else no limit)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"the case ran past the {seconds:g} s limit (--case-timeout)")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _guarded(run, adapter, config, case_timeout):
    """Run one case; a target that raises, calls sys.exit or hangs fails that case, and the rest still run."""
    extra = {}
    try:
        with _time_limit(case_timeout):
            return run()
    except CaseTimeout as exc:
        f = Finding("timeout", str(exc))
    except SystemExit as exc:
        f = Finding("exit", f"the target called sys.exit({exc.code!r}) during the case")
    except Exception as exc:                   # the target raised mid-run
        f = Finding("exception", f"raised {type(exc).__name__}: {exc}")
        extra["traceback"] = traceback.format_exc(limit=3)
    return {"scheduler": adapter.name, **config, "verdict": "fail", "findings": [f.to_dict()], "finding": str(f),
            **extra}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of ``choices``, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def case_label(case: dict) -> str:
    """The scheduler with its variant, e.g. DPMSolverMultistepScheduler[3M]."""
    return f"{case['scheduler']}[{case['variant']}]" if case.get("variant") else case["scheduler"]


def findings_by_kind(cases) -> dict:
    """Cases with findings grouped by (label, finding id): one group per scheduler and kind of disagreement (an
    explained finding's id names its explanation, an unexplained one's its kind)."""
    kinds = {}
    for c in cases:
        for f in c.get("findings", []):
            kinds.setdefault((case_label(c), f["id"]), []).append(c)
    return kinds


def resolve(target: str):
    """[(adapter instance, constructor)] for a target string; UsageError with the protocol report otherwise."""
    from .targets import diffusers as DS
    from . import targets as T

    if target.split(":", 1)[0] == "diffusers-pipeline":
        return T.pipelines.resolve_pipeline(target.partition(":")[2])
    if T.is_kdiffusion_spec(target):
        found, skipped = T.kdiffusion.resolve_kdiffusion(target)
        _NOT_MAPPED.update(skipped)
        return found
    module, _, name = target.partition(":")
    if module == "diffusers":
        try:
            import diffusers
        except ImportError as exc:
            raise UsageError(f"diffusers is not installed: {exc}") from None
        # diffusers logs a warning whenever a configuration adjusts itself (e.g. lower_order_final); the check
        # records the configuration it ran, so keep the console to the verdicts
        diffusers.utils.logging.set_verbosity_error()
        names = list(DS.SCHEDULERS) if not name else [name]
        out = []
        for n in names:
            if n in DS.SCHEDULERS:
                out.append(DS.SCHEDULERS[n](diffusers))
            elif n in DS.UNMAPPED:
                raise UsageError(f"diffusers:{n} is not checked: {DS.UNMAPPED[n]}; mapped: {sorted(DS.SCHEDULERS)}")
            elif n.endswith("Scheduler") and hasattr(diffusers, n):
                why = DS.NOT_MAPPED_REASONS.get(n, "new in this diffusers release")
                raise UsageError(f"diffusers:{n} is a diffusers scheduler that refdiff does not map yet ({why}); "
                                 f"mapped: {sorted(DS.SCHEDULERS)} (refdiff check --list)")
            else:
                raise UsageError(f"unknown diffusers scheduler {n!r}{did_you_mean(n, list(DS.SCHEDULERS))}; mapped: "
                                 f"{sorted(DS.SCHEDULERS)}")
        return out
    if os.getcwd() not in sys.path:              # as `python -m` does: modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(module), name) if name else importlib.import_module(module)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {target!r}: {exc}") from None
    except SystemExit as exc:
        raise UsageError(f"importing {module!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:                     # the module raised while importing: a usage error, not a verdict
        raise UsageError(f"importing {module!r} raised {type(exc).__name__}: {exc}") from None
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"custom targets run on torch tensors: {exc}") from None
    if callable(getattr(obj, "cases", None)) and callable(getattr(obj, "run_case", None)):   # a target object
        try:
            inst = obj() if inspect.isclass(obj) else obj
        except Exception as exc:
            raise UsageError(f"{target}: constructing the target raised {type(exc).__name__}: {exc}") from None
        if not isinstance(getattr(inst, "name", None), str):
            inst.name = target
        return [inst]
    if T.kdiffusion.looks_like_sampler_function(obj):       # owns its loop: run once, judge the trace
        return [T.kdiffusion.function_target(obj, target)]
    if inspect.isfunction(obj) and {"model", "sigmas"} & set(inspect.signature(obj).parameters):
        raise UsageError(f"{target} looks like a sampler function but its signature {inspect.signature(obj)} is not "
                         "k-diffusion's (model, x, sigmas, extra_args=None, callback=None, disable=None, ...)")
    return [protocol_target(obj, target)]


def protocol_target(obj, target: str):
    """A scheduler factory (or scheduler) of the step protocol as a target; UsageError naming what is missing."""
    from .targets.protocol import ProtocolAdapter

    probe_config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2,
                        prediction_type="epsilon", timestep_spacing="trailing")
    try:
        inst = obj(probe_config) if callable(obj) else obj
    except Exception as exc:                     # not a factory of the protocol (e.g. a class needing no config)
        raise UsageError(f"{target} is not a scheduler factory: calling it with a config raised "
                         f"{type(exc).__name__}: {exc}; missing {list(PROTOCOL_METHODS)}") from None
    if callable(getattr(inst, "set_timesteps", None)):
        try:
            inst.set_timesteps(2)                # timesteps exist once set
        except Exception as exc:
            raise UsageError(f"{target}: set_timesteps(2) raised {type(exc).__name__}: {exc}") from None
    found = [m for m in PROTOCOL_METHODS if hasattr(inst, m)]
    missing = [m for m in PROTOCOL_METHODS if m not in found]
    if missing:
        raise UsageError(f"{target} does not follow the scheduler protocol: found {found}, missing {missing}")
    try:
        return ProtocolAdapter(obj, target)
    except ValueError as exc:
        raise UsageError(f"{target}: {exc}") from None


def _kernel_check() -> dict:
    from .._env import env_info
    from .targets.kernels import kernel_cases

    try:
        results, backend = kernel_cases()
    except ImportError as exc:
        raise UsageError(f"the kernels target needs torch and triton: {exc}") from None
    cases = []
    for name, r in results:
        fs = [] if r <= 1.0 else [Finding("kernel", f"{name}: ratio to the error rule {r:.3g}",
                                          evidence={"ratio_to_rule": r})]
        cases.append({"scheduler": name, "beta_schedule": "-", "timestep_spacing": "-", "steps": "-",
                      "prediction_type": "-", "ratio_to_rule": r, "verdict": case_verdict(fs),
                      "findings": [f.to_dict() for f in fs]})
    env = env_info()
    code = exit_code(cases)
    return {"schema": SCHEMA, "refdiff_version": env["refdiff"], "env": env, "target": "kernels", "backend": backend,
            "verdict": "fail" if code else "pass", "headline": headline(cases), "exit_code": code, "accepted": [],
            "rule": "|kernel - ref64| <= 2 |naive same-dtype - ref64| + 2 ulp (tensor maxima)", "unmapped": {},
            "cases": cases}


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise UsageError(f"seed must be an integer in [0, 2^32), got {seed!r}")


def run_check(target: str, quick: bool = False, progress=None, on_total=None, seed: int = 0,
              case_timeout: float | None = CASE_TIMEOUT, accept=(), jobs: int = 1) -> dict:
    """Run every case of a target; the document's verdict, headline and exit code follow from the cases' typed
    findings (refdiff.check.findings), with the ``accept``-ed ids or kinds not failing the gate. ``jobs`` > 1 runs
    the cases in that many local processes (each resolves the target itself); the document is the same."""
    _check_seed(seed)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"jobs must be an integer >= 1, got {jobs!r}")
    if target == "kernels":
        return _kernel_check()
    _NOT_MAPPED.clear()
    return run_targets(resolve(target), target, quick=quick, progress=progress, on_total=on_total, seed=seed,
                       case_timeout=case_timeout, accept=accept, jobs=jobs)


def _plan(adapters, quick):
    from .targets import diffusers as DS

    return [(a, config) for a in adapters
            for config in (a.cases(quick) if hasattr(a, "cases") else DS.default_cases(a, quick))]


def _run_one(adapter, config, seed, case_timeout):
    from .targets import diffusers as DS

    run = adapter.run_case if hasattr(adapter, "run_case") else (
        lambda config, seed: DS.run_case(adapter, config, seed=seed))
    case = _guarded(lambda: run(config, seed=seed), adapter, config, case_timeout)
    case["seed"] = seed
    return case


_WORKER: dict = {}


def _worker_init(target, quick):
    """A --jobs worker: resolve the target in this process (targets loaded from files cannot be pickled)."""
    import os as _os

    _os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["plan"] = _plan(resolve(target), quick)


def _worker_case(args):
    k, seed, case_timeout = args
    adapter, config = _WORKER["plan"][k]
    return k, _run_one(adapter, config, seed, case_timeout)


def run_targets(adapters, target: str, quick: bool = False, progress=None, on_total=None, seed: int = 0,
                case_timeout: float | None = CASE_TIMEOUT, accept=(), jobs: int = 1) -> dict:
    """Run every case of already-resolved targets (refdiff.check.targets protocol, or diffusers adapters) under
    the per-case guards; the report document of run_check, labelled ``target``. ``jobs`` > 1 needs a target
    string that each worker process can resolve."""
    from .._env import env_info
    from .targets import diffusers as DS

    _check_seed(seed)
    plan = _plan(adapters, quick)
    if on_total is not None:
        on_total(len(plan))
    cases = [None] * len(plan)
    if jobs > 1 and len(plan) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(min(jobs, len(plan)), initializer=_worker_init, initargs=(target, quick)) as pool:
            for k, case in pool.imap_unordered(_worker_case, [(k, seed, case_timeout) for k in range(len(plan))]):
                cases[k] = case
                if progress is not None:
                    progress(case)
    else:
        for k, (adapter, config) in enumerate(plan):
            cases[k] = _run_one(adapter, config, seed, case_timeout)
            if progress is not None:
                progress(cases[k])
    env = env_info()
    code = exit_code(cases, accept)
    verdict = {EXIT_AGREE: "pass", EXIT_KNOWN: "known", EXIT_UNEXPLAINED: "fail"}[code]
    return {"schema": SCHEMA, "refdiff_version": env["refdiff"], "env": env, "target": target, "seed": seed,
            "verdict": verdict, "headline": headline(cases, accept), "exit_code": code, "accepted": list(accept),
            "rule": f"per step |target - refdiff| <= {DS.R} u (running rounding bound of the step's formula + "
                    "float32 level differences), same inputs; u = unit roundoff of the sample dtype",
            "unmapped": {**DS.UNMAPPED, **_NOT_MAPPED}, "cases": cases}


def write_check(doc: dict, out_dir, save_inputs: str = "never") -> list:
    """check.json, check.md and (``save_inputs``) one case_*.npz per saved case, each written atomically. Case files
    of an earlier run in the same folder are removed first, so every case file present belongs to this report."""
    out = check_output_dir(out_dir)
    for stale in out.glob("case_*.npz"):
        stale.unlink()
    paths = [out / "check.json", out / "check.md"]
    write_text(paths[0], json.dumps(doc, indent=2, default=float))
    from .reproducer import write_reproducers

    repro = write_reproducers(doc, out)
    n_pass = sum(c["verdict"] == "pass" for c in doc["cases"])
    title = doc.get("headline", doc["verdict"].upper())
    head = [f"# refdiff check {doc['target']} — {title}", "", f"{n_pass} of {len(doc['cases'])} "
            f"cases agree. Rule: `{doc['rule']}`." + (f" Accepted: {', '.join(doc['accepted'])}."
                                                       if doc.get("accepted") else ""), ""]
    if doc["target"] == "kernels":
        lines = head + [f"Backend: {doc.get('backend')}.", "", "| case | ratio to the rule | verdict |",
                        "|---|---|---|"]
        lines += [f"| {c['scheduler']} | {c['ratio_to_rule']:.3g} | {c['verdict']} |" for c in doc["cases"]]
        write_text(paths[1], "\n".join(lines + [""]))
        return paths
    lines = head + ["| scheduler | schedule | spacing | steps | prediction | dtype | max step ratio | end-to-end | "
                    "dup. t | verdict | finding |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in doc["cases"]:
        ratio = (f"{max(c['per_step_ratio']):.3g}" if c.get("per_step_ratio") else
                 f"{c['ratio_to_rule']:.3g}" if "ratio_to_rule" in c else "-")
        e2e = f"{c['end_to_end_max_abs']:.2e}" if c.get("end_to_end_max_abs") is not None else "-"
        name = case_label(c)
        finding = "; ".join(f"{'explained' if f['explained'] else 'unexplained'} [{f['id']}] {f['summary']}"
                            for f in c.get("findings", [])).replace("|", "\\|")
        lines.append(f"| {name} | {c.get('beta_schedule', '-')} | {c.get('timestep_spacing', '-')} | "
                     f"{c.get('steps', '-')} | {c.get('prediction_type', '-')} | {c.get('dtype', 'float32')} | {ratio} | {e2e} | "
                     f"{c.get('duplicate_timesteps', '-')} | {c['verdict']} | {finding} |")
    if doc["unmapped"]:
        lines += ["", "Not checked: " + "; ".join(f"{k} ({v})" for k, v in doc["unmapped"].items())]
    if repro:
        lines += ["", "Standalone reproducers (numpy, torch and the target; no refdiff): "
                  + ", ".join(f"`{p.name}`" for p in repro)]
    lines.append("")
    write_text(paths[1], "\n".join(lines))
    if save_inputs != "never":
        for k, c in enumerate(doc["cases"]):
            if save_inputs == "always" or c["verdict"] != "pass":
                p = out / f"case_{k:03d}_{_file_safe(c['scheduler'])}.npz"
                tmp = p.with_name(f".{p.name}.tmp")
                with open(tmp, "wb") as f:               # np.savez on a path would append .npz to the temporary
                    np.savez(f, x_T=np.asarray(c.get("x_T", []), dtype=np.float64),
                             timesteps=np.asarray(c.get("timesteps", [])),
                             config=np.asarray(json.dumps({kk: c[kk] for kk in CASE_KEYS if kk in c})),
                             scheduler=np.asarray(c["scheduler"]), seed=np.asarray(int(c.get("seed", 0))))
                os.replace(tmp, p)
                paths.append(p)
    return paths + repro


def _file_safe(name: str) -> str:
    """A target name as a file-name part (module:callable targets hold ':' and '.')."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))


def rerun_case(target: str, path) -> dict:
    """Run one saved case again (``--save-inputs``): the same configuration and starting sample x_T.

    The file is read with allow_pickle=False: a case file holds arrays and strings only, and a crafted object
    array (a pickle) must not execute. Anything else in it is a usage error with one line."""
    from .targets import diffusers as DS

    try:
        with np.load(path, allow_pickle=False) as f:
            config = json.loads(str(f["config"]))
            x_T = np.asarray(f["x_T"], dtype=np.float64)
            scheduler = str(f["scheduler"])
            seed = int(f["seed"])
        if not isinstance(config, dict) or not all(k in config for k in ("beta_schedule", "steps")):
            raise ValueError("its config lacks the case keys")
    except FileNotFoundError:
        raise UsageError(f"--rerun: no such file {str(path)!r}") from None
    except Exception as exc:
        raise UsageError(f"--rerun: {str(path)!r} is not a case file written by --save-inputs "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    adapters = [a for a in resolve(target) if a.name == scheduler]
    if not adapters:
        raise UsageError(f"{path} holds a case of {scheduler}, not of {target}")
    return DS.run_case(adapters[0], config, seed=seed, x_T=x_T if x_T.size else None)
