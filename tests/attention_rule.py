"""The flash-attention error rule for attention outputs, LSE and gradients (README, "Tests and tolerances"): the
checks shared by the single-device kernel tests and the sequence-parallel ones."""

import math

import numpy as np
import torch

from refdiff.attention import attention as ref_attention
from refdiff.attention import attention_probs
from tolerances import EPS32, KERNEL_FLOOR_ULPS, kernel_rule_violation

__all__ = ["naive", "forward_violations", "gradient_floors", "backward_violations"]


def naive(q, k, v, scale):
    """Plain torch in the storage dtype (FlashAttention's attention_ref without upcasting)."""
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def forward_violations(out, lse, q, k, v):
    """(out, lse) violations of the rule against float64 (<= 1 holds) for inputs q, k, v (B, H, N, d)."""
    d = q.shape[-1]
    Q, K, V = (t.detach().double().cpu().numpy() for t in (q, k, v))
    ref = ref_attention(Q, K, V)
    n_out, n_lse = naive(q.detach(), k.detach(), v.detach(), 1.0 / math.sqrt(d))
    # lse = m + log l: the max logit, a dot product rounded at the scale sum_d |q| |k| / sqrt(d), plus the log of
    # the rescaled sum; its floor sits at the size of those terms (in float64 from the reference)
    logits = np.einsum("bhqd,bhkd->bhqk", Q, K) / math.sqrt(d)
    m = np.max(logits, axis=-1)
    dot_terms = np.max(np.einsum("bhqd,bhkd->bhqk", np.abs(Q), np.abs(K)), axis=-1) / math.sqrt(d)
    lse_terms = float(np.max(dot_terms + np.abs(ref.lse - m)))
    # the output also inherits the kernel's fp32 logits rounding, d out ~ |v| d s with |d s| ~ eps32 x their terms
    logit_floor = KERNEL_FLOOR_ULPS * EPS32 * float(np.max(np.abs(V)) * np.max(dot_terms))
    return (kernel_rule_violation(out, n_out, ref.out, q.dtype, extra_floor=logit_floor),
            kernel_rule_violation(lse, n_lse, ref.lse, torch.float32, floor_scale=lse_terms))   # lse is float32


def gradient_floors(q, k, v, do):
    """Absolute floor per gradient from the terms it adds up, in float64: dq = scale sum_j ds_ij k_j with
    ds = P (dP - delta), dP and delta dot products over the head dim (delta uses the stored O); dk likewise with q;
    dv = sum_i P_ij dO_i. An exactly-zero gradient (dq with one key) is still formed from non-zero terms."""
    Q, K, V, dO = (t.detach().double().cpu().numpy() for t in (q, k, v, do))
    d = Q.shape[-1]
    P, _ = attention_probs(Q, K)
    O = P @ V
    # dP = dO v^T and delta = rowsum(dO o) are dot products: they round at the sums of absolute products
    dP_terms = np.abs(dO) @ np.swapaxes(np.abs(V), -1, -2)
    delta_terms = np.sum(np.abs(dO) * np.abs(O), axis=-1, keepdims=True)
    T = P * (dP_terms + delta_terms)
    scale = 1.0 / math.sqrt(d)
    terms = {"q": float(np.max(scale * T @ np.abs(K))), "k": float(np.max(scale * np.swapaxes(T, -1, -2) @ np.abs(Q))),
             "v": float(np.max(np.swapaxes(P, -1, -2) @ np.abs(dO)))}
    # the kernel sums these terms in fp32 (only the final store rounds to the storage dtype), and its recomputed P
    # carries the fp32 logits' rounding, relative eps32 x their term scale scale sum |q| |k|
    logit_terms = float(np.max(np.abs(Q) @ np.swapaxes(np.abs(K), -1, -2)) * scale)
    return {n: KERNEL_FLOOR_ULPS * EPS32 * (1.0 + logit_terms) * t for n, t in terms.items()}


def backward_violations(grads: dict, q, k, v, do, factor: float = 3.0) -> dict:
    """Violations of the rule (factor 3 for gradients) for grads {"q", "k", "v"} of sum(out * do)."""
    d = q.shape[-1]
    dt = q.dtype
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive(qn, kn, vn, 1.0 / math.sqrt(d))[0].backward(do)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    naive(q64, k64, v64, 1.0 / math.sqrt(d))[0].backward(do.double().cpu())
    extra = gradient_floors(q, k, v, do)
    return {name: kernel_rule_violation(grads[name], base.grad, ref.grad.numpy(), dt, factor=factor,
                                        extra_floor=extra[name])
            for name, base, ref in (("q", qn, q64), ("k", kn, k64), ("v", vn, v64))}
