"""Gaussian noise for the released sum: seeded in reproducible mode, OS CSPRNG in secure mode."""

from __future__ import annotations

import os

import numpy as np

from fleet import rng


def _secure_normal(n: int) -> np.ndarray:
    """n standard normals from os.urandom (Box-Muller on 53-bit uniforms)."""
    m = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return z[:n]


class NoiseSource:
    """Standard normal vectors, one call per released quantity per round."""

    def __init__(self, mode: str, seed: int):
        self.mode = mode
        self.seed = seed

    def normal(self, round_idx: int, stream: str, n: int) -> np.ndarray:
        if self.mode == "secure":
            return _secure_normal(n)
        key = int(rng.hash64(self.seed, stream, round_idx, np.zeros(1, dtype=np.int64))[0])
        return np.random.Generator(np.random.PCG64(key)).standard_normal(n)
