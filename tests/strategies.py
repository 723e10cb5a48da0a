"""hypothesis strategies bounded to the mathematical domain (README, "Tests and tolerances")."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# Continuous time inside (0, 1), normal floats only (subnormal t carries fewer than 53 significant bits).
times = st.floats(min_value=1e-300, max_value=1.0, exclude_max=True, allow_subnormal=False)

# A VP noise level (alpha, sigma) with alpha^2 + sigma^2 = 1, alpha and sigma both away from 0.
angles = st.floats(min_value=1e-3, max_value=np.pi / 2 - 1e-3)
vp_levels = angles.map(lambda a: (float(np.cos(a)), float(np.sin(a))))

# General positive (alpha, sigma), for non-VP families (VE, EDM, flow).
positive = st.floats(min_value=1e-3, max_value=1e3)
levels = st.tuples(positive, positive)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False)


def batches(max_b=5, max_d=6):
    """Arrays (B, D) of finite values."""
    shapes = st.tuples(st.integers(1, max_b), st.integers(1, max_d))
    return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=finite))


@st.composite
def spd_matrices(draw, d):
    """A symmetric positive-definite d x d matrix with condition number <= ~1e4."""
    a = draw(hnp.arrays(np.float64, (d, d), elements=st.floats(-2, 2)))
    return a @ a.T + 1e-2 * np.eye(d) * (1.0 + np.abs(a).max() ** 2)
