"""Philox4x32-10 counter-based RNG, reproducing Triton's ``tl.randint4x`` / ``tl.rand`` / ``tl.randn`` bit for bit.

A fused GPU kernel that draws its noise in-kernel from (seed, offset) can be replayed exactly on the CPU.
``numpy.random.Philox`` is the 4x64 variant — a different generator — and is not used.

Triton's mapping (triton/language/random.py, checked against Triton 3.4-3.8):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (offset & 0xffffffff, offset >> 32, 0, 0)      (int64 offsets; an int32 offset has hi = 0)
    uniform = float32(x') * float32(4.6566127342e-10),  x' = x if x >= 0 else -x - 1 for x = int32(c0)
    normal  = sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)      (Box-Muller on the first two words, float32)

Salmon et al. (2011), "Parallel random numbers: as easy as 1, 2, 3" define Philox; their known-answer
vectors are checked in the tests.
"""

from __future__ import annotations

import numpy as np

__all__ = ["philox4x32", "philox_randint4x", "philox_uniform", "philox_normal", "ALGORITHM"]

ALGORITHM = "philox4x32-10 (triton tl.rand / tl.randn)"
PHILOX_KEY_A = np.uint32(0x9E3779B9)
PHILOX_KEY_B = np.uint32(0xBB67AE85)
PHILOX_ROUND_A = np.uint64(0xD2511F53)
PHILOX_ROUND_B = np.uint64(0xCD9E8D57)
N_ROUNDS = 10
MASK32 = np.uint64(0xFFFFFFFF)
# Triton's int -> [0, 1) scale: the largest float32 s with (2^31 - 1) * s < 1 after rounding.
UNIFORM_SCALE = np.float32(4.6566127342e-10)
BOX_MULLER_U1_MIN = np.float32(1.0e-7)
TWO_PI = np.float32(6.283185307179586)
SEED_LIMIT = 2 ** 63          # Triton takes the seed as a signed 64-bit kernel argument


def _mulhilo(a: np.uint64, b: np.ndarray):
    p = a * b.astype(np.uint64)
    return (p >> np.uint64(32)).astype(np.uint32), (p & MASK32).astype(np.uint32)


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = N_ROUNDS):
    """n_rounds of Philox4x32 on counter words (c0..c3) with key (k0, k1); uint32 arrays in and out."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in (c0, c1, c2, c3))
    k0 = np.asarray(k0, dtype=np.uint32)
    k1 = np.asarray(k1, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for _ in range(n_rounds):
            hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
            hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
            k0 = k0 + PHILOX_KEY_A
            k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


def _seed_offsets(seed, offsets):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    off = np.asarray(offsets)
    if off.dtype == object or not (off.size == 0 or np.issubdtype(off.dtype, np.integer)):
        raise ValueError(f"offsets must be integers, got dtype {off.dtype}")
    if off.size and np.issubdtype(off.dtype, np.signedinteger) and off.min() < 0:
        raise ValueError("offsets must be non-negative")
    return int(seed), off.astype(np.uint64)


def philox_randint4x(seed: int, offsets):
    """Four uint32 words per offset, as ``tl.randint4x(seed, offsets)`` with int64 offsets."""
    seed, off = _seed_offsets(seed, offsets)
    zero = np.zeros(off.shape, np.uint32)
    return philox4x32((off & MASK32).astype(np.uint32), (off >> np.uint64(32)).astype(np.uint32), zero, zero,
                      np.full(off.shape, seed & 0xFFFFFFFF, np.uint32), np.full(off.shape, seed >> 32, np.uint32))


def _to_uniform(word: np.ndarray) -> np.ndarray:
    x = word.view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * UNIFORM_SCALE


def philox_uniform(seed: int, offsets) -> np.ndarray:
    """float32 uniforms in [0, 1), bit-identical to ``tl.rand(seed, offsets)``."""
    return _to_uniform(philox_randint4x(seed, offsets)[0])


def philox_normal(seed: int, offsets) -> np.ndarray:
    """float32 standard normals as ``tl.randn(seed, offsets)`` (Box-Muller on words 0 and 1).

    Identical under Triton's interpreter; a GPU's log / cos may differ by a few ulp.
    """
    w = philox_randint4x(seed, offsets)
    u1 = np.maximum(BOX_MULLER_U1_MIN, _to_uniform(w[0]))
    u2 = _to_uniform(w[1])
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(TWO_PI * u2)
