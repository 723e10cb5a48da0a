"""kernels._launch: device policy (DESIGN.md §6) before any launch."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import _launch  # noqa: E402


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _launch.check_device(torch.zeros(2))


def test_cpu_tensors_under_the_interpreter_are_accepted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _launch.check_device(torch.zeros(2), torch.ones(3))


def test_mixed_devices_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="same device"):
        _launch.check_device(torch.zeros(2), torch.zeros(2, device="meta"))


def test_unsupported_device_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="unsupported device"):
        _launch.check_device(torch.zeros(2, device="meta"))
