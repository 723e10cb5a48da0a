"""Distillation targets: progressive distillation (Salimans & Ho 2022) and guided distillation (Meng et al. 2023).

Progressive distillation: the teacher takes two DDIM steps t -> t' -> t''; the student's x0 target is the x~ for which
one DDIM step t -> t'' lands on the teacher's z_t'' (Salimans & Ho 2022, Alg. 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(at t'' = data the target is the teacher's z_t''). Guided distillation trains a student conditioned on the guidance
weight w to match the teacher's guided output (1 + w) m_c - w m_u, with w drawn from U[w_min, w_max].
"""

from __future__ import annotations

import numpy as np

from ._validate import as_f64, broadcast_rows, check_same_shape
from .samplers.base import Level, NumericContext
from .samplers.ddim import DDIM

__all__ = ["progressive_distillation_target", "teacher_two_ddim_steps", "guided_target", "guidance_weights"]


def progressive_distillation_target(z_t, z_t2, level_t: Level, level_t2: Level):
    """The student x0 target x~ that makes one DDIM step t -> t'' reproduce z_t'' (Salimans & Ho 2022, Alg. 2)."""
    z_t, z_t2 = as_f64(z_t, "z_t"), as_f64(z_t2, "z_t2")
    if z_t.shape != z_t2.shape:
        raise ValueError(f"z_t and z_t2 must have the same shape, got {z_t.shape} and {z_t2.shape}")
    if level_t2.is_data:
        return z_t2 / np.asarray(level_t2.alpha)
    r = np.asarray(level_t2.sigma) / np.asarray(level_t.sigma)
    return (z_t2 - r * z_t) / (np.asarray(level_t2.alpha) - r * np.asarray(level_t.alpha))


def teacher_two_ddim_steps(denoise, z_t, level_t: Level, level_t1: Level, level_t2: Level):
    """The teacher's two deterministic DDIM steps t -> t' -> t'' with ``denoise(x, level) -> x0_hat``."""
    ddim = DDIM(0.0)
    z = as_f64(z_t, "z_t")
    for cur, nxt in ((level_t, level_t1), (level_t1, level_t2)):
        ctx = NumericContext(z, denoise, None, (), None)
        z, _ = ddim.step(ctx, cur, nxt, None)
    return z


def guided_target(m_uncond, m_cond, w):
    """The guided teacher output (1 + w) m_c - w m_u (Ho & Salimans w) that a w-conditioned student regresses on
    (Meng et al. 2023, Eq. 6); w may be per-row (B,)."""
    mu, mc = as_f64(m_uncond, "m_uncond"), as_f64(m_cond, "m_cond")
    check_same_shape(mu, mc, "m_uncond", "m_cond")
    return (1.0 + broadcast_rows(w, mu, "w")) * mc - broadcast_rows(w, mu, "w") * mu


def guidance_weights(u, w_min: float = 0.0, w_max: float = 14.0):
    """w ~ U[w_min, w_max] from explicit uniforms (Meng et al. 2023 sample w in [0, 14] for pixel models)."""
    u = as_f64(u, "u")
    if np.any((u < 0) | (u > 1)) or not w_max >= w_min:
        raise ValueError("need uniforms in [0, 1] and w_max >= w_min")
    return w_min + u * (w_max - w_min)
