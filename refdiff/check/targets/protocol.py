"""Target: a scheduler of the step protocol (``refdiff check module:callable``; the protocol is in
refdiff.check.runner's docstring and the README): a factory ``config -> scheduler`` stepped and replayed as
diffusers' schedulers are (refdiff.check.replay), with the refdiff sampler it names in ``refdiff_sampler``."""

from __future__ import annotations

import numpy as np

from ... import schedules as S
from ...samplers import DDIM, DDPM, DEIS, SDEDPMSolverPP2M, DPMSolverPP, Grid, UniPC
from .diffusers import _Adapter

__all__ = ["ProtocolAdapter", "PROTOCOL_SAMPLERS"]

# what a ``module:callable`` target may name as its ``refdiff_sampler`` (VP discrete-time schedulers ending at the data)
PROTOCOL_SAMPLERS = {"ddim": lambda: DDIM(0.0), "ddpm": lambda: DDPM("fixed_small"),
                     "dpmsolver++2m": lambda: DPMSolverPP(2), "dpmsolver++3m": lambda: DPMSolverPP(3),
                     "sde-dpmsolver++2m": SDEDPMSolverPP2M, "unipc-bh2": lambda: UniPC(2, "bh2"),
                     "deis2": lambda: DEIS(2)}


class ProtocolAdapter(_Adapter):
    """A ``module:callable`` target following the step protocol (see refdiff.check.runner): ``factory(config)``
    returns a scheduler with set_timesteps(n), timesteps, alphas_cumprod, step(model_output, t, sample, generator=)
    -> .prev_sample (or a tensor) on torch tensors, and refdiff_sampler naming one of PROTOCOL_SAMPLERS. Its
    timesteps index alphas_cumprod, its last step goes to the data, and a stochastic sampler draws its noise as
    torch.randn(sample.shape, generator=generator, dtype=sample.dtype)."""

    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    predictions = ("epsilon", "v_prediction")

    def __init__(self, factory, name: str):
        self.factory, self.name = factory, name
        probe = factory(self.scheduler_config(dict(beta_schedule="scaled_linear", timestep_spacing="trailing",
                                                   prediction_type="epsilon")))
        self.kind = getattr(probe, "refdiff_sampler", None)
        if self.kind not in PROTOCOL_SAMPLERS:
            raise ValueError(f"refdiff_sampler must be one of {sorted(PROTOCOL_SAMPLERS)}, got {self.kind!r}")

    def supports(self, config):
        return True

    def make(self, config, variant):
        return self.factory(config)

    def table(self, sched):
        import torch

        ac = sched.alphas_cumprod
        ac = ac.double().numpy() if isinstance(ac, torch.Tensor) else np.asarray(ac, dtype=np.float64)
        return S.DiscreteSchedule.from_alphas_cumprod(ac)

    def grid(self, sched, table):
        return Grid.from_discrete(table, np.asarray(sched.timesteps).astype(np.int64), final="data")

    def sampler(self, sched, table, grid, variant=""):
        return PROTOCOL_SAMPLERS[self.kind]()
