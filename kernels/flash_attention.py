"""Flash attention forward in Triton for diffusion shapes (README, "Kernels and benchmarks"): online softmax, any strides (the
(B, N, H, d) layout diffusers uses is read in place), any N_q / N_k (masked tails; N_k = 77 cross-attention),
head dims up to 256 including 40, 72, 80, 160 without padding to the next power of two, fp16 / bf16 / fp32
(fp32 with an explicit input_precision), and the log-sum-exp.

Head dim d = D1 + tail: D1 the largest power of two <= d (at least 16), the tail padded to a power of two >= 16
(72 = 64 + 16, 80 = 64 + 16, 40 = 32 + 16, 160 = 128 + 32): q k^T is two tl.dot's and the output two accumulators,
so d = 72 does 80 columns of work, not 128. Under Triton's interpreter the dot operands are upcast to fp32 (its
bf16 arithmetic is wrong; products of fp16 / bf16 values are exact in fp32, so only the summation order differs
from tensor cores). The backward (FlashAttention-2: dK / dV by key block, dQ by query block) runs through
torch.autograd: ``attention`` is differentiable whenever an input requires a gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import MAX_GRID_Y, check_device, interpreter_active

__all__ = ["attention", "attention_forward", "attention_backward", "p2p_attention", "head_dim_split", "MAX_HEAD_DIM",
           "PRECISIONS"]

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)                  # exp(x) = exp2(x log2 e) inside the kernels
PRECISIONS = ("ieee", "tf32")
MIN_DOT = 16                      # tl.dot needs every dimension >= 16

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, pruned per head dim; one fixed config under the interpreter
CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3), (64, 32, 4, 3)]
INTERPRETER_CONFIG = (64, 64, 4, 1)


def head_dim_split(d: int):
    """(D1, D2): the power-of-two chunk and the padded tail (0 when d is a power of two >= 16)."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must lie in [1, {MAX_HEAD_DIM}], got {d}")
    d1 = max(MIN_DOT, 1 << (d.bit_length() - 1))
    rest = d - d1
    d2 = 0 if rest <= 0 else max(MIN_DOT, 1 << (rest - 1).bit_length())
    return d1, d2


@triton.jit
def _head_offset(bh, H, s_b, s_h):
    """Offset of head (b, h) = (bh // H, bh % H) in int64 (bh is int64: b * s_b passes 2^31 for large tensors)."""
    return (bh // H) * s_b + (bh % H) * s_h


@triton.jit
def _load_chunk(ptr, rows, row_stride, cols, col_stride, row_limit, col_limit):
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=(rows[:, None] < row_limit) & (cols[None, :] < col_limit), other=0.0)


