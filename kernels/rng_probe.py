"""Triton's own ``tl.rand`` / ``tl.randn`` / ``tl.randint4x`` exposed for verification of ``refdiff.rng``.

Used by the tests and by ``refdiff report``: the numbers come from Triton itself (interpreter on CPU, the
compiled kernel on CUDA), so a change in Triton's Philox constants or float conversion is caught.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._launch import check_device

__all__ = ["triton_rand"]

BLOCK = 128


@triton.jit
def _rand_probe_kernel(
    offsets_ptr,      # int64 offsets, one per output element
    uniform_ptr,      # float32 out: tl.rand(seed, offset)
    normal_ptr,       # float32 out: tl.randn(seed, offset)
    words_ptr,        # int32 out, 4 per element: tl.randint4x(seed, offset)
    n,                # number of offsets
    seed,             # Philox seed (64-bit kernel argument)
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = tl.load(offsets_ptr + idx, mask=mask, other=0)
    tl.store(uniform_ptr + idx, tl.rand(seed, off), mask=mask)
    tl.store(normal_ptr + idx, tl.randn(seed, off), mask=mask)
    w0, w1, w2, w3 = tl.randint4x(seed, off)
    tl.store(words_ptr + 4 * idx + 0, w0, mask=mask)
    tl.store(words_ptr + 4 * idx + 1, w1, mask=mask)
    tl.store(words_ptr + 4 * idx + 2, w2, mask=mask)
    tl.store(words_ptr + 4 * idx + 3, w3, mask=mask)


def triton_rand(seed: int, offsets, device: str = "cpu"):
    """Run Triton's generator at int64 ``offsets``: (uniform float32, normal float32, words uint32 (n, 4))."""
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must lie in [0, 2^63), got {seed}")
    off = torch.as_tensor(np.asarray(offsets, dtype=np.int64), device=device).reshape(-1)
    n = off.numel()
    uniform = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    normal = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    words = torch.zeros((n, 4), dtype=torch.int32, device=device)
    check_device(off, uniform, normal, words)
    if n:
        _rand_probe_kernel[(triton.cdiv(n, BLOCK),)](off, uniform, normal, words, n, int(seed), BLOCK=BLOCK)
    return uniform.cpu().numpy(), normal.cpu().numpy(), words.cpu().numpy().view(np.uint32)
