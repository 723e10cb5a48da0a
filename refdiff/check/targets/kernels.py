"""``refdiff check kernels``: the Triton kernels against the float64 reference by the error rule, on the CPU under
Triton's interpreter (small shapes) or natively on a GPU. Each case names its inputs and the ratio to the rule."""

from __future__ import annotations

import math

import numpy as np

from ..rules import kernel_rule_violation

__all__ = ["kernel_cases"]


def _sampler_step_cases(torch, device):
    from kernels.fused_step import sampler_step

    from ... import schedules as S
    from ...samplers import DDIM, DPMSolverPP, EulerAncestral, Grid, apply, step_coeffs
    from ...samplers.base import State

    grid = Grid.from_discrete(S.DiscreteSchedule(S.scaled_linear_betas(1000)), S.timesteps(1000, 25, "trailing"))
    for smp in (DDIM(), DPMSolverPP(2), EulerAncestral()):
        c = step_coeffs(smp, grid, State(step=5, history=(0, 0), orders=(1,) * 5))[-1]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            x, m, p1, z = (torch.randn((2, 4, 9, 11), generator=g, dtype=torch.float64).to(dtype).to(device)
                           for _ in range(4))
            use_p1 = bool(np.any(np.asarray(c.c1) != 0))
            use_z = bool(np.any(np.asarray(c.d) != 0))
            out, _ = sampler_step(x, c, m_uncond=m, d_prev1=p1 if use_p1 else None, noise=z if use_z else None)
            f = [t.double().cpu().numpy() for t in (x, m, p1, z)]
            ref, _ = apply(c, f[0], f[1], f[2] if use_p1 else None, None, f[3] if use_z else None)
            k = lambda v: float(np.asarray(v))  # noqa: E731
            D = k(c.c_x) * x + k(c.c_m) * m
            naive = k(c.a) * x + k(c.b) * D + (k(c.c1) * p1 if use_p1 else 0) + (k(c.d) * z if use_z else 0)
            yield f"sampler_step {smp.name} {str(dtype)[6:]}", kernel_rule_violation(out, naive, ref, dtype)


def _attention_cases(torch, device):
    from kernels.flash_attention import attention

    from ...attention import attention as ref_attention

    for (nq, nk, d) in ((77, 77, 40), (33, 97, 72), (20, 77, 160)):
        for dtype in (torch.float16, torch.bfloat16):
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn((1, 2, n, d), generator=g, dtype=torch.float64).to(dtype).to(device)
                       for n in (nq, nk, nk))
            out = attention(q, k, v)
            Q, K, V = (t.double().cpu().numpy() for t in (q, k, v))
            ref = ref_attention(Q, K, V).out
            naive = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), -1) @ v
            dot_terms = float(np.max(np.abs(Q) @ np.swapaxes(np.abs(K), -1, -2))) / math.sqrt(d)
            extra = 2 * np.finfo(np.float32).eps * float(np.max(np.abs(V))) * dot_terms
            yield (f"attention N_q={nq} N_k={nk} d={d} {str(dtype)[6:]}",
                   kernel_rule_violation(out, naive, ref, dtype, extra_floor=extra))


def kernel_cases():
    """[(name, ratio)] for the sampler-step and attention kernels; ratio <= 1 passes. Needs torch and triton."""
    from kernels._launch import select_backend

    backend = select_backend()
    import torch

    device = "cuda" if backend == "cuda" else "cpu"
    return list(_sampler_step_cases(torch, device)) + list(_attention_cases(torch, device)), backend
