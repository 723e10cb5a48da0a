"""Launch policy shared by every kernel: where a kernel may run, what it accepts, and how it is laid out.

Without CUDA the kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
before any ``triton.jit`` decorator executes; tests/conftest.py and ``refdiff report`` call ``select_backend``.
This module is the only place that knows about devices, dtypes, strides and grids.
"""

from __future__ import annotations

import os

__all__ = ["interpreter_active", "check_device", "select_backend", "STORAGE_DTYPES", "check_storage",
           "check_tensors", "row_layout", "MAX_GRID_Y", "check_grid"]

MAX_GRID_Y = 65535            # CUDA's limit on grid axes 1 and 2 (axis 0 allows 2^31 - 1)
MAX_INNER_DIMS = 3            # kernels take (B, n1, n2, n3) layouts; more inner dims are collapsed or copied


def select_backend() -> str:
    """Choose where kernels run, before any kernel module is imported: 'cuda' when a GPU is present, else
    switch on Triton's interpreter (a user's own TRITON_INTERPRET setting wins) and return 'interpreter'.

    Must run before the first ``triton.jit`` executes: the interpreter is chosen at decoration time.
    """
    import torch

    if torch.cuda.is_available() and not interpreter_active():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "interpreter" if interpreter_active() else "cpu-without-interpreter"


def interpreter_active() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors) -> None:
    """All tensors on one device, and a device the kernels can use: CUDA, or CPU under the interpreter.

    Raises ValueError for mixed devices and RuntimeError for CPU tensors without the interpreter.
    """
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on the same device; got {sorted(str(d) for d in devices)}")
    (device,) = devices
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                           "kernels, move the tensors to CUDA, or use the float64 reference in refdiff")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; the kernels run on CUDA (or CPU under the interpreter)")


def check_tensors(named: dict, reference_name: str) -> dict:
    """The tensors among ``named`` that are given: each a torch tensor, all on one usable device, all with the
    reference tensor's shape and storage dtype. Returns them by name."""
    import torch

    present = {k: v for k, v in named.items() if v is not None}
    for k, v in present.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{k} must be a torch tensor, got {type(v).__name__}")
    check_device(*present.values())
    check_storage(present, reference_name)
    return present


def _dtypes():
    import torch

    return (torch.float32, torch.float16, torch.bfloat16)


STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def check_storage(named: dict, reference_name: str) -> None:
    """Every named tensor has the reference tensor's shape and dtype, and the dtype is a storage dtype the kernels
    handle (fp32 / fp16 / bf16; arithmetic is always fp32 after the load)."""
    ref = named[reference_name]
    if ref.dtype not in _dtypes():
        raise ValueError(f"{reference_name} has dtype {ref.dtype}; kernels store float32, float16 or bfloat16")
    for name, t in named.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {reference_name} has shape {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {reference_name} has dtype {ref.dtype}: mixed "
                             "storage dtypes are not supported")


def _materialise_expanded(t):
    """Expanded (stride-0) inputs would alias rows of themselves; give the kernel its own copy."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return t.contiguous()
    return t


def _merge(shape, stride_lists):
    """Merge adjacent inner dims wherever every tensor's strides chain (stride_i = stride_{i+1} size_{i+1})."""
    dims = [(n, [s[k] for s in stride_lists]) for k, n in enumerate(shape) if n != 1]
    merged = []
    for n, st in dims:
        if merged and all(ps == s * n for ps, s in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return merged


def row_layout(tensors: dict):
    """A shared logical layout (B, n1, n2, n3) and, per tensor, (view, (stride_b, s1, s2, s3)).

    All tensors must have the same shape. Inner dims are merged where every tensor allows it (no copy for
    contiguous, batch-sliced, offset or transposed views); if more than three inner dims remain, the tensors that
    are not contiguous are copied and the layout recomputed. Absent tensors (None) get zero strides.
    """
    present = {k: _materialise_expanded(t) for k, t in tensors.items() if t is not None}
    shape = tuple(next(iter(present.values())).shape)
    for _ in range(2):
        merged = _merge(shape[1:], [list(t.stride()[1:]) for t in present.values()])
        if len(merged) <= MAX_INNER_DIMS:
            break
        present = {k: t.contiguous() for k, t in present.items()}
    while len(merged) < MAX_INNER_DIMS:
        merged.insert(0, (1, [0] * len(present)))
    logical = (shape[0], *[m[0] for m in merged])
    out = {}
    for j, (k, t) in enumerate(present.items()):
        out[k] = (t, (t.stride()[0] if shape[0] > 1 else 0, *[m[1][j] for m in merged]))
    for k, t in tensors.items():
        if t is None:
            out[k] = (None, (0, 0, 0, 0))
    return logical, out


def check_grid(n_blocks: int, n_rows: int) -> None:
    """Rows go on grid axis 1 (at most 65535); blocks within a row on axis 0."""
    if n_rows > MAX_GRID_Y:
        raise ValueError(f"batch of {n_rows} rows exceeds the grid's axis-1 limit {MAX_GRID_Y}; split the batch")
    if n_blocks >= 2 ** 31:
        raise ValueError(f"{n_blocks} blocks per row exceed the grid's axis-0 limit")
