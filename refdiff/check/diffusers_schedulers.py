"""The old name of refdiff.check.targets.diffusers (one module: patching either patches both)."""

import sys

from .targets import diffusers as _module

sys.modules[__name__] = _module
