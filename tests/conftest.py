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

# "ci" is the default everywhere (the README's command included): derandomized, so every run of the suite tries the
# same examples, and no example database, so no earlier run's failures leak into this one. "dev" explores: random
# examples, remembered failures (HYPOTHESIS_PROFILE=dev).
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
