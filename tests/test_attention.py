"""refdiff.attention: the float64 reference, the LSE merge of partial attentions, prompt-to-prompt edits."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refdiff import attention as A
from bad_inputs import bad, refused


def _qkv(seed, B=2, H=3, NQ=5, NK=7, d=4, scale=1.0):
    r = np.random.default_rng(seed)
    return [scale * r.standard_normal(s) for s in ((B, H, NQ, d), (B, H, NK, d), (B, H, NK, d))]


def test_lse_matches_mpmath():
    import mpmath

    mpmath.mp.dps = 50
    q, k, v = _qkv(0, 1, 1, 2, 6, 3, scale=3.0)
    res = A.attention(q, k, v)
    s = q[0, 0] @ k[0, 0].T / np.sqrt(3)
    for i in range(2):
        want = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in s[i]))
        assert abs(res.lse[0, 0, i] - float(want)) <= 4e-16 * max(1.0, abs(float(want)))


@given(seed=st.integers(0, 2 ** 32 - 1), cut=st.integers(1, 6))
def test_merge_of_disjoint_key_blocks_is_full_attention(seed, cut):
    q, k, v = _qkv(seed)
    full = A.attention(q, k, v)
    parts = [A.attention(q, k[:, :, :cut], v[:, :, :cut]), A.attention(q, k[:, :, cut:], v[:, :, cut:])]
    merged = A.merge_partials([p.out for p in parts], [p.lse for p in parts])
    np.testing.assert_allclose(merged.out, full.out, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.lse, full.lse, rtol=1e-14, atol=1e-14)


def test_all_equal_keys_give_the_mean_of_v():
    q, k, v = _qkv(1)
    k[:] = k[:, :, :1]
    np.testing.assert_allclose(A.attention(q, k, v).out, np.broadcast_to(v.mean(axis=2, keepdims=True),
                                                                            (2, 3, 5, 4)), rtol=1e-14, atol=1e-15)


def test_huge_logits_do_not_overflow():
    q, k, v = _qkv(2, scale=100.0)
    res = A.attention(q, k, v)
    assert np.all(np.isfinite(res.out)) and np.all(np.isfinite(res.lse))
    # the softmax is then one-hot on the largest logit
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / 2.0
    top = np.take_along_axis(v, s.argmax(-1)[..., None].repeat(4, -1), axis=2)
    np.testing.assert_allclose(res.out, top, rtol=1e-10, atol=1e-10)


def test_masks_and_bias():
    q, k, v = _qkv(3)
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 4:] = False
    np.testing.assert_allclose(A.attention(q, k, v, mask=mask).out, A.attention(q, k[:, :, :4], v[:, :, :4]).out,
                               rtol=1e-14)
    bias = np.where(mask, 0.0, -np.inf)
    np.testing.assert_allclose(A.attention(q, k, v, bias=bias).out, A.attention(q, k, v, mask=mask).out, rtol=1e-14)
    none = np.zeros((1, 1, 5, 7), bool)
    res = A.attention(q, k, v, mask=none)
    assert np.all(res.out == 0) and np.all(np.isneginf(res.lse))


def test_prompt_to_prompt_edits():
    q, k, _ = _qkv(4, NK=6)
    P, _ = A.attention_probs(q, k)
    P2, _ = A.attention_probs(q, k[:, :, ::-1])
    np.testing.assert_array_equal(A.p2p_reweight(P, 2, 1.0), P)
    rw = A.p2p_reweight(P, 2, 3.0)
    np.testing.assert_array_equal(rw[..., 2], 3.0 * P[..., 2])
    np.testing.assert_array_equal(np.delete(rw, 2, -1), np.delete(P, 2, -1))
    np.testing.assert_array_equal(A.p2p_refine(P, P2, np.arange(6)), P)            # identity alignment: source maps
    keep = A.p2p_refine(P, P2, np.array([0, 1, -1, -1, 4, 5]))
    np.testing.assert_array_equal(keep[..., 2:4], P2[..., 2:4])                   # new tokens keep their own
    np.testing.assert_array_equal(A.p2p_replace(P, P2, step=3, tau=5), P)
    np.testing.assert_array_equal(A.p2p_replace(P, P2, step=5, tau=5), P2)


Q, K, VV = _qkv(5)

BAD = [
    bad(lambda: A.attention(Q, K[..., :3], VV), ValueError, "head-dim", "head-dims-differ"),
    bad(lambda: A.attention(Q, K, VV[:, :, :3]), ValueError, "key dims", "key-counts-differ"),
    bad(lambda: A.attention(Q[0], K[0], VV[0]), ValueError, r"\(B, H, N, d\)", "3-D-inputs"),
    bad(lambda: A.attention(Q, K, VV, mask=np.ones((5, 7))), ValueError, "boolean", "float-mask"),
    bad(lambda: A.attention(Q, K, VV, mask=np.ones((5, 6), bool)), ValueError, "does not broadcast", "mask-shape"),
    bad(lambda: A.attention(Q, K, VV, bias=np.ones((4, 7))), ValueError, "does not broadcast", "bias-shape"),
    bad(lambda: A.merge_partials([Q], []), ValueError, "as many", "merge-counts"),
    bad(lambda: A.merge_partials([Q, Q[..., :2]], [Q[..., 0], Q[..., 0]]), ValueError, "partial 1", "merge-shapes"),
    bad(lambda: A.p2p_replace(np.zeros((2, 3)), np.zeros((2, 4)), 0, 1), ValueError, "same shape", "p2p-shapes"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_no_keys_is_the_empty_sum():
    """Zero keys (or all masked): lse = -inf and out = 0, the empty sum that the LSE merge needs (an empty key
    block contributes nothing); the Triton kernel refuses N_k = 0 instead."""
    res = A.attention(Q, K[:, :, :0], VV[:, :, :0])
    assert np.all(np.isneginf(res.lse)) and np.all(res.out == 0)