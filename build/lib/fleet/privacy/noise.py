"""The one place DP noise is drawn: seeded numpy normals in reproducible mode, OpenDP's discrete
Gaussian in secure mode.

Why secure mode does not sample floats itself. A textbook sampler (Box-Muller on 53-bit uniforms,
numpy's normals) returns floats whose set of reachable values depends on the input: adding them to
a float sum leaves holes and a truncated tail that reveal the input (Mironov 2012; Jin et al. 2022),
whatever the epsilon says. OpenDP's `make_gaussian` on a float vector instead rounds each input
coordinate to the nearest multiple of 2^k, adds an exact discrete Gaussian on that lattice (the
Canonne-Kamath-Steinke sampler, rational arithmetic, entropy from the OS), and only then converts
the lattice point to the nearest float. Its privacy map (zero-concentrated DP) is proven for the
released lattice point, and the float conversion is a fixed function of that point (it never sees
the input again), so it is post-processing and costs no privacy. The price of the rounding is a
slightly larger sensitivity, which `accounted_sensitivity` reads off OpenDP's own map.

The lattice is chosen relative to the noise: 2^k <= std * 2^-40, i.e. at least 2^40 lattice steps a
standard deviation. The rounding slack is then about sqrt(n) * std * 2^-40 (1e-9 std for 1.5M
coordinates) and the discrete Gaussian is, to measurement, the continuous one (tests/test_noise.py
measures the gap between their privacy curves and how it shrinks with the number of steps).
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fleet import rng

MODES = ("reproducible", "secure")

LATTICE_BITS = 40
"""Secure mode's lattice step is 2^k with k = floor(log2(std)) - LATTICE_BITS: 2^40 to 2^41 steps
a standard deviation. Finer costs nothing measurable (OpenDP's sampler time barely depends on k)."""

MAX_CHUNK = 1 << 16
"""Coordinates per OpenDP call in secure mode: small enough to balance the thread pool on a
1.5M-parameter model, large enough that the per-call overhead is nil."""


def lattice_exponent(std: float) -> int:
    """k such that the lattice step 2^k lies in (std * 2^-41, std * 2^-40]."""
    _, e = math.frexp(std)  # std = f * 2^e with 0.5 <= f < 1, so floor(log2(std)) = e - 1
    return e - 1 - LATTICE_BITS


@functools.lru_cache(maxsize=32)
def _measurement(size: int, std: float, k: int):
    """OpenDP's Gaussian measurement on float vectors of `size` coordinates (cached: building one
    checks its arguments in Rust; a round reuses at most two sizes)."""
    import opendp.prelude as dp

    # OpenDP 0.16 gates make_gaussian behind "contrib" (its proof has not finished OpenDP's vetting
    # process); it does not need "floating-point", the opt-in for float-attackable components.
    dp.enable_features("contrib")
    domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size)
    return dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=std, k=k)


