"""kernels.sampler_step and kernels.driver against refdiff.apply in float64, by the flash-attention error rule,
under Triton's interpreter on CPU (natively on a GPU)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import driver  # noqa: E402
from kernels import fused_step as SS  # noqa: E402
from refdiff import rng  # noqa: E402
from refdiff import schedules as S  # noqa: E402
from refdiff.convergence import oracle_model  # noqa: E402
from refdiff.oracles import GaussianMixture  # noqa: E402
from refdiff.samplers import (DDIM, DDPM, SEEDS, TCD, Churn, DPM2Ancestral, DPMFast, DPMSolver,  # noqa: E402
                              DPMSolverPP, DPMSolverPP2MSDE, DPMSolverPP2SAncestral, DPMSolverPP3MSDE, ERSDE, Euler,
                              EulerAncestral, FlowEuler, FlowHeun, FlowStochastic, Grid, Heun, Level, RESMultistep,
                              SDEDPMSolverPP2M, StepCoeffs, UniPC, apply, step_coeffs)
from refdiff.samplers.base import State  # noqa: E402
from bad_inputs import bad, refused  # noqa: E402
from tolerances import kernel_rule_violation  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLERS = [DDIM(), DDIM(0.7), DDPM(), Euler(Churn(4.0)), Heun(), EulerAncestral(), DPMSolver(2), DPMSolver(3),
            DPMSolverPP(2), DPMSolverPP(3), SDEDPMSolverPP2M(), UniPC(2)]
SHAPES = [(1, 1), (2, 77), (3, 97), (2, 3, 5, 7), (1, 4, 9, 11), (3, 2, 3, 4, 5)]
SCHED = S.Cosine()


def _grid(per_row_b=None, n=8):
    if per_row_b is None:
        return Grid.from_times(SCHED, S.log_snr_uniform_times(SCHED, n, 0.95, 0.02))
    rs = np.random.default_rng(per_row_b)
    t0, t1 = rs.uniform(0.8, 0.98, per_row_b), rs.uniform(0.01, 0.1, per_row_b)
    times = np.stack([S.log_snr_uniform_times(SCHED, n, a, b) for a, b in zip(t0, t1)], axis=1)
    return Grid([Level(t, SCHED.alpha(t), SCHED.sigma(t), SCHED.log_snr(t)) for t in times], SCHED)


def naive(c, x, m=None, p1=None, p2=None, z=None, m_cond=None, w=None):
    """The same stage in plain torch, every operation in the storage dtype (the rule's baseline)."""
    def k(v):
        v = torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=x.dtype, device=x.device)
        return v.reshape((-1,) + (1,) * (x.dim() - 1)) if v.dim() == 1 else v

    out = k(c.a) * x
    D = None
    if c.evaluate:
        mm = m if m_cond is None else m + k(w) * (m_cond - m)
        D = k(c.c_x) * x + k(c.c_m) * mm
        out = out + k(c.b) * D
    if p1 is not None:
        out = out + k(c.c1) * p1
    if p2 is not None:
        out = out + k(c.c2) * p2
    if z is not None:
        out = out + k(c.d) * z
    return out, D


def _view(t, layout):
    if layout == "transposed" and t.dim() >= 3:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)        # same values, non-contiguous strides
    if layout == "batch_slice":
        return torch.cat([t, t], 0)[::2]
    if layout == "offset":
        flat = torch.cat([torch.zeros(1, dtype=t.dtype, device=t.device), t.reshape(-1)])
        return flat[1:].reshape(t.shape)                                   # storage offset 1: misaligned
    return t


def _case(sampler, step, shape, dtype, layout, per_row, guided, seed):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    grid = _grid(B if per_row else None)
    state = State(step=step, history=(0, 0), orders=tuple([1] * step))
    stages = step_coeffs(sampler, grid, state)
    c = stages[seed % len(stages)]
    dt = DTYPES[dtype]

    def rnd():
        return _view(torch.randn(shape, generator=g, dtype=torch.float64).to(dt).to(DEVICE), layout)

    x, m_u, p1, p2, z = rnd(), rnd(), rnd(), rnd(), rnd()
    m_c = rnd() if guided and c.evaluate else None
    w = 3.5 if m_c is not None else None
    uses = dict(p1=np.any(np.asarray(c.c1) != 0), p2=np.any(np.asarray(c.c2) != 0), z=np.any(np.asarray(c.d) != 0))
    args = dict(d_prev1=p1 if uses["p1"] else None, d_prev2=p2 if uses["p2"] else None,
                noise=z if uses["z"] else None)
    coeffs = c._asdict()
    if w is not None:
        coeffs["w"] = w
    coeffs["evaluate"] = c.evaluate
    return c, coeffs, x, (m_u if c.evaluate else None), m_c, w, args


