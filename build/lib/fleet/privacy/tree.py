"""Tree aggregation for DP-FTRL (Kairouz et al. 2021): noised prefix sums of the rounds' sums.

Within one tree, step t (the t-th released round since the tree started) adds its clipped sum
g_t as leaf t, and the release is the sum of the noised values of the dyadic nodes that cover
[1, t]: one node per 1-bit of t, each its leaves' exact sum plus independent N(0, (zS)^2) noise,
so the prefix sum g_1 + ... + g_t plus popcount(t) noises. A node [a 2^l + 1, (a + 1) 2^l] is
first needed when its last leaf arrives; it is noised then, once (by the mechanism's one noise
source), and kept for every later prefix that uses it (it leaves the cover for good when it stops
being used, so only O(log T) vectors are ever held). Nothing here samples anyone: the guarantee
rests on how often one device can contribute to a tree, not on who was chosen.

Sensitivity (the first invariant of the architecture notes, for the tree). The release of a tree
is a linear function of its used nodes' sums, each with its own noise, so the whole tree is one
Gaussian mechanism whose squared L2 sensitivity, for a device whose rounds in the tree are P (each
update of norm <= S, all pointing the same way in the worst case), is S^2 * sum over used nodes v
of |P n v|^2. `sensitivity_factor` is the exact max over P of that sum, for any number of
participations at least b steps apart, by a dynamic program over the tree (an earlier per-level
bound over-paid: 552 for 315 at 2,000 steps and b = 100). With one participation it is the number
of levels, ceil(log2(T + 1)): dp-accounting's `SingleEpochTreeAggregationDpEvent`. Tests match
it to a brute force over every participation pattern of small trees.
"""

from __future__ import annotations

import functools
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
    """max_P sum_v |P n v|^2 over the used nodes of a tree of `steps` steps, P any set of steps at
    least `separation` apart: the tree's exact squared sensitivity over S^2, by a dynamic program
    (`_tables`, `_chain`; tests match it to a brute force over every pattern). With one
    participation it is the number of levels, ceil(log2(steps + 1))."""
    if steps <= 0:
        return 0
    if separation <= 1:  # every step may take part, and more participations never lower the sum
        return sum(_all_leaves(level) for level, _ in cover(steps))
    return int(round(_chain([level for level, _ in cover(steps)], separation)))


def _all_leaves(level: int) -> int:
    """sum_v |v|^2 over the used nodes of a full subtree of height `level` whose root is used: the
    root (4^level) and the left children below it, 2^(level - j - 1) of 4^j at each level j."""
    return (1 << (2 * level)) + sum((1 << (level - j - 1)) * (1 << (2 * j)) for j in range(level))


# The dynamic program. A node (level, i) is used (released in some prefix) when i is even - a left
# child, or a root - and its last leaf is at most the number of steps (`used_nodes`): the right
# half of a pair is always released through its parent. The used nodes of a tree of t steps all lie
# in the blocks of cover(t), full subtrees of decreasing height side by side whose roots are used,
# with no used node above them. So the factor is a chain over those blocks (`_chain`) of one table
# per height (`_tables`): for a full subtree of height l, T[c - 1, f, g] is the largest sum over
# its used nodes of |P n v|^2 among patterns inside it with c participations, f steps before the
# first and g after the last (both capped at separation - 1: a neighbour only needs to know whether
# the gap reaches it). Two patterns side by side join when g_left + f_right + 1 >= separation.

_NEG = -np.inf


@functools.lru_cache(maxsize=128)
def _tables(level: int, separation: int, root_used: bool) -> np.ndarray:
    """T[c - 1, f, g] (c >= 1) for a full subtree of height `level` (see above)."""
    d = separation  # f, g in [0, separation - 1]
    if level == 0:
        t = np.full((1, d, d), _NEG)
        t[0, 0, 0] = 1.0 if root_used else 0.0  # one participation, on the leaf
        return t
    if root_used:
        below = _tables(level, separation, False)
        return below + (np.arange(1, below.shape[0] + 1) ** 2)[:, None, None]
    lhs, rhs = _tables(level - 1, separation, True), _tables(level - 1, separation, False)
    half = 1 << (level - 1)
    out = np.full((lhs.shape[0] + rhs.shape[0], d, d), _NEG)
    shift = np.minimum(np.arange(d) + half, d - 1)
    for c0 in range(rhs.shape[0]):  # the left half empty: the right's f moves by half
        np.maximum.at(out[c0], (shift, slice(None)), rhs[c0])
    for c0 in range(lhs.shape[0]):  # the right half empty: the left's g grows by half
        np.maximum.at(out[c0], (slice(None), shift), lhs[c0])
    # both halves: the left's last and the right's first at least `separation` apart
    need = np.maximum(separation - 1 - np.arange(d), 0)  # g_left must reach this for f_right
    suffix = np.maximum.accumulate(lhs[:, :, ::-1], axis=2)[:, :, ::-1]  # max over g_left >= x
    left = suffix[:, :, need]  # [cL, fL, fR]: the best left whose gap suits a right starting at fR
    chunk = max(1, int(2e7 // d**3))
    for cl in range(lhs.shape[0]):
        for lo in range(0, rhs.shape[0], chunk):
            right = rhs[lo : lo + chunk]  # [cR, fR, gR]
            best = (left[cl][None, :, :, None] + right[:, None, :, :]).max(axis=2)  # [cR, fL, gR]
            target = out[cl + 1 + lo : cl + 1 + lo + len(right)]
            np.maximum(target, best, out=target)
    alive = np.isfinite(out).any(axis=(1, 2))
    return out[: int(np.flatnonzero(alive).max()) + 1]  # counts the separation allows


def _chain(levels: list[int], separation: int) -> float:
    """The largest sum over blocks of full subtrees (roots used) of these heights, left to right."""
    d = separation
    need = np.maximum(separation - 1 - np.arange(d), 0)
    best = 0.0  # the empty pattern
    gap = np.full(d, _NEG)  # the best value so far by the gap after the last participation
    for level in levels:
        block = _tables(level, separation, True).max(axis=0)  # [f, g], any count
        grown = np.full(d, _NEG)  # this block empty: every gap grows by its size
        np.maximum.at(grown, np.minimum(np.arange(d) + (1 << level), d - 1), gap)
        first = block.max(axis=0)  # nothing before it: any f
        suffix = np.maximum.accumulate(gap[::-1])[::-1]  # max over gaps >= x
        after = (suffix[need][:, None] + block).max(axis=0)  # [g]: joined to what came before
        gap = np.maximum(grown, np.maximum(first, after))
        best = max(best, float(gap.max()))
    return best


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
