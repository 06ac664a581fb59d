"""Tree aggregation for DP-FTRL (Kairouz et al. 2021): noised prefix sums of the rounds' sums.

Within one tree, step t (the t-th released round since the tree started) adds its clipped sum
g_t as leaf t, and the release is the sum of the noised values of the dyadic nodes that cover
[1, t]: one node per 1-bit of t, each its leaves' exact sum plus independent N(0, (zS)^2) noise,
so the prefix sum g_1 + ... + g_t plus popcount(t) noises. A node [a 2^l + 1, (a + 1) 2^l] is
first needed when its last leaf arrives; it is noised then, once (by the mechanism's one noise
source), and kept for every later prefix that uses it (it leaves the cover for good when it stops
being used, so only O(log T) vectors are ever held). Nothing here samples anyone: the guarantee
rests on how often one device can contribute to a tree, not on who was chosen.

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
    """One tree's running state: its steps, and for each node of the current cover its exact sum
    and its noised value (`noised(exact, level, index)`, called once per node, when the node's
    last leaf arrives). A release is the sum of the cover's noised values: a post-processing of
    the nodes' releases, which is what the sensitivity above is about. A node's exact sum is its
    leaf plus the exact sums of the cover nodes it absorbs, so only O(log T) vectors are held."""

    index: int
    dim: int
    steps: int = 0
    exact: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    nodes: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def add(self, leaf: np.ndarray, noised: Callable[[np.ndarray, int, int], np.ndarray]) -> np.ndarray:
        """Add the next leaf; returns the noised prefix sum of all leaves so far."""
        self.steps += 1
        needed = cover(self.steps)
        level, i = needed[-1]  # the node that ends at this leaf (the others are kept)
        first = i << level  # its leaves are [first, first + 2^level), 0-based
        exact = leaf.astype(np.float64)
        for (lv, j), value in self.exact.items():
            if j << lv >= first:  # a cover node inside the new one: absorbed
                exact = exact + value
        self.exact = {node: self.exact[node] for node in needed[:-1]}
        self.nodes = {node: self.nodes[node] for node in needed[:-1]}
        self.exact[(level, i)] = exact
        self.nodes[(level, i)] = np.asarray(noised(exact, level, i), dtype=np.float64)
        return np.sum([self.nodes[node] for node in needed], axis=0)

    def exact_prefix(self) -> np.ndarray:
        """The prefix sum without noise (telemetry: the noise's norm is released - exact)."""
        return np.sum(list(self.exact.values()), axis=0) if self.exact else np.zeros(self.dim)

    def state(self) -> dict:
        return {
            "index": self.index,
            "dim": self.dim,
            "steps": self.steps,
            "exact": self.exact,
            "nodes": self.nodes,
        }


def from_state(state: dict) -> Tree:
    return Tree(state["index"], state["dim"], state["steps"], dict(state["exact"]), dict(state["nodes"]))
