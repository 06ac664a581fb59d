"""The noise multiplier a target epsilon needs, from a run's (or a dry run's) own ledger.

Which devices are available and sampled, and so every round's q_r and the ledger's shape, does not
depend on the noise: the model never decides who checks in or is drawn (the sampler's randomness
is keyed by seed and round, the fleet's by its schedules). So one run, or one dry run
(`fleet-plan`), is the plan for every z: scale each entry's noise multiplier by z / the run's z
and recompute with the mechanism's own accountant, as a run with that z would (its own PLD
interval). A search over z then gives the smallest that meets a target.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.config import Config


def ledger_epsilon(
    cls: Any, cfg: Config, population: int, releases: list, kind: str, delta: float, z: float
) -> float:
    """Epsilon of the run's released rounds had its noise multiplier been z."""
    z0 = cfg.privacy.noise_multiplier
    scaled = [dataclasses.replace(e, noise_multiplier=e.noise_multiplier * z / z0) for e in releases]
    interval = cls.interval(cfg, population, scaled[0].noise_multiplier, delta)
    return cls.recompute(cfg, scaled, kind, delta, interval)


def smallest_z(eps: Any, target: float, start: float, rtol: float = 1e-4) -> float:
    """The smallest z (to `rtol`, rounded up) with eps(z) <= target, eps falling as z grows."""
    if not target > 0:
        raise ValueError(f"target epsilon must be > 0 (got {target})")
    lo = hi = start
    while eps(lo) <= target and lo > 1e-4:
        lo /= 2
    while eps(hi) > target:
        hi *= 2
        if hi > 1e5:
            raise ValueError(f"no noise multiplier up to 1e5 meets epsilon {target:g}")
    while hi - lo > rtol * hi:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def noise_for_ledger(
    cls: Any, cfg: Config, population: int, releases: list, kind: str, delta: float, target: float
) -> float:
    """The smallest z whose ledger, the same released rounds, recomputes to at most `target`."""
    if cfg.privacy.noise_multiplier <= 0:
        raise ValueError("the run had no noise: its ledger cannot be rescaled")

    def eps(z: float) -> float:
        return ledger_epsilon(cls, cfg, population, releases, kind, delta, z)

    return smallest_z(eps, target, cfg.privacy.noise_multiplier)
