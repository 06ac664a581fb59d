"""Buffered Linear Toeplitz (BLT) correlated noise (McMahan et al. 2024, arXiv 2408.08868): the
strategy, its sensitivity and its stream.

The mechanism is the matrix mechanism with a lower-triangular Toeplitz strategy C: the rounds'
clipped sums G (one row a round) are released as Y = C G + Z, Z ~ N(0, (zS)^2) per coordinate, and
the model is trained on G_hat = C^-1 Y = G + C^-1 Z: every round's sum plus noise correlated across
rounds so that it cancels in the prefix sums the model is made of. Y is one Gaussian release of
C G, whose squared L2 sensitivity for a device taking part at most once in any b consecutive rounds
is S^2 max_u |C u|^2 over its participation patterns u (`sensitivity_squared`); G_hat is a
post-processing of Y and costs nothing more.

What is hand-written here and what is not:

- The strategy is jax-privacy's (`matrix_factorization.buffered_toeplitz.optimize`, max-error
  loss for the run's rounds, min separation and participations), optimized once for those inputs
  and cached on disk (`strategy`): a BLT is 2 x buffers numbers.
- Its sensitivity is jax-privacy's `toeplitz.minsep_sensitivity_squared` (for Toeplitz
  coefficients that are non-negative and non-increasing, which jax-privacy's optimizer ensures for
  min-separation BLTs and which is checked again here), for the steps actually released: a numpy
  transcription of it, since jax recompiles for each length and the accountant asks every round
  (tests hold the two equal).
- The stream (`Stream`) is the BLT recurrence of jax-privacy's `StreamingMatrixBuilder`, in numpy
  on the model's flat vector: buffers b_i <- theta_i b_i + x, read out as sum_i omega_i b_i.
  jax-privacy's streaming matrix works on jax arrays; the model's sums live in numpy and the noise
  must come from the mechanism's one noise source, so the two lines are kept here (tests check the
  stream against jax-privacy's dense C and C^-1 to 1e-12).

Y is formed exactly before it is noised: y_t = (C G)_t + z_t, with (C G)_t = g_t + read(buffers of
G), and the noise source adds z_t to that exact vector (so in secure mode OpenDP's lattice sampler
sees the quantity whose sensitivity is accounted). Then g_hat_t = y_t - read(buffers of G_hat):
C^-1 applied to Y by the same recurrence (Alg. 3 of the paper). Both buffer sets are float64.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "FLEET_CACHE"


def cache_dir() -> Path:
    """Where optimized strategies are kept: $FLEET_CACHE/blt, else ~/.cache/fleet/blt."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fleet")
    return Path(root) / "blt"


def _jax():
    """jax with float64 on (jax-privacy's BLT needs it for numerical stability); imported lazily so
    that runs of other mechanisms never load it."""
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


@dataclass(frozen=True)
class Strategy:
    """A BLT C: Toeplitz coefficients c_0 = 1, c_j = sum_i omega_i theta_i^(j-1) (j >= 1)."""

    buf_decay: tuple[float, ...]
    output_scale: tuple[float, ...]

    @property
    def buffers(self) -> int:
        return len(self.buf_decay)

    def coefs(self, n: int) -> np.ndarray:
        """The first n Toeplitz coefficients of C (float64)."""
        theta, omega = np.array(self.buf_decay), np.array(self.output_scale)
        powers = np.arange(max(n - 1, 0))
        return np.concatenate([[1.0], (theta[None, :] ** powers[:, None] * omega).sum(axis=1)])[:n]

    def dense(self, n: int) -> np.ndarray:
        """C as an n x n matrix (for tests and small checks)."""
        c = self.coefs(n)
        i, j = np.indices((n, n))
        return np.where(i >= j, c[np.abs(i - j)], 0.0)

    def to_json(self) -> dict:
        return {"buf_decay": list(self.buf_decay), "output_scale": list(self.output_scale)}

    @classmethod
    def from_json(cls, d: dict) -> Strategy:
        return cls(tuple(float(x) for x in d["buf_decay"]), tuple(float(x) for x in d["output_scale"]))


def _key(rounds: int, separation: int, max_buffers: int) -> dict:
    import jax_privacy

    return {
        "rounds": int(rounds),
        "min_sep": int(max(separation, 1)),
        "max_buffers": int(max_buffers),
        "error": "max",
        "jax_privacy": getattr(jax_privacy, "__version__", "?"),
    }


