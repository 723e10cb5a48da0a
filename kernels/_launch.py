"""Launch policy shared by every kernel: where a kernel may run and how it is being run.

Without CUDA the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before any ``triton.jit`` decorator executes; tests/conftest.py does that when CUDA is absent.
"""

from __future__ import annotations

import os

__all__ = ["interpreter_active", "check_device", "select_backend"]


def select_backend() -> str:
    """Choose where kernels run, before any kernel module is imported: 'cuda' when a GPU is present, else
    switch on Triton's interpreter (a user's own TRITON_INTERPRET setting wins) and return 'interpreter'.

    Must run before the first ``triton.jit`` executes: the interpreter is chosen at decoration time.
    """
    import torch

    if torch.cuda.is_available() and not interpreter_active():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "interpreter" if interpreter_active() else "cpu-without-interpreter"


def interpreter_active() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors) -> None:
    """All tensors on one device, and a device the kernels can use: CUDA, or CPU under the interpreter.

    Raises ValueError for mixed devices and RuntimeError for CPU tensors without the interpreter.
    """
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on the same device; got {sorted(str(d) for d in devices)}")
    (device,) = devices
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                           "kernels, move the tensors to CUDA, or use the float64 reference in refdiff")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; the kernels run on CUDA (or CPU under the interpreter)")