def chunks(n: int, threads: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds secure mode splits n coordinates into: at most MAX_CHUNK each, and at least
    one per thread when n allows, so every thread has work; at most two distinct sizes."""
    if n <= 0:
        return []
    size = min(MAX_CHUNK, -(-n // max(1, threads)))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


class NoiseSource:
    """Gaussian noise for released quantities, one call per released quantity per round.

    reproducible: keyed PCG64 normals, so a run can be replayed and a test can subtract the noise;
    no guarantee (the seed is in the config). secure: OpenDP's discrete Gaussian with OS entropy;
    numpy's generators are never touched.
    """

    def __init__(self, mode: str, seed: int, *, threads: int | None = None):
        if mode not in MODES:
            raise ValueError(f"noise mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.seed = seed
        self.threads = max(1, threads or os.cpu_count() or 1)

    def add(self, x: np.ndarray, std: float, round_idx: int, stream: str) -> np.ndarray:
        """x + Gaussian noise of standard deviation `std` per coordinate, as released (float64).

        Secure mode returns, per coordinate, the nearest float to round(x / 2^k) * 2^k + 2^k * Z
        with Z an exact discrete Gaussian of scale std / 2^k (k from `lattice_exponent`); that
        lattice point is what OpenDP's privacy map covers, and its conversion to float is
        post-processing. Non-finite input is refused there (OpenDP would silently clamp or replace
        it). `round_idx` and `stream` only key the reproducible draws."""
        std = float(std)
        if not (math.isfinite(std) and std >= 0.0):
            raise ValueError(f"noise std must be finite and >= 0, got {std}")
        x = np.asarray(x, dtype=np.float64)
        if std == 0.0:
            return x.copy()
        if self.mode == "reproducible":
            # exactly the old callers' `total + std * normal(...)`, bit for bit
            return x + std * self.normal(round_idx, stream, x.size).reshape(x.shape)
        if not np.isfinite(x).all():
            raise ValueError(
                f"secure noise refuses non-finite input ({int((~np.isfinite(x)).sum())} of {x.size} "
                f"coordinates of {stream!r} in round {round_idx} are nan or inf)"
            )
        return self._opendp(x.ravel(), std).reshape(x.shape)

    def _opendp(self, x: np.ndarray, std: float) -> np.ndarray:
        """OpenDP's Gaussian on x, in chunks on a thread pool.

        Chunking gives the same law as one call on the whole vector: the mechanism adds independent
        noise to each coordinate (a product of n one-dimensional mechanisms), so splitting the
        vector and concatenating the outputs changes nothing in the joint distribution of the
        release, and the whole-vector privacy map (`accounted_sensitivity`) applies to it. OpenDP's
        FFI releases the GIL, so the chunks run in parallel."""
        n = x.size
        k = lattice_exponent(std)
        out = np.empty(n, dtype=np.float64)
        bounds = chunks(n, self.threads)
        if not bounds:
            return out

        def run(b: tuple[int, int]) -> None:
            lo, hi = b
            part = np.ascontiguousarray(x[lo:hi])
            out[lo:hi] = np.asarray(_measurement(hi - lo, std, k)(part), dtype=np.float64)

        if len(bounds) == 1 or self.threads == 1:
            for b in bounds:
                run(b)
        else:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(bounds))) as pool:
                list(pool.map(run, bounds))  # list(): re-raise a worker's exception here
        return out

    def accounted_sensitivity(self, sensitivity: float, n: int, std: float) -> float:
        """The L2 sensitivity a release of n coordinates with this std must be accounted with, when
        its exact sensitivity is `sensitivity`: secure mode adds OpenDP's slack for rounding the
        input onto its lattice, taken from OpenDP's own privacy map (not re-derived by hand);
        reproducible returns `sensitivity` unchanged.

        OpenDP certifies rho = Delta^2 / (2 std^2) zCDP for the whole n-vector, with Delta its
        exact sensitivity plus the rounding slack (sqrt(n) * 2^k in 0.16); the sensitivity that
        certificate stands for is std * sqrt(2 rho). The chunked release has the same law as the
        whole-vector one (see `_opendp`), so this map is the one that applies; tests check it
        against the Minkowski bound over chunks, sensitivity + sqrt(n) * 2^k."""
        sensitivity = float(sensitivity)
        if not (math.isfinite(sensitivity) and sensitivity >= 0.0):
            raise ValueError(f"sensitivity must be finite and >= 0, got {sensitivity}")
        std = float(std)
        if self.mode == "reproducible" or std == 0.0 or n == 0:
            return sensitivity
        rho = _measurement(int(n), std, lattice_exponent(std)).map(sensitivity)
        d = std * math.sqrt(2.0 * rho)
        # sqrt and the product each round to nearest: step two ulps up so the figure stays an
        # upper bound on the (already upward-rounded) certificate.
        d = math.nextafter(math.nextafter(d, math.inf), math.inf)
        return max(d, sensitivity)

    def normal(self, round_idx: int, stream: str, n: int) -> np.ndarray:
        """Reproducible mode only: the keyed standard normals (so a test can subtract the noise);
        raises in secure mode, whose noise is only ever drawn inside `add`."""
        if self.mode != "reproducible":
            raise RuntimeError("NoiseSource.normal is reproducible mode only; secure noise is drawn by add()")
        key = int(rng.hash64(self.seed, stream, round_idx, np.zeros(1, dtype=np.int64))[0])
        return np.random.Generator(np.random.PCG64(key)).standard_normal(n)

    def describe(self) -> str:
        """One line for summaries: which sampler, and whether it is a guarantee."""
        if self.mode == "secure":
            return (
                f"OpenDP discrete Gaussian on a 2^k lattice, 2^k <= std * 2^-{LATTICE_BITS} "
                "(floating-point safe, OS entropy; sensitivity accounted with OpenDP's rounding slack)"
            )
        return "seeded numpy normals (reproducible, not a guarantee)"
