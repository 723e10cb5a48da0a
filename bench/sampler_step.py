"""Fused sampler step vs what users pay today, measured side by side in one run (README, "Kernels and benchmarks").

Per size (16K, 65K, 262K, 4.8M, 64M elements) and dtype (fp32, fp16, bf16):
  ceiling      torch copy_ of the tensor (device-to-device bandwidth) and a trivial Triton kernel's launch time
  ours         kernels.sampler_step for CFG + DDIM, CFG + DPM-Solver++ 2M, CFG + Euler ancestral (in-kernel noise)
  diffusers    the pipeline's CFG combine (m_u + s (m_c - m_u)) plus scheduler.step for the same configuration
  compile      torch.compile of the same fused formula
Bytes are the minimum each variant must move (each input read once, each output written once); bandwidth is
reported in GB/s and as a fraction of the measured copy bandwidth.

    python bench/sampler_step.py --out bench/results            (GPU)
    python bench/sampler_step.py --dry-run --out /tmp/x         (CPU: exercises the script, no real timings)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = (16_384, 65_536, 262_144, 4_838_400, 67_108_864)
DRY_SIZES = (1_024,)
DTYPES = ("float32", "float16", "bfloat16")
GUIDANCE = 7.5                         # diffusers-convention CFG scale


def _configs():
    from refdiff import schedules as S
    from refdiff.samplers import DDIM, DPMSolverPP, EulerAncestral, Grid

    table = S.DiscreteSchedule(S.scaled_linear_betas(1000))
    grid = Grid.from_discrete(table, S.timesteps(1000, 25, "trailing"), final="data")
    return table, grid, {"CFG+DDIM": DDIM(), "CFG+DPM++2M": DPMSolverPP(2), "CFG+EulerAncestral": EulerAncestral()}


def _diffusers_step(name, n, dtype, device):
    """A callable running diffusers' CFG combine + scheduler.step at step 5 of 25, or None if unavailable."""
    try:
        import diffusers
        import torch
    except ImportError:
        return None
    kw = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=1.2e-2,
              timestep_spacing="trailing")
    cls = {"CFG+DDIM": diffusers.DDIMScheduler, "CFG+DPM++2M": diffusers.DPMSolverMultistepScheduler,
           "CFG+EulerAncestral": diffusers.EulerAncestralDiscreteScheduler}[name]
    sched = cls(**kw)
    sched.set_timesteps(25, device=device)
    t = sched.timesteps[5]
    x, mu, mc = (torch.randn(n, device=device, dtype=dtype) for _ in range(3))
    if name == "CFG+DPM++2M":
        sched.model_outputs = [torch.randn(n, device=device, dtype=dtype)] * sched.config.solver_order
        sched.lower_order_nums = 2
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        if hasattr(sched, "_step_index"):
            sched._step_index = 5
        m = mu + GUIDANCE * (mc - mu)
        kwargs = {"generator": gen} if name == "CFG+EulerAncestral" else {}
        return sched.step(m, t, x, **kwargs).prev_sample
    return run