@triton.jit
def _attn_block(q1, q2, k_base, v_base, offs_n, sk_n, sk_d, sv_n, sv_d, N_K, sm_scale, m_i, l_i, acc1, acc2,
                HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """One key block of the online softmax (Dao 2023, Alg. 1)."""
    d1 = tl.arange(0, D1)
    kt1 = tl.trans(_load_chunk(k_base, offs_n, sk_n, d1, sk_d, N_K, HEAD_D))
    if UPCAST:
        kt1 = kt1.to(tl.float32)
    s = tl.dot(q1, kt1, input_precision=PRECISION)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        kt2 = tl.trans(_load_chunk(k_base, offs_n, sk_n, d2, sk_d, N_K, HEAD_D))
        if UPCAST:
            kt2 = kt2.to(tl.float32)
        s += tl.dot(q2, kt2, input_precision=PRECISION)
    # the running max stays in natural-logit units (one rounding, so lse = m + log l is as accurate as a plain
    # logsumexp); log2(e) enters only inside exp2
    s = tl.where(offs_n[None, :] < N_K, s * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2((m_i - m_new) * LOG2E_C)
    p = tl.exp2((s - m_new[:, None]) * LOG2E_C)
    l_i = l_i * alpha + tl.sum(p, 1)
    v1 = _load_chunk(v_base, offs_n, sv_n, d1, sv_d, N_K, HEAD_D)
    if UPCAST:
        pv = p
        v1 = v1.to(tl.float32)
    else:
        pv = p.to(v1.dtype)
    acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=PRECISION)
    if D2 > 0:
        v2 = _load_chunk(v_base, offs_n, sv_n, D1 + tl.arange(0, D2), sv_d, N_K, HEAD_D)
        if UPCAST:
            v2 = v2.to(tl.float32)
        acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2, input_precision=PRECISION)
    return m_new, l_i, acc1, acc2


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,                                  # tensors; LSE is float32 (B, H, N_q)
    sm_scale,                                         # softmax scale
    sq_b, sq_h, sq_n, sq_d,                           # strides of q
    sk_b, sk_h, sk_n, sk_d,                           # ... of k
    sv_b, sv_h, sv_n, sv_d,                           # ... of v
    so_b, so_h, so_n, so_d,                           # ... of the output
    sl_b, sl_h, sl_n,                                 # ... of lse
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WHILE_LOOP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_base = Q + _head_offset(bh, H, sq_b, sq_h)
    k_base = K + _head_offset(bh, H, sk_b, sk_h)
    v_base = V + _head_offset(bh, H, sv_b, sv_h)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    d1 = tl.arange(0, D1)
    q1 = _load_chunk(q_base, offs_m, sq_n, d1, sq_d, N_Q, HEAD_D)
    if UPCAST:
        q1 = q1.to(tl.float32)
    if D2 > 0:
        d2 = D1 + tl.arange(0, D2)
        q2 = _load_chunk(q_base, offs_m, sq_n, d2, sq_d, N_Q, HEAD_D)
        if UPCAST:
            q2 = q2.to(tl.float32)
    else:
        q2 = q1                                          # unused placeholder (no tail)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2 if D2 > 0 else 16], tl.float32)
    if WHILE_LOOP:
        # Triton 3.6's interpreter cannot bound a for-loop by a runtime scalar; a while loop it can
        start = 0
        while start < N_K:
            m_i, l_i, acc1, acc2 = _attn_block(q1, q2, k_base, v_base, start + offs_n0, sk_n, sk_d, sv_n, sv_d,
                                               N_K, sm_scale, m_i, l_i, acc1, acc2, HEAD_D, D1, D2, UPCAST,
                                               PRECISION)
            start += BLOCK_N
    else:
        for start in range(0, N_K, BLOCK_N):             # a for-loop, so that the compiler pipelines the loads
            m_i, l_i, acc1, acc2 = _attn_block(q1, q2, k_base, v_base, start + offs_n0, sk_n, sk_d, sv_n, sv_d,
                                               N_K, sm_scale, m_i, l_i, acc1, acc2, HEAD_D, D1, D2, UPCAST,
                                               PRECISION)
    inv = 1.0 / l_i
    o_base = O + _head_offset(bh, H, so_b, so_h)
    mask_m = offs_m[:, None] < N_Q
    tl.store(o_base + offs_m[:, None] * so_n + d1[None, :] * so_d, (acc1 * inv[:, None]).to(O.dtype.element_ty),
             mask=mask_m & (d1[None, :] < HEAD_D))
    if D2 > 0:
        tl.store(o_base + offs_m[:, None] * so_n + d2[None, :] * so_d, (acc2 * inv[:, None]).to(O.dtype.element_ty),
                 mask=mask_m & (d2[None, :] < HEAD_D))
    tl.store(LSE + _head_offset(bh, H, sl_b, sl_h) + offs_m * sl_n, m_i + tl.log(l_i), mask=offs_m < N_Q)


def _fits(config, width: int) -> bool:
    """Pruning predicate: wide heads (> 128 columns of work) keep k / v tiles of at most 32 keys so that the q tile,
    two k / v tiles and the accumulators stay within shared memory and registers; narrow heads keep big tiles."""
    bm, bn, warps, _ = config
    return (bn <= 32 and warps >= 4) if width > 128 else bm * bn >= 64 * 64


def _config(d1, d2, dtype):
    """The first fitting config (used by p2p_attention and as the interpreter's single config)."""
    if interpreter_active():
        return INTERPRETER_CONFIG
    return next((c for c in CONFIGS if _fits(c, d1 + d2)), CONFIGS[-1])


_TUNED = None


