"""Epsilon of DP-FTRL's trees, by dp-accounting: each tree one Gaussian mechanism, composed.

A tree's releases are a post-processing of its nodes' noised sums, so the whole tree is one
Gaussian mechanism whose squared sensitivity is `tree.sensitivity_factor(steps, separation)`
S^2 for a device that takes part at most once in any `separation` consecutive released rounds.
Trees use independent noise and compose. Nothing here depends on who was sampled or on how many
devices were available: the figure is every device's.

A tree is accounted once, whole: its releases must come in order, step after step. A tree that is
re-entered (a step that does not continue the last one) would be two mechanisms sharing leaves
and nodes, which this accounting does not cover, so it is refused; the mechanism starts a fresh
tree instead (`fleet.privacy.mechanisms.ftrl`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.privacy import tree as tree_lib
from fleet.privacy.accountant import ACCOUNTANTS, ORDERS


@dataclass(frozen=True)
class TreeRelease:
    """One released DP-FTRL round as accounted: where it sits in its tree, the participation limit
    (in released rounds) the shards enforced, and each node's noise over S."""

    round: int
    tree: int
    step: int
    separation: int
    noise_multiplier: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TreeVersion:
    """Releases of one tree: `steps` so far, under a participation limit of `separation`."""

    tree: int
    steps: int
    separation: int


def tree_events(versions: list[TreeVersion], z: float, kind: str) -> list[Any]:
    """One dp-accounting event per tree: `SingleEpochTreeAggregationDpEvent(z, steps)` when one
    participation per tree is all the limit allows (RDP), else the Gaussian mechanism with the
    tree's sensitivity bound (`tree.sensitivity_factor`): multiplier z / sqrt(factor)."""
    import dp_accounting

    out = []
    for v in versions:
        if kind == "rdp" and tree_lib.participations(v.steps, v.separation) == 1:
            out.append(dp_accounting.SingleEpochTreeAggregationDpEvent(z, v.steps))
        else:
            factor = tree_lib.sensitivity_factor(v.steps, v.separation)
            out.append(dp_accounting.GaussianDpEvent(z / math.sqrt(factor)))
    return out


def tree_rho(versions: list[TreeVersion], z: float) -> float:
    """zCDP of the trees: each is a Gaussian mechanism, rho = sensitivity^2 / (2 (zS)^2)."""
    return sum(tree_lib.sensitivity_factor(v.steps, v.separation) for v in versions) / (2 * z * z)


def tree_epsilon(versions: list[TreeVersion], z: float, kind: str, delta: float, interval: float) -> float:
    """Epsilon at delta of the trees so far, composed by dp-accounting."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not versions:
        return 0.0
    if z <= 0:
        return math.inf
    if kind == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(
            list(ORDERS), dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        )
        for e in tree_events(versions, z, kind):
            acc.compose(e)
        return float(acc.get_epsilon(delta))
    # Gaussian mechanisms compose into one Gaussian: sensitivities add in quadrature.
    total = math.sqrt(2 * tree_rho(versions, z))  # sensitivity over the noise, summed
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_accounting.GaussianDpEvent(1.0 / total))
    return max(0.0, float(acc.get_epsilon(delta)))


def extend(versions: list[TreeVersion], r: TreeRelease) -> list[TreeVersion]:
    """The trees after release r (a new list): the next step of the last tree, or a new tree."""
    out = [TreeVersion(v.tree, v.steps, v.separation) for v in versions]
    last = out[-1] if out else None
    if last is not None and last.tree == r.tree:
        if r.step != last.steps + 1:
            raise ValueError(
                f"ledger: tree {r.tree} re-entered at step {r.step} after {last.steps} steps; "
                "a tree is accounted whole, in order"
            )
        last.steps += 1
        last.separation = min(last.separation, r.separation)
    else:
        if r.step != 1 or any(v.tree == r.tree for v in out):
            raise ValueError(f"ledger: tree {r.tree} starts at step {r.step}; a tree starts at step 1, once")
        out.append(TreeVersion(r.tree, 1, r.separation))
    return out


@dataclass
class TreeAccountant:
    """The trees' epsilon over the recorded releases, with the sampled accountant's interface."""

    kind: str  # pld | rdp
    delta: float
    interval: float = 1e-4
    releases: list[TreeRelease] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant: unknown value {self.kind!r}")
        self.trees: list[TreeVersion] = []
        self._eps = 0.0
        releases, self.releases = self.releases, []
        for r in releases:
            self.record(r)

    def _with(self, r: TreeRelease) -> tuple[list[TreeVersion], float]:
        trees = extend(self.trees, r)
        if math.isinf(self._eps) or r.noise_multiplier <= 0:
            return trees, math.inf
        return trees, tree_epsilon(trees, r.noise_multiplier, self.kind, self.delta, self.interval)

    def epsilon(self) -> float:
        return self._eps

    def epsilon_with(self, r: TreeRelease) -> float:
        return self._with(r)[1]

    def record(self, r: TreeRelease) -> float:
        self.trees, self._eps = self._with(r)
        self.releases.append(r)
        return self._eps

    def snapshot(self) -> dict:
        return {"releases": len(self.releases)}

    def load(self, releases: Iterable[TreeRelease], snapshot: dict | None = None) -> None:
        """Continue from a ledger (a tree's epsilon is cheap to recompute from its steps)."""
        self.releases, self.trees, self._eps = [], [], 0.0
        for r in releases:
            self.record(r)
