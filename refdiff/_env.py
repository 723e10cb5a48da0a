"""What this machine is: versions, device, interpreter and TF32 state, RNG algorithm (``refdiff env``).

Optional packages (torch, triton, diffusers) are looked up only when asked, never at ``import refdiff``.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

from .rng import ALGORITHM

__all__ = ["env_info"]

OPTIONAL = ("torch", "triton", "diffusers", "mpmath", "hypothesis", "matplotlib", "tqdm")


def _version(name: str):
    try:
        return importlib.import_module(name).__version__
    except Exception:                      # not installed, or broken: report it as absent
        return None


def env_info() -> dict:
    import numpy
    import scipy

    from . import __version__

    info = {
        "refdiff": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "packages": {name: _version(name) for name in OPTIONAL},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "rng_algorithm": ALGORITHM,
        "device": "cpu",
        "cuda": None,
        "tf32": None,
    }
    if info["packages"]["torch"]:
        import torch

        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
        info["tf32"] = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                        "cudnn": bool(torch.backends.cudnn.allow_tf32)}
    return info
