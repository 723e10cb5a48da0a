"""The kernel error rule (README, "Tests and tolerances"), shared by the tests, ``refdiff check kernels`` and the report.

|kernel - ref64| <= factor |naive same-dtype - ref64| + 2 ulp(storage dtype at the output's scale) + extra, on
tensor maxima as FlashAttention's tests do. Takes torch tensors (imported lazily) and float64 references.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KERNEL_RULE_FACTOR", "KERNEL_FLOOR_ULPS", "EPS32", "dtype_ulp", "kernel_rule_violation"]

KERNEL_RULE_FACTOR = 2.0      # 2x the naive error for outputs; 3x for gradients
KERNEL_FLOOR_ULPS = 2
EPS32 = float(np.finfo(np.float32).eps)


def dtype_ulp(values, torch_dtype):
    """Spacing of the storage dtype at |values|: 2^floor(log2 |v|) eps_dtype, |v| clamped to the smallest normal."""
    import torch

    fi = torch.finfo(torch_dtype)
    mag = np.maximum(np.abs(values), fi.tiny)
    return np.exp2(np.floor(np.log2(mag))) * fi.eps


def kernel_rule_violation(kernel, naive, ref64, torch_dtype, factor: float = KERNEL_RULE_FACTOR,
                          floor_scale: float | None = None, extra_floor: float = 0.0) -> float:
    """max|kernel - ref| / (factor max|naive - ref| + 2 ulp(scale) + extra_floor); <= 1 means the rule holds.

    The rule is on tensor maxima (elementwise, a baseline exact by luck at one element would fail an equally
    accurate kernel). NaN in the kernel output where the reference is finite is a violation. ``floor_scale`` sets the
    magnitude of the 2-ulp floor when the result cancels larger terms (gradients); ``extra_floor`` adds an absolute
    term for errors inherited from the kernel's fp32 intermediates (attention logits)."""
    k = kernel.detach().double().cpu().numpy()
    n = naive.detach().double().cpu().numpy()
    if k.size == 0:
        return 0.0
    if np.any(np.isnan(k) & np.isfinite(ref64)):
        return float("inf")
    scale = float(np.max(np.abs(ref64))) if floor_scale is None else float(floor_scale)
    bound = (factor * np.max(np.abs(n - ref64)) + KERNEL_FLOOR_ULPS * float(dtype_ulp(scale, torch_dtype))
             + extra_floor)
    return float(np.max(np.abs(k - ref64)) / bound)
