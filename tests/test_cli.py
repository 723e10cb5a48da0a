"""The refdiff command: env and report write what they promise, with the documented exit codes."""

import json
import subprocess
import sys

import pytest

from refdiff import cli
from refdiff.report import SCHEMA


def test_env_json(tmp_path, capsys):
    path = tmp_path / "env.json"
    assert cli.main(["env", "--json", str(path)]) == cli.EXIT_PASS
    info = json.loads(path.read_text())
    for key in ("refdiff", "python", "numpy", "scipy", "device", "triton_interpret", "rng_algorithm", "tf32"):
        assert key in info
    assert "rng_algorithm" in capsys.readouterr().out


def test_report_writes_files_with_schema_and_verdicts(tmp_path):
    out = tmp_path / "rep"
    code = cli.main(["report", "--out", str(out), "--quiet", "--json", str(tmp_path / "copy.json")])
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == SCHEMA and report["refdiff_version"] and report["env"]
    assert report["cases"] and all(c["verdict"] in ("pass", "fail", "not run") for c in report["cases"])
    groups = {c["group"] for c in report["cases"]}
    assert {"schedules", "oracles", "rng"} <= groups
    assert code == (cli.EXIT_FAIL if report["verdict"] == "fail" else cli.EXIT_PASS)
    assert report["verdict"] == "pass", [c["name"] for c in report["cases"] if c["verdict"] == "fail"]
    md = (out / "report.md").read_text()
    assert md.startswith("# refdiff report") and "| case | measured | rule | verdict |" in md
    assert "## convergence orders" in md and (out / "order.png").stat().st_size > 0
    assert {"schedules", "oracles", "objectives", "likelihood", "samplers", "conformance", "kernels", "rng"} <= groups
    pipelines = {c["name"] for c in report["cases"] if c["name"].startswith("diffusers-pipeline:")}
    assert {"diffusers-pipeline:StableDiffusionPipeline", "diffusers-pipeline:FluxPipeline"} <= pipelines
    assert json.loads((tmp_path / "copy.json").read_text())["cases"] == report["cases"]


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "refdiff.cli", "env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "numpy" in res.stdout


