"""Fused sampler step: one pass over memory applies one refdiff StepCoeffs stage (README, "The sampler interface").

    m      = m_u + w (m_c - m_u)                        (classifier-free guidance, when m_c is given)
    D      = c_x x + c_m m                              (model output -> data prediction)
    x_next = a x + b D + c1 D_prev1 + c2 D_prev2 + d z  (z from a tensor, or Philox in-kernel)

Storage fp32 / fp16 / bf16, arithmetic fp32 (each load is cast at once: this is also what keeps bf16 right under
Triton's interpreter), one rounding at each store. Coefficients are scalars or per-row vectors (per-sample
timesteps). In-kernel noise is ``tl.randn(seed, offset + b * N + j)`` at the row-major logical index, which
``refdiff.rng.philox_normal`` reproduces. No host synchronisation: with scalar coefficients (or a device tensor of
per-row ones) and in-kernel noise a step is capturable in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from refdiff.guidance import check_threshold

from ._jit import offset as _offset
from ._launch import check_device, check_grid, check_storage, check_tensors, row_layout

__all__ = ["sampler_step", "cfg_rescale_factors", "COEFF_NAMES", "BLOCK"]

BLOCK = 1024                  # elements per program: 4 KB of fp32 per operand, enough to hide latency
COEFF_NAMES = ("c_x", "c_m", "a", "b", "c1", "c2", "d", "w")
NOISE_NONE = tl.constexpr(0)         # noise modes of the kernel's NOISE argument
NOISE_TENSOR = tl.constexpr(1)
NOISE_PHILOX = tl.constexpr(2)


@triton.jit
def _coef(ptr, scalar, k: tl.constexpr, row, n_rows, PER_ROW: tl.constexpr):
    if PER_ROW:
        return tl.load(ptr + k * n_rows + row)
    return scalar


@triton.jit
def _sampler_step_kernel(
    x_ptr, mu_ptr, mc_ptr, p1_ptr, p2_ptr, z_ptr,     # inputs: sample, model outputs (uncond, cond), history, noise
    out_ptr, d_ptr,                                   # outputs: x_next, data prediction D
    coef_ptr,                                         # (8, B) float32 per-row coefficients when PER_ROW
    c_x, c_m, a, b, c1, c2, d, w,                     # scalar coefficients otherwise
    n_rows, n_per_row, n2, n3,                        # logical layout (B, n1, n2, n3), n_per_row = n1 n2 n3
    sx_b, sx_1, sx_2, sx_3,                           # strides of x (batch, inner)
    su_b, su_1, su_2, su_3,                           # ... of m_u
    sc_b, sc_1, sc_2, sc_3,                           # ... of m_c
    sp1_b, sp1_1, sp1_2, sp1_3,                       # ... of D_prev1
    sp2_b, sp2_1, sp2_2, sp2_3,                       # ... of D_prev2
    sz_b, sz_1, sz_2, sz_3,                           # ... of z
    so_b, so_1, so_2, so_3,                           # ... of x_next
    sd_b, sd_1, sd_2, sd_3,                           # ... of D
    seed, noise_offset,                               # Philox key and the offset of element (0, 0)
    thr_ptr, thr_max,                                 # per-row threshold s (dynamic thresholding) and max value
    EVALUATE: tl.constexpr, HAS_COND: tl.constexpr, HAS_P1: tl.constexpr, HAS_P2: tl.constexpr,
    NOISE: tl.constexpr, PER_ROW: tl.constexpr, CONTIG: tl.constexpr, THRESHOLD: tl.constexpr,
    WRITE_X: tl.constexpr, BLOCK: tl.constexpr,
):
    # a slot whose coefficient is 0 contributes exactly 0 (as in refdiff.apply): an unused history or noise buffer
    # may hold anything, e.g. uninitialised memory in a captured CUDA graph, and 0 * NaN would poison the output.
    # Scalar zeros are compiled out by the launcher; per-row zeros select 0 here (tl.where, not 0 * value).
    row = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n_per_row
    ca = _coef(coef_ptr, a, 2, row, n_rows, PER_ROW)
    x = tl.load(x_ptr + row * sx_b + _offset(j, n2, n3, sx_1, sx_2, sx_3, CONTIG), mask=mask).to(tl.float32)
    acc = tl.where(ca != 0, ca * x, 0.0)
    if EVALUATE:
        m = tl.load(mu_ptr + row * su_b + _offset(j, n2, n3, su_1, su_2, su_3, CONTIG), mask=mask).to(tl.float32)
        if HAS_COND:
            mc = tl.load(mc_ptr + row * sc_b + _offset(j, n2, n3, sc_1, sc_2, sc_3, CONTIG),
                         mask=mask).to(tl.float32)
            m = m + _coef(coef_ptr, w, 7, row, n_rows, PER_ROW) * (mc - m)
        cx = _coef(coef_ptr, c_x, 0, row, n_rows, PER_ROW)
        D = tl.where(cx != 0, cx * x, 0.0) + _coef(coef_ptr, c_m, 1, row, n_rows, PER_ROW) * m
        if THRESHOLD:
            s_row = tl.load(thr_ptr + row)
            D = tl.minimum(tl.maximum(D, -s_row), s_row) * (thr_max / s_row)
        tl.store(d_ptr + row * sd_b + _offset(j, n2, n3, sd_1, sd_2, sd_3, CONTIG),
                 D.to(d_ptr.dtype.element_ty), mask=mask)
        acc += _coef(coef_ptr, b, 3, row, n_rows, PER_ROW) * D
    if HAS_P1:
        cp1 = _coef(coef_ptr, c1, 4, row, n_rows, PER_ROW)
        p1 = tl.load(p1_ptr + row * sp1_b + _offset(j, n2, n3, sp1_1, sp1_2, sp1_3, CONTIG), mask=mask)
        acc += tl.where(cp1 != 0, cp1 * p1.to(tl.float32), 0.0)
    if HAS_P2:
        cp2 = _coef(coef_ptr, c2, 5, row, n_rows, PER_ROW)
        p2 = tl.load(p2_ptr + row * sp2_b + _offset(j, n2, n3, sp2_1, sp2_2, sp2_3, CONTIG), mask=mask)
        acc += tl.where(cp2 != 0, cp2 * p2.to(tl.float32), 0.0)
    if NOISE == NOISE_TENSOR:
        cz = _coef(coef_ptr, d, 6, row, n_rows, PER_ROW)
        z = tl.load(z_ptr + row * sz_b + _offset(j, n2, n3, sz_1, sz_2, sz_3, CONTIG), mask=mask).to(tl.float32)
        acc += tl.where(cz != 0, cz * z, 0.0)
    if NOISE == NOISE_PHILOX:
        z = tl.randn(seed, noise_offset + row * n_per_row + j)
        acc += _coef(coef_ptr, d, 6, row, n_rows, PER_ROW) * z
    if WRITE_X:
        tl.store(out_ptr + row * so_b + _offset(j, n2, n3, so_1, so_2, so_3, CONTIG),
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_moment_kernel(
    mu_ptr, mc_ptr,                  # model outputs (uncond, cond)
    mean_ptr,                        # (2, B) float32 row means of m_c and m_cfg (second pass only)
    partial_ptr,                     # (2, B, n_blocks) float32 per-block sums
    w, n_rows, n_per_row, n_blocks, n2, n3,
    su_b, su_1, su_2, su_3, sc_b, sc_1, sc_2, sc_3,
    CENTRED: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-block sums of m_c and of m_cfg = m_u + w (m_c - m_u) (first pass), or of their squared deviations from
    the row means (second pass): a two-pass variance, free of the cancellation of sum(v^2) - n mean^2."""
    row = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    j = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n_per_row
    mu = tl.load(mu_ptr + row * su_b + _offset(j, n2, n3, su_1, su_2, su_3, CONTIG), mask=mask).to(tl.float32)
    mc = tl.load(mc_ptr + row * sc_b + _offset(j, n2, n3, sc_1, sc_2, sc_3, CONTIG), mask=mask).to(tl.float32)
    cfg = mu + w * (mc - mu)
    if CENTRED:
        mc = tl.where(mask, mc - tl.load(mean_ptr + row), 0.0)
        cfg = tl.where(mask, cfg - tl.load(mean_ptr + n_rows + row), 0.0)
        mc = mc * mc
        cfg = cfg * cfg
    else:
        mc = tl.where(mask, mc, 0.0)
        cfg = tl.where(mask, cfg, 0.0)
    tl.store(partial_ptr + row * n_blocks + blk, tl.sum(mc, axis=0))
    tl.store(partial_ptr + (n_rows + row) * n_blocks + blk, tl.sum(cfg, axis=0))