def strategy(rounds: int, separation: int, max_buffers: int = 8) -> Strategy:
    """jax-privacy's BLT for `rounds` rounds, each device at most once in any `separation`
    consecutive rounds (so at most ceil(rounds / separation) times), optimized for the max error of
    the prefix sums; from the cache when these inputs were optimized before."""
    key = _key(rounds, separation, max_buffers)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{digest}.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return Strategy.from_json(saved["strategy"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is optimized again
    _jax()
    from jax_privacy.matrix_factorization import buffered_toeplitz

    log.info(
        "optimizing the BLT for %d rounds, min separation %d (jax-privacy; cached in %s)",
        rounds,
        key["min_sep"],
        path.parent,
    )
    t0 = time.perf_counter()
    blt = buffered_toeplitz.optimize(
        n=int(rounds), min_sep=key["min_sep"], max_participations=None, max_buffers=int(max_buffers)
    )
    out = Strategy(tuple(float(x) for x in blt.buf_decay), tuple(float(x) for x in blt.output_scale))
    sensitivity_squared(out, rounds, separation)  # checks the coefficients suit min-separation
    log.info("BLT: %d buffers in %.1f s", out.buffers, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent writers: each its own
    tmp.write_text(json.dumps({"key": key, "strategy": out.to_json()}, indent=1))
    os.replace(tmp, path)
    return out


@functools.lru_cache(maxsize=4096)
def sensitivity_squared(s: Strategy, steps: int, separation: int) -> float:
    """max_u |C u|^2 over the 0/1 participation vectors u of `steps` rounds whose 1s are at least
    `separation` apart (exact for Toeplitz coefficients that are non-negative and non-increasing:
    the worst pattern is then up to k participations exactly `separation` apart from the first
    step; refused otherwise).

    This is jax-privacy's `toeplitz.minsep_sensitivity_squared`, transcribed to numpy: jax compiles
    its operations anew for every length (0.27 s a call here), and the accountant asks for every
    released step count. Tests hold the two equal (`jax_sensitivity_squared`) for many lengths."""
    if steps <= 0:
        return 0.0
    b = max(int(separation), 1)
    c = s.coefs(int(steps))
    if np.any(c < 0) or np.any(np.diff(c) > 0):
        raise ValueError("a BLT's sensitivity needs non-negative, non-increasing Toeplitz coefficients")
    k = -(-int(steps) // b)  # ceil(steps / b): the participations the separation allows
    padded = np.pad(c, (0, (-len(c)) % b))
    v = padded.reshape(-1, b).cumsum(axis=0).ravel()  # row i: the sum of c over i, i - b, ...
    v[b * k :] -= v[: len(v) - b * k]  # at most k of them
    v = v[: int(steps)]
    return float(v @ v)


def jax_sensitivity_squared(s: Strategy, steps: int, separation: int) -> float:
    """jax-privacy's own min-separation sensitivity (what `sensitivity_squared` transcribes)."""
    _jax()
    from jax_privacy.matrix_factorization import toeplitz

    return float(
        toeplitz.minsep_sensitivity_squared(s.coefs(steps), min_sep=max(int(separation), 1), n=int(steps))
    )


def max_error(s: Strategy, n: int) -> float:
    """Max over rounds t <= n of the RMS noise in the prefix sum of G_hat, per unit noise std:
    sqrt(max_t |(A C^-1)_t|^2), A the prefix-sum matrix (the loss jax-privacy optimizes)."""
    inv = np.linalg.inv(s.dense(n))
    prefix = np.cumsum(inv, axis=0)
    return float(math.sqrt((prefix**2).sum(axis=1).max()))


class Stream:
    """The BLT recurrence over one segment's rounds: exact buffers of G and of G_hat (float64)."""

    def __init__(self, s: Strategy, dim: int):
        self.s = s
        self.theta = np.array(s.buf_decay)[:, None]
        self.omega = np.array(s.output_scale)
        self.exact = np.zeros((s.buffers, dim))
        self.released = np.zeros((s.buffers, dim))
        self.steps = 0

    def correlated(self, g: np.ndarray) -> np.ndarray:
        """(C G)_t for the next round's sum g: what is noised and released."""
        return g + self.omega @ self.exact

    def advance(self, g: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Take round t's exact sum g and its release y = (C G)_t + z_t; returns g_hat_t = (C^-1 Y)_t."""
        g_hat = y - self.omega @ self.released
        self.exact *= self.theta
        self.exact += g
        self.released *= self.theta
        self.released += g_hat
        self.steps += 1
        return g_hat

    def state(self) -> dict:
        return {
            "strategy": self.s.to_json(),
            "exact": self.exact,
            "released": self.released,
            "steps": self.steps,
        }

    @classmethod
    def from_state(cls, state: dict) -> Stream:
        out = cls(Strategy.from_json(state["strategy"]), state["exact"].shape[1])
        out.exact, out.released, out.steps = (
            state["exact"].copy(),
            state["released"].copy(),
            int(state["steps"]),
        )
        return out
