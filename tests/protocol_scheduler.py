"""Schedulers outside diffusers that follow ``refdiff check``'s step protocol (see refdiff.check.runner): DDIM
written from the paper on torch tensors, and the same with an off-by-one table read, as a check must catch it."""

import math

import numpy as np
import torch


def _betas(config):
    T, kind = config["num_train_timesteps"], config["beta_schedule"]
    if kind == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], T)
    if kind == "scaled_linear":
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    raise ValueError(f"unsupported beta_schedule {kind!r}")


class PaperDDIM:
    """DDIM (Song et al. 2021, Eq. 12, eta = 0) with the spacings of Lin et al. 2024, Table 2."""

    refdiff_sampler = "ddim"

    def __init__(self, config, off_by_one=False):
        self.T = config["num_train_timesteps"]
        self.prediction_type = config["prediction_type"]
        self.spacing = config.get("timestep_spacing", "linspace")
        self.offset = config.get("steps_offset", 0)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - _betas(config)), dtype=torch.float32)
        self.off_by_one = off_by_one

    def _spaced(self, n):
        if self.spacing == "linspace":
            return np.round(np.linspace(self.T - 1, 0, n))
        if self.spacing == "leading":
            return np.arange(n)[::-1] * (self.T // n) + self.offset
        return np.round(np.arange(self.T, 0, -self.T / n)) - 1           # trailing

    def set_timesteps(self, n):
        self.timesteps = torch.from_numpy(self._spaced(n).astype(np.int64))
        nxt = list(self.timesteps[1:].tolist()) + [-1]
        self._next = dict(zip(self.timesteps.tolist(), nxt))

    def step(self, model_output, t, sample, generator=None):
        t = int(t)
        prev = self._next[t]
        a_t = self.alphas_cumprod[max(t - 1, 0) if self.off_by_one else t]
        a_p = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        if self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
            eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
        else:
            eps = model_output
            x0 = (sample - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps


def ddim(config):
    return PaperDDIM(config)


def ddim_off_by_one(config):
    return PaperDDIM(config, off_by_one=True)


class IgnoresSpacing(PaperDDIM):
    """Always linspace, whatever timestep_spacing asks: every step is right for the levels it picked."""

    def _spaced(self, n):
        return np.round(np.linspace(self.T - 1, 0, n))


def ignores_spacing(config):
    return IgnoresSpacing(config)


def wrong_betas(config):
    """Builds a linear table whatever beta_schedule asks (a copy-paste slip): right steps on the wrong schedule."""
    return PaperDDIM({**config, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 2e-2})


class NoSampler:
    """Has the scheduler methods but does not say which refdiff sampler it implements."""

    def __init__(self, config):
        self.alphas_cumprod = torch.ones(10)
        self.timesteps = torch.arange(1)

    def set_timesteps(self, n):
        pass

    def step(self, *args, **kwargs):
        pass


class WrongShape(PaperDDIM):
    """Returns the first row only: (1, D) for a (B, D) sample, which broadcasting would hide."""

    def step(self, model_output, t, sample, generator=None):
        return super().step(model_output, t, sample, generator)[:1]


def wrong_shape(config):
    return WrongShape(config)


class Sleeper(PaperDDIM):
    """Hangs (sleeps for an hour) on half-precision samples, works otherwise."""

    def step(self, model_output, t, sample, generator=None):
        if sample.dtype != torch.float32:
            import os
            import time

            marker = os.environ.get("REFDIFF_TEST_SLEEP_MARKER")
            if marker:                   # tells a test that the run is inside the hang
                open(marker, "w").close()
            try:
                time.sleep(3600)
            except Exception:            # a target swallowing exceptions must still be stopped
                pass
        return super().step(model_output, t, sample, generator)


def sleeper(config):
    return Sleeper(config)


class Exiter(PaperDDIM):
    """Calls sys.exit(0) on half-precision samples."""

    def step(self, model_output, t, sample, generator=None):
        if sample.dtype != torch.float32:
            import sys

            sys.exit(0)
        return super().step(model_output, t, sample, generator)


def exiter(config):
    return Exiter(config)