def cfg_rescale_factors(m_uncond, m_cond, w: float, phi: float):
    """Per-row k with CFG-rescale's output = k m_cfg (Lin et al. 2023, Alg. 2): k = phi std(m_c) / std(m_cfg) + 1 - phi,
    standard deviations over each row, unbiased (as diffusers' torch.std). Two reduction passes, float32 (B,)."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must lie in [0, 1], got {phi}")
    check_device(m_uncond, m_cond)
    check_storage({"m_uncond": m_uncond, "m_cond": m_cond}, "m_uncond")
    logical, lay = row_layout({"mu": m_uncond, "mc": m_cond})
    n_rows, n1, n2, n3 = logical
    n = n1 * n2 * n3
    if n < 2:
        raise ValueError("CFG-rescale needs at least 2 elements per row (an unbiased standard deviation)")
    blocks = triton.cdiv(n, BLOCK)
    check_grid(blocks, n_rows)
    contig = all(st[1:] == (0, 0, 1) for _, st in lay.values()) and n1 == n2 == 1
    partial = torch.empty((2, n_rows, blocks), dtype=torch.float32, device=m_uncond.device)
    args = (n_rows, n, blocks, n2, n3, *lay["mu"][1], *lay["mc"][1])
    _row_moment_kernel[(blocks, n_rows)](lay["mu"][0], lay["mc"][0], partial, partial, float(w), *args,
                                         CENTRED=False, CONTIG=contig, BLOCK=BLOCK)
    mean = (partial.sum(dim=2) / n).contiguous()
    _row_moment_kernel[(blocks, n_rows)](lay["mu"][0], lay["mc"][0], mean, partial, float(w), *args,
                                         CENTRED=True, CONTIG=contig, BLOCK=BLOCK)
    var = partial.sum(dim=2) / (n - 1)
    return phi * torch.sqrt(var[0] / var[1]) + (1.0 - phi)


def _coefficients(coeffs, n_rows, device):
    """(scalars, per-row tensor or None): per-row when any coefficient is a vector or a tensor is given."""
    if isinstance(coeffs, torch.Tensor):
        if coeffs.shape != (len(COEFF_NAMES), n_rows) or coeffs.dtype != torch.float32:
            raise ValueError(f"a coefficient tensor must be float32 of shape ({len(COEFF_NAMES)}, {n_rows})")
        return [0.0] * len(COEFF_NAMES), coeffs
    vals = [coeffs.get(k, 0.0) for k in COEFF_NAMES]
    if any(np.ndim(v) for v in vals):
        rows = []
        for k, v in zip(COEFF_NAMES, vals):
            v = np.asarray(v, dtype=np.float64)
            if v.ndim == 1 and v.shape[0] != n_rows:
                raise ValueError(f"per-row coefficient {k} has {v.shape[0]} entries for {n_rows} rows")
            if v.ndim > 1:
                raise ValueError(f"coefficient {k} must be a scalar or a (B,) vector, got shape {v.shape}")
            rows.append(np.broadcast_to(v, (n_rows,)))
        return [0.0] * len(COEFF_NAMES), torch.tensor(np.stack(rows), dtype=torch.float32, device=device)
    return [float(v) for v in vals], None


def sampler_step(x, coeffs, m_uncond=None, m_cond=None, d_prev1=None, d_prev2=None, noise=None, seed=None,
                 noise_offset: int = 0, evaluate: bool = True, out=None, out_d=None, cfg_rescale: float | None = None,
                 threshold: tuple | None = None):
    """Apply one stage in one kernel launch: returns (x_next, D) (D is None for a model-free stage).

    Parameters
    ----------
    x : (B, ...) tensor, fp32 / fp16 / bf16, any strides
    coeffs : refdiff ``StepCoeffs`` (or a mapping with keys c_x, c_m, a, b, c1, c2, d, w), float64 scalars or
        per-row (B,) vectors; or a float32 device tensor (8, B) in COEFF_NAMES order (graph-capturable)
    m_uncond, m_cond : model outputs (m_cond and w give classifier-free guidance)
    d_prev1, d_prev2 : history data predictions (needed where c1 / c2 are not zero)
    noise : a tensor of standard normals, or ``seed`` (with ``noise_offset``) for in-kernel Philox
    out, out_d : optional output tensors
    cfg_rescale : phi of CFG-rescale (needs m_cond): a reduction pass gives per-row k, folded into c_m
    threshold : (percentile, max_value[, ceiling]) for dynamic thresholding of D (Imagen): D is formed once, the
        per-row quantile of |D| taken (torch.quantile, on the device), and the step applied with D clipped
    """
    if hasattr(coeffs, "_asdict"):
        c = coeffs._asdict()
        evaluate = bool(c.pop("evaluate", True)) and evaluate
        c.pop("level", None)
        coeffs = c
    named = {"x": x, "m_uncond": m_uncond if evaluate else None, "m_cond": m_cond if evaluate else None,
             "d_prev1": d_prev1, "d_prev2": d_prev2, "noise": noise, "out": out, "out_d": out_d if evaluate else None}
    check_tensors(named, "x")
    if evaluate and m_uncond is None:
        raise ValueError("this stage evaluates the model: pass m_uncond (the model output)")
    if noise is not None and seed is not None:
        raise ValueError("give the noise as a tensor or as a Philox seed, not both")
    if seed is not None and not (0 <= int(seed) < 2 ** 63 and 0 <= int(noise_offset) < 2 ** 63):
        raise ValueError("seed and noise_offset must lie in [0, 2^63)")
    B = x.shape[0] if x.dim() else 0
    scal, per_row = _coefficients(coeffs, B, x.device)
    if not isinstance(coeffs, torch.Tensor):
        need = {"c1": d_prev1, "c2": d_prev2}
        for k, t in need.items():
            if t is None and np.any(np.asarray(coeffs.get(k, 0.0)) != 0):
                raise ValueError(f"coefficient {k} is not zero: pass {'d_prev1' if k == 'c1' else 'd_prev2'}")
        if np.any(np.asarray(coeffs.get("d", 0.0)) != 0) and noise is None and seed is None:
            raise ValueError("coefficient d is not zero: pass noise or a Philox seed")
        if m_cond is not None and np.all(np.asarray(coeffs.get("w", 0.0)) == 0):
            raise ValueError("m_cond given but the guidance scale w is 0 (set w, the diffusers-convention scale)")
    if (cfg_rescale is not None or threshold is not None) and not evaluate:
        raise ValueError("CFG-rescale and thresholding act on the model output: the stage must evaluate it")
    if cfg_rescale is not None and m_cond is None:
        raise ValueError("CFG-rescale needs the conditional output m_cond")
    if cfg_rescale is not None and not 0.0 <= cfg_rescale <= 1.0:
        raise ValueError(f"CFG-rescale's phi must lie in [0, 1], got {cfg_rescale}")
    if threshold is not None:
        check_threshold(*threshold)
    out = torch.empty_like(x) if out is None else out
    out_d = (torch.empty_like(x) if out_d is None else out_d) if evaluate else None
    if x.numel() == 0:
        return out, out_d
    if cfg_rescale is not None:
        w = coeffs[7] if isinstance(coeffs, torch.Tensor) else coeffs.get("w", 0.0)
        if np.ndim(w) or isinstance(w, torch.Tensor):
            raise ValueError("CFG-rescale takes a scalar guidance scale w")
        k = cfg_rescale_factors(m_uncond, m_cond, float(w), float(cfg_rescale))
        if per_row is None:
            per_row = torch.tensor(scal, dtype=torch.float32, device=x.device)[:, None].repeat(1, B)
        per_row = per_row.clone()
        per_row[1] = per_row[1] * k                    # c_m k: the rescaled output is k m_cfg
    thr = None
    if threshold is not None:
        pct, max_value, *rest = threshold
        ceiling = rest[0] if rest else float("inf")
        _, d_only = _launch_step(x, scal, per_row, m_uncond, m_cond, None, None, None, None, 0, out, out_d,
                                 evaluate=True, write_x=False, thr=None, thr_max=1.0)
        q = torch.quantile(d_only.reshape(B, -1).abs().float(), pct, dim=1)
        thr = q.clamp(min=max_value, max=ceiling).contiguous()
        threshold_max = float(max_value)
    return _launch_step(x, scal, per_row, m_uncond, m_cond, d_prev1, d_prev2, noise, seed, noise_offset, out,
                        out_d, evaluate, True, thr, threshold_max if threshold is not None else 1.0)


def _launch_step(x, scal, per_row, m_uncond, m_cond, d_prev1, d_prev2, noise, seed, noise_offset, out, out_d,
                 evaluate, write_x, thr, thr_max):
    logical, lay = row_layout({"x": x, "m_uncond": m_uncond if evaluate else None,
                               "m_cond": m_cond if evaluate else None, "d_prev1": d_prev1, "d_prev2": d_prev2,
                               "noise": noise, "out": out, "out_d": out_d})
    n_rows, n1, n2, n3 = logical
    n_per_row = n1 * n2 * n3
    contig = all(s[1:] == (0, 0, 1) or (s == (0, 0, 0, 0) and v is None) for v, s in lay.values()) and n1 == n2 == 1
    blocks = triton.cdiv(n_per_row, BLOCK)
    check_grid(blocks, n_rows)
    dummy = lay["x"][0]
    ptr = {k: (v if v is not None else dummy) for k, (v, _) in lay.items()}
    strides = [lay[k][1] for k in ("x", "m_uncond", "m_cond", "d_prev1", "d_prev2", "noise", "out", "out_d")]
    # slots whose scalar coefficient is 0 are compiled out; per-row zeros are masked inside the kernel
    used = {k: per_row is not None or scal[COEFF_NAMES.index(k)] != 0 for k in ("c1", "c2", "d")}
    noise_mode = (NOISE_NONE if not used["d"] else NOISE_TENSOR if noise is not None else
                  NOISE_PHILOX if seed is not None else NOISE_NONE).value
    _sampler_step_kernel[(blocks, n_rows)](
        ptr["x"], ptr["m_uncond"], ptr["m_cond"], ptr["d_prev1"], ptr["d_prev2"], ptr["noise"], ptr["out"],
        ptr["out_d"], per_row if per_row is not None else torch.zeros(1, dtype=torch.float32, device=x.device),
        *scal, n_rows, n_per_row, n2, n3, *[s for st in strides for s in st],
        int(seed) if seed is not None else 0, int(noise_offset), thr if thr is not None else dummy, float(thr_max),
        EVALUATE=evaluate, HAS_COND=evaluate and m_cond is not None, HAS_P1=d_prev1 is not None and used["c1"],
        HAS_P2=d_prev2 is not None and used["c2"], NOISE=noise_mode, PER_ROW=per_row is not None, CONTIG=contig,
        THRESHOLD=thr is not None, WRITE_X=write_x, BLOCK=BLOCK)
    if lay["out"][0] is not out:
        out.copy_(lay["out"][0])
    if evaluate and lay["out_d"][0] is not out_d:
        out_d.copy_(lay["out_d"][0])
    return out, out_d
