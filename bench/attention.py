"""Attention forward and forward + backward: ours against every torch SDPA backend forced one at a time (cuDNN,
flash, efficient), measured side by side in one run, at the diffusion shapes of README, "Kernels and benchmarks".

TFLOP/s use the true head dim (4 B H N_q N_k d for the forward, 2.5x that for forward + backward); latency-bound
shapes also report the byte floor (q, k, v read once, the output written once) in microseconds at the measured copy
bandwidth. Correctness is checked at every shape before timing (ours against SDPA's math backend in fp32).

    python bench/attention.py --out bench/results            (GPU)
    python bench/attention.py --dry-run --out /tmp/x         (CPU: tiny shapes under the interpreter, no timings)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (B, H, N_q, N_k, d)
SHAPES = {
    "SD1.5 d=40 N=4096": (2, 8, 4096, 4096, 40),
    "SD1.5 d=80 N=1024": (2, 8, 1024, 1024, 80),
    "SD1.5 d=160 N=256": (2, 8, 256, 256, 160),
    "SD1.5 cross N_k=77": (2, 8, 4096, 77, 40),
    "SDXL d=64 N=4096": (2, 10, 4096, 4096, 64),
    "DiT-XL/2 d=72 N=256": (16, 16, 256, 256, 72),
    "Flux d=128 N=4608": (1, 24, 4608, 4608, 128),
    "video d=128 N=32768": (1, 8, 32768, 32768, 128),
}
DRY_SHAPES = {"tiny d=40": (1, 1, 33, 33, 40), "tiny cross": (1, 1, 20, 7, 72)}
LATENCY_BOUND = ("SD1.5 d=160 N=256", "SD1.5 cross N_k=77", "DiT-XL/2 d=72 N=256")
BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
CHECK_QUERIES = 512


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--dtype", default="float16,bfloat16")
    args = p.parse_args(argv)
    dry = args.dry_run
    import os

    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.attention  # noqa: F401  (sdpa_kernel, SDPBackend)
    import torch.nn.functional as F

    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to exercise the script", file=sys.stderr)
        return 3
    from bench.harness import SCHEMA, env_block, time_ms, write_results
    from kernels import attention

    device = "cpu" if dry else "cuda"
    sdpa = getattr(torch.nn.attention, "sdpa_kernel", None)
    SDPBackend = getattr(torch.nn.attention, "SDPBackend", None)
    rows = []
    copy_gbs = None
    if not dry:
        big = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
        dst = torch.empty_like(big)
        copy_gbs = 2 * big.numel() / (time_ms(lambda: dst.copy_(big), dry)[0] * 1e-3) / 1e9
    for dname in args.dtype.split(","):
        dtype = getattr(torch, dname)
        for name, (B, H, NQ, NK, D) in (DRY_SHAPES if dry else SHAPES).items():
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, H, NQ, D, device=device, dtype=dtype, generator=g, requires_grad=True)
            k = torch.randn(B, H, NK, D, device=device, dtype=dtype, generator=g, requires_grad=True)
            v = torch.randn(B, H, NK, D, device=device, dtype=dtype, generator=g, requires_grad=True)
            do = torch.randn(B, H, NQ, D, device=device, dtype=dtype, generator=g)
            flops = 4.0 * B * H * NQ * NK * D
            row = {"dtype": dname, "shape": name, "B": B, "H": H, "N_q": NQ, "N_k": NK, "d": D}
            with torch.no_grad():                        # checked on the first queries: the fp32 math backend
                qs = q[:, :, :CHECK_QUERIES]                # materialises N_q x N_k scores
                ref = F.scaled_dot_product_attention(qs.float(), k.float(), v.float())
                ours = attention(qs, k, v)
            row["max_abs_err_vs_fp32_math"] = float((ours.float() - ref).abs().max())
            with torch.no_grad():                        # the forward alone: no autograd graph recorded
                fwd = time_ms(lambda: attention(q, k, v), dry)
            row["ours_fwd_ms"] = fwd
            row["ours_fwd_TFLOPs"] = flops / (fwd[0] * 1e-3) / 1e12

            def fwd_bwd():
                out = attention(q, k, v)
                out.backward(do)
            fb = time_ms(fwd_bwd, dry, rep=50)
            row["ours_fwdbwd_ms"] = fb
            row["ours_fwdbwd_TFLOPs"] = 3.5 * flops / (fb[0] * 1e-3) / 1e12
            for backend in BACKENDS:
                if dry or sdpa is None:
                    continue
                try:
                    with sdpa(getattr(SDPBackend, backend)):
                        t = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), dry)

                        def sdpa_fb():
                            F.scaled_dot_product_attention(q, k, v).backward(do)
                        tb = time_ms(sdpa_fb, dry, rep=50)
                    row[f"{backend}_fwd_ms"], row[f"{backend}_fwdbwd_ms"] = t, tb
                    row[f"speedup_fwd_vs_{backend}"] = t[0] / fwd[0]
                    row[f"speedup_fwdbwd_vs_{backend}"] = tb[0] / fb[0]
                except Exception as exc:          # a backend that does not support this shape / dtype
                    row[f"{backend}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            if copy_gbs and name in LATENCY_BOUND:
                elt = q.element_size()
                n_bytes = elt * (2 * B * H * NQ * D + 2 * B * H * NK * D)
                row["byte_floor_us"] = n_bytes / (copy_gbs * 1e9) * 1e6
            rows.append(row)
            print(f"{dname:9s} {name:24s} ours fwd {fwd[0] * 1e3:9.1f} us {row['ours_fwd_TFLOPs']:6.1f} TFLOP/s",
                  flush=True)
    env = env_block()
    env["mode"] = "dry-run (interpreter; not performance numbers)" if dry else "cuda"
    env["copy_GBps"] = copy_gbs
    doc = {"schema": SCHEMA, "benchmark": "attention", "env": env, "rows": rows}
    md = ["# attention — " + env["device"] + (" (DRY RUN: not performance numbers)" if dry else ""), "",
          "| dtype | shape | ours fwd (us) | TFLOP/s | x cuDNN | x flash | x efficient | fwd+bwd x cuDNN | "
          "x flash | byte floor (us) | max err |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else "n/a"
    for r in rows:
        md.append(f"| {r['dtype']} | {r['shape']} | {r['ours_fwd_ms'][0] * 1e3:.1f} | {r['ours_fwd_TFLOPs']:.1f} | "
                  f"{ratio(r, 'speedup_fwd_vs_CUDNN_ATTENTION')} | {ratio(r, 'speedup_fwd_vs_FLASH_ATTENTION')} | "
                  f"{ratio(r, 'speedup_fwd_vs_EFFICIENT_ATTENTION')} | "
                  f"{ratio(r, 'speedup_fwdbwd_vs_CUDNN_ATTENTION')} | {ratio(r, 'speedup_fwdbwd_vs_FLASH_ATTENTION')} | "
                  f"{r.get('byte_floor_us', float('nan')):.2f} | {r['max_abs_err_vs_fp32_math']:.2e} |")
    for path in write_results("attention", doc, "\n".join(md) + "\n", args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
