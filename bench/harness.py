"""Timing and reporting shared by the benchmarks.

On CUDA: triton.testing.do_bench medians with 20th / 80th percentiles (ms). Without CUDA (``--dry-run``) a
perf_counter median of a few calls under the interpreter: that checks the script end to end and is never a
performance number (results are labelled ``dry-run``). Nothing runs at import.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

from refdiff._io import check_output_dir, write_text

QUANTILES = (0.5, 0.2, 0.8)
SCHEMA = "refdiff.bench/1"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu-interpreter"


def time_ms(fn, dry_run: bool, warmup: int = 25, rep: int = 100):
    """(median, p20, p80) milliseconds of fn()."""
    if not dry_run:
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return float(med), float(lo), float(hi)
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


def env_block() -> dict:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": device_name()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def write_results(name: str, doc: dict, markdown: str, out_dir) -> list:
    out = check_output_dir(out_dir)
    stem = f"{name}-{doc['env']['device'].replace(' ', '_')}"
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_text(paths[0], json.dumps(doc, indent=2, default=float))
    write_text(paths[1], markdown)
    return paths
