"""Triton kernels for the hot GPU paths of diffusion, each property-tested against the float64 reference.

Importing this package needs torch and triton (the ``kernels`` extra); ``refdiff`` never imports it at module
level. Launch policy (device checks, interpreter detection, dtype rules) lives in ``kernels._launch``.
"""

from ._launch import interpreter_active

__all__ = ["interpreter_active"]
