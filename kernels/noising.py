"""Fused training-step kernels: forward noising, and the weighted denoising loss with its gradient.

A training step has the model between the two memory-bound parts, so there are two passes, each a single read of
its inputs (refdiff.losses.training_loss is the reference):

* ``add_noise``:    x_t = alpha x0 + sigma eps, eps from a tensor or regenerated in-kernel by Philox (seed, offset);
* ``noising_loss``: the target (eps, x0, v = alpha eps - sigma x0, flow = eps - x0) formed on the fly from x0 and the
  same eps (never stored), loss_b = w_b mean_j (m - target)^2 (or the sum) and d loss_b / d m, in one pass.

Per-row alpha, sigma and w (per-sample timesteps) are float32 vectors. Row sums are per-block partials reduced by
torch afterwards: deterministic, no atomics, no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import check_grid, check_tensors, row_layout
from ._jit import offset as _offset

__all__ = ["add_noise", "noising_loss", "NoisingLoss", "TARGETS"]

BLOCK = 1024
TARGETS = {"eps": 0, "x0": 1, "v": 2, "flow": 3}


@triton.jit
def _noising_kernel(
    x0_ptr, eps_ptr, m_ptr,                  # inputs: data, noise (if given), model output (loss mode)
    xt_ptr, grad_ptr, partial_ptr,           # outputs: x_t (noising mode); gradient and per-block sums (loss mode)
    coef_ptr,                                # (3, B) float32: alpha, sigma, weight per row
    n_rows, n_per_row, n_blocks, n2, n3,     # logical layout (B, n1, n2, n3)
    s0_b, s0_1, s0_2, s0_3,                  # strides of x0
    se_b, se_1, se_2, se_3,                  # ... of eps
    sm_b, sm_1, sm_2, sm_3,                  # ... of the model output
    so_b, so_1, so_2, so_3,                  # ... of x_t / gradient
    seed, noise_offset, grad_scale,          # Philox key and offset; d loss / d m = grad_scale w (m - target)
    LOSS: tl.constexpr, TARGET: tl.constexpr, PHILOX: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    j = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n_per_row
    alpha = tl.load(coef_ptr + row)
    sigma = tl.load(coef_ptr + n_rows + row)
    x0 = tl.load(x0_ptr + row * s0_b + _offset(j, n2, n3, s0_1, s0_2, s0_3, CONTIG), mask=mask).to(tl.float32)
    if PHILOX:
        eps = tl.randn(seed, noise_offset + row * n_per_row + j)
    else:
        eps = tl.load(eps_ptr + row * se_b + _offset(j, n2, n3, se_1, se_2, se_3, CONTIG), mask=mask).to(tl.float32)
    if LOSS:
        m = tl.load(m_ptr + row * sm_b + _offset(j, n2, n3, sm_1, sm_2, sm_3, CONTIG), mask=mask).to(tl.float32)
        if TARGET == 0:
            target = eps
        elif TARGET == 1:
            target = x0
        elif TARGET == 2:
            target = alpha * eps - sigma * x0
        else:
            target = eps - x0
        diff = tl.where(mask, m - target, 0.0)
        w = tl.load(coef_ptr + 2 * n_rows + row)
        tl.store(grad_ptr + row * so_b + _offset(j, n2, n3, so_1, so_2, so_3, CONTIG),
                 (grad_scale * w * diff).to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + row * n_blocks + blk, tl.sum(diff * diff, axis=0))
    else:
        tl.store(xt_ptr + row * so_b + _offset(j, n2, n3, so_1, so_2, so_3, CONTIG),
                 (alpha * x0 + sigma * eps).to(xt_ptr.dtype.element_ty), mask=mask)


class NoisingLoss(NamedTuple):
    """loss (B,) float32 per sample, grad d loss_b / d model_output (model output's dtype)."""

    loss: torch.Tensor
    grad: torch.Tensor


def _row_coefs(x0, alpha, sigma, weight):
    B = x0.shape[0]
    out = []
    for name, v in (("alpha", alpha), ("sigma", sigma), ("weight", weight)):
        if isinstance(v, torch.Tensor):
            if v.shape not in ((), (B,)):
                raise ValueError(f"{name} must be a scalar or have shape ({B},), got {tuple(v.shape)}")
            out.append(v.to(device=x0.device, dtype=torch.float32).expand(B))
            continue
        a = np.asarray(v, dtype=np.float64)
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != B):
            raise ValueError(f"{name} must be a scalar or have shape ({B},), got {a.shape}")
        out.append(torch.tensor(np.broadcast_to(a, (B,)), dtype=torch.float32, device=x0.device))
    return torch.stack(out).contiguous()


