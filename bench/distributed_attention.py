"""Sequence-parallel attention (kernels.distributed: ring and Ulysses) against the single-device kernel: per-rank
time of the forward and of forward + backward, the bytes each rank sends (counted by kernels.distributed, not
computed from a formula), and the overlap a ring can reach: the time of one local block's attention against the
time of one k / v hop, both measured in the same run.

A ring hides its transfers when a block's compute outlasts a hop: 4 B H (N/P)^2 d flops at F FLOP/s against
2 B H (N/P) d e bytes at W bytes/s (e bytes per element), i.e. when N/P > F e / (2 W). At H100 / H200 figures
(F ~ 400-600 TFLOP/s fp16 attention, W ~ 350-450 GB/s per direction over NVLink 4) that is N/P above about
1000-1700 tokens: Flux's 4608 tokens over 2 GPUs overlaps, over 8 it is hop-bound; video sequences (32K-1M tokens)
overlap at any practical P. Ulysses sends 4 (P - 1) / P of a rank's q, k, v, out shards per forward whatever N is,
at all-to-all bandwidth. The report gives the measured threshold beside these nominal ones.

    python bench/distributed_attention.py --out bench/results               (>= 2 GPUs: one rank per GPU, NCCL)
    python bench/distributed_attention.py --dry-run --ranks 2 --out /tmp/x  (CPU: gloo + the interpreter, tiny
                                                                              shapes; checks the script, no timings)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (B, H, N, d), self-attention with the sequence sharded
SHAPES = {
    "Flux d=128 N=4608": (1, 24, 4608, 128),
    "video d=128 N=32768": (1, 24, 32768, 128),
    "video d=128 N=131072": (1, 24, 131072, 128),
}
DRY_SHAPES = {"tiny d=32 N=50": (1, 4, 50, 32)}
REPS, DRY_REPS = 10, 2


def _timed(fn, reps, device):
    """Median, min, max milliseconds of fn() on this rank, every call started together on all ranks."""
    import torch
    import torch.distributed as dist

    samples = []
    for _ in range(reps + 1):                         # the first call compiles / warms up
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples = sorted(samples[1:])
    return [statistics.median(samples), samples[0], samples[-1]]


def _rank_main(rank, P, init_file, dry, dtype_name, result_file):
    import torch
    import torch.distributed as dist

    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if dry else f"cuda:{rank}")
    if not dry:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if dry else "nccl", init_method=f"file://{init_file}", rank=rank, world_size=P)
    from kernels import attention
    from kernels import distributed as KD
    from kernels.flash_attention import attention_forward

    dtype = getattr(torch, dtype_name)
    reps = DRY_REPS if dry else REPS
    rows = []
    for name, (B, H, N, D) in (DRY_SHAPES if dry else SHAPES).items():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
        lens = KD.shard_lengths(N, P)
        start = sum(lens[:rank])
        qs, ks, vs, dos = (t[:, :, start:start + lens[rank]].contiguous().requires_grad_(t is not do)
                           for t in (q, k, v, do))
        row = {"shape": name, "dtype": dtype_name, "ranks": P, "B": B, "H": H, "N": N, "d": D}
        flops = 4.0 * B * H * N * N * D
        with torch.no_grad():
            single_out = attention(q, k, v)
            # the single-device kernel on the whole sequence, one rank at a time on its own device
            row["single_fwd_ms"] = _timed(lambda: attention(q, k, v), reps, device)
            # one ring block (the local shard against one k / v shard) and one hop of that shard
            row["block_fwd_ms"] = _timed(lambda: attention_forward(qs, ks, vs), reps, device)

            def hop():
                reqs, _ = KD._rotate(None, P, rank, (ks.detach(), vs.detach()),
                                     [(B, H, lens[(rank - 1) % P], D)] * 2, 0)
                for r in reqs:
                    r.wait()
            row["hop_ms"] = _timed(hop, reps, device)
        for fname, fn in (("ring", KD.ring_attention), ("ulysses", KD.ulysses_attention)):
            if fname == "ulysses" and H % P:
                row[f"{fname}_error"] = f"{H} heads not divisible by {P} ranks"
                continue
            with torch.no_grad():
                KD.sent_bytes(reset=True)
                out = fn(qs, ks, vs)
                row[f"{fname}_fwd_sent_bytes"] = sum(KD.sent_bytes(reset=True).values())
                row[f"{fname}_max_abs_err_vs_single"] = float(
                    (out.float() - single_out[:, :, start:start + lens[rank]].float()).abs().max())
                row[f"{fname}_fwd_ms"] = _timed(lambda: fn(qs, ks, vs), reps, device)

            def fwd_bwd():
                fn(qs, ks, vs).backward(dos)
            KD.sent_bytes(reset=True)
            fwd_bwd()
            row[f"{fname}_fwdbwd_sent_bytes"] = sum(KD.sent_bytes(reset=True).values())
            row[f"{fname}_fwdbwd_ms"] = _timed(fwd_bwd, reps, device)
        row["fwd_flops"] = flops
        rows.append(row)
        q = k = v = do = qs = ks = vs = dos = single_out = None      # free before the next shape
    gathered = [None] * P
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        torch.save(gathered, result_file)
    dist.barrier()
    dist.destroy_process_group()


def summarize(per_rank: list) -> list:
    """One row per shape: the slowest rank's medians (a step waits for it), bytes per rank, the overlap figures."""
    rows = []
    for i, first in enumerate(per_rank[0]):
        ranks = [rr[i] for rr in per_rank]
        row = {key: first[key] for key in ("shape", "dtype", "ranks", "B", "H", "N", "d")}
        for key in first:
            if key.endswith("_ms"):
                row[key] = max(r[key][0] for r in ranks)
                row[key + "_per_rank"] = [r[key] for r in ranks]
            elif key.endswith("_sent_bytes"):
                row[key + "_per_rank"] = [r[key] for r in ranks]
            elif key.endswith("_err_vs_single"):
                row[key] = max(r[key] for r in ranks)
            elif key.endswith("_error"):
                row[key] = first[key]
        P = row["ranks"]
        row["single_fwd_TFLOPs"] = first["fwd_flops"] / (row["single_fwd_ms"] * 1e-3) / 1e12
        row["ideal_fwd_ms"] = row["single_fwd_ms"] / P
        for fname in ("ring", "ulysses"):
            if f"{fname}_fwd_ms" in row:
                row[f"{fname}_fwd_efficiency"] = row["ideal_fwd_ms"] / row[f"{fname}_fwd_ms"]
        # overlap: a hop is hidden when it is shorter than a block; the measured threshold N/P above which it is
        row["hop_over_block"] = row["hop_ms"] / row["block_fwd_ms"]
        row["overlap_threshold_tokens_per_rank"] = row["N"] / P * row["hop_over_block"]
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--ranks", type=int, default=None, help="number of ranks (default: every visible GPU)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = p.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    from bench.harness import SCHEMA, env_block, write_results
    from refdiff._io import check_output_dir

    check_output_dir(args.out)
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    P = args.ranks or (2 if args.dry_run else n_gpu)
    if P < 2:
        print("need at least 2 ranks (2 GPUs, or --dry-run --ranks 2 on the CPU)", file=sys.stderr)
        return 3
    if not args.dry_run and P > n_gpu:
        print(f"{P} ranks need {P} GPUs, {n_gpu} visible: use --dry-run to exercise the script", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "ranks.pt")
        mp.start_processes(_rank_main, args=(P, os.path.join(tmp, "store"), args.dry_run, args.dtype, result),
                           nprocs=P, join=True, start_method="spawn")
        per_rank = torch.load(result)
    rows = summarize(per_rank)
    env = env_block()
    env["mode"] = ("dry-run (gloo + interpreter; not performance numbers)" if args.dry_run
                   else f"cuda, NCCL, {P} GPUs")
    env["ranks"] = P
    doc = {"schema": SCHEMA, "benchmark": "distributed_attention", "env": env, "rows": rows}
    md = [f"# sequence-parallel attention — {P} x {env['device']}"
          + (" (DRY RUN: not performance numbers)" if args.dry_run else ""), "",
          "Times: the slowest rank's median (ms). Ideal: single-device time / P. Sent: bytes per rank.", "",
          "| shape | single fwd | TFLOP/s | ring fwd | eff. | ulysses fwd | eff. | ring fwd+bwd | ulysses fwd+bwd | "
          "ring sent fwd (MB) | ulysses sent fwd (MB) | hop / block | overlap from N/P = | max err |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(r, key, fmt="{:.3f}"):
        return fmt.format(r[key]) if key in r else "n/a"

    def mb(r, key):
        return f"{max(r[key + '_per_rank']) / 1e6:.2f}" if key + "_per_rank" in r else "n/a"
    for r in rows:
        err = max(r.get("ring_max_abs_err_vs_single", 0.0), r.get("ulysses_max_abs_err_vs_single", 0.0))
        md.append(f"| {r['shape']} | {f(r, 'single_fwd_ms')} | {f(r, 'single_fwd_TFLOPs', '{:.1f}')} | "
                  f"{f(r, 'ring_fwd_ms')} | {f(r, 'ring_fwd_efficiency', '{:.2f}')} | {f(r, 'ulysses_fwd_ms')} | "
                  f"{f(r, 'ulysses_fwd_efficiency', '{:.2f}')} | {f(r, 'ring_fwdbwd_ms')} | "
                  f"{f(r, 'ulysses_fwdbwd_ms')} | {mb(r, 'ring_fwd_sent_bytes')} | "
                  f"{mb(r, 'ulysses_fwd_sent_bytes')} | {f(r, 'hop_over_block', '{:.2f}')} | "
                  f"{f(r, 'overlap_threshold_tokens_per_rank', '{:.0f}')} | {err:.2e} |")
    for path in write_results("distributed_attention", doc, "\n".join(md) + "\n", args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
