"""Float64 softmax attention with its log-sum-exp, the LSE merge of partial attentions, and prompt-to-prompt edits
of cross-attention maps.

Symbols: q (B, H, N_q, d), k (B, H, N_k, d), v (B, H, N_k, d_v); logits s = scale q k^T + bias (masked entries
-inf); lse = log sum_j exp(s_j) per query (natural log); P = exp(s - lse); out = P v.

The LSE merge combines attentions over disjoint key blocks exactly (what ring / sequence-parallel attention
needs): lse = logsumexp_i lse_i, out = sum_i exp(lse_i - lse) out_i. Prompt-to-prompt (Hertz et al. 2022, §3.2):
word swap injects the source maps (replace), added words take the source maps through an alignment (refine), and
reweighting scales a token's column (reweight). A query whose keys are all masked has lse = -inf and out = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import logsumexp

from ._validate import as_f64

__all__ = ["Attention", "attention", "attention_probs", "merge_partials", "p2p_replace", "p2p_refine",
           "p2p_reweight"]


class Attention(NamedTuple):
    out: np.ndarray          # (B, H, N_q, d_v)
    lse: np.ndarray          # (B, H, N_q)


def _qk(q, k):
    q, k = as_f64(q, "q"), as_f64(k, "k")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be (B, H, N, d), got shapes {q.shape} and {k.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k batch / head / head-dim disagree: {q.shape} vs {k.shape}")
    return q, k


def _qkv(q, k, v):
    q, k = _qk(q, k)
    v = as_f64(v, "v")
    if v.ndim != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v batch / head / key dims disagree: {k.shape} vs {v.shape}")
    return q, k, v


def _broadcast(a, shape, name):
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to the logits' shape {shape} "
                         "(B, H, N_q, N_k)") from None


def _logits(q, k, scale, bias, mask):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
    shape = s.shape
    if bias is not None:
        s = s + _broadcast(as_f64(bias, "bias"), shape, "bias")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise ValueError("mask must be boolean (True keeps a key)")
        s = np.where(_broadcast(mask, shape, "mask"), s, -np.inf)
    return s


def attention_probs(q, k, scale=None, bias=None, mask=None):
    """(P, lse): softmax probabilities (B, H, N_q, N_k) and log-sum-exp (B, H, N_q) of the scaled logits."""
    q, k = _qk(q, k)
    s = _logits(q, k, scale, bias, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(s, axis=-1)
        P = np.where(np.isneginf(lse)[..., None], 0.0, np.exp(s - lse[..., None]))
    return P, lse


def attention(q, k, v, scale=None, bias=None, mask=None) -> Attention:
    """Softmax attention in float64 with the log-sum-exp (scale defaults to 1 / sqrt(d))."""
    q, k, v = _qkv(q, k, v)
    P, lse = attention_probs(q, k, scale, bias, mask)
    return Attention(np.einsum("bhqk,bhkd->bhqd", P, v), lse)


def merge_partials(outs, lses) -> Attention:
    """Exact combination of attentions over disjoint key blocks from their outputs and log-sum-exps."""
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need as many partial outputs as lses (at least one), got {len(outs)} and {len(lses)}")
    outs = [as_f64(o, f"outs[{i}]") for i, o in enumerate(outs)]
    lses = [as_f64(l, f"lses[{i}]") for i, l in enumerate(lses)]
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or l.shape != o.shape[:-1]:
            raise ValueError(f"partial {i}: out {o.shape} / lse {l.shape} do not match out {outs[0].shape}")
    L = np.stack(lses)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = logsumexp(L, axis=0)
        w = np.where(np.isneginf(lse), 0.0, np.exp(L - lse))
    return Attention(np.einsum("i...,i...d->...d", w, np.stack(outs)), lse)


def p2p_replace(P_source, P_target, step: int, tau: int):
    """Word swap: the edited prompt uses the source prompt's maps for the first ``tau`` steps (Hertz et al. 2022,
    Eq. 2 with the injection schedule), its own maps afterwards. Token counts must match."""
    Ps, Pt = as_f64(P_source, "P_source"), as_f64(P_target, "P_target")
    if Ps.shape != Pt.shape:
        raise ValueError(f"replace needs maps of the same shape (same token count): {Ps.shape} vs {Pt.shape}")
    return Ps.copy() if step < tau else Pt.copy()


def p2p_refine(P_source, P_target, alignment):
    """Adding a phrase: target token j takes the source map of token A(j) when it has one (A(j) >= 0), and keeps
    its own map otherwise (Hertz et al. 2022, §3.2, 'Adding a new phrase'). ``alignment`` has one entry per target
    token."""
    Ps, Pt = as_f64(P_source, "P_source"), as_f64(P_target, "P_target")
    A = np.asarray(alignment)
    if A.shape != (Pt.shape[-1],) or not np.issubdtype(A.dtype, np.integer):
        raise ValueError(f"alignment must hold one integer per target token ({Pt.shape[-1]}), got {A.shape}")
    if np.any(A >= Ps.shape[-1]):
        raise ValueError("alignment points past the source tokens")
    out = Pt.copy()
    has = A >= 0
    out[..., has] = Ps[..., A[has]]
    return out


def p2p_reweight(P, token, c):
    """Attention re-weighting: the columns of ``token`` (an index or an array of them) scaled by c (a scalar or one
    per token) (Hertz et al. 2022, §3.2; not renormalised)."""
    P = as_f64(P, "P").copy()
    tok = np.atleast_1d(np.asarray(token))
    if not np.issubdtype(tok.dtype, np.integer) or np.any((tok < 0) | (tok >= P.shape[-1])):
        raise ValueError(f"token indices must lie in [0, {P.shape[-1]}), got {token!r}")
    P[..., tok] *= np.broadcast_to(as_f64(c, "c"), tok.shape)
    return P
