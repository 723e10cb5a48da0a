"""The README's promises: its two set-up commands are the ones CI runs, and its Python examples run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_readme_opens_with_exactly_two_set_up_commands():
    first = _blocks("bash")[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 2
    assert commands[0].endswith("refdiff report") and commands[1].endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = [c.split("#")[0].strip() for c in _blocks("bash")[0].splitlines()][1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]


@pytest.mark.parametrize("k", range(len(_blocks("python"))))
def test_python_example_runs(k, monkeypatch):
    monkeypatch.chdir(ROOT / "tests")               # the pytest example names a target in tests/
    code = _blocks("python")[k]
    namespace = {}
    exec(compile(code, f"README.md python block {k}", "exec"), namespace)
    for name, fn in list(namespace.items()):         # a block defining tests: run them
        if name.startswith("test_") and callable(fn):
            fn()
