"""Triton kernels for the hot GPU paths of diffusion, each property-tested against the float64 reference.

Importing this package needs torch and triton (the ``kernels`` extra); ``refdiff`` never imports it at module
level. Launch policy (device checks, interpreter detection, dtype and layout rules) lives in ``kernels._launch``.
Kernel modules load lazily, so that the backend (CUDA or the interpreter) can be chosen before any triton.jit runs.
"""

import importlib

from ._launch import interpreter_active, select_backend

__all__ = ["interpreter_active", "select_backend", "sampler_step", "add_noise", "noising_loss", "sample"]

_LAZY = {"sampler_step": ("kernels.sampler_step", "sampler_step"), "add_noise": ("kernels.noising", "add_noise"),
         "noising_loss": ("kernels.noising", "noising_loss"), "sample": ("kernels.driver", "sample")}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
