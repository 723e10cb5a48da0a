"""Probe kernels for the tests (a @triton.jit body must live in a file): the index arithmetic of the real kernels,
run at offsets past 2^31 without allocating 2^31 elements."""

import triton
import triton.language as tl

from kernels.flash_attention import _head_offset
from kernels._jit import offset as _offset


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


@triton.jit
def head_offset_probe_kernel(out_ptr, H, s_b, s_h, s_n, n0, BLOCK: tl.constexpr):
    """The attention kernel's offsets: head base for program (., bh) plus query rows n0 + arange, in int64."""
    bh = tl.program_id(1).to(tl.int64)
    rows = n0 + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + bh * BLOCK + tl.arange(0, BLOCK), _head_offset(bh, H, s_b, s_h) + rows * s_n)