def _tuned_forward():
    """The forward kernel autotuned over CONFIGS pruned by head width (CUDA only: autotuning times real runs)."""
    global _TUNED
    if _TUNED is None:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st in CONFIGS]

        def prune(configs, named_args, **kwargs):
            width = kwargs["D1"] + kwargs["D2"]
            kept = [c for c in configs if _fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                 c.num_stages), width)]
            return kept or configs[-1:]

        _TUNED = triton.autotune(configs=configs, key=["N_Q", "N_K", "HEAD_D"],
                                 prune_configs_by={"early_config_prune": prune})(_attn_fwd_kernel)
    return _TUNED


def _check_qkv(q, k, v):
    """q, k, v: 4-D tensors on one usable device, one storage dtype, matching batch / heads / head dim."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch tensor (B, H, N, d), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    check_device(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention takes float16, bfloat16 or float32, got {q.dtype}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    head_dim_split(D)


def _precision(dtype, input_precision):
    """The tl.dot input precision: fp32 inputs must name one (TF32 and IEEE differ by ~1e-3 relative); fp16 / bf16
    products are exact in fp32 either way. The interpreter computes exact fp32 products whatever is asked."""
    if dtype == torch.float32:
        if input_precision not in PRECISIONS:
            raise ValueError(f"fp32 attention needs input_precision='ieee' (exact fp32 products) or 'tf32' (tensor-core "
                             f"TF32, ~1e-3 relative), got {input_precision!r}")
    elif input_precision not in (None, "ieee"):
        raise ValueError(f"input_precision applies to fp32 inputs only (accepted for {dtype}: None or 'ieee'), got "
                         f"{input_precision!r}")
    return "ieee" if interpreter_active() else (input_precision or "ieee")


def attention(q, k, v, scale=None, return_lse: bool = False, input_precision: str | None = None, out=None,
              lse=None):
    """softmax(scale q k^T) v for (B, H, N, d) tensors of any strides; scale defaults to 1 / sqrt(d).

    Differentiable: when an input requires a gradient (and grad mode is on) the backward runs the Triton backward
    kernels through torch.autograd (the lse output carries no gradient; ``out`` / ``lse`` buffers are then refused,
    as autograd owns its outputs). fp32 inputs need ``input_precision`` ("ieee": exact fp32 products; "tf32":
    tensor-core TF32). Returns out (and the natural-log lse (B, H, N_q) float32 with ``return_lse``).
    """
    _check_qkv(q, k, v)
    _precision(q.dtype, input_precision)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if out is not None or lse is not None:
            raise ValueError("out= / lse= buffers cannot be used while autograd records attention (its outputs are "
                             "new tensors); run under torch.no_grad() or drop the buffers")
        o, l = _FlashAttention.apply(q, k, v, scale, input_precision)
        return (o, l) if return_lse else o
    o, l = attention_forward(q, k, v, scale, input_precision, out, lse)
    return (o, l) if return_lse else o


def attention_forward(q, k, v, scale=None, input_precision=None, out=None, lse=None):
    """The forward kernel alone: (out, lse), no autograd. ``out`` (q's shape, q's dtype or float32: an fp32 buffer
    keeps a partial result unrounded for an exact LSE merge, as sequence-parallel attention does) and ``lse``
    ((B, H, N_q) float32) may be given, with any strides."""
    _check_qkv(q, k, v)
    precision = _precision(q.dtype, input_precision)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    d1, d2 = head_dim_split(D)
    for name, buf, shape, dtypes in (("out", out, tuple(q.shape), (q.dtype, torch.float32)),
                                     ("lse", lse, (B, H, NQ), (torch.float32,))):
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != shape or buf.dtype not in dtypes:
            allowed = " or ".join(map(str, dict.fromkeys(dtypes)))
            raise ValueError(f"{name} must be a {allowed} tensor of shape {shape}, got "
                             f"{(buf.dtype, tuple(buf.shape)) if isinstance(buf, torch.Tensor) else type(buf).__name__}")
        if buf.device != q.device:
            raise ValueError(f"{name} is on {buf.device}, q on {q.device}: all tensors must be on the same device")
        if any(st == 0 and n > 1 for st, n in zip(buf.stride(), buf.shape)):
            raise ValueError(f"{name} is an expanded (stride-0) view: its rows would overwrite each other")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device) if lse is None else lse
    if q.numel() == 0:
        return out, lse
    if NK == 0:
        raise ValueError("attention over zero keys is undefined (softmax over an empty set): N_k must be >= 1")
    if B * H > MAX_GRID_Y:
        raise ValueError(f"B * H = {B * H} exceeds the grid's axis-1 limit {MAX_GRID_Y}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    args = (q, k, v, out, lse, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), H, NQ, NK)
    if interpreter_active():
        bm, bn, warps, stages = INTERPRETER_CONFIG
        _attn_fwd_kernel[(triton.cdiv(NQ, bm), B * H)](
            *args, HEAD_D=D, D1=d1, D2=d2, BLOCK_M=bm, BLOCK_N=bn, UPCAST=True, PRECISION=precision,
            WHILE_LOOP=True, num_warps=warps, num_stages=stages)
    else:
        _tuned_forward()[lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)](
            *args, HEAD_D=D, D1=d1, D2=d2, UPCAST=False, PRECISION=precision, WHILE_LOOP=False)
    return out, lse


# ------------------------------------------------------------------------------------------------
# backward (FlashAttention-2, Dao 2023, Alg. 2): dK, dV by key block over all queries; dQ by query block
# ------------------------------------------------------------------------------------------------

@triton.jit
def _dot_d(a1, a2, b1, b2, D2: tl.constexpr, PRECISION: tl.constexpr):
    """a b^T over the head dim split into (D1, D2) chunks: a (M, D), b (N, D) -> (M, N)."""
    out = tl.dot(a1, tl.trans(b1), input_precision=PRECISION)
    if D2 > 0:
        out += tl.dot(a2, tl.trans(b2), input_precision=PRECISION)
    return out


@triton.jit
def _load_split(base, rows, s_n, s_d, n_limit, HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                UPCAST: tl.constexpr):
    a1 = _load_chunk(base, rows, s_n, tl.arange(0, D1), s_d, n_limit, HEAD_D)
    if UPCAST:
        a1 = a1.to(tl.float32)
    if D2 > 0:
        a2 = _load_chunk(base, rows, s_n, D1 + tl.arange(0, D2), s_d, n_limit, HEAD_D)
        if UPCAST:
            a2 = a2.to(tl.float32)
    else:
        a2 = a1
    return a1, a2


@triton.jit
def _probs(q1, q2, k1, k2, lse, offs_m, offs_n, N_Q, N_K, qk_scale, D2: tl.constexpr, PRECISION: tl.constexpr):
    """P = exp(scale q k^T - lse) for a (query block, key block) tile, 0 outside the valid rows / columns."""
    s = _dot_d(q1, q2, k1, k2, D2, PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None] * LOG2E_C)
    valid = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    return tl.where(valid, p, 0.0)


@triton.jit
def _dkdv_block(q_base, do_base, lse_base, delta_base, offs_m, k1, k2, v1, v2, offs_n, dk1, dk2, dv1, dv2,
                sq_n, sq_d, sdo_n, sdo_d, N_Q, N_K, qk_scale, HEAD_D: tl.constexpr, D1: tl.constexpr,
                D2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    q1, q2 = _load_split(q_base, offs_m, sq_n, sq_d, N_Q, HEAD_D, D1, D2, UPCAST)
    do1, do2 = _load_split(do_base, offs_m, sdo_n, sdo_d, N_Q, HEAD_D, D1, D2, UPCAST)
    lse = tl.load(lse_base + offs_m, mask=offs_m < N_Q, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=offs_m < N_Q, other=0.0)
    p = _probs(q1, q2, k1, k2, lse, offs_m, offs_n, N_Q, N_K, qk_scale, D2, PRECISION)
    pt = tl.trans(p).to(do1.dtype)
    dv1 += tl.dot(pt, do1, input_precision=PRECISION)
    if D2 > 0:
        dv2 += tl.dot(pt, do2, input_precision=PRECISION)
    dp = _dot_d(do1, do2, v1, v2, D2, PRECISION)
    ds = tl.trans(p * (dp - delta[:, None])).to(q1.dtype)
    dk1 += tl.dot(ds, q1, input_precision=PRECISION)
    if D2 > 0:
        dk2 += tl.dot(ds, q2, input_precision=PRECISION)
    return dk1, dk2, dv1, dv2


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,                  # LSE, DELTA float32 (B, H, N_q) contiguous
    qk_scale, sm_scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k1, k2 = _load_split(K + _head_offset(bh, H, sk_b, sk_h), offs_n, sk_n, sk_d, N_K, HEAD_D, D1, D2, UPCAST)
    v1, v2 = _load_split(V + _head_offset(bh, H, sv_b, sv_h), offs_n, sv_n, sv_d, N_K, HEAD_D, D1, D2, UPCAST)
    q_base = Q + _head_offset(bh, H, sq_b, sq_h)
    do_base = DO + _head_offset(bh, H, sdo_b, sdo_h)
    lse_base = LSE + bh * N_Q
    delta_base = DELTA + bh * N_Q
    W2: tl.constexpr = D2 if D2 > 0 else 16
    dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    dk2 = tl.zeros([BLOCK_N, W2], tl.float32)
    dv2 = tl.zeros([BLOCK_N, W2], tl.float32)
    offs_m0 = tl.arange(0, BLOCK_M).to(tl.int64)
    if WHILE_LOOP:
        start = 0
        while start < N_Q:
            dk1, dk2, dv1, dv2 = _dkdv_block(q_base, do_base, lse_base, delta_base, start + offs_m0, k1, k2, v1, v2,
                                             offs_n, dk1, dk2, dv1, dv2, sq_n, sq_d, sdo_n, sdo_d, N_Q, N_K,
                                             qk_scale, HEAD_D, D1, D2, UPCAST, PRECISION)
            start += BLOCK_M
    else:
        for start in range(0, N_Q, BLOCK_M):
            dk1, dk2, dv1, dv2 = _dkdv_block(q_base, do_base, lse_base, delta_base, start + offs_m0, k1, k2, v1, v2,
                                             offs_n, dk1, dk2, dv1, dv2, sq_n, sq_d, sdo_n, sdo_d, N_Q, N_K,
                                             qk_scale, HEAD_D, D1, D2, UPCAST, PRECISION)
    _store_split(DK + _head_offset(bh, H, sdk_b, sdk_h), offs_n, sdk_n, sdk_d, N_K, dk1 * sm_scale,
                 dk2 * sm_scale, HEAD_D, D1, D2)
    _store_split(DV + _head_offset(bh, H, sdv_b, sdv_h), offs_n, sdv_n, sdv_d, N_K, dv1, dv2, HEAD_D, D1, D2)


@triton.jit
def _store_split(base, rows, s_n, s_d, n_limit, a1, a2, HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    c1 = tl.arange(0, D1)
    tl.store(base + rows[:, None] * s_n + c1[None, :] * s_d, a1.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_limit) & (c1[None, :] < HEAD_D))
    if D2 > 0:
        c2 = D1 + tl.arange(0, D2)
        tl.store(base + rows[:, None] * s_n + c2[None, :] * s_d, a2.to(base.dtype.element_ty),
                 mask=(rows[:, None] < n_limit) & (c2[None, :] < HEAD_D))


@triton.jit
def _dq_block(k_base, v_base, offs_n, q1, q2, do1, do2, lse, delta, offs_m, dq1, dq2, sk_n, sk_d, sv_n, sv_d,
              N_Q, N_K, qk_scale, HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    k1, k2 = _load_split(k_base, offs_n, sk_n, sk_d, N_K, HEAD_D, D1, D2, UPCAST)
    v1, v2 = _load_split(v_base, offs_n, sv_n, sv_d, N_K, HEAD_D, D1, D2, UPCAST)
    p = _probs(q1, q2, k1, k2, lse, offs_m, offs_n, N_Q, N_K, qk_scale, D2, PRECISION)
    dp = _dot_d(do1, do2, v1, v2, D2, PRECISION)
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 += tl.dot(ds, k1, input_precision=PRECISION)
    if D2 > 0:
        dq2 += tl.dot(ds, k2, input_precision=PRECISION)
    return dq1, dq2


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qk_scale, sm_scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_split(Q + _head_offset(bh, H, sq_b, sq_h), offs_m, sq_n, sq_d, N_Q, HEAD_D, D1, D2, UPCAST)
    do1, do2 = _load_split(DO + _head_offset(bh, H, sdo_b, sdo_h), offs_m, sdo_n, sdo_d, N_Q, HEAD_D, D1, D2,
                           UPCAST)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = K + _head_offset(bh, H, sk_b, sk_h)
    v_base = V + _head_offset(bh, H, sv_b, sv_h)
    W2: tl.constexpr = D2 if D2 > 0 else 16
    dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    dq2 = tl.zeros([BLOCK_M, W2], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    if WHILE_LOOP:
        start = 0
        while start < N_K:
            dq1, dq2 = _dq_block(k_base, v_base, start + offs_n0, q1, q2, do1, do2, lse, delta, offs_m, dq1, dq2,
                                 sk_n, sk_d, sv_n, sv_d, N_Q, N_K, qk_scale, HEAD_D, D1, D2, UPCAST, PRECISION)
            start += BLOCK_N
    else:
        for start in range(0, N_K, BLOCK_N):
            dq1, dq2 = _dq_block(k_base, v_base, start + offs_n0, q1, q2, do1, do2, lse, delta, offs_m, dq1, dq2,
                                 sk_n, sk_d, sv_n, sv_d, N_Q, N_K, qk_scale, HEAD_D, D1, D2, UPCAST, PRECISION)
    _store_split(DQ + _head_offset(bh, H, sdq_b, sdq_h), offs_m, sdq_n, sdq_d, N_Q, dq1 * sm_scale, dq2 * sm_scale,
                 HEAD_D, D1, D2)


BWD_CONFIG = (64, 64, 4, 2)        # (BLOCK_M, BLOCK_N, num_warps, num_stages)
BWD_CONFIG_WIDE = (32, 32, 4, 1)   # head dims past 128: smaller tiles keep q, k, v, dO tiles in shared memory


def attention_backward(q, k, v, out, lse, d_out, scale, input_precision=None, grad_dtype=None):
    """(dq, dk, dv) of softmax(scale q k^T) v given d_out, using the forward's out and lse (any strides).

    With the full softmax's out and lse and a block of the keys, the result is that block's exact share of the
    gradients (what sequence-parallel attention sums). ``grad_dtype`` torch.float32 returns them unrounded
    (default: the inputs' dtype)."""
    if grad_dtype not in (None, torch.float32, q.dtype):
        raise ValueError(f"grad_dtype must be None, torch.float32 or the inputs' dtype, got {grad_dtype}")
    _check_qkv(q, k, v)
    precision = _precision(q.dtype, input_precision)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    for name, t, shape, dtype in (("out", out, tuple(q.shape), q.dtype), ("d_out", d_out, tuple(q.shape), None),
                                  ("lse", lse, (B, H, NQ), torch.float32)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"{name} must be a tensor of shape {shape}{f' and dtype {dtype}' if dtype else ''}")
    check_device(q, out, d_out, lse)
    if NK == 0 and q.numel():
        raise ValueError("attention over zero keys is undefined: N_k must be >= 1")
    d1, d2 = head_dim_split(D)
    d_out = d_out.to(q.dtype)
    delta = (d_out.float() * out.float()).sum(-1).contiguous()           # rowsum(dO * O), float32 (B, H, N_q)
    lse = lse.contiguous()
    gd = q.dtype if grad_dtype is None else grad_dtype
    dq, dk, dv = (torch.empty(t.shape, dtype=gd, device=t.device) for t in (q, k, v))
    if q.numel() == 0:
        return dq, dk, dv
    bm, bn, warps, stages = INTERPRETER_CONFIG if interpreter_active() else (
        BWD_CONFIG_WIDE if d1 + d2 > 128 else BWD_CONFIG)
    common = dict(HEAD_D=D, D1=d1, D2=d2, BLOCK_M=bm, BLOCK_N=bn, UPCAST=interpreter_active(), PRECISION=precision,
                  WHILE_LOOP=interpreter_active(), num_warps=warps, num_stages=stages)
    qk_scale = scale * LOG2E
    _attn_bwd_dkdv_kernel[(triton.cdiv(NK, bn), B * H)](
        q, k, v, d_out, lse, delta, dk, dv, qk_scale, scale, *q.stride(), *k.stride(), *v.stride(),
        *d_out.stride(), *dk.stride(), *dv.stride(), H, NQ, NK, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(NQ, bm), B * H)](
        q, k, v, d_out, lse, delta, dq, qk_scale, scale, *q.stride(), *k.stride(), *v.stride(), *d_out.stride(),
        *dq.stride(), H, NQ, NK, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, input_precision):
        out, lse = attention_forward(q, k, v, scale, input_precision)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        ctx.input_precision = input_precision
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, d_out, ctx.scale, ctx.input_precision)
        return dq, dk, dv, None, None


