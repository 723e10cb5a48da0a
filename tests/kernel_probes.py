"""Probe kernels for the tests (a @triton.jit body must live in a file): the index arithmetic of the real kernels,
run at offsets past 2^31 without allocating 2^31 elements."""

import triton
import triton.language as tl

from kernels.sampler_step import _offset


@triton.jit
def offset_probe_kernel(
    out_ptr,          # int64 out: (n_rows, BLOCK) memory offsets the real kernels would use
    stride_b,         # batch stride (large: row * stride_b passes 2^31)
    j0,               # first in-row logical index (large: j passes 2^31)
    n2, n3, s1, s2, s3,
    CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    j = j0 + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    off = row * stride_b + _offset(j, n2, n3, s1, s2, s3, CONTIG)
    tl.store(out_ptr + row * BLOCK + tl.arange(0, BLOCK), off)
