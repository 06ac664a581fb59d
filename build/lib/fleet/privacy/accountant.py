"""Epsilon of the rounds released so far, by Google's dp-accounting: PLD (default) or RDP.

The accountant is fed the ledger's releases (`fleet.privacy.sampled.SampledRelease`), one per
released round, each with its own sampling probability q_r. Abandoned rounds release nothing and add
nothing (docs/ARCHITECTURE.md, invariant 5). The figure is the epsilon of a device available in every
released round, an upper bound for every device (a device not available in a round is sampled
with probability 0 there).

Rounds rarely share a q, and dp-accounting's cost is per distinct mechanism (tens to hundreds of
milliseconds for a PLD or an RDP curve), so exact mechanisms are built once, on a grid, and a
round between two grid points is accounted by an upper bound made of them:

- Poisson (`GRID_RATIO`, 4.4% apart): q = (1 - w) q_lo + w q_hi. Sampling with q is dominated
  by "flip a coin with bias w, sample with q_hi or q_lo, and publish the coin": dropping the
  coin gives back Poisson sampling with q for the device in question (the rest of the sample
  does not change the pair's worst case), and by joint convexity every hockey-stick divergence,
  hence every (epsilon, delta), of the mixture is at most that of the published-coin mechanism.
  Its privacy loss distribution is the w-mixture of the two grid points' (dp-accounting's
  `compute_mixture`), and its RDP the chord between their exp((a - 1) RDP_a). Measured excess
  over the exact mechanism: under 0.1% in epsilon (rounding q up to the grid would cost 2.4%).
- Fixed-size (RDP only): dp-accounting's bound for sampling without replacement depends on q =
  m/n alone; q is rounded UP to a fine grid (`FINE_RATIO`, 0.27%). A smaller sample is a
  post-processing of a larger one (draw m' >= m, keep a uniform m-subset), so this is an upper
  bound; the bound is also checked to grow with q on the grid (tests).

PLD composes incrementally (one mixture and one convolution per round), RDP adds curves; the
benchmark `python -m fleet.bench privacy` holds a round's update under 50 ms at round 2,000.

PLD discretisation: dp-accounting's pessimistic estimate is an upper bound whatever the interval;
its excess grows with the number of rounds and shrinks with the square of the interval over
epsilon. The interval is chosen once per run from a forecast (`pld_interval`) so the figure stays
within about 0.3% of the exact PLD epsilon (tests hold it against a 10x finer one).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.privacy.sampled import SampledRelease, event, neighbouring

# RDP orders: dense at small orders where the optimum usually lies, sparse up to 1024.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
ACCOUNTANTS = ("pld", "rdp")
GRID_RATIO = 2.0 ** (1 / 16)
FINE_RATIO = 2.0 ** (1 / 256)


def grid_below(q: float, ratio: float = GRID_RATIO) -> tuple[float, float]:
    """The two grid points q_lo <= q <= q_hi (equal when q is on the grid; q_hi <= 1)."""
    if q >= 1.0:
        return 1.0, 1.0
    k = math.floor(math.log(q) / math.log(ratio))
    while ratio**k > q:  # float rounding
        k -= 1
    while ratio ** (k + 1) <= q:
        k += 1
    lo = ratio**k
    return (lo, lo) if lo == q else (lo, min(1.0, ratio ** (k + 1)))


def round_up(q: float, ratio: float = FINE_RATIO) -> float:
    """The fine grid point at or above q."""
    lo, hi = grid_below(q, ratio)
    return hi


def pld_interval(q: float, z: float, rounds: int, delta: float) -> float:
    """PLD value-discretisation interval for a run of about `rounds` releases near q.

    Measured: the pessimistic PLD's relative excess is about 0.2 T^1.2 (interval / epsilon)^2 after
    T rounds; the interval is set for 0.3% at the forecast epsilon (a coarse PLD of T rounds at q,
    refined once when it is small). The run's q_r are at least the forecast's q (it is taken as
    cohort / population), so its epsilon is larger and its relative excess smaller.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld

    rounds = max(1, rounds)
    if z <= 0:
        return 1e-3
    interval = 1e-3
    want = interval
    for _ in range(2):
        one = pld.from_gaussian_mechanism(
            z, sampling_prob=min(q, 1.0), value_discretization_interval=interval
        )
        eps = one.self_compose(rounds).get_epsilon_for_delta(delta)
        want = eps * math.sqrt(0.003 / (0.2 * rounds**1.2))
        if not want > 0:  # epsilon 0 (a delta so large nothing is protected): any interval will do
            return 1e-2
        if want >= interval / 2:
            break
        interval = want
    return float(min(1e-2, max(1e-5, want)))