def _launch(x0, eps, m, out, coefs, seed, noise_offset, loss, target, grad_scale):
    logical, lay = row_layout({"x0": x0, "eps": eps, "m": m, "out": out})
    n_rows, n1, n2, n3 = logical
    n_per_row = n1 * n2 * n3
    blocks = triton.cdiv(n_per_row, BLOCK)
    check_grid(blocks, n_rows)
    partial = torch.zeros((n_rows, blocks), dtype=torch.float32, device=x0.device) if loss else None
    contig = all(v is None or (s[1:] == (0, 0, 1)) for v, s in lay.values()) and n1 == n2 == 1
    dummy = lay["x0"][0]
    ptr = {k: (v if v is not None else dummy) for k, (v, _) in lay.items()}
    strides = [s for k in ("x0", "eps", "m", "out") for s in lay[k][1]]
    _noising_kernel[(blocks, n_rows)](
        ptr["x0"], ptr["eps"], ptr["m"], ptr["out"], ptr["out"], partial if loss else dummy, coefs,
        n_rows, n_per_row, blocks, n2, n3, *strides, int(seed or 0), int(noise_offset), float(grad_scale),
        LOSS=loss, TARGET=target, PHILOX=eps is None, CONTIG=contig, BLOCK=BLOCK)
    if lay["out"][0] is not out:
        out.copy_(lay["out"][0])
    return partial


def _check(x0, eps, seed, noise_offset, extra: dict):
    check_tensors({"x0": x0, "eps": eps, **extra}, "x0")
    if (eps is None) == (seed is None):
        raise ValueError("give the noise either as eps (a tensor) or as a Philox seed")
    if seed is not None and not (0 <= int(seed) < 2 ** 63 and 0 <= int(noise_offset) < 2 ** 63):
        raise ValueError("seed and noise_offset must lie in [0, 2^63)")
    if x0.dim() == 0:
        raise ValueError("x0 needs a batch axis")


def add_noise(x0, alpha, sigma, eps=None, seed=None, noise_offset: int = 0, out=None):
    """x_t = alpha x0 + sigma eps in one pass (alpha, sigma scalars or per-row (B,))."""
    _check(x0, eps, seed, noise_offset, {"out": out})
    out = torch.empty_like(x0) if out is None else out
    if x0.numel() == 0:
        return out
    _launch(x0, eps, None, out, _row_coefs(x0, alpha, sigma, 0.0), seed, noise_offset, False, 0, 0.0)
    return out


def noising_loss(model_output, x0, alpha, sigma, eps=None, seed=None, noise_offset: int = 0,
                 prediction: str = "eps", weight=1.0, reduction: str = "mean") -> NoisingLoss:
    """Per-sample weighted MSE of ``model_output`` against the target formed on the fly, and its gradient.

    loss_b = w_b reduce_j (m - target)^2 with reduce = mean or sum; grad = d loss_b / d m = 2 w_b (m - target) / N
    (mean) or 2 w_b (m - target) (sum). ``eps`` / ``seed`` must be what the noising pass used.
    """
    if prediction not in TARGETS:
        raise ValueError(f"prediction must be one of {tuple(TARGETS)}, got {prediction!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check(x0, eps, seed, noise_offset, {"model_output": model_output})
    grad = torch.empty_like(model_output)
    B = x0.shape[0]
    n = x0[0].numel() if B else 0
    if x0.numel() == 0:
        return NoisingLoss(torch.zeros(B, dtype=torch.float32, device=x0.device), grad)
    scale = 2.0 / n if reduction == "mean" else 2.0
    coefs = _row_coefs(x0, alpha, sigma, weight)
    partial = _launch(x0, eps, model_output, grad, coefs, seed, noise_offset, True, TARGETS[prediction], scale)
    sums = partial.sum(dim=1)
    return NoisingLoss(coefs[2] * (sums / n if reduction == "mean" else sums), grad)
