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
    assert json.loads((tmp_path / "copy.json").read_text())["cases"] == report["cases"]


def test_usage_error_exit_code():
    assert cli.main(["no-such-command"]) == cli.EXIT_USAGE
    assert cli.main([]) == cli.EXIT_USAGE


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "refdiff.cli", "env"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "numpy" in res.stdout


def test_reference_imports_without_torch():
    code = ("import sys, refdiff, refdiff.report, refdiff.selfcheck, refdiff.highprec; "
            "bad = [m for m in ('torch', 'triton', 'kernels', 'matplotlib') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("argv", [["report", "--seed", "x"], ["env", "--bogus"]])
def test_bad_arguments(argv):
    assert cli.main(argv) == cli.EXIT_USAGE


def test_order_writes_table_and_plot(tmp_path):
    code = cli.main(["order", "--out", str(tmp_path), "--ode-only"])
    doc = json.loads((tmp_path / "order.json").read_text())
    assert doc["schema"] == "refdiff.order/1" and doc["cases"]
    assert all(c["verdict"] in ("pass", "fail") for c in doc["cases"])
    assert code == (cli.EXIT_FAIL if doc["verdict"] == "fail" else cli.EXIT_PASS)
    assert "| sampler |" in (tmp_path / "order.md").read_text()
    assert (tmp_path / "order.png").stat().st_size > 0