def _truncation(delta: float) -> float:
    """dp-accounting drops noise mass below e^bound from each PLD and counts it against delta;
    at most 1e-6 of delta over a million rounds."""
    return max(-50.0, math.log(1e-12 * delta))


@functools.lru_cache(maxsize=4096)
def _rdp_curve(sampling: str, q: float, z: float) -> np.ndarray:
    """RDP of one round at ORDERS (dp-accounting), cached by grid point. Near q = 1 dp-accounting
    drops fractional orders it cannot converge at (infinite RDP: looser, still valid) with a
    warning each; they are kept out of the log."""
    from dp_accounting import rdp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc = rdp.RdpAccountant(list(ORDERS), neighbouring(sampling))
        acc.compose(event(sampling, q, z), 1)
    finally:
        absl.setLevel(level)
    return np.asarray(acc.rdp, dtype=np.float64)


@functools.lru_cache(maxsize=1024)
def _pld(q: float, z: float, interval: float, delta: float) -> Any:
    """PLD of one Poisson round at a grid point (dp-accounting), cached."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(
        z,
        sampling_prob=q,
        value_discretization_interval=interval,
        log_mass_truncation_bound=_truncation(delta),
        neighboring_relation=neighbouring("poisson"),
    )


def round_rdp(r: SampledRelease) -> np.ndarray:
    """An upper bound on the round's RDP curve (see the module docstring)."""
    if r.sampling != "poisson":
        return _rdp_curve(r.sampling, round_up(r.q), r.noise_multiplier)
    lo, hi = grid_below(r.q)
    if lo == hi:
        return _rdp_curve("poisson", lo, r.noise_multiplier)
    w = (r.q - lo) / (hi - lo)
    a = np.asarray(ORDERS) - 1.0
    c_lo, c_hi = _rdp_curve("poisson", lo, r.noise_multiplier), _rdp_curve("poisson", hi, r.noise_multiplier)
    with np.errstate(divide="ignore", invalid="ignore"):
        chord = np.logaddexp(math.log1p(-w) + a * c_lo, math.log(w) + a * c_hi) / a
    return np.where(np.isinf(c_lo) | np.isinf(c_hi), np.inf, chord)


def round_pld(r: SampledRelease, interval: float, delta: float) -> Any:
    """An upper bound on the round's privacy loss distribution (Poisson only)."""
    if r.sampling != "poisson":
        raise ValueError(
            "privacy.accountant: pld cannot account fixed_size sampling: dp-accounting has no PLD "
            "for sampling without replacement under replace-one (its Poisson replace-one pair is "
            "not an upper bound for it); use privacy.accountant=rdp"
        )
    lo, hi = grid_below(r.q)
    if lo == hi:
        return _pld(lo, r.noise_multiplier, interval, delta)
    w = (r.q - lo) / (hi - lo)
    return _pld(hi, r.noise_multiplier, interval, delta).compute_mixture(
        _pld(lo, r.noise_multiplier, interval, delta), w
    )


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    from dp_accounting import rdp as rdp_lib

    if not np.any(rdp):
        return 0.0
    eps, _ = rdp_lib.rdp_privacy_accountant.compute_epsilon(ORDERS, rdp, delta)
    return float(eps)


