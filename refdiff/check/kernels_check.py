"""The old name of refdiff.check.targets.kernels (one module: patching either patches both)."""

import sys

from .targets import kernels as _module

sys.modules[__name__] = _module
