"""Run a whole refdiff sampler on torch tensors with the fused kernel doing every update.

The host computes each stage's StepCoeffs in float64 from the sampler's own paper-form step (refdiff.step_coeffs);
the device applies them with ``sampler_step``, keeping the two history data predictions as tensors. Noise comes
from in-kernel Philox (``seed``; the offset advances by x.numel() per noisy stage, so refdiff.rng reproduces every
draw) or from a callable returning standard-normal tensors. Samplers whose steps are not affine with two history
slots (RK4, predictor-corrector, learned-range DDPM) are refused by step_coeffs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np
import torch

from refdiff.samplers.base import Grid, Sampler, State, step_coeffs

from .fused_step import sampler_step

__all__ = ["DriverResult", "sample", "philox_noise_offsets"]


class DriverResult(NamedTuple):
    x: torch.Tensor
    trajectory: list | None
    state: State
    stages: list          # (step, StepCoeffs, inputs) per stage when recording, else []


def philox_noise_offsets(sampler: Sampler, grid: Grid, numel: int, prediction: str = "eps"):
    """The Philox offset of each noisy stage, in order (what the driver uses with ``seed``)."""
    offsets, off, state = [], 0, State()
    for i in range(len(grid)):
        for c in step_coeffs(sampler, grid, state, prediction):
            if np.any(np.asarray(c.d) != 0):
                offsets.append(off)
                off += numel
        state = replace(state, step=i + 1, history=(0, 0), orders=state.orders + (sampler.step_order(state, grid),))
    return offsets


def sample(sampler: Sampler, model: Callable, grid: Grid, x_T: torch.Tensor, prediction: str = "eps",
           seed: int | None = None, noise: Callable | None = None, guidance=None, return_trajectory: bool = False,
           record: bool = False) -> DriverResult:
    """``model(x, level)`` returns the model output tensor (or (uncond, cond) with ``guidance``, the diffusers
    scale s of m_u + s (m_c - m_u), folded into the kernel's CFG combine)."""
    x = x_T
    h1 = h2 = None
    state = State()
    offset = 0
    traj = [x] if return_trajectory else None
    stages = []
    for i in range(len(grid)):
        for c in step_coeffs(sampler, grid, state, prediction):
            m_u = m_c = None
            coeffs = c._asdict()
            if c.evaluate:
                out = model(x, c.level)
                if guidance is not None:
                    m_u, m_c = out
                    coeffs["w"] = guidance
                else:
                    m_u = out
            noisy = np.any(np.asarray(c.d) != 0)
            z = noise() if (noisy and noise is not None) else None
            if noisy and z is None and seed is None:
                raise ValueError(f"{sampler.name} is stochastic: pass seed (in-kernel Philox) or noise")
            if record:
                stages.append((i, c, dict(x=x, m_uncond=m_u, m_cond=m_c, d_prev1=h1, d_prev2=h2, noise=z,
                                          noise_offset=offset if (noisy and z is None) else None)))
            x_new, D = sampler_step(x, coeffs, m_uncond=m_u, m_cond=m_c,
                                    d_prev1=h1 if np.any(np.asarray(c.c1) != 0) else None,
                                    d_prev2=h2 if np.any(np.asarray(c.c2) != 0) else None, noise=z,
                                    seed=seed if (noisy and z is None) else None, noise_offset=offset,
                                    evaluate=c.evaluate)
            if noisy and z is None:
                offset += x.numel()
            if D is not None:
                h1, h2 = D, h1
            x = x_new
        state = replace(state, step=i + 1, history=(0, 0), orders=state.orders + (sampler.step_order(state, grid),))
        if return_trajectory:
            traj.append(x)
    return DriverResult(x, traj, state, stages)