@dataclass
class Accountant:
    """Epsilon of the recorded releases; `epsilon_with` looks one release ahead without recording.

    `interval` is the PLD discretisation (ignored by RDP); `releases` is the ledger as recorded.
    """

    kind: str  # pld | rdp
    delta: float
    interval: float = 1e-4
    releases: list[SampledRelease] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant: unknown value {self.kind!r}")
        self._state: Any = None  # running RDP curve or PLD
        self._eps = 0.0
        self._pending: tuple[SampledRelease, Any, float] | None = None
        releases, self.releases = self.releases, []
        for r in releases:
            self.record(r)

    def _with(self, r: SampledRelease) -> tuple[Any, float]:
        """(new state, epsilon) after also composing r."""
        if math.isinf(self._eps) or r.noise_multiplier <= 0:
            return None, math.inf
        if r.q <= 0:
            return self._state, self._eps
        if self.kind == "rdp":
            total = round_rdp(r) if self._state is None else self._state + round_rdp(r)
            return total, rdp_epsilon(total, self.delta)
        one = round_pld(r, self.interval, self.delta)
        total = one if self._state is None else self._state.compose(one)
        return total, float(total.get_epsilon_for_delta(self.delta))

    def epsilon(self) -> float:
        return self._eps

    def epsilon_with(self, r: SampledRelease) -> float:
        """Epsilon if `r` were released too (kept, so `record(r)` costs nothing more)."""
        state, eps = self._with(r)
        self._pending = (r, state, eps)
        return eps

    def record(self, r: SampledRelease) -> float:
        if self._pending is not None and self._pending[0] == r:
            _, state, eps = self._pending
        else:
            state, eps = self._with(r)
        self._pending = None
        self.releases.append(r)
        self._state, self._eps = state, eps
        return eps

    def snapshot(self) -> dict:
        """The running state, for a checkpoint (rebuilding it from a long ledger costs a
        composition per round)."""
        return {"releases": len(self.releases), "state": self._state, "epsilon": self._eps}

    def load(self, releases: Iterable[SampledRelease], snapshot: dict | None = None) -> None:
        """Continue from a ledger: the snapshot's state covers its first releases, the rest (rounds
        released after the checkpoint, in secure mode) are composed on top."""
        releases = list(releases)
        self._pending = None
        self.releases, self._state, self._eps = [], None, 0.0
        if snapshot is not None and snapshot["releases"] <= len(releases):
            n = snapshot["releases"]
            self.releases, self._state, self._eps = releases[:n], snapshot["state"], snapshot["epsilon"]
            releases = releases[n:]
        for r in releases:
            self.record(r)


def epsilon_of(releases: Iterable[SampledRelease], kind: str, delta: float, interval: float) -> float:
    """Epsilon of a list of releases (a run's ledger), as the run's accountant computes it."""
    return Accountant(kind, delta, interval, list(releases)).epsilon()


def nominal_epsilon(kind: str, sampling: str, q: float, z: float, rounds: int, delta: float) -> float:
    """`rounds` releases with sampling probability q each, as the run's accountant would account
    them (z is the accounted multiplier, under the sampling's relation)."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return math.inf
    one = SampledRelease(0, sampling, min(1.0, q), 0, 0, z)
    if kind == "rdp":
        return rdp_epsilon(rounds * round_rdp(one), delta)
    interval = pld_interval(q, z, rounds, delta)
    return float(round_pld(one, interval, delta).self_compose(rounds).get_epsilon_for_delta(delta))


def noise_for_epsilon(
    kind: str, sampling: str, q: float, rounds: int, delta: float, target: float, scale: float = 1.0
) -> float:
    """Smallest configured noise multiplier z whose epsilon after `rounds` releases at q is at
    most `target` (bisection to 0.1%); the accounted multiplier is z / scale (2 for fixed_size)."""

    def eps(z: float) -> float:
        return nominal_epsilon(kind, sampling, q, z / scale, rounds, delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError("no noise multiplier below 1e4 meets the target epsilon")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi
