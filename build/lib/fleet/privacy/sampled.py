"""What one released DP-FedAvg round is, as dp-accounting sees it: sampling, neighbours, noise.

Each sampling is paired with the neighbouring relation its analysis needs, and the relation fixes
the sensitivity of what the round releases (the clipped sum, and with adaptive clipping the
centred count of unclipped updates):

- `poisson`: every available, eligible device joins the cohort independently with probability
  q_r. Neighbours: one device's contribution replaced by nothing (zero-out; dp-accounting's
  REPLACE_SPECIAL). The device stays in the fleet, so how many devices are available (and hence
  q_r) is the same on both sides. Sensitivity: S for the sum, 1/2 for the centred count (each bit
  enters as b - 1/2).
- `fixed_size`: m_r of the n_r available devices drawn uniformly without replacement.
  Neighbours: one device's data replaced by another's (replace-one; n_r is public). Sensitivity:
  2S for the sum (a contribution u becomes u', |u - u'| <= 2S), 1 for the centred count.

dp-accounting's noise multiplier is the noise's standard deviation over the sensitivity under
the relation, so the same z costs twice as much under replace-one: the multiplier accounted is
z/2. Both relations protect a device's training data; its presence in the fleet, its schedule,
its speed and its example count (which decide whether its job makes the deadline) are the
simulated world, public on both sides.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: only the accountants and the audits need dp-accounting
    import dp_accounting


@dataclass(frozen=True)
class Sampling:
    """One sampling scheme: its neighbouring relation and the sensitivities it implies."""

    name: str
    relation: str  # dp-accounting NeighboringRelation member
    sum_sensitivity: float  # in units of the clip norm S
    count_sensitivity: float  # of the centred count of unclipped updates (adaptive clipping)
    neighbours: str  # in words, for summaries and the README


SAMPLINGS = {
    "poisson": Sampling(
        "poisson",
        "REPLACE_SPECIAL",
        1.0,
        0.5,
        "one device's contribution replaced by nothing (zero-out: the device stays in the fleet, "
        "so q_r is the same on both sides)",
    ),
    "fixed_size": Sampling(
        "fixed_size",
        "REPLACE_ONE",
        2.0,
        1.0,
        "one device's data replaced by another's (replace-one: sensitivity 2S)",
    ),
}


def sampling(name: str) -> Sampling:
    try:
        return SAMPLINGS[name]
    except KeyError:
        raise ValueError(f"privacy.sampling: unknown value {name!r}") from None


def effective_noise_multiplier(
    name: str, update_std: float, clip_norm: float, count_std: float | None = None
) -> float:
    """Noise multiplier of the round's whole release under the sampling's relation.

    The sum (std `update_std`, sensitivity `sum_sensitivity * clip_norm`) and, with adaptive
    clipping, the centred count (std `count_std`) are two Gaussian mechanisms on the same sample:
    together a Gaussian mechanism on the pair, whose sensitivity over std adds in quadrature.
    """
    s = sampling(name)
    if update_std <= 0:
        return 0.0
    inv = (s.sum_sensitivity * clip_norm / update_std) ** 2
    if count_std is not None:
        if count_std <= 0:
            return 0.0
        inv += (s.count_sensitivity / count_std) ** 2
    return inv**-0.5


def adaptive_split(z: float, count_std: float) -> float:
    """The update's noise multiplier that keeps the zero-out total at z when the centred count
    (sensitivity 1/2) carries noise `count_std` (Andrew et al. 2021): solves
    z^-2 = z_update^-2 + (2 count_std)^-2. Needs z < 2 count_std."""
    if z <= 0:
        return z
    if z >= 2 * count_std:
        raise ValueError(
            f"privacy.noise_multiplier: adaptive clipping needs z < 2 * count_noise ({z} >= {2 * count_std})"
        )
    return (z**-2 - (2 * count_std) ** -2) ** -0.5


@dataclass(frozen=True)
class NoisePlan:
    """The noise a run adds and the multiplier its rounds are accounted with."""

    update: float  # std of the sum's noise over the clip norm
    count_std: float | None  # std of the centred count's noise (adaptive clipping), else None
    accounted: float  # the release's multiplier under the sampling's relation


def noise_plan(privacy: Any, goal: int) -> NoisePlan:
    """From the privacy config: the split of z between the sum and the count, and what it costs."""
    z = privacy.noise_multiplier
    if privacy.adaptive:
        count_std = privacy.count_noise if privacy.count_noise is not None else goal / 20.0
        update = adaptive_split(z, count_std)
    else:
        count_std, update = None, z
    return NoisePlan(update, count_std, effective_noise_multiplier(privacy.sampling, update, 1.0, count_std))


@dataclass(frozen=True)
class SampledRelease:
    """One released DP-FedAvg round as accounted: the ledger's entry (a reviewer recomputes from
    these).

    `q` is the chance that a device available in this round is in its cohort; `available` and
    `cohort` are n_r and m_r (for poisson, m_r is the cohort the coordinator aimed at, the
    realised size is random); `noise_multiplier` is under the sampling's relation.
    """

    round: int
    sampling: str
    q: float
    available: int
    cohort: int
    noise_multiplier: float

    def event(self) -> dp_accounting.DpEvent:
        """The exact dp-accounting event of this round (no bucketing)."""
        return event(self.sampling, self.q, self.noise_multiplier, self.available, self.cohort)

    def to_json(self) -> dict:
        return asdict(self)


# Fixed-size events are built from q alone (dp-accounting's bound for sampling without
# replacement depends on m/n only): m/n is represented over this many candidates.
_WOR_SCALE = 1 << 40


def event(
    name: str, q: float, z: float, available: int | None = None, cohort: int | None = None
) -> dp_accounting.DpEvent:
    """The dp-accounting event of one round of `name` sampling with probability q, multiplier z."""
    import dp_accounting

    gauss = dp_accounting.GaussianDpEvent(z)
    if name == "poisson":
        return dp_accounting.PoissonSampledDpEvent(q, gauss)
    if name == "fixed_size":
        if available is None or cohort is None:
            available, cohort = _WOR_SCALE, min(_WOR_SCALE, math.ceil(q * _WOR_SCALE))
        return dp_accounting.SampledWithoutReplacementDpEvent(int(available), int(cohort), gauss)
    raise ValueError(f"privacy.sampling: unknown value {name!r}")


def neighbouring(name: str) -> dp_accounting.NeighboringRelation:
    import dp_accounting

    return dp_accounting.NeighboringRelation[sampling(name).relation]
