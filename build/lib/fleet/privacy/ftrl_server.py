"""DP-FTRL's server (Kairouz et al. 2021, Algorithm 1 with momentum: DP-FTRLM).

Each released round adds its clipped sum to the tree (`fleet.privacy.tree`) and gets back the
noised prefix sum s_t of all the tree's sums so far; the model is FTRL's:

    m_t = gamma m_{t-1} + s_t / goal,      theta_t = theta_0 + lr m_t

(the clipped sums are model deltas, so the model moves along them; the goal is the fixed
denominator, as in DP-FedAvg). With gamma = 0 that is plain FTRL: theta_0 plus lr times the sum
of the averaged updates, which is what server SGD would reach; with gamma > 0 it is heavy-ball
momentum SGD on the same updates, unrolled (with no noise the two are equal, tested). Everything
here post-processes the tree's releases, so it costs no privacy. Every `restart_every` released
rounds a new tree starts from the current model: theta_0 moves there, the sum, the momentum and
the node noises start afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fleet.privacy import tree as tree_lib


class FTRLServer:
    """The model as DP-FTRL(M) releases it. `noised(tree, exact, level, index)` releases a node."""

    def __init__(
        self,
        params: np.ndarray,
        lr: float,
        momentum: float,
        restart_every: int,
        noised: Callable[[int, np.ndarray, int, int], np.ndarray],
    ):
        self.lr, self.momentum, self.restart_every, self.noised = lr, momentum, restart_every, noised
        self.theta0 = params.astype(np.float64)
        self.params = params.astype(np.float32)
        self.m = np.zeros_like(self.theta0)
        self.tree = tree_lib.Tree(0, len(params))
        self.last_noise_norm = 0.0

    def position(self) -> tuple[int, int]:
        """(tree index, step) the next release will have."""
        if self.restart_every and self.tree.steps >= self.restart_every:
            return self.tree.index + 1, 1
        return self.tree.index, self.tree.steps + 1

    def restart(self, index: int) -> None:
        """A new tree `index` from the current model: theta_0 moves there, the sum, the momentum
        and the nodes start afresh (nothing noised before is reused)."""
        self.theta0 = self.params.astype(np.float64)
        self.m = np.zeros_like(self.theta0)
        self.tree = tree_lib.Tree(index, len(self.params))

    def step(self, clipped_sum: np.ndarray, goal: int) -> np.ndarray:
        """Release one round: add its clipped sum to the tree, return the new model."""
        if self.restart_every and self.tree.steps >= self.restart_every:
            self.restart(self.tree.index + 1)
        index = self.tree.index
        prefix = self.tree.add(clipped_sum, lambda exact, level, i: self.noised(index, exact, level, i))
        self.last_noise_norm = float(np.linalg.norm(prefix - self.tree.exact_prefix()))
        self.m = self.momentum * self.m + prefix / goal
        self.params = (self.theta0 + self.lr * self.m).astype(np.float32)
        return self.params.copy()

    def state(self) -> dict[str, Any]:
        return {"theta0": self.theta0, "params": self.params, "m": self.m, "tree": self.tree.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.theta0, self.params, self.m = state["theta0"], state["params"], state["m"]
        self.tree = tree_lib.from_state(state["tree"])
