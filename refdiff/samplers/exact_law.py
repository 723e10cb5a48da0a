"""The exact output distribution of an affine sampler on Gaussian data with the exact denoiser.

For x0 ~ N(mu, C) the exact denoiser is affine, D = mu + K (x - alpha mu) with K = alpha C (alpha^2 C + sigma^2 I)^-1.
Every stage of a sampler is affine in (x, D, D_prev1, D_prev2, z), so the joint law of (x, D_prev1, D_prev2) stays
Gaussian and its mean and covariance propagate exactly through the StepCoeffs — the output law of the sampler with
no Monte-Carlo error at all.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..oracles import GaussianData
from .base import Grid, Sampler, State, step_coeffs

__all__ = ["GaussianLaw", "gaussian_output_law", "gaussian_marginal", "output_law_by_map"]


class GaussianLaw(NamedTuple):
    mean: np.ndarray
    cov: np.ndarray


def gaussian_marginal(data: GaussianData, alpha, sigma) -> GaussianLaw:
    """The exact marginal p_t = N(alpha mu, alpha^2 C + sigma^2 I)."""
    return GaussianLaw(alpha * data.mean, alpha * alpha * data.cov + sigma * sigma * np.eye(data.D))


def _denoiser_map(data: GaussianData, alpha, sigma):
    lam, U = data.eigvals[0], data.eigvecs[0]
    K = (U * (alpha * lam / (alpha * alpha * lam + sigma * sigma))) @ U.T
    return K, data.mean - alpha * (K @ data.mean)


def gaussian_output_law(sampler: Sampler, data: GaussianData, grid: Grid, start: GaussianLaw | None = None,
                        prediction: str = "eps") -> GaussianLaw:
    """Mean and covariance of the sampler's output when x_T ~ start (default: the exact marginal at the first level).

    Scalar grids only (per-row coefficients describe different laws per row).
    """
    D = data.D
    first = grid.levels[0]
    start = gaussian_marginal(data, float(first.alpha), float(first.sigma)) if start is None else start
    n = 3 * D                                     # the joint state (x, H1, H2)
    mean = np.zeros(n)
    cov = np.zeros((n, n))
    mean[:D] = start.mean
    cov[:D, :D] = start.cov
    state = State()
    I = np.eye(D)
    for i in range(len(grid)):
        for c in step_coeffs(sampler, grid, state, prediction):
            M = np.zeros((n, n))
            off = np.zeros(n)
            if c.evaluate:
                K, k = _denoiser_map(data, float(c.level.alpha), float(c.level.sigma))
                # x' = a x + b (K x + k) + c1 H1 + c2 H2 + d z; H1' = K x + k; H2' = H1
                M[:D, :D] = c.a * I + c.b * K
                M[:D, D:2 * D] = c.c1 * I
                M[:D, 2 * D:] = c.c2 * I
                off[:D] = c.b * k
                M[D:2 * D, :D] = K
                off[D:2 * D] = k
                M[2 * D:, D:2 * D] = I
            else:
                M[:D, :D] = c.a * I
                M[:D, D:2 * D] = c.c1 * I
                M[:D, 2 * D:] = c.c2 * I
                M[D:, D:] = np.eye(2 * D)
            mean = M @ mean + off
            cov = M @ cov @ M.T
            cov[:D, :D] += float(c.d) ** 2 * I
        state = State(step=i + 1, history=(0, 0), orders=state.orders + (sampler.step_order(state, grid),))
    return GaussianLaw(mean[:D], 0.5 * (cov[:D, :D] + cov[:D, :D].T))


def output_law_by_map(sampler: Sampler, data: GaussianData, grid: Grid, model=None, start: GaussianLaw | None = None,
                      prediction: str = "x0") -> GaussianLaw:
    """The exact output law of any sampler whose run is affine given Gaussian data and an affine model, from its
    paper form: out = A x_T + sum_k B_k z_k + c is read off one batched run on basis inputs (x_T = 0 and e_j with
    no noise; each draw z_k = e_j alone), then mean = A mu + c and cov = A Sigma A^T + sum_k B_k B_k^T.

    Covers the samplers without a coefficient form (multistep ones carrying past x, consistency samplers, SDE solvers
    with more history); not samplers whose coefficients read the sample itself (the Langevin corrector's norms) or
    adaptive step sizes. ``model(x, level)`` defaults to the exact denoiser as an x0 prediction.
    """
    from ..solve import sample

    D = data.D
    first = grid.levels[0]
    start = gaussian_marginal(data, float(first.alpha), float(first.sigma)) if start is None else start
    if model is None:
        model = (lambda x, level: data.denoise(x, level.alpha, level.sigma))
        prediction = "x0"
    count = []

    def counting():
        count.append(1)
        return np.zeros((1, D))
    sample(sampler, model, grid, np.zeros((1, D)), noise=counting if sampler.stochastic else None,
           prediction=prediction, progress=False)
    K = len(count)
    rows = 1 + D + K * D
    x = np.zeros((rows, D))
    x[1:1 + D] = np.eye(D)
    draws = iter(range(K))

    def basis_noise():
        k = next(draws)
        z = np.zeros((rows, D))
        z[1 + D + k * D: 1 + D + (k + 1) * D] = np.eye(D)
        return z
    out = sample(sampler, model, grid, x, noise=basis_noise if K else None, prediction=prediction, progress=False).x
    c = out[0]
    A = (out[1:1 + D] - c).T                                  # column j: the response to x_T = e_j
    B = (out[1 + D:] - c).reshape(K, D, D).transpose(0, 2, 1)  # B[k][:, j]: the response to z_k = e_j
    mean = A @ start.mean + c
    cov = A @ start.cov @ A.T + sum((b @ b.T for b in B), np.zeros((D, D)))
    return GaussianLaw(mean, 0.5 * (cov + cov.T))
