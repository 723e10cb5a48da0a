"""The ``refdiff`` command (README, "The command line").

    refdiff report [--out DIR] [--json PATH]   every check that applies here -> report.md, report.json, plots
    refdiff order [--out DIR] [--json PATH]    convergence orders of the samplers -> order.md, order.json, order.png
    refdiff bench [--out DIR] [--dry-run]      kernel benchmarks against peers (GPU; exit 3 without one)
    refdiff check TARGET [--out DIR] [--quick] conformance of e.g. diffusers:DDIMScheduler against the reference
    refdiff env [--json PATH]                  versions, device, interpreter / TF32 state, RNG algorithm

Exit codes: 0 pass, 1 verification failed (an unexplained finding), 2 usage or import error, 3 not run, 4 only
explained (known) findings — ``refdiff check --accept ID ...`` turns those into 0 for a CI gate; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_RUN, EXIT_KNOWN = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130             # 128 + SIGINT, as shells report it


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2^32) (numpy's and torch's seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2^32), got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _outputs(args, folder: bool = True) -> None:
    """Check --out (a writable folder, created) and --json (a writable file path) before any compute."""
    from ._io import check_output_dir, check_output_file

    if folder and getattr(args, "out", None) is not None:
        check_output_dir(args.out)
    if getattr(args, "json", None):
        check_output_file(args.json)


def _write_json(path, text: str) -> None:
    from ._io import write_text

    write_text(path, text)


def _cmd_env(args) -> int:
    from ._env import env_info

    _outputs(args, folder=False)
    info = env_info()
    if args.json:
        _write_json(args.json, json.dumps(info, indent=2))
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{key:18s} {value}")
    return EXIT_PASS


def _cmd_report(args) -> int:
    from .report import run_report, write_report

    _outputs(args)
    report = run_report(seed=args.seed, progress=None if not args.quiet else False)
    paths = write_report(report, args.out)
    if args.json:
        _write_json(args.json, json.dumps(report, indent=2, default=float))
    failed = [c["name"] for c in report["cases"] if c["verdict"] == "fail"]
    n_pass = sum(c["verdict"] == "pass" for c in report["cases"])
    not_run = sum(c["verdict"] == "not run" for c in report["cases"])
    print(f"refdiff report: {report['verdict']} ({n_pass}/{len(report['cases'])} cases pass"
          f"{f', {not_run} not run' if not_run else ''}); wrote {', '.join(str(p) for p in paths)}")
    for name in failed:
        print(f"  FAIL {name}")
    return EXIT_FAIL if failed else EXIT_PASS


def _cmd_order(args) -> int:
    from ._env import env_info
    from .convergence import order_markdown, order_table, write_order

    from ._progress import progress_bar, ticker
    from .convergence import specs

    _outputs(args)
    kinds = ["ODE"] if args.ode_only else args.kind
    bar = progress_bar(len(specs(kinds)), "refdiff order", False if args.quiet else None)
    try:
        cases = order_table(progress=ticker(bar), kinds=kinds)
    finally:
        if bar is not None:
            bar.close()
    paths = write_order(cases, args.out, env_info())
    if args.json:
        _write_json(args.json, Path(paths[0]).read_text())
    print(order_markdown(cases))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return EXIT_FAIL if any(c["verdict"] == "fail" for c in cases) else EXIT_PASS


def _accepted(args) -> list:
    from .check.findings import read_accept_file

    accept = list(args.accept or [])
    if args.accept_file:
        try:
            accept += read_accept_file(args.accept_file)
        except OSError as exc:
            raise _UsageError(f"--accept-file: cannot read {args.accept_file!r}: {exc.strerror or exc}") from None
    return accept


class _UsageError(Exception):
    pass


def _cmd_check(args) -> int:
    from .check.runner import UsageError, findings_by_kind, rerun_case, run_check, write_check

    if args.list:
        return _list_schedulers()
    if not args.target:
        print("refdiff check: name a TARGET (or --list the diffusers schedulers)", file=sys.stderr)
        return EXIT_USAGE
    if args.jobs < 1:
        print(f"refdiff check: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return EXIT_USAGE
    _outputs(args, folder=not args.rerun)
    try:
        accept = _accepted(args)
    except _UsageError as exc:
        print(f"refdiff check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.rerun:
        try:
            case = rerun_case(args.target, args.rerun)
        except UsageError as exc:
            print(f"refdiff check: {exc}", file=sys.stderr)
            return EXIT_USAGE
        from .check.findings import exit_code

        ratios = ", ".join(f"{r:.3g}" for r in case.get("per_step_ratio", []))
        print(f"{case['scheduler']} {case.get('variant', '')} {case['beta_schedule']} {case['timestep_spacing']} "
              f"{case['steps']} steps {case['prediction_type']} {case['dtype']}: {case['verdict']}\n"
              f"  per-step ratio to the rule: {ratios}\n  {case.get('finding', '')}")
        return exit_code([case], accept)
    from ._progress import progress_bar

    bar = progress_bar(0, "refdiff check", False if args.quiet else None)
    try:          # (a tqdm of total 0 is falsy: test for None, or the bar never advances)
        doc = run_check(args.target, quick=args.quick, progress=(lambda case: bar.update(1)) if bar is not None else None,
                        on_total=(lambda n: bar.reset(total=n)) if bar is not None else None, seed=args.seed,
                        case_timeout=args.case_timeout, accept=accept, jobs=args.jobs)
    except UsageError as exc:
        print(f"refdiff check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if bar is not None:
            bar.close()
    paths = write_check(doc, args.out, args.save_inputs)
    if args.json:
        _write_json(args.json, Path(paths[0]).read_text())
    cases = doc["cases"]
    agree = sum(c["verdict"] == "pass" for c in cases)
    known = sum(c["verdict"] == "known" for c in cases)
    print(f"refdiff check {args.target}: {doc['headline']} — {agree} of {len(cases)} cases agree, {known} with "
          f"explained findings only, {len(cases) - agree - known} with unexplained ones; wrote {paths[0]}, {paths[1]}")
    for (label, fid), cs in findings_by_kind(cases).items():
        f = next(f for f in cs[0]["findings"] if f["id"] == fid)
        tag = "accepted" if fid in accept or f["kind"] in accept else "explained" if f["explained"] else "UNEXPLAINED"
        c = cs[0]
        print(f"  {len(cs):4d} x {label} [{fid}, {tag}], e.g. {c.get('beta_schedule', '-')} "
              f"{c.get('timestep_spacing', '-')} {c.get('steps', '-')} steps {c.get('prediction_type', '-')}: "
              f"{f['summary'][:150]}")
    return doc["exit_code"]


def _list_schedulers() -> int:
    try:
        import diffusers
    except ImportError as exc:
        print(f"refdiff check --list: diffusers is not installed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .check.targets.diffusers import scheduler_listing

    rows = scheduler_listing(diffusers)
    print(f"diffusers {diffusers.__version__}: {sum(r[1] == 'mapped' for r in rows)} of {len(rows)} schedulers "
          "mapped")
    for name, status, why in rows:
        print(f"  {name:36s} {status:10s} {why}")
    return EXIT_PASS


def _cmd_bench(args) -> int:
    import importlib.util

    _outputs(args)
    root = Path(__file__).resolve().parents[1]
    scripts = [root / "bench" / "sampler_step.py", root / "bench" / "attention.py"]
    if not all(s.exists() for s in scripts):
        print("refdiff bench needs the source tree (bench/ is not installed with the package)", file=sys.stderr)
        return EXIT_USAGE
    try:
        import torch
    except ImportError:
        print("refdiff bench needs torch and triton: pip install -e '.[kernels]'", file=sys.stderr)
        return EXIT_USAGE
    if not torch.cuda.is_available() and not args.dry_run:
        print("refdiff bench: not run: no CUDA device (timings need a GPU; --dry-run exercises the script under "
              "the interpreter without real timings)")
        return EXIT_NOT_RUN
    code = EXIT_PASS
    for script in scripts:
        spec = importlib.util.spec_from_file_location(f"refdiff_bench_{script.stem}", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        code = max(code, mod.main(["--out", args.out] + (["--dry-run"] if args.dry_run else [])))
    return code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: 'refdiff check: error: ... (see refdiff check --help)', exit 2."""

    def error(self, message):
        import re

        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            from .check.runner import did_you_mean

            choices = re.findall(r"'([^']*)'", bad.group(2)) or [c.strip() for c in bad.group(2).split(",")]
            message += did_you_mean(bad.group(1), choices)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="refdiff", description="Numerical ground truth for diffusion models.")
    parser.add_argument("--version", action="version", version=f"refdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("report", help="run every applicable check; write report.md, report.json and plots")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.add_argument("--json", help="also write the JSON report to this path")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the numpy Generator used by Monte-Carlo checks")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("order", help="convergence orders of every sampler: table (JSON + markdown) and log-log PNG")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.add_argument("--json", help="also write the JSON table to this path")
    from .convergence import KINDS

    p.add_argument("--kind", action="append", choices=KINDS,
                   help="only the rows of this kind (repeatable; default: all)")
    p.add_argument("--ode-only", action="store_true", help="only the ODE rows (--kind ODE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_order)
    p = sub.add_parser("check", help="conformance of a third-party implementation (e.g. diffusers:DDIMScheduler)")
    p.add_argument("target", nargs="?", help="kernels | diffusers[:NAME] | diffusers-pipeline[:NAME] | kdiffusion[:NAME]"
                                            " | PATH.py[:NAME] | module:callable")
    p.add_argument("--list", action="store_true",
                   help="list every scheduler diffusers ships: mapped (its variants) or not mapped (why), then exit")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="run the cases in N local processes")
    p.add_argument("--out", default="report/check", help="output folder (default: ./report/check)")
    p.add_argument("--json", help="also write the JSON report to this path")
    p.add_argument("--quick", action="store_true", help="a reduced grid of configurations")
    p.add_argument("--save-inputs", choices=("never", "incorrect", "always"), default="never",
                   help="write the inputs of failing (or all) cases as .npz")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--rerun", metavar="NPZ", help="run one case saved by --save-inputs again and print its steps")
    p.add_argument("--seed", type=_seed, default=0, help="seed of x_T and of the generator noise (default 0)")
    p.add_argument("--case-timeout", type=_positive_seconds, default=120.0, metavar="SECONDS",
                   help="fail a case that runs longer than this (a hung target; default 120)")
    p.add_argument("--accept", nargs="+", metavar="ID", default=[],
                   help="finding ids (e.g. diffusers-12633) or kinds (e.g. schedule) that do not fail the exit code")
    p.add_argument("--accept-file", metavar="PATH", help="a file of ids / kinds to accept, one per line (# comments)")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("bench", help="benchmarks against peers on the GPU (exit 3 without one)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--dry-run", action="store_true", help="exercise the benchmarks under the interpreter (no timings)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("env", help="versions, device, interpreter and TF32 state, RNG algorithm")
    p.add_argument("--json", help="also write the environment as JSON to this path")
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv=None) -> int:
    if hasattr(signal, "SIGPIPE"):                 # `refdiff ... | head` ends quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:       # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    from ._io import OutputError

    try:
        return args.func(args)
    except OutputError as exc:
        print(f"refdiff {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"refdiff {args.command}: interrupted; no report was written (files are replaced only when complete)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
