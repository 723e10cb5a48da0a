"""Editing: SDEdit (Meng et al. 2022) and DDIM inversion (Song et al. 2021a, §4.3; Dhariwal & Nichol 2021, App. F).

SDEdit with ``strength`` in [0, 1] on a grid of N steps starts k = N - min(floor(N strength), N) steps in (diffusers'
img2img ``get_timesteps``), noising the guide to that level with explicit noise, and samples from there. Strength 0
returns the guide noised to the final level (the guide itself when that level is the data); strength 1 starts at
the grid's first level.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import as_f64, positive_int
from .samplers.base import Grid
from .samplers.ddim import DDIM
from .solve import SampleResult, sample

__all__ = ["sdedit_start", "sdedit", "ddim_invert"]


def sdedit_start(n_steps: int, strength: float) -> int:
    """Index of the grid level where SDEdit starts: N - min(floor(N strength), N)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    n_steps = positive_int(n_steps, "n_steps")
    return n_steps - min(int(math.floor(n_steps * strength)), n_steps)


def sdedit(sampler, model, grid: Grid, x_guide, strength: float, noise_init, noise=None, prediction: str = "eps",
           **kw) -> SampleResult:
    """SDEdit: x_k = alpha_k x_guide + sigma_k eps (``noise_init``), then ``sampler`` over grid.levels[k:]."""
    x_guide = as_f64(x_guide, "x_guide")
    eps = as_f64(noise_init, "noise_init")
    if eps.shape != x_guide.shape:
        raise ValueError(f"noise_init must match x_guide's shape {x_guide.shape}, got {eps.shape}")
    k = sdedit_start(len(grid), strength)
    lvl = grid.levels[k]
    x_k = np.asarray(lvl.alpha) * x_guide + np.asarray(lvl.sigma) * eps
    if k == len(grid):
        return SampleResult(x_k, [x_k], [], None)
    sub = Grid(grid.levels[k:], grid.schedule)
    return sample(sampler, model, sub, x_k, noise=noise, prediction=prediction, **kw)


def ddim_invert(model, grid: Grid, x, prediction: str = "eps", **kw) -> SampleResult:
    """Deterministic DDIM inversion: DDIM(eta = 0) run on the grid reversed, from its least noisy level (which
    must have sigma > 0) to its noisiest. DDIM sampling over ``grid`` maps the result back to x up to O(h)."""
    inv = grid if grid.inversion else grid.reversed()
    if inv.levels[0].is_data:
        raise ValueError("inversion must start at a noisy level (sigma > 0): drop the data level from the grid")
    return sample(DDIM(0.0), model, inv, x, prediction=prediction, **kw)