def _compiled(dtype, dry_run):
    import torch

    def formula(x, mu, mc, w, c_x, c_m, a, b, c1, p1):
        xf, m = x.float(), mu.float() + w * (mc.float() - mu.float())
        D = c_x * xf + c_m * m
        return (a * xf + b * D + c1 * p1.float()).to(x.dtype), D.to(x.dtype)
    return formula if dry_run else torch.compile(formula)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes under the interpreter; no real timings")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to exercise the script", file=sys.stderr)
            return 3
    else:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton
    import triton.language as tl

    from bench.harness import SCHEMA, env_block, time_ms, write_results
    from kernels.fused_step import sampler_step
    from refdiff.samplers import step_coeffs
    from refdiff.samplers.base import State

    device = "cpu" if dry else "cuda"

    @triton.jit
    def _trivial(ptr):
        tl.store(ptr, 1.0)

    table, grid, configs = _configs()
    rows = []
    for dname in DTYPES:
        dtype = getattr(torch, dname)
        for n in (DRY_SIZES if dry else SIZES):
            elt = torch.tensor([], dtype=dtype).element_size()
            src = torch.randn(n, device=device, dtype=dtype)
            dst = torch.empty_like(src)
            copy_ms = time_ms(lambda: dst.copy_(src), dry)
            copy_gbs = 2 * n * elt / (copy_ms[0] * 1e-3) / 1e9
            flag = torch.zeros(1, device=device)
            launch_ms = time_ms(lambda: _trivial[(1,)](flag), dry)
            x, mu, mc, p1 = (torch.randn(n, device=device, dtype=dtype).reshape(1, n) for _ in range(4))
            for name, smp in configs.items():
                state = State(step=5, history=(0, 0), orders=(1,) * 5)
                c = step_coeffs(smp, grid, state)[0]
                coeffs = {**c._asdict(), "w": GUIDANCE}
                coeffs.pop("level"), coeffs.pop("evaluate")
                uses_p1 = np.any(np.asarray(c.c1) != 0)
                noisy = np.any(np.asarray(c.d) != 0)

                def ours():
                    return sampler_step(x, coeffs, m_uncond=mu, m_cond=mc, d_prev1=p1 if uses_p1 else None,
                                        seed=0 if noisy else None)
                n_bytes = int((3 + int(uses_p1) + 2) * n * elt)      # x, m_u, m_c (, D_prev1) in; x_next, D out
                ours_ms = time_ms(ours, dry)
                row = {"dtype": dname, "elements": n, "config": name, "bytes": n_bytes,
                       "copy_ms": copy_ms, "copy_GBps": copy_gbs, "launch_ms": launch_ms, "ours_ms": ours_ms,
                       "ours_GBps": n_bytes / (ours_ms[0] * 1e-3) / 1e9}
                row["ours_fraction_of_copy_bw"] = row["ours_GBps"] / copy_gbs
                row["ours_over_copy_time"] = ours_ms[0] / copy_ms[0]
                peer = _diffusers_step(name, n, dtype, device)
                if peer is not None:
                    row["diffusers_ms"] = time_ms(peer, dry)
                    row["speedup_vs_diffusers"] = row["diffusers_ms"][0] / ours_ms[0]
                comp = _compiled(dtype, dry)
                f = lambda: comp(x, mu, mc, GUIDANCE, float(np.asarray(c.c_x)), float(np.asarray(c.c_m)),  # noqa
                                 float(np.asarray(c.a)), float(np.asarray(c.b)), float(np.asarray(c.c1)), p1)
                row["compile_ms"] = time_ms(f, dry)
                row["speedup_vs_compile"] = row["compile_ms"][0] / ours_ms[0]
                rows.append(row)
                print(f"{dname:9s} {n:>10d} {name:20s} ours {ours_ms[0] * 1e3:9.2f} us "
                      f"{row['ours_fraction_of_copy_bw']:6.1%} of copy BW", flush=True)
    env = env_block()
    env["mode"] = "dry-run (interpreter; not performance numbers)" if dry else "cuda"
    doc = {"schema": SCHEMA, "benchmark": "sampler_step", "env": env, "rows": rows}
    md = ["# fused sampler step — " + env["device"] + (" (DRY RUN: not performance numbers)" if dry else ""), "",
          "| dtype | elements | config | ours (us) | GB/s | % copy BW | ours / copy time | diffusers (us) | "
          "x vs diffusers | compile (us) | x vs compile |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dif = f"{r['diffusers_ms'][0] * 1e3:.2f} | {r['speedup_vs_diffusers']:.2f}" if "diffusers_ms" in r else "n/a | n/a"
        md.append(f"| {r['dtype']} | {r['elements']} | {r['config']} | {r['ours_ms'][0] * 1e3:.2f} | "
                  f"{r['ours_GBps']:.0f} | {r['ours_fraction_of_copy_bw']:.1%} | {r['ours_over_copy_time']:.2f} | "
                  f"{dif} | {r['compile_ms'][0] * 1e3:.2f} | {r['speedup_vs_compile']:.2f} |")
    for p_ in write_results("sampler_step", doc, "\n".join(md) + "\n", args.out):
        print("wrote", p_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
