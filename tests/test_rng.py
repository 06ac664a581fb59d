"""Keyed randomness: the scalar path equals the vectorised one; streams and keys are independent."""

from __future__ import annotations

import numpy as np

from fleet import rng


def test_hash_one_equals_hash64():
    ids = np.array([0, 1, 5, 2**62 + 7, -5], dtype=np.int64)
    for seed, stream, counter in [(0, "x", 3), (2**40, "synthetic_data", 0), (7, 12345, 987654321)]:
        vec = rng.hash64(seed, stream, counter, ids)
        assert [rng.hash_one(seed, stream, counter, int(d)) for d in ids] == [int(v) for v in vec]


def test_uniform_depends_on_every_part_of_the_key():
    ids = np.arange(10_000)
    base = rng.uniform(1, "a", 2, ids)
    assert abs(base.mean() - 0.5) < 0.01
    for other in (rng.uniform(2, "a", 2, ids), rng.uniform(1, "b", 2, ids), rng.uniform(1, "a", 3, ids)):
        assert abs(np.corrcoef(base, other)[0, 1]) < 0.05
    np.testing.assert_array_equal(rng.uniform(1, "a", 2, ids[5000:]), base[5000:])  # no dependence on range
