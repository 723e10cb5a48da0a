"""kernels.attention (forward, backward, prompt-to-prompt) against refdiff.attention in float64, by the
flash-attention error rule; its bad-input table."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import flash_attention as KA  # noqa: E402
from refdiff.attention import attention as ref_attention  # noqa: E402
from attention_rule import backward_violations, forward_violations  # noqa: E402
from bad_inputs import bad, refused  # noqa: E402
from tolerances import EPS32, KERNEL_FLOOR_ULPS, kernel_rule_violation  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LENGTHS = [1, 2, 15, 77, 97, 128, 129, 257]
HEAD_DIMS = [16, 32, 40, 64, 72, 80, 96, 128, 160]


def _inputs(B, H, NQ, NK, d, dtype, scale, layout, seed):
    g = torch.Generator().manual_seed(seed)

    def mk(n):
        t = (scale * torch.randn((B, n, H, d), generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)
        return t.transpose(1, 2) if layout == "BNHD" else t.transpose(1, 2).contiguous()
    return mk(NQ), mk(NK), mk(NK)


def _check(q, k, v, precision=None):
    out = torch.full_like(q, float("nan"))                                 # NaN-poisoned: unwritten rows fail
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    KA.attention(q, k, v, return_lse=True, input_precision=precision, out=out, lse=lse)
    return forward_violations(out, lse, q, k, v)


@settings(max_examples=40)
@given(B=st.integers(1, 2), H=st.integers(1, 2), NQ=st.sampled_from(LENGTHS), NK=st.sampled_from(LENGTHS),
       d=st.sampled_from(HEAD_DIMS), dtype=st.sampled_from(list(DTYPES)), scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]),
       layout=st.sampled_from(["BHND", "BNHD"]), seed=st.integers(0, 1000))
def test_forward_follows_the_error_rule(B, H, NQ, NK, d, dtype, scale, layout, seed):
    q, k, v = _inputs(B, H, NQ, NK, d, DTYPES[dtype], scale, layout, seed)
    v_out, v_lse = _check(q, k, v, "ieee" if dtype == "float32" else None)
    assert v_out <= 1.0 and v_lse <= 1.0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_equal_keys_give_the_mean_of_v(dtype):
    q, k, v = _inputs(1, 2, 33, 77, 40, DTYPES[dtype], 1.0, "BHND", 1)
    k = k[:, :, :1].expand_as(k).contiguous()
    out = KA.attention(q, k, v, input_precision="ieee" if dtype == "float32" else None)
    mean = v.double().mean(dim=2, keepdim=True).expand_as(q)
    # p = 1 / N_k exactly in every format; the mean of v is formed in fp32: a few ulp of the storage dtype
    torch.testing.assert_close(out.double(), mean, rtol=0, atol=4 * torch.finfo(DTYPES[dtype]).eps)


def test_single_key_and_huge_logits():
    q, k, v = _inputs(1, 1, 17, 1, 64, torch.float16, 1.0, "BHND", 2)
    torch.testing.assert_close(KA.attention(q, k, v), v.expand_as(q), rtol=0, atol=0)
    q, k, v = _inputs(1, 1, 20, 50, 72, torch.bfloat16, 30.0, "BHND", 3)       # logits ~ 1e4: no overflow
    out, lse = KA.attention(q, k, v, return_lse=True)
    ref = ref_attention(*(t.double().cpu().numpy() for t in (q, k, v)))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    np.testing.assert_allclose(lse.double().cpu().numpy(), ref.lse, rtol=1e-6)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref.out, rtol=0, atol=0.02 * 30)


@pytest.mark.parametrize("d,split", [(40, (32, 16)), (72, (64, 16)), (80, (64, 16)), (160, (128, 32)),
                                     (64, (64, 0)), (96, (64, 32)), (8, (16, 0)), (256, (256, 0))])
def test_head_dim_split_avoids_padding_to_the_next_power_of_two(d, split):
    assert KA.head_dim_split(d) == split


Q16 = torch.zeros((1, 2, 5, 16), device=DEVICE, dtype=torch.float16)
Q32 = Q16.float()
K16_3H = torch.zeros((1, 3, 5, 16), device=DEVICE, dtype=torch.float16)
V16_4N = torch.zeros((1, 2, 4, 16), device=DEVICE, dtype=torch.float16)
WIDE = torch.zeros((1, 1, 2, 300), device=DEVICE, dtype=torch.float16)
NO_KEYS = torch.zeros((1, 2, 0, 16), device=DEVICE, dtype=torch.float16)
Q_GRAD = Q16.clone().requires_grad_()
P2P = _inputs(1, 1, 8, 7, 16, torch.float16, 1.0, "BHND", 0)

BAD = [
    bad(lambda: KA.attention(Q16, K16_3H, K16_3H), ValueError, "batch, heads or head dim", "heads-differ"),
    bad(lambda: KA.attention(Q16, Q16, V16_4N), ValueError, "same shape", "k-v-shapes-differ"),
    bad(lambda: KA.attention(WIDE, WIDE, WIDE), ValueError, r"head dim must lie in \[1, 256\]", "head-dim-300"),
    bad(lambda: KA.attention(Q16[..., :0], Q16[..., :0], Q16[..., :0]), ValueError, "head dim", "head-dim-0"),
    bad(lambda: KA.attention(Q16, Q32, Q16), ValueError, "dtypes differ", "mixed-dtypes"),
    bad(lambda: KA.attention(Q32, Q32, Q32), ValueError, "input_precision='ieee'.*'tf32'", "fp32-needs-precision"),
    bad(lambda: KA.attention(Q32, Q32, Q32, input_precision="fp32"), ValueError, "'ieee'", "fp32-unknown-precision"),
    bad(lambda: KA.attention(Q16, Q16, Q16, input_precision="tf32"), ValueError, "fp32 inputs only",
        "fp16-with-tf32"),
    bad(lambda: KA.attention(Q16, Q16.to("meta"), Q16), ValueError, "same device", "mixed-devices"),
    bad(lambda: KA.attention(Q16[0], Q16[0], Q16[0]), ValueError, "4-D torch tensor", "3-D-inputs"),
    bad(lambda: KA.attention(Q16.numpy() if DEVICE == "cpu" else Q16.cpu().numpy(), Q16, Q16), ValueError,
        "4-D torch tensor", "numpy-input"),
    bad(lambda: KA.attention(Q16.double(), Q16.double(), Q16.double()), ValueError, "float16, bfloat16 or float32",
        "float64"),
    bad(lambda: KA.attention(Q16.int(), Q16.int(), Q16.int()), ValueError, "float16, bfloat16 or float32", "int32"),
    bad(lambda: KA.attention(Q16, NO_KEYS, NO_KEYS), ValueError, "zero keys", "N_k-0"),
    bad(lambda: KA.attention(Q16, Q16, Q16, lse=torch.zeros((1, 2, 5), dtype=torch.int32, device=DEVICE)),
        ValueError, "lse must be a torch.float32", "int32-lse-buffer"),
    bad(lambda: KA.attention(Q16, Q16, Q16, lse=torch.zeros((1, 2, 4), device=DEVICE)), ValueError,
        r"shape \(1, 2, 5\)", "lse-buffer-shape"),
    bad(lambda: KA.attention(Q16, Q16, Q16, out=torch.zeros_like(Q32).double()), ValueError,
        "out must be a torch.float16 or torch.float32", "out-buffer-dtype"),
    bad(lambda: KA.attention(Q32, Q32, Q32, input_precision="ieee", out=torch.zeros_like(Q16)), ValueError,
        "out must be a torch.float32", "out-buffer-half-for-fp32"),
    bad(lambda: KA.attention_backward(Q16, Q16, Q16, Q16, torch.zeros((1, 2, 5)), Q16, 0.25,
                                      grad_dtype=torch.float64), ValueError, "grad_dtype", "grad-dtype"),
    bad(lambda: KA.attention(Q16, Q16, Q16, out=torch.zeros((1, 1, 1, 16), dtype=torch.float16,
                                                              device=DEVICE).expand(1, 2, 5, 16)),
        ValueError, "stride-0", "expanded-out-buffer"),
    bad(lambda: KA.attention(Q_GRAD, Q16, Q16, out=torch.zeros_like(Q16)), ValueError, "autograd",
        "buffers-under-autograd"),
    bad(lambda: KA.attention_backward(Q16, Q16, Q16, Q16, torch.zeros((1, 2, 5), device=DEVICE),
                                      Q16[:, :, :3], 0.25), ValueError, "d_out must be", "backward-d_out-shape"),
    bad(lambda: KA.p2p_attention(*P2P, P2P[0], P2P[1], alignment=np.zeros(3, int)), ValueError, "alignment",
        "p2p-alignment-length"),
    bad(lambda: KA.p2p_attention(*P2P, P2P[0].float(), P2P[1]), ValueError, "dtype", "p2p-mixed-dtypes"),
    bad(lambda: KA.p2p_attention(*P2P, P2P[0][:, :, :4], P2P[1]), ValueError, "source shapes",
        "p2p-source-shapes"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_empty_batch_gives_an_empty_result():
    empty = torch.zeros((0, 2, 5, 16), device=DEVICE, dtype=torch.float16)
    assert KA.attention(empty, empty, empty).shape == (0, 2, 5, 16)


@pytest.mark.parametrize("layout", ["permuted", "sliced"])
def test_a_strided_lse_buffer_is_honoured(layout):
    """An lse buffer of any strides receives the same values as a fresh one (it was once read with unit stride)."""
    q, k, v = _inputs(2, 3, 77, 40, 32, torch.float16, 1.0, "BHND", 3)
    _, want = KA.attention(q, k, v, return_lse=True)
    if layout == "permuted":
        buf = torch.full((77, 3, 2), float("nan"), device=DEVICE).permute(2, 1, 0)      # (B, H, N) with N outermost
    else:
        buf = torch.full((2, 3, 154), float("nan"), device=DEVICE)[:, :, ::2]
    KA.attention(q, k, v, return_lse=True, lse=buf)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)


def test_lse_carries_no_gradient_and_out_does():
    q, k, v = (t.detach().float().requires_grad_() for t in _inputs(1, 1, 9, 9, 16, torch.float32, 1.0, "BHND", 4))
    out, lse = KA.attention(q, k, v, return_lse=True, input_precision="ieee")
    assert out.requires_grad and not lse.requires_grad


def test_int64_offset_probe():
    from kernel_probes import head_offset_probe_kernel

    block, H = 8, 3
    s_b, s_h, s_n, n0 = 2 ** 31 + 17, 2 ** 30 + 1, 5 * 2 ** 20, 2 ** 12
    out = torch.zeros((2 * H, block), dtype=torch.int64, device=DEVICE)
    head_offset_probe_kernel[(1, 2 * H)](out, H, s_b, s_h, s_n, n0, BLOCK=block)
    bh = np.arange(2 * H)[:, None]
    want = (bh // H) * s_b + (bh % H) * s_h + (n0 + np.arange(block))[None] * s_n
    np.testing.assert_array_equal(out.cpu().numpy(), want)




@settings(max_examples=12)
@given(NQ=st.sampled_from([1, 15, 77, 129]), NK=st.sampled_from([1, 2, 77, 97]), d=st.sampled_from(HEAD_DIMS),
       dtype=st.sampled_from(list(DTYPES)), layout=st.sampled_from(["BHND", "BNHD"]), seed=st.integers(0, 1000))
def test_backward_follows_the_error_rule(NQ, NK, d, dtype, layout, seed):
    dt = DTYPES[dtype]
    q, k, v = _inputs(1, 2, NQ, NK, d, dt, 1.0, layout, seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dt).to(DEVICE)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = KA.attention(qs, ks, vs, input_precision="ieee" if dtype == "float32" else None)
    out.backward(do)
    viol = backward_violations({"q": qs.grad, "k": ks.grad, "v": vs.grad}, q, k, v, do)
    assert max(viol.values()) <= 1.0, viol


# -- prompt-to-prompt inside the kernel --------------------------------------------------------------------

def _p2p_naive(q, k, v, qs, ks, align, c, scale):
    """The same edit in plain torch in the storage dtype."""
    Ps = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, -1)
    Pt = torch.softmax((q @ k.transpose(-1, -2)) * scale, -1)
    a = torch.as_tensor(align)
    sel = (a >= 0).to(q.dtype)
    P = Ps[..., a.clamp(min=0)] * sel + Pt * (1 - sel)
    return (P * torch.as_tensor(c, dtype=q.dtype)) @ v


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d,NS,NK", [(40, 77, 77), (80, 70, 77), (160, 77, 20)])
def test_p2p_kernel_follows_the_error_rule(dtype, d, NS, NK):
    from refdiff import attention as RA

    dt = DTYPES[dtype]
    q, qs = (t for t in _inputs(1, 2, 33, 33, d, dt, 1.0, "BHND", 5)[:2])
    k, v = _inputs(1, 2, NK, NK, d, dt, 1.0, "BHND", 6)[1:]
    ks = _inputs(1, 2, NS, NS, d, dt, 1.0, "BHND", 7)[1]
    rs = np.random.default_rng(d)
    align = np.where(rs.uniform(size=NK) < 0.6, rs.integers(0, NS, NK), -1)
    c = rs.uniform(0.5, 2.0, NK)
    prec = "ieee" if dtype == "float32" else None
    out = KA.p2p_attention(q, k, v, qs, ks, alignment=align, weights=c, input_precision=prec)
    Q, K, V, QS, KS = (t.double().cpu().numpy() for t in (q, k, v, qs, ks))
    Ps, _ = RA.attention_probs(QS, KS)
    Pt, _ = RA.attention_probs(Q, K)
    ref = RA.p2p_reweight(RA.p2p_refine(Ps, Pt, align), np.arange(NK), c) @ V
    n = _p2p_naive(q, k, v, qs, ks, align, c, 1 / math.sqrt(d))
    dot_terms = max(float(np.max(np.abs(Q) @ np.swapaxes(np.abs(K), -1, -2))),
                    float(np.max(np.abs(QS) @ np.swapaxes(np.abs(KS), -1, -2)))) / math.sqrt(d)
    logit_floor = KERNEL_FLOOR_ULPS * EPS32 * float(np.max(np.abs(V)) * np.max(c)) * dot_terms
    assert kernel_rule_violation(out, n, ref, dt, extra_floor=logit_floor) <= 1.0


def test_p2p_without_edits_is_plain_attention_and_word_swap_uses_the_source_maps():
    q, k, v = _inputs(1, 2, 40, 77, 64, torch.float32, 1.0, "BHND", 8)
    qs, ks = _inputs(1, 2, 40, 77, 64, torch.float32, 1.0, "BHND", 9)[:2]
    plain = KA.attention(q, k, v, input_precision="ieee")
    torch.testing.assert_close(KA.p2p_attention(q, k, v, qs, ks, input_precision="ieee"), plain, rtol=1e-6,
                               atol=1e-6)
    swap = KA.p2p_attention(q, k, v, qs, ks, alignment=np.arange(77), input_precision="ieee")
    torch.testing.assert_close(swap, KA.attention(qs, ks, v, input_precision="ieee"), rtol=1e-6, atol=1e-6)


