"""Test-wide setup: the Triton backend, numpy error policy, and hypothesis profiles.

The interpreter must be switched on before any ``triton.jit`` runs, so the backend is chosen here, at import,
before any test module imports a kernel. A user's own TRITON_INTERPRET setting wins.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

try:
    from kernels._launch import select_backend

    BACKEND = select_backend()
except ImportError:          # torch / triton absent: kernel tests skip themselves
    BACKEND = None

settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _numpy_errors_raise():
    """Every floating-point exception in a test is an error, except gradual underflow (benign)."""
    with np.errstate(all="raise", under="ignore"):
        yield


def pytest_collection_modifyitems(config, items):
    if BACKEND == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/run_gpu.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
