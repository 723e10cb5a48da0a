"""refdiff.rng: Philox4x32-10 known answers, and bit-exact agreement with Triton's own tl.rand / tl.randn."""

import numpy as np
import pytest

from refdiff import rng
from refdiff import selfcheck as C
from bad_inputs import bad, refused
from tolerances import z_bound

SEEDS = [0, 1, 12345, 2 ** 31 + 3, 2 ** 32 + 7, 2 ** 62 + 11]
OFFSETS = np.array([0, 1, 2, 3, 97, 1000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 2 ** 40 + 3,
                    2 ** 62 + 7], dtype=np.int64)
NORMAL_MAX_ULP = 2     # Box-Muller through log / cos: exact in the interpreter, a few ulp on a GPU

# tl.rand(seed=1234, offsets) recorded from Triton 3.6 under its interpreter: float32 bit patterns.
# A change in Triton's Philox constants or int -> float conversion breaks this pin.
PINNED_SEED = 1234
PINNED_OFFSETS = np.array([0, 1, 2 ** 32 + 1], dtype=np.int64)
PINNED_BITS = np.array([0x3E8242CC, 0x3F422243, 0x3F7D9B0A], dtype=np.uint32)


def test_philox_known_answer_vectors():
    assert C.philox_kat_mismatches() == 0


def test_uniform_range_and_moments():
    u = rng.philox_uniform(7, np.arange(200_000))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    n = u.size
    assert abs(u.mean() - 0.5) <= z_bound() * np.sqrt(1 / 12 / n)


def test_normal_moments():
    z = rng.philox_normal(7, np.arange(200_000))
    n = z.size
    assert abs(z.mean()) <= z_bound(2) / np.sqrt(n)
    assert abs(z.var() - 1.0) <= z_bound(2) * np.sqrt(2 / n)


def test_offsets_select_counters_independently_of_batching():
    a = rng.philox_uniform(3, np.arange(10))
    b = np.concatenate([rng.philox_uniform(3, np.arange(5)), rng.philox_uniform(3, np.arange(5, 10))])
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    assert rng.philox_uniform(3, np.zeros((0,), np.int64)).shape == (0,)


BAD = [
    bad(lambda: rng.philox_uniform(-1, [0]), ValueError, "seed", "negative-seed"),
    bad(lambda: rng.philox_uniform(2 ** 63, [0]), ValueError, "seed", "seed-past-2^63"),
    bad(lambda: rng.philox_uniform(0.5, [0]), ValueError, "seed", "float-seed"),
    bad(lambda: rng.philox_uniform(0, [-1]), ValueError, "non-negative", "negative-offset"),
    bad(lambda: rng.philox_uniform(0, [0.5]), ValueError, "integers", "float-offset"),
    bad(lambda: rng.philox_normal(0, [2 ** 64]), ValueError, "integers", "offset-past-2^64"),
]

@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input(call, error, match):
    refused(call, error, match)


def test_any_offset_shape_and_the_empty_draw():
    assert rng.philox_uniform(0, np.zeros((2, 3), dtype=np.int64)).shape == (2, 3)
    assert rng.philox_normal(0, []).shape == (0,)


triton_probe = pytest.importorskip("kernels.rng_probe", reason="needs torch and triton (the kernels extra)")


@pytest.fixture(scope="module")
def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_triton_bit_for_bit(seed, device):
    res = C.rng_vs_triton([seed], OFFSETS, device)
    assert res["uniform_mismatches"] == 0
    assert res["word_mismatches"] == 0
    assert res["normal_max_ulp"] <= NORMAL_MAX_ULP


def test_pinned_triton_uniforms(device):
    u, _, _ = triton_probe.triton_rand(PINNED_SEED, PINNED_OFFSETS, device)
    ours = rng.philox_uniform(PINNED_SEED, PINNED_OFFSETS)
    np.testing.assert_array_equal(u.view(np.uint32), ours.view(np.uint32))
    np.testing.assert_array_equal(ours.view(np.uint32), PINNED_BITS)
