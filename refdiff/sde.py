"""Forward SDEs dx = f(t) x dt + g(t) dW, their reverse-time SDE and probability-flow ODE (Song et al. 2021).

Symbols
-------
f(t)        linear drift coefficient, f = alpha' / alpha for the marginal x_t = alpha x0 + sigma eps
g(t)^2      diffusion, g^2 = d sigma^2 / dt - 2 f sigma^2 (so that the marginal variance is sigma^2)
reverse     dx = [f x - g^2 score] dt + g dW_bar            (Song et al. 2021, Eq. 6)
PF ODE      dx/dt = f x - g^2 score / 2                       (Song et al. 2021, Eq. 13)

``VPSDE`` (Eq. 11), ``SubVPSDE`` (Eq. 12) and ``VESDE`` (Eq. 9) in closed form, and ``ScheduleSDE`` for any
refdiff schedule (VP, VE, EDM, flow). The VE marginal here is exact: variance sigma(t)^2 - sigma_min^2 from a
clean start (score_sde's ``marginal_prob`` returns sigma(t), dropping the sigma_min^2 term).
"""

from __future__ import annotations

import numpy as np

from ._validate import as_f64
from .schedules import VE, ContinuousSchedule, VPLinear

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ScheduleSDE"]

LOG_2PI = float(np.log(2.0 * np.pi))


class SDE:
    """A linear-drift SDE with Gaussian transition from x(0) = x0: x_t ~ N(alpha(t) x0, sigma(t)^2 I).

    Subclasses define f(t), g2(t), alpha(t), sigma(t) and the time interval [t_min, T].
    """

    t_min = 0.0
    T = 1.0

    def f(self, t):
        raise NotImplementedError

    def g2(self, t):
        raise NotImplementedError

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    # -- the SDE as a mathematical object ----------------------------------------------------------
    def drift(self, x, t):
        """f(t) x; x (B, D), t scalar."""
        return self.f(t) * as_f64(x, "x")

    def diffusion(self, t):
        return np.sqrt(self.g2(t))

    def marginal(self, x0, t):
        """Mean alpha(t) x0 and std sigma(t) of p(x_t | x0)."""
        return self.alpha(t) * as_f64(x0, "x0"), self.sigma(t)

    def prior_sample(self, noise):
        """A draw from the prior N(0, sigma(T)^2 I) made from the given standard normal noise."""
        return self.sigma(self.T) * as_f64(noise, "noise")

    def prior_logp(self, z):
        """log N(z; 0, sigma(T)^2 I) per row, z (B, D)."""
        z = as_f64(z, "z")
        s2 = self.sigma(self.T) ** 2
        D = z[0].size if z.ndim > 1 else z.size
        return -0.5 * (D * (LOG_2PI + np.log(s2)) + (z.reshape(z.shape[0], -1) ** 2).sum(axis=1) / s2)

    def reverse_drift(self, x, t, score):
        """Drift of the reverse-time SDE, f x - g^2 score (to be integrated backwards in t)."""
        return self.drift(x, t) - self.g2(t) * as_f64(score, "score")

    def pf_drift(self, x, t, score):
        """Velocity of the probability-flow ODE, f x - g^2 score / 2."""
        return self.drift(x, t) - 0.5 * self.g2(t) * as_f64(score, "score")


class VPSDE(SDE):
    """dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW with beta linear (Song et al. 2021, Eq. 11; DDPM's limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.schedule = VPLinear(beta_min, beta_max)

    def f(self, t):
        return -0.5 * self.schedule.beta(t)

    def g2(self, t):
        return self.schedule.beta(t)

    def alpha(self, t):
        return self.schedule.alpha(t)

    def sigma(self, t):
        return self.schedule.sigma(t)


class SubVPSDE(SDE):
    """dx = -beta x / 2 dt + sqrt(beta (1 - e^{-2 B(t)})) dW (Song et al. 2021, Eq. 12): variance (1 - e^{-B})^2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.schedule = VPLinear(beta_min, beta_max)

    def _B(self, t):
        hi, lo = self.schedule.B(t)
        return hi + lo

    def f(self, t):
        return -0.5 * self.schedule.beta(t)

    def g2(self, t):
        return self.schedule.beta(t) * -np.expm1(-2.0 * self._B(t))

    def alpha(self, t):
        return self.schedule.alpha(t)

    def sigma(self, t):
        return -np.expm1(-self._B(t))


class VESDE(SDE):
    """dx = sqrt(d sigma^2 / dt) dW with sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, Eq. 9).

    From a clean x0 the marginal variance is sigma(t)^2 - sigma_min^2 (exact); the prior is N(0, sigma_max^2 I) as
    in score_sde (the sigma_min^2 difference is below the prior's own approximation).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.schedule = VE(sigma_min, sigma_max)

    def f(self, t):
        return np.zeros_like(as_f64(t, "t"))[()]

    def g2(self, t):
        s = self.schedule.sigma(t)
        return 2.0 * s * s * self.schedule.log_ratio

    def alpha(self, t):
        return np.ones_like(as_f64(t, "t"))[()]

    def sigma(self, t):
        s = self.schedule.sigma(t)
        smin = self.schedule.sigma_min
        return np.sqrt((s - smin) * (s + smin))

    def prior_sample(self, noise):
        return self.schedule.sigma_max * as_f64(noise, "noise")

    def prior_logp(self, z):
        z = as_f64(z, "z")
        s2 = self.schedule.sigma_max ** 2
        D = z[0].size
        return -0.5 * (D * (LOG_2PI + np.log(s2)) + (z.reshape(z.shape[0], -1) ** 2).sum(axis=1) / s2)


class ScheduleSDE(SDE):
    """The SDE whose marginals are those of a refdiff schedule: f = alpha'/alpha, g^2 = 2 sigma sigma' - 2 f sigma^2.

    For VPLinear this is the VP SDE; for VE / EDM it is the VE SDE dx = sqrt(2 sigma sigma') dW; for rectified flow
    it is the SDE of the flow's marginals. Times follow the schedule; the interval is [t_min, T] as given.
    """

    def __init__(self, schedule: ContinuousSchedule, t_min: float | None = None, T: float | None = None):
        if not isinstance(schedule, ContinuousSchedule):
            raise ValueError(f"schedule must be a refdiff ContinuousSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.t_min = schedule.t_min if t_min is None else float(t_min)
        self.T = (1.0 if np.isinf(schedule.t_max) else schedule.t_max) if T is None else float(T)
        if not self.T > self.t_min:
            raise ValueError(f"need T > t_min, got {self.t_min}, {self.T}")

    def f(self, t):
        return self.schedule.dalpha_dt(t) / self.schedule.alpha(t)

    def g2(self, t):
        s = self.schedule.sigma(t)
        return 2.0 * s * (self.schedule.dsigma_dt(t) - self.f(t) * s)

    def alpha(self, t):
        return self.schedule.alpha(t)

    def sigma(self, t):
        return self.schedule.sigma(t)
