"""The scale benchmark's in-process shard that meters the bytes each round call moves."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from fleet.round.protocol import JobPlan, TrainReport
from fleet.round.shard import ShardCore


class MeteredShard(ShardCore):
    """An in-process shard that tallies the bytes each round call moves, pickled as Ray ships them.

    The weights are left out of `train`'s arguments: the coordinator broadcasts them once per
    round (one `ray.put` that every shard reads), so they are counted once, not per shard."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.bytes: dict[str, int] = {"check_in": 0, "plan": 0, "train": 0}

    def _meter(self, phase: str, args: tuple, result: Any) -> Any:
        self.bytes[phase] += len(pickle.dumps(args, protocol=5)) + len(pickle.dumps(result, protocol=5))
        return result

    def check_in(self, round_idx: int, t: float, release_idx: int | None = None) -> int:
        result = super().check_in(round_idx, t, release_idx)
        return self._meter("check_in", (round_idx, t, release_idx), result)

    def plan(self, round_idx: int, t: float, deadline: float, local_ranks: np.ndarray) -> JobPlan:
        result = super().plan(round_idx, t, deadline, local_ranks)
        return self._meter("plan", (round_idx, t, deadline, local_ranks), result)

    def train(
        self, round_idx: int, t: float, params: np.ndarray, accepted: np.ndarray, clip_norm: float | None
    ) -> TrainReport:
        result = super().train(round_idx, t, params, accepted, clip_norm)
        return self._meter("train", (round_idx, t, accepted, clip_norm), result)
