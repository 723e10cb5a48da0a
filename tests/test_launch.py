"""kernels._launch: device policy (README, "Bad input") before any launch."""

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


def test_public_names_survive_repeated_calls_and_submodule_imports():
    """``kernels.sampler_step`` once became the submodule after its first call ("'module' object is not callable")
    and ``kernels.attention`` was missing: checked in a fresh interpreter, where the first lookup happens."""
    import subprocess
    import sys

    code = """
import os
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch, kernels
x = torch.zeros((2, 8))
q = torch.zeros((1, 1, 4, 16), dtype=torch.float16)
for _ in range(2):
    kernels.sampler_step(x, {"a": 1.0, "b": 1.0, "c_m": 1.0}, m_uncond=x)
    kernels.attention(q, q, q)
    kernels.add_noise(x, 1.0, 0.0, eps=x)
import kernels.fused_step, kernels.flash_attention, kernels.noising, kernels.driver, kernels.distributed
for name in ("sampler_step", "attention", "add_noise", "noising_loss", "sample", "p2p_attention",
             "ring_attention", "ulysses_attention"):
    assert callable(getattr(kernels, name)), name
kernels.sampler_step(x, {"a": 1.0, "b": 1.0, "c_m": 1.0}, m_uncond=x)
kernels.attention(q, q, q)
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items()}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