def test_reference_imports_without_torch():
    code = ("import sys, refdiff, refdiff.report, refdiff.selfcheck, refdiff.highprec; "
            "bad = [m for m in ('torch', 'triton', 'kernels', 'matplotlib') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


FILE = "{tmp}/a_file"            # a regular file, created by the test

BAD_ARGS = [
    pytest.param(["report", "--seed", "x"], "must be an integer", id="seed-not-int"),
    pytest.param(["report", "--seed", "-1"], "[0, 2^32)", id="report-negative-seed"),
    pytest.param(["check", "kernels", "--seed", "-1"], "[0, 2^32)", id="check-negative-seed"),
    pytest.param(["check", "kernels", "--seed", str(2 ** 32)], "[0, 2^32)", id="check-huge-seed"),
    pytest.param(["check", "kernels", "--case-timeout", "0"], "must be > 0", id="zero-timeout"),
    pytest.param(["env", "--bogus"], "unrecognized arguments", id="unknown-flag"),
    pytest.param(["no-such-command"], "invalid choice", id="unknown-command"),
    pytest.param([], "required", id="no-command"),
    pytest.param(["report", "--out", FILE], "is a file", id="report-out-is-a-file"),
    pytest.param(["report", "--out", FILE + "/sub"], "cannot create output folder", id="report-out-under-a-file"),
    pytest.param(["order", "--out", FILE], "is a file", id="order-out-is-a-file"),
    pytest.param(["check", "kernels", "--out", FILE], "is a file", id="check-out-is-a-file"),
    pytest.param(["check", "kernels", "--json", "{tmp}/missing/x.json"], "does not exist", id="json-folder-missing"),
    pytest.param(["check", "kernels", "--json", "{tmp}"], "is a folder", id="json-is-a-folder"),
    pytest.param(["env", "--json", "{tmp}/missing/env.json"], "does not exist", id="env-json-folder-missing"),
    pytest.param(["bench", "--out", FILE], "is a file", id="bench-out-is-a-file"),
    pytest.param(["check", "diffusers", "--rerun", "{tmp}/no_such.npz"], "no such file", id="rerun-missing"),
    pytest.param(["check", "no_such_module:x"], "cannot import", id="check-unknown-module"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS)
def test_usage_errors_exit_2_with_one_line_before_any_compute(argv, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]          # nothing written


def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """Reports are written to a temporary file and renamed: SIGINT (KeyboardInterrupt) mid-write keeps the old one."""
    from refdiff import _io

    target = tmp_path / "report.md"
    target.write_text("previous report")

    def interrupted(self, text):
        self.open("w").write(text[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(type(target), "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _io.write_text(target, "a new report, long enough to be cut")
    monkeypatch.undo()
    assert target.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_sigint_mid_run_exits_130_and_writes_no_report(tmp_path):
    """A check interrupted while a target runs: exit 130, one line, nothing half-written in --out."""
    import os
    import signal
    import time

    out, marker = tmp_path / "out", tmp_path / "sleeping"
    tests_dir = os.path.dirname(__file__)
    # the sleeper touches the marker when it starts to hang; faulthandler dumps every thread on SIGABRT if the
    # interrupted run does not end (a diagnosis instead of a bare timeout)
    env = {**os.environ, "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "REFDIFF_TEST_SLEEP_MARKER": str(marker), "PYTHONFAULTHANDLER": "1"}
    def deliverable_sigint():
        # as in a terminal: the child must not inherit an ignored or blocked SIGINT from whatever started the test
        # run (a shell's background job ignores it; a thread spawning helpers may block it), or Ctrl-C is not tested
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    proc = subprocess.Popen([sys.executable, "-m", "refdiff.cli", "check", "protocol_scheduler:sleeper", "--quick",
                             "--quiet", "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tests_dir, preexec_fn=deliverable_sigint)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the run never reached the hanging case"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the interrupted run did not end; its threads:\n{err[-4000:]}")
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert "interrupted" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_order_writes_table_and_plot(tmp_path):
    code = cli.main(["order", "--out", str(tmp_path), "--kind", "exact law", "--kind", "adaptive"])
    doc = json.loads((tmp_path / "order.json").read_text())
    assert doc["schema"] == "refdiff.order/2" and {c["kind"] for c in doc["cases"]} == {"exact law", "adaptive"}
    assert all(c["verdict"] in ("pass", "fail") for c in doc["cases"])
    assert code == (cli.EXIT_FAIL if doc["verdict"] == "fail" else cli.EXIT_PASS)
    assert "| sampler |" in (tmp_path / "order.md").read_text()
    assert (tmp_path / "order.png").stat().st_size > 0


def test_version_and_did_you_mean(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("refdiff ")
    assert cli.main(["chek", "kernels"]) == cli.EXIT_USAGE
    assert "did you mean 'check'" in capsys.readouterr().err


def test_bench_without_a_gpu_is_not_run():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmarks would run")
    assert cli.main(["bench"]) == cli.EXIT_NOT_RUN


def test_order_bar_advances_once_per_sampler(tmp_path, monkeypatch):
    from refdiff import _progress
    from refdiff import convergence

    counts = []

    class Bar:
        def __init__(self):
            self.n = 0

        def update(self, k=1):
            self.n += k

        def close(self):
            counts.append(self.n)
    monkeypatch.setattr(_progress, "progress_bar", lambda *a, **k: Bar())
    specs = convergence.specs
    monkeypatch.setattr("refdiff.convergence.specs", lambda kinds=None: specs(kinds)[:2])
    assert cli.main(["order", "--out", str(tmp_path), "--ode-only"]) in (cli.EXIT_PASS, cli.EXIT_FAIL)
    assert counts == [2]
