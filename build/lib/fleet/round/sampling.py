"""Secret uniform sampling of the cohort, by ranks.

The coordinator knows only how many devices each shard has available. It draws K distinct ranks
uniformly from [0, total) and sends each shard the ranks that fall in its range; the shard maps
rank j to its j-th available device. That is exact uniform sampling without replacement over the
whole fleet (docs/ARCHITECTURE.md, invariant 4), it is the same sample whatever the number of shards, and no
device id ever reaches the coordinator (invariant 3).

Two samplings, each accounted as what it is (`fleet.privacy.sampled`): `draw` takes exactly k
of the available devices without replacement (fixed_size); `draw_poisson` takes each available
device independently with probability q, drawn as a Binomial(total, q) cohort size and then that
many distinct ranks uniformly, which is the same law as one coin per device, with no per-device
draw and still no device id at the coordinator.

In secure mode the ranks (and the Poisson cohort size) come from the OS CSPRNG
(`random.SystemRandom`, `os.urandom`), so nobody who learns the seed, the config or the code can
reconstruct who was sampled: privacy amplification by sampling only holds if the sample is secret.
"""

from __future__ import annotations

import os
import random

import numpy as np

from fleet import rng


class Sampler:
    """Draws the round's ranks; reproducible (seeded per round) or secure (OS CSPRNG)."""

    def __init__(self, mode: str, seed: int):
        if mode not in ("reproducible", "secure"):
            raise ValueError(f"rng: unknown mode {mode!r}")
        self.mode = mode
        self.seed = seed
        self._system = random.SystemRandom() if mode == "secure" else None

    def draw(self, round_idx: int, total: int, k: int) -> np.ndarray:
        """k distinct ranks from [0, total), sorted; k is capped at total."""
        k = min(k, total)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if self._system is not None:
            ranks = np.fromiter(self._system.sample(range(total), k), dtype=np.int64, count=k)
        else:
            key = int(rng.hash64(self.seed, "cohort", round_idx, np.zeros(1, dtype=np.int64))[0])
            gen = np.random.Generator(np.random.PCG64(key))
            ranks = gen.choice(total, size=k, replace=False, shuffle=False).astype(np.int64)
        ranks.sort()
        return ranks

    def draw_poisson(self, round_idx: int, total: int, q: float) -> np.ndarray:
        """Each of `total` ranks independently with probability q, sorted."""
        if total <= 0 or q <= 0:
            return np.zeros(0, dtype=np.int64)
        if self._system is not None:
            from scipy.stats import binom

            u = (int.from_bytes(os.urandom(8), "little") >> 11) * 2.0**-53 + 2.0**-54  # (0, 1)
            k = int(min(total, binom.ppf(u, total, min(q, 1.0))))
            return self.draw(round_idx, total, k)
        key = int(rng.hash64(self.seed, "poisson_cohort", round_idx, np.zeros(1, dtype=np.int64))[0])
        gen = np.random.Generator(np.random.PCG64(key))
        k = int(gen.binomial(total, min(q, 1.0)))
        ranks = gen.choice(total, size=k, replace=False, shuffle=False).astype(np.int64)
        ranks.sort()
        return ranks


def split_ranks(ranks: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Global sorted ranks -> per-shard local ranks, using prefix sums of the shards' counts."""
    bounds = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    cuts = np.searchsorted(ranks, bounds)
    return [ranks[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(counts))]
