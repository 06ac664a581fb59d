"""Privacy accounting with Google's dp-accounting (RDP), fed the mechanism that actually ran.

One event per released round: a sampled Gaussian with noise multiplier z and the configured
sampling model, `poisson` (q = goal / population, the DP-FedAvg analysis) or `fixed_size`
(sampling `goal` of `population` without replacement, replace-one neighbours). Abandoned rounds
release nothing and add no event (DESIGN.md invariant 5).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: only the coordinator needs it (~70 MiB with scipy)
    import dp_accounting
    from dp_accounting import rdp

# RDP orders: dense at small orders where the optimum usually lies, sparse up to 1024.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


@dataclass(frozen=True)
class Mechanism:
    sampling: str  # poisson | fixed_size
    population: int
    goal: int
    noise_multiplier: float

    def event(self) -> dp_accounting.DpEvent:
        import dp_accounting

        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.goal / self.population, gaussian)
        if self.sampling == "fixed_size":
            return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.goal, gaussian)
        raise ValueError(f"privacy.sampling: unknown value {self.sampling!r}")

    def neighbouring(self) -> rdp.rdp_privacy_accountant.NeighborRel:
        from dp_accounting import rdp

        rel = rdp.rdp_privacy_accountant.NeighborRel
        return rel.REPLACE_ONE if self.sampling == "fixed_size" else rel.ADD_OR_REMOVE_ONE


@functools.lru_cache(maxsize=256)
def _rdp_one_round(mech: Mechanism) -> np.ndarray:
    """RDP curve of one released round, computed once by dp-accounting and cached."""
    from dp_accounting import rdp

    acc = rdp.RdpAccountant(ORDERS, mech.neighbouring())
    acc.compose(mech.event(), 1)
    return np.asarray(acc.rdp, dtype=np.float64)


def epsilon(mech: Mechanism, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` released rounds of `mech`.

    RDP composes additively, so `rounds` events cost one dp-accounting evaluation of the event,
    scaled; the conversion to (epsilon, delta) is dp-accounting's own.
    """
    if rounds <= 0:
        return 0.0
    if mech.noise_multiplier <= 0:
        return math.inf
    from dp_accounting import rdp

    eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(ORDERS, rounds * _rdp_one_round(mech), delta)
    return float(eps)


def noise_for_epsilon(
    sampling: str, population: int, goal: int, rounds: int, delta: float, target: float
) -> float:
    """Smallest noise multiplier whose epsilon after `rounds` is at most `target` (bisection)."""

    def eps(z: float) -> float:
        return epsilon(Mechanism(sampling, population, goal, z), rounds, delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError("no noise multiplier below 1e4 meets the target epsilon")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


@dataclass
class Accountant:
    """Counts released rounds of one mechanism; epsilon and the look-ahead budget check."""

    mechanism: Mechanism
    delta: float
    released: int = 0
    history: list[int] = field(default_factory=list)  # round index of every released event

    def record(self, round_idx: int) -> None:
        self.released += 1
        self.history.append(round_idx)

    def epsilon(self) -> float:
        return epsilon(self.mechanism, self.released, self.delta)

    def epsilon_after_next(self) -> float:
        return epsilon(self.mechanism, self.released + 1, self.delta)

    def state(self) -> dict:
        return {"released": self.released, "history": list(self.history)}

    def load_state(self, state: dict) -> None:
        self.released = state["released"]
        self.history = list(state["history"])