# ------------------------------------------------------------------------------------------------
# prompt-to-prompt cross-attention (Hertz et al. 2022) inside the kernel
# ------------------------------------------------------------------------------------------------

@triton.jit
def _p2p_block(q1, q2, qs1, qs2, lse_s, kt_base, ka_base, v_base, w_ptr, sel_ptr, offs_n, sk_n, sk_d, sa_n, sa_d,
               sv_n, sv_d, N_K, sm_scale, m_t, l_t, at1, at2, as1, as2, HEAD_D: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    kt1, kt2 = _load_split(kt_base, offs_n, sk_n, sk_d, N_K, HEAD_D, D1, D2, UPCAST)
    ka1, ka2 = _load_split(ka_base, offs_n, sa_n, sa_d, N_K, HEAD_D, D1, D2, UPCAST)
    v1, v2 = _load_split(v_base, offs_n, sv_n, sv_d, N_K, HEAD_D, D1, D2, UPCAST)
    valid = offs_n < N_K
    w = tl.load(w_ptr + offs_n, mask=valid, other=0.0)
    sel = tl.load(sel_ptr + offs_n, mask=valid, other=0.0)
    # target softmax, online over all target tokens (its normaliser l_t is unweighted)
    s = tl.where(valid[None, :], _dot_d(q1, q2, kt1, kt2, D2, PRECISION) * sm_scale, float("-inf"))
    m_new = tl.maximum(m_t, tl.max(s, 1))
    alpha = tl.exp2((m_t - m_new) * LOG2E_C)
    p = tl.exp2((s - m_new[:, None]) * LOG2E_C)
    l_t = l_t * alpha + tl.sum(p, 1)
    pt = p * (w * (1.0 - sel))[None, :]
    # source maps at the aligned tokens, normalised by the source softmax's exact lse
    sa = _dot_d(qs1, qs2, ka1, ka2, D2, PRECISION) * sm_scale
    ps = tl.where(valid[None, :], tl.exp2((sa - lse_s[:, None]) * LOG2E_C), 0.0) * (w * sel)[None, :]
    if UPCAST:
        ptv = pt
        psv = ps
    else:
        ptv = pt.to(v1.dtype)
        psv = ps.to(v1.dtype)
    at1 = at1 * alpha[:, None] + tl.dot(ptv, v1, input_precision=PRECISION)
    as1 += tl.dot(psv, v1, input_precision=PRECISION)
    if D2 > 0:
        at2 = at2 * alpha[:, None] + tl.dot(ptv, v2, input_precision=PRECISION)
        as2 += tl.dot(psv, v2, input_precision=PRECISION)
    return m_new, l_t, at1, at2, as1, as2


@triton.jit
def _p2p_fwd_kernel(
    QT, QS, KT, KA, V, W, SEL, LSE_S, O,              # target / source queries, target keys, aligned source keys,
    sm_scale,                                         # target values, column weights, selector, source lse, out
    sqt_b, sqt_h, sqt_n, sqt_d, sqs_b, sqs_h, sqs_n, sqs_d, skt_b, skt_h, skt_n, skt_d,
    ska_b, ska_h, ska_n, ska_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
    H, N_Q, N_K,
    HEAD_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    q1, q2 = _load_split(QT + _head_offset(bh, H, sqt_b, sqt_h), offs_m, sqt_n, sqt_d, N_Q, HEAD_D, D1, D2, UPCAST)
    qs1, qs2 = _load_split(QS + _head_offset(bh, H, sqs_b, sqs_h), offs_m, sqs_n, sqs_d, N_Q, HEAD_D, D1, D2,
                           UPCAST)
    lse_s = tl.load(LSE_S + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    kt_base = KT + _head_offset(bh, H, skt_b, skt_h)
    ka_base = KA + _head_offset(bh, H, ska_b, ska_h)
    v_base = V + _head_offset(bh, H, sv_b, sv_h)
    W2: tl.constexpr = D2 if D2 > 0 else 16
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    at1 = tl.zeros([BLOCK_M, D1], tl.float32)
    as1 = tl.zeros([BLOCK_M, D1], tl.float32)
    at2 = tl.zeros([BLOCK_M, W2], tl.float32)
    as2 = tl.zeros([BLOCK_M, W2], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    if WHILE_LOOP:
        start = 0
        while start < N_K:
            m_t, l_t, at1, at2, as1, as2 = _p2p_block(q1, q2, qs1, qs2, lse_s, kt_base, ka_base, v_base, W, SEL,
                                                      start + offs_n0, skt_n, skt_d, ska_n, ska_d, sv_n, sv_d, N_K,
                                                      sm_scale, m_t, l_t, at1, at2, as1, as2, HEAD_D, D1, D2,
                                                      UPCAST, PRECISION)
            start += BLOCK_N
    else:
        for start in range(0, N_K, BLOCK_N):
            m_t, l_t, at1, at2, as1, as2 = _p2p_block(q1, q2, qs1, qs2, lse_s, kt_base, ka_base, v_base, W, SEL,
                                                      start + offs_n0, skt_n, skt_d, ska_n, ska_d, sv_n, sv_d, N_K,
                                                      sm_scale, m_t, l_t, at1, at2, as1, as2, HEAD_D, D1, D2,
                                                      UPCAST, PRECISION)
    inv = 1.0 / l_t
    _store_split(O + _head_offset(bh, H, so_b, so_h), offs_m, so_n, so_d, N_Q, at1 * inv[:, None] + as1,
                 at2 * inv[:, None] + as2, HEAD_D, D1, D2)


def p2p_attention(q, k, v, q_source, k_source, alignment=None, weights=None, scale=None, input_precision=None):
    """Cross-attention of the edited (target) prompt with prompt-to-prompt edits applied inside the kernel:

        out_i = sum_j c_j [sel_j P_src(i, A(j)) + (1 - sel_j) P_tgt(i, j)] v_j,   sel_j = [A(j) >= 0]

    (Hertz et al. 2022, §3.2: word swap = identity alignment, refinement = partial alignment, reweighting = c).
    P_src = softmax(scale q_source k_source^T) over the source tokens, P_tgt = softmax(scale q k^T). ``alignment``
    (N_k ints, -1 = keep the target map; default: none) and ``weights`` c (N_k, default 1) apply to every head.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("q_source", q_source), ("k_source", k_source)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch tensor (B, H, N, d)")
    check_device(q, k, v, q_source, k_source)
    if len({t.dtype for t in (q, k, v, q_source, k_source)}) != 1:
        raise ValueError("q, k, v, q_source, k_source must share one dtype")
    if q_source.shape != q.shape or k_source.shape[:2] != k.shape[:2] or k_source.shape[3] != k.shape[3]:
        raise ValueError(f"source shapes {tuple(q_source.shape)}, {tuple(k_source.shape)} do not match "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    if v.shape != k.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    dev = q.device
    if alignment is None:
        align = torch.full((NK,), -1, dtype=torch.int64, device=dev)
    else:
        align = torch.as_tensor(alignment, dtype=torch.int64, device=dev)
        if align.shape != (NK,) or int(align.max()) >= k_source.shape[2]:
            raise ValueError(f"alignment must hold {NK} source indices (-1 to keep the target map)")
    w = torch.ones(NK, dtype=torch.float32, device=dev) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float32, device=dev).reshape(NK).contiguous()
    sel = (align >= 0).float().contiguous()
    k_aligned = k_source[:, :, align.clamp(min=0)]                     # (B, H, N_k, d): source keys by target token
    _, lse_src = attention_forward(q_source, k_source, k_source, scale,
                                   input_precision)                   # the source softmax's normaliser
    d1, d2 = head_dim_split(D)
    precision = "ieee" if interpreter_active() else (input_precision or "ieee")
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    bm, bn, warps, stages = _config(d1, d2, q.dtype)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _p2p_fwd_kernel[(triton.cdiv(NQ, bm), B * H)](
        q, q_source, k, k_aligned, v, w, sel, lse_src.contiguous(), out, sm_scale, *q.stride(), *q_source.stride(),
        *k.stride(), *k_aligned.stride(), *v.stride(), *out.stride(), H, NQ, NK,
        HEAD_D=D, D1=d1, D2=d2, BLOCK_M=bm, BLOCK_N=bn, UPCAST=interpreter_active(), PRECISION=precision,
        WHILE_LOOP=interpreter_active(), num_warps=warps, num_stages=stages)
    return out
