"""Check an implementation from your own test suite.

    from refdiff.testing import assert_conforms, check_sampler, check_scheduler

    def test_my_sampler():                                  # a k-diffusion-style function
        assert_conforms(check_sampler(my_sample_euler_ancestral, "euler_ancestral"))

    def test_my_scheduler():                                # a step-protocol factory, a diffusers class or a name
        assert_conforms(check_scheduler(make_my_ddim))

    def test_upstream():
        assert_conforms(check_scheduler("diffusers:DPMSolverMultistepScheduler"),
                        accept=["dpmsolver-3m-halved-d2", "diffusers-zero-snr-clamp"])

Each check runs the same cases and judge as ``refdiff check`` (quick grid by default) and returns a ``CheckResult``
of typed findings (refdiff.check.findings.Finding). ``assert_conforms`` fails with every finding that is neither
explained by a known convention nor accepted, one line each; with ``reproducers=DIR`` it first writes the report and
a standalone reproducer script per finding there (refdiff.check.reproducer) and names them in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .check.findings import EXIT_UNEXPLAINED, Finding, is_accepted

__all__ = ["CheckResult", "check", "check_sampler", "check_scheduler", "assert_conforms"]


@dataclass(frozen=True)
class CheckResult:
    """The result of a check: the report document's cases, and their findings as (case label, Finding)."""

    target: str
    cases: list
    findings: list
    exit_code: int
    headline: str
    doc: dict = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no finding is unexplained (explained findings are known upstream conventions or bugs)."""
        return self.exit_code != EXIT_UNEXPLAINED

    def failing(self, accept=()) -> list:
        """(case label, Finding) pairs that neither a known explanation nor ``accept`` covers."""
        return [(label, f) for label, f in self.findings if not f.explained and not is_accepted(f, accept)]

    def unaccepted(self, accept=()) -> list:
        """(case label, Finding) pairs not covered by ``accept`` (explained ones included)."""
        return [(label, f) for label, f in self.findings if not is_accepted(f, accept)]


def _result(doc: dict) -> CheckResult:
    from .check.runner import case_label

    findings = []
    for c in doc["cases"]:
        label = f"{case_label(c)} {c.get('steps', '')} steps".strip()
        findings.extend((label, Finding.from_dict(f)) for f in c.get("findings", []))
    return CheckResult(doc["target"], doc["cases"], findings, doc["exit_code"], doc["headline"], doc)


def check(target, quick: bool = True, seed: int = 0, case_timeout: float | None = None, accept=()) -> CheckResult:
    """Check a target given as ``refdiff check`` names it (``"diffusers:DDIMScheduler"``, ``"kdiffusion"``,
    ``"mypkg.mod:fn"``, ...) or as an object: a target object (``cases`` / ``run_case``), a k-diffusion-style
    function (which names its sampler in ``fn.refdiff_sampler``), a diffusers scheduler class, or a step-protocol
    scheduler factory."""
    from .check import runner
    from .check.targets import kdiffusion as KD

    timeout = runner.CASE_TIMEOUT if case_timeout is None else case_timeout
    if isinstance(target, str):
        return _result(runner.run_check(target, quick=quick, seed=seed, case_timeout=timeout, accept=accept))
    label = getattr(target, "__qualname__", None) or type(target).__name__
    if callable(getattr(target, "cases", None)) and callable(getattr(target, "run_case", None)):
        objs = [target() if isinstance(target, type) else target]
    elif KD.looks_like_sampler_function(target):
        objs = [KD.function_target(target, label)]
    elif isinstance(target, type) and target.__module__.startswith("diffusers"):
        return check(f"diffusers:{target.__name__}", quick, seed, case_timeout, accept)
    else:
        objs = [runner.protocol_target(target, label)]
    return _result(runner.run_targets(objs, label, quick=quick, seed=seed, case_timeout=timeout, accept=accept))


def check_sampler(fn, sampler: str | None = None, quick: bool = True, seed: int = 0,
                  case_timeout: float | None = None, accept=()) -> CheckResult:
    """Check a function with k-diffusion's signature ``fn(model, x, sigmas, extra_args=None, callback=None,
    disable=None, ...)`` against the refdiff sampler ``sampler`` (a name of refdiff.samplers.SAMPLER_NAMES, e.g.
    "euler_ancestral"; default: ``fn.refdiff_sampler`` or fn's name without ``sample_``)."""
    from .check import runner
    from .check.targets import kdiffusion as KD

    if not KD.looks_like_sampler_function(fn):
        raise ValueError(f"check_sampler needs a function with k-diffusion's signature (model, x, sigmas, ...), got "
                         f"{fn!r}")
    label = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    if sampler is not None:
        from .samplers import SAMPLER_NAMES

        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {sampler!r}{runner.did_you_mean(sampler, SAMPLER_NAMES)}; known: "
                             f"{sorted(SAMPLER_NAMES)}")
        target = KD.KFunction(fn, label, KD.MAPPED.get(sampler, sampler))
    else:
        try:
            target = KD.function_target(fn, label)
        except runner.UsageError as exc:
            raise ValueError(str(exc)) from None
    timeout = runner.CASE_TIMEOUT if case_timeout is None else case_timeout
    return _result(runner.run_targets([target], label, quick=quick, seed=seed, case_timeout=timeout, accept=accept))


def check_scheduler(target, quick: bool = True, seed: int = 0, case_timeout: float | None = None,
                    accept=()) -> CheckResult:
    """Check a scheduler: ``"diffusers:NAME"``, a diffusers scheduler class, or a factory ``config -> scheduler``
    of the step protocol (README, "Checking your own scheduler")."""
    from .check.runner import UsageError

    try:
        return check(target, quick=quick, seed=seed, case_timeout=case_timeout, accept=accept)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def assert_conforms(result, accept=(), reproducers=None, **check_kwargs) -> CheckResult:
    """Raise AssertionError listing every finding of ``result`` (a CheckResult, or a target to ``check`` first)
    that is neither explained nor accepted. ``reproducers``: a folder for the report and one standalone reproducer
    script per failing case (named in the message)."""
    if not isinstance(result, CheckResult):
        result = check(result, accept=accept, **check_kwargs)
    failing = result.failing(accept)
    if not failing:
        return result
    lines = [f"{result.target}: {len(failing)} finding{'s' if len(failing) != 1 else ''} neither explained nor "
             f"accepted ({result.headline})"]
    lines += [f"  {label}: [{f.id}] {f.summary}" for label, f in failing[:20]]
    if len(failing) > 20:
        lines.append(f"  ... and {len(failing) - 20} more")
    if reproducers is not None:
        from .check.runner import write_check

        paths = write_check(result.doc, reproducers)
        scripts = [str(p) for p in paths if p.name.startswith("repro_")]
        lines.append(f"  report: {paths[1]}" + (f"; reproducers: {', '.join(scripts)}" if scripts else ""))
    raise AssertionError("\n".join(lines))

