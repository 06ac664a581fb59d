"""Counter-based randomness keyed by (seed, stream, counter, device id).

Per-device randomness must not depend on which shard owns a device, nor on how many shards
there are (docs/ARCHITECTURE.md, invariant 6). A stateful generator per shard would break that; a hash of
the key does not. SplitMix64's finaliser is a good 64-bit mixer, vectorises in numpy, and costs a
few ns per device, so a 10-million-device fleet draws its per-round numbers in milliseconds.

This is for simulating the world (availability, failures, device data). Secret choices (the
cohort, DP noise) use `fleet.round.sampling` and `fleet.privacy`, which take a CSPRNG in secure mode.
"""

from __future__ import annotations

import zlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def stream_id(name: str) -> int:
    """A stable 32-bit id for a named stream ("failure", "nightly", ...)."""
    return zlib.crc32(name.encode())


def hash64(seed: int, stream: int | str, counter: int | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """64-bit hash of (seed, stream, counter, id) for every id; counter may be per id."""
    if isinstance(stream, str):
        stream = stream_id(stream)
    key = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _mix(key ^ np.uint64(stream))
    with np.errstate(over="ignore"):
        h = np.asarray(ids).astype(np.uint64)  # a fresh copy, mixed in place below
        h *= _M1
        h += _GOLDEN
        counter = np.asarray(counter).astype(np.uint64, copy=False)
        h ^= _mix(key ^ (counter * _GOLDEN))
        return _mix(h)


def uniform(seed: int, stream: int | str, counter: int | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per id, as float64 with 53 random bits."""
    h = hash64(seed, stream, counter, ids)
    h >>= np.uint64(11)
    u = h.astype(np.float64)
    u *= 1.0 / 9007199254740992.0
    return u


def normal(seed: int, stream: int | str, counter: int | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Standard normals, one per id (inverse CDF of a keyed uniform)."""
    from scipy.special import ndtri

    u = uniform(seed, stream, counter, ids)
    return ndtri(np.clip(u, 1e-300, 1.0 - 1e-16))


_MASK = 0xFFFFFFFFFFFFFFFF


def _mix_int(x: int) -> int:
    """`_mix` on one Python int: the per-device path, where numpy's per-call overhead dominates."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def hash_one(seed: int, stream: int | str, counter: int, device_id: int) -> int:
    """`hash64` of a single (seed, stream, counter, id), bit-for-bit the same, in plain Python."""
    if isinstance(stream, str):
        stream = stream_id(stream)
    key = _mix_int(_mix_int(seed & _MASK) ^ stream)
    h = ((device_id & _MASK) * 0xBF58476D1CE4E5B9 + 0x9E3779B97F4A7C15) & _MASK
    h ^= _mix_int(key ^ ((counter & _MASK) * 0x9E3779B97F4A7C15 & _MASK))
    return _mix_int(h)


def device_generator(seed: int, stream: int | str, counter: int, device_id: int) -> np.random.Generator:
    """A numpy Generator for one device's bulk randomness (its data, its minibatch order)."""
    return np.random.Generator(np.random.PCG64(hash_one(seed, stream, counter, int(device_id))))
