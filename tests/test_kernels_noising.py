"""kernels.add_noise / noising_loss against refdiff (forward.q_sample, losses.training_loss) by the error rule."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import noising as NZ  # noqa: E402
from refdiff import rng  # noqa: E402
from refdiff.parametrization import from_x0_eps  # noqa: E402
from bad_inputs import bad, refused
from tolerances import kernel_rule_violation  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = float(np.finfo(np.float32).eps)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHAPES = [(1, 1), (2, 77), (3, 97), (2, 3, 5, 7)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dt).to(DEVICE) for _ in range(3)]


@settings(max_examples=40)
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 1000),
       per_row=st.booleans(), transposed=st.booleans())
def test_add_noise_follows_the_error_rule(shape, dtype, seed, per_row, transposed):
    x0, eps, _ = _inputs(shape, dtype, seed)
    if transposed and x0.dim() >= 3:
        x0, eps = x0.transpose(-1, -2), eps.transpose(-1, -2)
    B = shape[0]
    a = np.random.default_rng(seed).uniform(0.05, 1.0, B) if per_row else 0.6
    s = np.sqrt(1 - np.asarray(a) ** 2)
    out = NZ.add_noise(x0, a, s, eps=eps)
    ar = np.reshape(a, (-1,) + (1,) * (x0.dim() - 1)) if per_row else a
    sr = np.reshape(s, (-1,) + (1,) * (x0.dim() - 1)) if per_row else s
    ref = ar * x0.double().cpu().numpy() + sr * eps.double().cpu().numpy()
    dt = x0.dtype
    naive = torch.as_tensor(ar, dtype=dt, device=DEVICE) * x0 + torch.as_tensor(sr, dtype=dt, device=DEVICE) * eps
    assert kernel_rule_violation(out, naive, ref, dt) <= 1.0


@settings(max_examples=40)
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(list(DTYPES)), seed=st.integers(0, 1000),
       prediction=st.sampled_from(["eps", "x0", "v", "flow"]), reduction=st.sampled_from(["mean", "sum"]))
def test_noising_loss_matches_refdiff(shape, dtype, seed, prediction, reduction):
    x0, eps, m = _inputs(shape, dtype, seed)
    B = shape[0]
    r = np.random.default_rng(seed)
    a = r.uniform(0.05, 1.0, B)
    s = np.sqrt(1 - a * a)
    w = r.uniform(0.5, 2.0, B)
    res = NZ.noising_loss(m, x0, a, s, eps=eps, prediction=prediction, weight=w, reduction=reduction)
    x0d, epsd, md = (t.double().cpu().numpy() for t in (x0, eps, m))
    tgt = from_x0_eps(x0d, epsd, prediction, a, s)
    err = (md - tgt).reshape(B, -1)
    n = err.shape[1]
    red = (lambda v: v.mean(1)) if reduction == "mean" else (lambda v: v.sum(1))
    ref = w * red(err ** 2)
    # each difference d = m - target is formed in float32 from terms of size T = |m| + |a eps| + |s x0| + |x0| +
    # |eps| (every target is a combination of these): |delta d| <= 4 eps32 T, so |delta d^2| <= 2 |d| 4 eps32 T;
    # then the float32 accumulation of n squares adds <= (n + 2) eps32 of the sum
    ar, sr = a.reshape(-1, 1), s.reshape(-1, 1)
    T = np.abs(md).reshape(B, -1) + np.abs(ar * epsd.reshape(B, -1))
    T = T + (np.abs(sr * x0d.reshape(B, -1)) + np.abs(x0d.reshape(B, -1)) + np.abs(epsd.reshape(B, -1)))
    tol = w * red(2 * np.abs(err) * 4 * EPS32 * T) + (n + 2) * EPS32 * ref
    assert np.all(np.abs(res.loss.double().cpu().numpy() - ref) <= tol)
    gref = (2 / n if reduction == "mean" else 2.0) * w.reshape((-1,) + (1,) * (m.dim() - 1)) * (md - tgt)
    dt = m.dtype
    wt = torch.as_tensor(w.reshape((-1,) + (1,) * (m.dim() - 1)), dtype=dt, device=DEVICE)
    tgt_naive = {"eps": eps, "x0": x0, "flow": eps - x0,
                 "v": torch.as_tensor(a.reshape((-1,) + (1,) * (m.dim() - 1)), dtype=dt, device=DEVICE) * eps
                 - torch.as_tensor(s.reshape((-1,) + (1,) * (m.dim() - 1)), dtype=dt, device=DEVICE) * x0}[prediction]
    naive = (2.0 / n if reduction == "mean" else 2.0) * wt * (m - tgt_naive)
    assert kernel_rule_violation(res.grad, naive, gref, dt) <= 1.0


def test_philox_noise_is_regenerated_identically():
    x0 = torch.randn((3, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    xt = NZ.add_noise(x0, 0.0, 1.0, seed=5, noise_offset=2 ** 32 + 1)          # x_t = eps
    want = rng.philox_normal(5, 2 ** 32 + 1 + np.arange(120)).reshape(3, 40)
    np.testing.assert_array_equal(xt.cpu().numpy(), want)
    # the loss pass regenerates the same eps: eps prediction equal to it has zero loss
    res = NZ.noising_loss(xt, x0, 0.3, 0.9, seed=5, noise_offset=2 ** 32 + 1, prediction="eps")
    assert torch.all(res.loss == 0) and torch.all(res.grad == 0)


XN = torch.zeros((2, 5), device=DEVICE)

BAD = [
    bad(lambda: NZ.add_noise(XN, 1.0, 0.0), ValueError, "either as eps", "noise-missing"),
    bad(lambda: NZ.add_noise(XN, 1.0, 0.0, eps=XN, seed=1), ValueError, "either as eps", "noise-twice"),
    bad(lambda: NZ.add_noise(XN, 1.0, 0.0, eps=torch.zeros((2, 4), device=DEVICE)), ValueError,
        r"shape \(2, 4\)", "eps-shape"),
    bad(lambda: NZ.add_noise(XN, np.ones(3), 0.0, eps=XN), ValueError, r"shape \(2,\)", "per-row-length"),
    bad(lambda: NZ.add_noise(XN, 1.0, 0.0, eps=XN.half()), ValueError, "dtype", "mixed-dtypes"),
    bad(lambda: NZ.add_noise(XN.double(), 1.0, 0.0, eps=XN.double()), ValueError, "float32, float16 or bfloat16",
        "float64"),
    bad(lambda: NZ.noising_loss(XN, XN, 1.0, 0.0, eps=XN, prediction="score"), ValueError, "prediction",
        "unsupported-target"),
    bad(lambda: NZ.noising_loss(XN, torch.zeros((2, 6), device=DEVICE), 1.0, 0.0, eps=XN), ValueError, "shape",
        "prediction-shape"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_empty_batches_launch_nothing():
    z = torch.zeros((0, 5), device=DEVICE)
    assert NZ.add_noise(z, 1.0, 0.0, eps=z).shape == (0, 5)
    assert NZ.noising_loss(z, z, 1.0, 0.0, eps=z).loss.shape == (0,)