"""What the coordinator and a shard say to each other in a round, in one place.

A round is three calls on every shard, in this order (docs/ARCHITECTURE.md, steps 1-5):

1. `check_in(round, t, release) -> int`: the number of the shard's devices available,
   eligible and outside their participation limit at simulated time `t`;
2. `plan(round, t, deadline, ranks) -> JobPlan`: `ranks` (int64) are the shard's share of the
   secret sample, as positions among the devices it counted at check-in; the answer is each
   selected device's job, in rank order;
3. `train(round, t, params, accepted, clip_norm) -> TrainReport`: `accepted` (bool, one per
   rank) says whose arrival the round counted; the answer is one clipped sum and aggregates.

Nothing in either direction names a device (docs/ARCHITECTURE.md, invariant 3): counts, ranks,
arrival times by rank, one sum, histograms. Every reply carries the shard's `incarnation`, which
changes when Ray restarts it, so the coordinator sees a restart even when no call failed.

The requests are the `Shard` protocol's signatures, which every shard class keeps to the letter
(a fast test compares them); the replies are frozen dataclasses rather than dicts: a field added
on one side and forgotten on the other is an AttributeError in the fast tests, not a missing key
in a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Time-zone and speed make-up of a set of devices, as counts: {"tz": {"+2": 5}, "speed": [...]}.
Mix = dict


@dataclass(frozen=True)
class JobPlan:
    """A shard's answer to `plan`: one entry per rank it was sent, in rank order."""

    arrival: np.ndarray  # float64: simulated time the update arrives (inf: it never does)
    reason: np.ndarray  # int8 `phones.timing.Reason`: REPORTED, or why the device dropped
    flops: np.ndarray  # float64: the job's compute
    done: np.ndarray  # float64 in [0, 1]: share of the job done before it stopped
    mix: Mix  # the selected devices' make-up
    waiting: int  # devices available and eligible but waiting out their participation limit
    incarnation: str


@dataclass(frozen=True)
class TrainReport:
    """A shard's answer to `train`: the sum of the counted devices' clipped updates and the
    statistics the round's line reports (un-noised telemetry, not released)."""

    sum: np.ndarray  # float64: the clipped updates of the `count` counted devices, summed
    count: int  # devices whose valid update is in the sum
    invalid: int  # devices that trained but sent NaN, Inf or a wrong shape: not in the sum
    invalid_flops: float  # their compute, wasted
    mix: Mix  # the counted devices' make-up
    loss_sum: float
    norm_sum: float  # sum of the updates' norms before clipping
    unclipped: int  # updates within the clip norm (adaptive clipping's count)
    norm_hist: np.ndarray  # int64 counts of the unclipped norms over `shard.NORM_BINS`
    incarnation: str


def merge_mix(mixes: list[Mix]) -> Mix:
    """Sum the shards' time-zone and speed counts."""
    tz: dict[str, int] = {}
    for m in mixes:
        for k, v in m["tz"].items():
            tz[k] = tz.get(k, 0) + v
    speed = np.sum([m["speed"] for m in mixes], axis=0).astype(int).tolist() if mixes else []
    return {"tz": tz, "speed": speed}


class Shard(Protocol):
    """The three calls of a round, as the coordinator makes them (`fleet.round.calls.call_all`
    passes their arguments by position, in this order)."""

    def check_in(self, round_idx: int, t: float, release_idx: int | None = None) -> int: ...

    def plan(self, round_idx: int, t: float, deadline: float, local_ranks: np.ndarray) -> JobPlan: ...

    def train(
        self, round_idx: int, t: float, params: np.ndarray, accepted: np.ndarray, clip_norm: float | None
    ) -> TrainReport: ...
