"""Triton kernels for the hot GPU paths of diffusion, each property-tested against the float64 reference.

Importing this package needs torch and triton (the ``kernels`` extra); ``refdiff`` never imports it at module
level. Launch policy (device checks, interpreter detection, dtype and layout rules) lives in ``kernels._launch``.

The public functions load their modules lazily, so that the backend (CUDA or the interpreter) can be chosen before
any triton.jit runs. No module bears a public function's name (``fused_step`` holds ``sampler_step``,
``flash_attention`` holds ``attention``): importing a submodule binds it as a package attribute, and a module
named like a function would replace that function after the first import.
"""

import importlib

from ._launch import interpreter_active, select_backend

_LAZY = {
    "sampler_step": "kernels.fused_step",
    "cfg_rescale_factors": "kernels.fused_step",
    "add_noise": "kernels.noising",
    "noising_loss": "kernels.noising",
    "sample": "kernels.driver",
    "attention": "kernels.flash_attention",
    "attention_backward": "kernels.flash_attention",
    "p2p_attention": "kernels.flash_attention",
    "ring_attention": "kernels.distributed",
    "ulysses_attention": "kernels.distributed",
}

__all__ = ["interpreter_active", "select_backend", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        fn = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = fn                  # later lookups skip __getattr__
        return fn
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
