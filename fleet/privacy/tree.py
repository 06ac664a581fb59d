"""Tree aggregation for DP-FTRL (Kairouz et al. 2021): noised prefix sums of the rounds' sums.

Within one tree, step t (the t-th released round since the tree started) adds its clipped sum
g_t as leaf t, and the release is the prefix sum g_1 + ... + g_t plus the noise of the dyadic
nodes that cover [1, t]: one node per 1-bit of t, so popcount(t) independent N(0, (zS)^2)
vectors. A node [a 2^l + 1, (a + 1) 2^l] is first needed when its last leaf arrives; its noise is
drawn then, once, and kept for every later prefix that uses it (it leaves the cover for good when
it stops being used, so only O(log T) vectors are ever held). Nothing here samples anyone: the
guarantee rests on how often one device can contribute to a tree, not on who was chosen.

Sensitivity (DESIGN.md invariant 1, for the tree). The release of a tree is a linear function of
its used nodes' sums, each with its own noise, so the whole tree is one Gaussian mechanism whose
squared L2 sensitivity, for a device whose rounds in the tree are P (each update of norm <= S,
all pointing the same way in the worst case), is S^2 * sum over used nodes v of |P n v|^2.
`sensitivity_factor` bounds max_P of that sum for at most k participations at least b steps
apart: at level l the used nodes are disjoint intervals of 2^l leaves, one holds at most
c_l = floor((2^l - 1) / b) + 1 of P, the level holds at most k, and a sum of squares of counts
<= c_l adding to <= k is largest when as many as possible are full. With k = 1 it is the number of
levels, ceil(log2(T + 1)): dp-accounting's `SingleEpochTreeAggregationDpEvent`. Tests check the
bound against brute force over every participation pattern of small trees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def cover(t: int) -> list[tuple[int, int]]:
    """The dyadic nodes (level, index) whose leaves [i 2^l + 1, (i + 1) 2^l] partition [1, t]."""
    out, start = [], 0
    for level in range(t.bit_length() - 1, -1, -1):
        if t >> level & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


def used_nodes(steps: int) -> set[tuple[int, int]]:
    """Every node some prefix sum t <= steps uses (the tree's released nodes)."""
    return {node for t in range(1, steps + 1) for node in cover(t)}


def participations(steps: int, separation: int) -> int:
    """At most this many participations fit in `steps` steps at least `separation` apart
    (`separation` 0 or 1: every step)."""
    if steps <= 0:
        return 0
    return steps if separation <= 1 else (steps - 1) // separation + 1


def sensitivity_factor(steps: int, separation: int) -> int:
    """An upper bound on max_P sum_v |P n v|^2 over the used nodes of a tree of `steps` steps,
    for a device taking part at most once in any `separation` consecutive steps (see the module
    docstring); exact for one participation."""
    if steps <= 0:
        return 0
    k = participations(steps, separation)
    total = 0
    for level in range(steps.bit_length()):  # 2^level <= steps: the levels with used nodes
        c = (((1 << level) - 1) // max(separation, 1)) + 1
        full, rest = divmod(k, c)
        total += full * c * c + rest * rest
    return total


@dataclass
class Tree:
    """One tree's running state: its steps, the exact sum so far, and the noise of the nodes in
    the current cover (drawn once, by `draw(level, index)`, and kept while in use)."""

    index: int
    dim: int
    steps: int = 0
    exact: np.ndarray | None = None
    nodes: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def add(self, leaf: np.ndarray, draw: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Add the next leaf; returns the noised prefix sum of all leaves so far."""
        self.steps += 1
        self.exact = leaf.astype(np.float64) if self.exact is None else self.exact + leaf
        needed = cover(self.steps)
        self.nodes = {node: self.nodes[node] if node in self.nodes else draw(*node) for node in needed}
        return self.exact + np.sum([self.nodes[node] for node in needed], axis=0)

    def noise_std_factor(self) -> int:
        """How many node noises the latest prefix sum carries (popcount of the step)."""
        return bin(self.steps).count("1")

    def state(self) -> dict:
        return {
            "index": self.index,
            "dim": self.dim,
            "steps": self.steps,
            "exact": self.exact,
            "nodes": self.nodes,
        }


def from_state(state: dict) -> Tree:
    return Tree(state["index"], state["dim"], state["steps"], state["exact"], dict(state["nodes"]))


def levels(steps: int) -> int:
    """Levels of a tree of `steps` leaves: ceil(log2(steps + 1))."""
    return math.ceil(math.log2(steps + 1)) if steps > 0 else 0
