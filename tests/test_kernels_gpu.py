"""GPU-only kernel checks (run by bench/run_gpu.sh): native bf16 at real latent sizes, CUDA-graph capture and
replay of a fused step with in-kernel noise, and bitwise determinism across runs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

from kernels.fused_step import sampler_step  # noqa: E402
from refdiff import schedules as S  # noqa: E402
from refdiff.samplers import DPMSolverPP, EulerAncestral, Grid, apply, step_coeffs  # noqa: E402
from refdiff.samplers.base import State  # noqa: E402
from tolerances import kernel_rule_violation  # noqa: E402

GRID = Grid.from_discrete(S.DiscreteSchedule(S.scaled_linear_betas(1000)), S.timesteps(1000, 25, "trailing"))
LATENTS = {"SD 512": (2, 4, 64, 64), "SDXL": (2, 4, 128, 128), "Flux": (1, 16, 128, 128)}


@pytest.mark.parametrize("shape", list(LATENTS.values()), ids=list(LATENTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_rule_at_latent_sizes(shape, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, mu, mc, p1 = (torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(4))
    c = step_coeffs(DPMSolverPP(2), GRID, State(step=5, history=(0, 0), orders=(1,) * 5))[0]
    coeffs = {**c._asdict(), "w": 7.5}
    out, D = sampler_step(x, coeffs, m_uncond=mu, m_cond=mc, d_prev1=p1)
    f64 = [t.double().cpu().numpy() for t in (x, mu, p1, mc)]
    ref, _ = apply(c, f64[0], f64[1], f64[2], m_cond=f64[3], guidance=7.5)
    m = mu + 7.5 * (mc - mu)
    Dn = float(np.asarray(c.c_x)) * x + float(np.asarray(c.c_m)) * m
    naive = float(np.asarray(c.a)) * x + float(np.asarray(c.b)) * Dn + float(np.asarray(c.c1)) * p1
    assert kernel_rule_violation(out, naive, ref, dtype) <= 1.0


def test_cuda_graph_capture_and_replay_give_identical_output():
    x = torch.randn((2, 4, 64, 64), device="cuda", dtype=torch.float16)
    mu, mc = torch.randn_like(x), torch.randn_like(x)
    c = step_coeffs(EulerAncestral(), GRID, State(step=3))[0]
    coeffs = {**c._asdict(), "w": 7.5}
    eager, _ = sampler_step(x, coeffs, m_uncond=mu, m_cond=mc, seed=123, noise_offset=7)
    out, d_out = torch.empty_like(x), torch.empty_like(x)
    sampler_step(x, coeffs, m_uncond=mu, m_cond=mc, seed=123, noise_offset=7, out=out, out_d=d_out)   # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler_step(x, coeffs, m_uncond=mu, m_cond=mc, seed=123, noise_offset=7, out=out, out_d=d_out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_bitwise_deterministic():
    x = torch.randn((1, 16, 128, 128), device="cuda", dtype=torch.bfloat16)
    mu = torch.randn_like(x)
    c = step_coeffs(DPMSolverPP(2), GRID, State(step=0))[0]
    a, _ = sampler_step(x, c, m_uncond=mu)
    b, _ = sampler_step(x, c, m_uncond=mu)
    assert torch.equal(a, b)


ATTN_SHAPES = {"SD1.5 d=40": (2, 8, 4096, 4096, 40), "SD1.5 cross": (2, 8, 4096, 77, 40),
               "DiT d=72": (16, 16, 256, 256, 72), "d=160": (2, 8, 256, 256, 160), "Flux d=128": (1, 24, 4608, 4608, 128)}
CHECK_QUERIES = 256          # float64 reference on a slice of queries against all keys


@pytest.mark.parametrize("shape", list(ATTN_SHAPES.values()), ids=list(ATTN_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_native_rule_at_diffusion_shapes(shape, dtype):
    import math

    from kernels.flash_attention import attention

    B, H, NQ, NK, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype) for n in (NQ, NK, NK))
    out, lse = attention(q, k, v, return_lse=True)
    qs = q[:, :, :CHECK_QUERIES]
    s64 = (qs.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    ref = (torch.softmax(s64, -1) @ v.double()).cpu().numpy()
    naive = torch.softmax((qs @ k.transpose(-1, -2)) / math.sqrt(D), -1) @ v
    assert kernel_rule_violation(out[:, :, :CHECK_QUERIES], naive, ref, dtype) <= 1.0
    lse_ref = torch.logsumexp(s64, -1).cpu().numpy()
    assert np.abs(lse[:, :, :CHECK_QUERIES].double().cpu().numpy() - lse_ref).max() <= 1e-3 * (1 + np.abs(lse_ref).max())
