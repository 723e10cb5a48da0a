"""Triton device helpers shared by the elementwise kernels (fused step, noising): index arithmetic on the logical
(B, n1, n2, n3) row layout that ``kernels._launch.row_layout`` computes."""

import triton
import triton.language as tl

__all__ = ["offset"]


@triton.jit
def offset(j, n2, n3, s1, s2, s3, CONTIG: tl.constexpr):
    """Memory offset of in-row logical index j for one tensor's inner strides (int64)."""
    if CONTIG:
        return j
    i3 = j % n3
    r = j // n3
    return (r // n2) * s1 + (r % n2) * s2 + i3 * s3