def _f64(t):
    return None if t is None else t.double().cpu().numpy()


@settings(max_examples=60)
@given(sampler=st.sampled_from(SAMPLERS), step=st.integers(0, 7), shape=st.sampled_from(SHAPES),
       dtype=st.sampled_from(list(DTYPES)), layout=st.sampled_from(["contiguous", "transposed", "batch_slice", "offset"]),
       per_row=st.booleans(), guided=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_follows_the_error_rule(sampler, step, shape, dtype, layout, per_row, guided, seed):
    c, coeffs, x, m_u, m_c, w, args = _case(sampler, step, shape, dtype, layout, per_row, guided, seed)
    cc = dict(coeffs)
    evaluate = cc.pop("evaluate")
    out, D = SS.sampler_step(x, cc, m_uncond=m_u, m_cond=m_c, evaluate=evaluate, **args)
    ref, Dref = apply(c, _f64(x), _f64(m_u), _f64(args["d_prev1"]), _f64(args["d_prev2"]), _f64(args["noise"]),
                      m_cond=_f64(m_c), guidance=w)
    nv, nD = naive(c, x, m_u, args["d_prev1"], args["d_prev2"], args["noise"], m_c, w)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert kernel_rule_violation(out, nv, ref, x.dtype) <= 1.0
    if c.evaluate:
        assert kernel_rule_violation(D, nD, Dref, x.dtype) <= 1.0


# the affine samplers of the k-diffusion / ComfyUI, flow and consistency families (tests/test_samplers_k.py proves
# their coefficient form equals their paper form): every stage at a start, middle and late step, both half and
# single precision
NEW_SAMPLERS = [FlowEuler(), FlowHeun(), FlowStochastic(), DPM2Ancestral(), DPMSolverPP2SAncestral(),
                DPMSolverPP2MSDE(), DPMSolverPP2MSDE(solver_type="heun"), DPMSolverPP3MSDE(), RESMultistep(eta=1.0),
                SEEDS(3, eta=0.0), DPMFast(23, eta=1.0), ERSDE(), TCD(0.3)]


@pytest.mark.parametrize("sampler", NEW_SAMPLERS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_new_samplers_stages_follow_the_error_rule(sampler, dtype):
    for step in (0, 3, 6):
        for k in range(len(step_coeffs(sampler, _grid(), State(step=step, history=(0, 0))))):
            c, coeffs, x, m_u, m_c, w, args = _case(sampler, step, (3, 97), dtype, "contiguous", False, k % 2 == 1,
                                                    k)
            cc = dict(coeffs)
            evaluate = cc.pop("evaluate")
            out, D = SS.sampler_step(x, cc, m_uncond=m_u, m_cond=m_c, evaluate=evaluate, **args)
            ref, Dref = apply(c, _f64(x), _f64(m_u), _f64(args["d_prev1"]), _f64(args["d_prev2"]),
                              _f64(args["noise"]), m_cond=_f64(m_c), guidance=w)
            nv, nD = naive(c, x, m_u, args["d_prev1"], args["d_prev2"], args["noise"], m_c, w)
            assert kernel_rule_violation(out, nv, ref, x.dtype) <= 1.0, (step, k)
            if c.evaluate:
                assert kernel_rule_violation(D, nD, Dref, x.dtype) <= 1.0, (step, k)


@pytest.mark.parametrize("offset", [0, 5, 2 ** 32 + 3, 2 ** 40])
@pytest.mark.parametrize("seed", [0, 2 ** 33 + 1])
def test_in_kernel_noise_is_refdiff_rng(seed, offset):
    x = torch.zeros((3, 5, 7), device=DEVICE)
    out, _ = SS.sampler_step(x, {"a": 0.0, "d": 1.0}, seed=seed, noise_offset=offset, evaluate=False)
    want = rng.philox_normal(seed, offset + np.arange(x.numel())).reshape(x.shape)
    ulp = np.abs(out.cpu().numpy().view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulp.max() <= 2                  # exact under the interpreter; libdevice log / cos on a GPU


def test_in_kernel_noise_follows_the_logical_index_for_any_layout():
    x = torch.zeros((2, 6, 4), device=DEVICE).transpose(1, 2)             # non-contiguous output
    out, _ = SS.sampler_step(x, {"a": 0.0, "d": 1.0}, seed=9, evaluate=False)
    want = rng.philox_normal(9, np.arange(48)).reshape(2, 4, 6)
    np.testing.assert_array_equal(out.contiguous().cpu().numpy(), want)


@pytest.mark.parametrize("sampler", [DDIM(), DPMSolverPP(2)], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_whole_trajectories_follow_the_rule_at_every_step(sampler, dtype):
    gmm = GaussianMixture([0.5, 0.5], [[1.0, -0.5, 0.2], [-1.0, 0.5, 0.0]], [np.eye(3) * 0.3] * 2)
    model_np = oracle_model(gmm)
    dt = DTYPES[dtype]

    def model(x, level):
        return torch.as_tensor(model_np(x.double().cpu().numpy(), level), dtype=dt, device=DEVICE)

    grid = _grid(n=12)
    x = torch.randn((5, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt).to(DEVICE)
    res = driver.sample(sampler, model, grid, x, record=True)
    assert len(res.stages) == 12
    for _, c, inp in res.stages:
        out, D = SS.sampler_step(inp["x"], c, m_uncond=inp["m_uncond"], d_prev1=inp["d_prev1"],
                                 d_prev2=inp["d_prev2"])
        ref, Dref = apply(c, _f64(inp["x"]), _f64(inp["m_uncond"]), _f64(inp["d_prev1"]), _f64(inp["d_prev2"]))
        nv, nD = naive(c, inp["x"], inp["m_uncond"], inp["d_prev1"], inp["d_prev2"])
        assert kernel_rule_violation(out, nv, ref, dt) <= 1.0
        assert kernel_rule_violation(D, nD, Dref, dt) <= 1.0
    assert torch.isfinite(res.x).all()


def test_driver_with_in_kernel_noise_reproduces_refdiff():
    """Euler ancestral driven by the kernel with Philox noise equals refdiff's coefficient form fed the same draws."""
    from refdiff.solve import sample as ref_sample

    gmm = GaussianMixture([1.0], [[0.3, -0.2]], [np.eye(2) * 0.5])
    model_np = oracle_model(gmm)
    grid = _grid(n=6)
    x = torch.randn((4, 2), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def model(u, level):
        return torch.as_tensor(model_np(u.double().cpu().numpy(), level), dtype=torch.float32, device=DEVICE)

    res = driver.sample(EulerAncestral(), model, grid, x, seed=11)
    offsets = iter(driver.philox_noise_offsets(EulerAncestral(), grid, x.numel()))
    draws = lambda: rng.philox_normal(11, next(offsets) + np.arange(8)).reshape(4, 2).astype(np.float64)  # noqa
    ref = ref_sample(EulerAncestral(), model_np, grid, x.double().cpu().numpy(), noise=draws, mode="coeffs")
    # float32 storage and arithmetic in the kernel: a few eps32 of |x| per step, over 6 steps
    np.testing.assert_allclose(res.x.double().cpu().numpy(), ref.x, rtol=0, atol=64 * 1.2e-7 * np.abs(ref.x).max())


# -- bad input, empty tensors, int64 offsets ---------------------------------------------------------------

def test_empty_tensors_return_empty_without_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a zero-size grid was launched")

    monkeypatch.setattr(SS, "_sampler_step_kernel", NoLaunch())
    x = torch.zeros((0, 4), device=DEVICE)
    out, D = SS.sampler_step(x, {"a": 1.0, "b": 1.0, "c_m": 1.0}, m_uncond=x)
    assert out.shape == (0, 4) and D.shape == (0, 4)


def test_expanded_inputs_are_materialised():
    x = torch.randn((1, 6), device=DEVICE).expand(3, 6)
    m = torch.randn((3, 6), device=DEVICE)
    out, D = SS.sampler_step(x, {"a": 0.5, "b": 1.0, "c_x": 1.0, "c_m": 2.0}, m_uncond=m)
    ref = 0.5 * x + (x + 2.0 * m)
    torch.testing.assert_close(out, ref, rtol=2e-7, atol=2e-7)


X = torch.zeros((2, 5), device=DEVICE)
C = {"a": 1.0, "b": 1.0, "c_m": 1.0}

BAD = [
    bad(lambda: SS.sampler_step(X, C, m_uncond=torch.zeros((2, 4), device=DEVICE)), ValueError,
        r"shape \(2, 4\) but x has shape \(2, 5\)", "model-output-shape"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X, m_cond=torch.zeros((2, 6), device=DEVICE)), ValueError,
        r"m_cond has shape \(2, 6\)", "cond-shape"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=torch.zeros((2, 5), dtype=torch.float16, device=DEVICE)), ValueError,
        "mixed storage dtypes", "mixed-dtypes"),
    bad(lambda: SS.sampler_step(X.double(), C, m_uncond=X.double()), ValueError, "float32, float16 or bfloat16",
        "float64"),
    bad(lambda: SS.sampler_step(X.int(), C, m_uncond=X.int()), ValueError, "float32, float16 or bfloat16", "int32"),
    bad(lambda: SS.sampler_step(X, C), ValueError, "m_uncond", "no-model-output"),
    bad(lambda: SS.sampler_step(X, {**C, "c1": 0.5}, m_uncond=X), ValueError, "d_prev1", "missing-history"),
    bad(lambda: SS.sampler_step(X, {**C, "d": 0.5}, m_uncond=X), ValueError, "noise", "missing-noise"),
    bad(lambda: SS.sampler_step(X, {**C, "d": 0.5}, m_uncond=X, noise=X, seed=1), ValueError, "not both",
        "noise-and-seed"),
    bad(lambda: SS.sampler_step(X, {**C, "d": 0.5}, m_uncond=X, seed=-1), ValueError, r"\[0, 2\^63\)",
        "negative-seed"),
    bad(lambda: SS.sampler_step(X, {**C, "b": np.ones(3)}, m_uncond=X), ValueError,
        "per-row coefficient b has 3 entries", "per-row-length"),
    bad(lambda: SS.sampler_step(X, {**C, "b": np.ones((2, 2))}, m_uncond=X), ValueError, "scalar or a", "2-D-coef"),
    bad(lambda: SS.sampler_step(X, torch.zeros((8, 3)), m_uncond=X), ValueError, r"\(8, 2\)", "coef-tensor-shape"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=torch.zeros((2, 5), device="meta")), ValueError, "same device",
        "mixed-devices"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X, m_cond=X), ValueError, "guidance scale w is 0", "cond-without-w"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X.numpy() if DEVICE == "cpu" else X.cpu().numpy()), ValueError,
        "must be a torch tensor", "numpy-model-output"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X, cfg_rescale=0.7), ValueError, "m_cond", "rescale-without-cond"),
    bad(lambda: SS.sampler_step(X, {**C, "w": 2.0}, m_uncond=X, m_cond=X, cfg_rescale=1.5), ValueError, "phi",
        "rescale-phi"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X, threshold=(1.5, 1.0)), ValueError, "percentile",
        "threshold-percentile"),
    bad(lambda: SS.sampler_step(X, C, m_uncond=X, threshold=(0.9, -1.0)), ValueError, "max_value",
        "threshold-negative-max"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            SS.sampler_step(X, C, m_uncond=X)


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per-row"])
def test_unused_slots_are_not_read(per_row):
    """NaN in a history or noise buffer whose coefficient is 0 (an uninitialised buffer in a captured CUDA graph)
    does not reach the output, as in refdiff.apply; a used slot's NaN still propagates where IEEE puts it."""
    x = torch.randn((2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    nan = torch.full_like(x, float("nan"))
    zero = np.zeros(2) if per_row else 0.0
    c = {"c_x": 1.0, "c_m": -0.5, "a": 0.3, "b": 0.7, "c1": zero, "c2": zero, "d": zero}
    out, _ = SS.sampler_step(x, c, m_uncond=x, d_prev1=nan, d_prev2=nan, noise=nan)
    ref, _ = apply(StepCoeffs(1.0, -0.5, 0.3, 0.7, zero, zero, zero), x.double().cpu().numpy(),
                   x.double().cpu().numpy(), nan.double().cpu().numpy(), nan.double().cpu().numpy(),
                   nan.double().cpu().numpy())
    assert not torch.isnan(out).any() and np.all(np.isfinite(ref))
    if per_row:                              # row 1 uses D_prev1: its NaN propagates there, and only there
        c["c1"] = np.array([0.0, 0.5])
        out, _ = SS.sampler_step(x, c, m_uncond=x, d_prev1=nan, d_prev2=nan, noise=nan)
        assert not torch.isnan(out[0]).any() and torch.isnan(out[1]).all()


def test_x_is_not_read_when_neither_a_nor_c_x_uses_it():
    m = torch.randn((2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, D = SS.sampler_step(torch.full_like(m, float("nan")), {"c_x": 0.0, "c_m": 1.0, "a": 0.0, "b": 0.5},
                             m_uncond=m)
    torch.testing.assert_close(out, 0.5 * m) and torch.testing.assert_close(D, m)


def test_int64_offset_probe():
    """Row offsets row * stride_b and in-row indices past 2^31 are formed in int64 (they wrap in int32)."""
    from kernel_probes import offset_probe_kernel

    block = 16
    out = torch.zeros((3, block), dtype=torch.int64, device=DEVICE)
    stride_b, j0 = 2 ** 31 - 1, 2 ** 31 + 5
    n2, n3, s1, s2, s3 = 7, 11, 3 * 2 ** 29, 13, 1
    for contig in (True, False):
        offset_probe_kernel[(1, 3)](out, stride_b, j0, n2, n3, s1, s2, s3, CONTIG=contig, BLOCK=block)
        j = j0 + np.arange(block)
        inner = j if contig else (j // n3 // n2) * s1 + (j // n3 % n2) * s2 + (j % n3) * s3
        want = np.arange(3)[:, None] * stride_b + inner[None]
        np.testing.assert_array_equal(out.cpu().numpy(), want)


# -- non-affine extras through per-row reductions ----------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 77), (3, 4, 9, 11)])
def test_cfg_rescale_follows_the_error_rule(dtype, shape):
    from refdiff import guidance as G

    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(3)
    x, mu, mc = (torch.randn(shape, generator=g, dtype=torch.float64).to(dt).to(DEVICE) for _ in range(3))
    c = {"c_x": 1.3, "c_m": -0.6, "a": 0.4, "b": 0.8, "w": 6.0}
    out, D = SS.sampler_step(x, c, m_uncond=mu, m_cond=mc, cfg_rescale=0.7)
    X, U, C = (_f64(t) for t in (x, mu, mc))
    m_res = G.cfg_rescale(G.cfg(U, C, 6.0, "diffusers"), C, 0.7)
    ref = 0.4 * X + 0.8 * (1.3 * X - 0.6 * m_res)
    # naive: diffusers' rescale_noise_cfg in the storage dtype
    m_cfg = mu + 6.0 * (mc - mu)
    dims = tuple(range(1, x.dim()))
    m_n = 0.7 * m_cfg * (mc.std(dim=dims, keepdim=True) / m_cfg.std(dim=dims, keepdim=True)) + 0.3 * m_cfg
    naive_out = 0.4 * x + 0.8 * (1.3 * x - 0.6 * m_n)
    assert kernel_rule_violation(out, naive_out, ref, dt) <= 1.0


def test_dynamic_thresholding_matches_refdiff():
    from refdiff import guidance as G

    g = torch.Generator().manual_seed(4)
    x, mu, mc = (3 * torch.randn((3, 4, 6, 5), generator=g).to(DEVICE) for _ in range(3))
    c = {"c_x": 1.1, "c_m": -0.5, "a": 0.3, "b": 0.9, "w": 4.0}
    out, D = SS.sampler_step(x, c, m_uncond=mu, m_cond=mc, threshold=(0.95, 1.0))
    X, U, C = (_f64(t) for t in (x, mu, mc))
    Dt = G.dynamic_threshold(1.1 * X - 0.5 * G.cfg(U, C, 4.0, "diffusers"), 0.95, 1.0)
    assert np.abs(D.double().cpu().numpy()).max() <= 1.0 + 1e-6
    # float32 D and its quantile: a few eps32 of the clipped values (|D| <= 1) and of |a x|
    np.testing.assert_allclose(_f64(D), Dt, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_f64(out), 0.3 * X + 0.9 * Dt, rtol=0, atol=1e-5 * (1 + np.abs(X).max()))


def test_rescale_and_threshold_bad_input():
    x = torch.zeros((2, 5), device=DEVICE)
    c = {"a": 1.0, "b": 1.0, "c_m": 1.0, "w": 2.0}
    with pytest.raises(ValueError, match="m_cond"):
        SS.sampler_step(x, c, m_uncond=x, cfg_rescale=0.5)
    with pytest.raises(ValueError, match="phi"):
        SS.sampler_step(x, c, m_uncond=x, m_cond=x, cfg_rescale=1.5)
    with pytest.raises(ValueError, match="percentile"):
        SS.sampler_step(x, c, m_uncond=x, threshold=(1.5, 1.0))
