"""k-diffusion-style sampler functions written for the check tests: correct ones from the papers' forms, and copies
with one planted bug each (a 1e-4 coefficient error, an off-by-one sigma index, a wrong noise scaling, a missing
model call, a crash mid-run). ``refdiff check kd_samplers:NAME`` drives each through the trace judge.

Signature (k-diffusion's): fn(model, x, sigmas, extra_args=None, callback=None, disable=None, ...) with
model(x, sigma * ones(B)) -> the data prediction D(x; sigma), x = x0 + sigma eps.
"""

import torch


def _ones(x):
    return x.new_ones([x.shape[0]])


def _ancestral(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step (Ho et al. 2020 posterior in sigma form)."""
    up = min(float(sigma_next), eta * float((sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5))
    return (sigma_next ** 2 - up ** 2) ** 0.5, up


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, _noise_factor=1.0):
    """Euler steps on the PF ODE to sigma_down, then fresh noise of scale sigma_up (Karras et al. 2022 form)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or (lambda s, sn: torch.randn_like(x))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (s_noise * up * _noise_factor)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, _coef_error=0.0):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in t = -log sigma, first order at the first and the last step."""
    extra_args = extra_args or {}
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * (1 + _coef_error) * d
        old = denoised
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, _index_shift=0):
    """Euler on the PF ODE dx/dsigma = (x - D) / sigma."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        s_model = sigmas[min(i + _index_shift, len(sigmas) - 2)]
        denoised = model(x, s_model * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def coefficient_error(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) with its update scaled by 1 + 1e-4."""
    return sample_dpmpp_2m(model, x, sigmas, extra_args, callback, disable, _coef_error=1e-4)


coefficient_error.refdiff_sampler = "dpmpp_2m"


def off_by_one_sigma(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler evaluating the model at sigmas[i + 1] instead of sigmas[i]."""
    return sample_euler(model, x, sigmas, extra_args, callback, disable, _index_shift=1)


off_by_one_sigma.refdiff_sampler = "euler"


def wrong_noise_scale(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                      noise_sampler=None):
    """Euler ancestral adding 1.1 times the noise its sigma_up asks for."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                                  _noise_factor=1.1)


wrong_noise_scale.refdiff_sampler = "euler_ancestral"


def skips_last_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler whose last step reuses the previous model output instead of calling the model."""
    denoised = None
    for i in range(len(sigmas) - 1):
        if i < len(sigmas) - 2 or denoised is None:
            denoised = model(x, sigmas[i] * _ones(x))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


skips_last_call.refdiff_sampler = "euler"


def crashes(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Raises after one model call."""
    model(x, sigmas[0] * _ones(x))
    raise RuntimeError("planted crash mid-run")


crashes.refdiff_sampler = "euler"


def no_callback(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Correct DPM-Solver++(2M) that never calls the callback: judged end to end over one span."""
    return sample_dpmpp_2m(model, x, sigmas, extra_args, None, disable)


no_callback.refdiff_sampler = "dpmpp_2m"


def wrong_signature(x, model, sigmas):
    """Parameters in the wrong order."""
    return x


def unnamed(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Correct Euler, but neither named sample_* nor carrying refdiff_sampler."""
    return sample_euler(model, x, sigmas, extra_args, callback, disable)


def hangs(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Never returns."""
    import time

    while True:
        time.sleep(0.05)


hangs.refdiff_sampler = "euler"


class OwnLoopTarget:
    """A check target object (refdiff.check.targets protocol) defined outside refdiff: its own Euler loop, recorded
    and judged; ``refdiff check kd_samplers:OwnLoopTarget``."""

    name = "own-loop-euler"

    def cases(self, quick=False):
        return [{"steps": n, "variant": "defaults"} for n in ((5,) if quick else (5, 11))]

    def run_case(self, config, seed=0, x_T=None):
        import numpy as np

        from refdiff.check.findings import case_verdict
        from refdiff.check.targets.kdiffusion import OracleDenoiser
        from refdiff.check.trace import Trace, judge
        from refdiff.samplers import Grid, sampler

        sigmas = torch.tensor(np.geomspace(14.6, 0.03, config["steps"]).tolist() + [0.0])
        trace = Trace(np.full((2, 4), 14.6))
        model = OracleDenoiser(trace, torch)

        def callback(d):
            trace.states[d["i"]] = d["x"].double().numpy()
        trace.final = sample_euler(model, torch.full((2, 4), 14.6), sigmas, callback=callback).double().numpy()
        j = judge(trace, sampler("euler"), Grid.from_sigmas(sigmas.double().numpy()), u=2.0 ** -24)
        return {"scheduler": self.name, **config, "findings": [f.to_dict() for f in j.findings],
                "verdict": case_verdict(j.findings), "per_step_ratio": j.per_step_ratio}
