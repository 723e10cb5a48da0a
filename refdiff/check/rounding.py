"""A running rounding-error bound (Wilkinson's running error analysis) for the paper-form steps of the samplers.

``Bounded(v, e)`` is a float64 value v with a bound e, in units of the unit roundoff u, on the error of computing
v in a lower precision by the same sequence of operations: a sum adds its operands' bounds and one rounding of the
result (|v|), a scaling by a coefficient c scales the bound by |c| and adds one rounding. Inputs that both sides
share exactly (the float32 sample, the model output, the injected noise) start with e = 0.

Every affine sampler step only adds, subtracts and scales by level coefficients (the symbolic context proves it),
so the same paper-form code runs on ``Bounded`` values: the result carries the reference value and a bound of the
float32 error of the paper's formula, |fp32 - exact| <= u e (to first order). An implementation that associates the
same terms differently, or forms its coefficients in float32 from a few operations, stays within a small multiple
of it; implementations whose coefficients cancel (1 - alpha_bar_t / alpha_bar_s) add their own terms (see
``refdiff.check.targets.diffusers``).
"""

from __future__ import annotations

import numpy as np

from ..samplers.base import AffineAlgebra, NumericContext

__all__ = ["Bounded", "BoundedContext", "exact"]


class Bounded(AffineAlgebra):
    __slots__ = ("v", "e")

    def __init__(self, v, e):
        self.v = np.asarray(v, dtype=np.float64)
        self.e = np.asarray(e, dtype=np.float64)

    def __add__(self, other):
        if isinstance(other, Bounded):
            v = self.v + other.v
            return Bounded(v, self.e + other.e + np.abs(v))
        if np.all(np.asarray(other) == 0):
            return self
        raise TypeError("only bounded values (or 0) can be added to a bounded value")

    def __neg__(self):
        return Bounded(-self.v, self.e)

    def _scaled(self, c):
        v = self.v * c
        return Bounded(v, np.abs(c) * self.e + np.abs(v))

    def __repr__(self):
        return f"Bounded(max|v| {np.max(np.abs(self.v)):.3g}, max e {np.max(self.e):.3g})"


def exact(v) -> Bounded:
    """A value both sides share exactly (no rounding to account for)."""
    return Bounded(v, 0.0)


class BoundedContext(NumericContext):
    """Runs a sampler's paper-form step on Bounded values. ``denoise(u, level) -> Bounded D`` and ``noise() -> array``
    are supplied by the caller (e.g. a replay of a third-party implementation's model calls); every evaluation is
    recorded with its input in ``stages``, every draw in ``draws``."""

    def __init__(self, x: Bounded, denoise, noise, history, grid):
        super().__init__(x, denoise, noise, history, grid)
        self.stages = []
        self.draws = []

    def denoise(self, x, level):
        d = super().denoise(x, level)
        self.stages.append((x, level, d))
        return d

    def noise(self):
        z = np.asarray(super().noise(), dtype=np.float64)
        self.draws.append(z)
        return exact(z)
