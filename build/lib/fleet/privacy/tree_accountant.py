"""Epsilon of DP-FTRL's trees: each tree one segment (`fleet.privacy.segments`), composed.

A tree's releases are a post-processing of its nodes' noised sums, so the whole tree is one
Gaussian mechanism whose squared sensitivity is `tree.sensitivity_factor(steps, separation)`
S^2 for a device that takes part at most once in any `separation` consecutive released rounds.
When the limit allows one participation per tree, RDP uses dp-accounting's own
`SingleEpochTreeAggregationDpEvent` for it. A tree re-entered is refused (`segments.extend`); the
mechanism starts a fresh tree instead (`fleet.privacy.mechanisms.ftrl`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleet.privacy import tree as tree_lib
from fleet.privacy.segments import Segment, SegmentAccountant


@dataclass(frozen=True)
class TreeRelease:
    """One released DP-FTRL round as accounted: where it sits in its tree, the participation limit
    (in released rounds) the shards enforced, and each node's noise over S."""

    round: int
    tree: int
    step: int
    separation: int
    noise_multiplier: float

    @property
    def segment(self) -> int:
        return self.tree

    def to_json(self) -> dict:
        return asdict(self)


class TreeAccountant(SegmentAccountant):
    """Trees as segments: factor `tree.sensitivity_factor`, and dp-accounting's tree event when one
    participation per tree is all the limit allows (RDP)."""

    @classmethod
    def factor(cls, segment: Segment) -> float:
        return float(tree_lib.sensitivity_factor(segment.steps, segment.separation))

    @classmethod
    def rdp_event(cls, segment: Segment, z: float) -> Any:
        import dp_accounting

        if tree_lib.participations(segment.steps, segment.separation) == 1:
            return dp_accounting.SingleEpochTreeAggregationDpEvent(z, segment.steps)
        return None

    @property
    def trees(self) -> list[Segment]:
        return self.segments


def planned_trees(rounds: int, restart_every: int, separation: int) -> list[Segment]:
    """The trees of a planned run: `rounds` released rounds in trees of `restart_every` (0: one)."""
    size = restart_every or rounds
    return [Segment(i, min(size, rounds - i * size), separation) for i in range(-(-rounds // size))]
