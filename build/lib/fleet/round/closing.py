"""How a round's cohort closes: which arrivals count, and when the round ends.

Given the shards' job plans (in global rank order) the rule is the mechanism's: a cohort that
closes on its goal counts the first `goal` arrivals before the deadline (later ones are
`after_goal`) and ends at the goal's arrival, or at the deadline when the goal is not reached; a
Poisson cohort counts every arrival before the deadline (nothing caps it) and ends when the last
selected device has arrived or dropped, at the deadline if any is still out then. Ties in arrival
go to the lower global rank. A pure function of the plans: the coordinator calls it, tests call
it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.phones.timing import Reason
from fleet.round.protocol import JobPlan, Mix, merge_mix


@dataclass(frozen=True)
class Closing:
    """The round's cohort after the plans: arrays over the selected devices in rank order."""

    arrival: np.ndarray
    reason: np.ndarray  # REPORTED for the counted arrivals; AFTER_GOAL for those past the goal
    flops: np.ndarray
    done: np.ndarray
    accepted: np.ndarray  # bool: the arrivals the round counts
    goal_time: float | None  # when the goal-th update arrived (None: fewer arrived)
    close: float  # when the round ends
    waiting: int  # devices the participation limit held back at check-in
    mix: Mix  # the selected devices' make-up

    @property
    def n_accepted(self) -> int:
        return int(self.accepted.sum())


def close_cohort(plans: list[JobPlan], closes_on_goal: bool, goal: int, deadline: float) -> Closing:
    arrival = np.concatenate([p.arrival for p in plans]) if plans else np.zeros(0)
    reason = np.concatenate([p.reason for p in plans]) if plans else np.zeros(0, np.int8)
    flops = np.concatenate([p.flops for p in plans]) if plans else np.zeros(0)
    done = np.concatenate([p.done for p in plans]) if plans else np.zeros(0)
    order = np.argsort(arrival, kind="stable")  # the concatenation is in rank order
    n_arrived = int(np.count_nonzero(reason == Reason.REPORTED))
    accepted = reason == Reason.REPORTED
    if closes_on_goal:
        accepted = np.zeros(len(arrival), dtype=bool)
        accepted[order[: min(goal, n_arrived)]] = True
        reason[(reason == Reason.REPORTED) & ~accepted] = Reason.AFTER_GOAL
    goal_time = float(arrival[order[goal - 1]]) if n_arrived >= goal else None
    if closes_on_goal:
        close = goal_time if goal_time is not None else deadline
    elif np.any(reason == Reason.DEADLINE) or n_arrived == 0:
        close = deadline  # a round that does not close on its goal waits for every selected device
    else:
        close = float(arrival[accepted].max())
    waiting = int(sum(p.waiting for p in plans))
    return Closing(
        arrival, reason, flops, done, accepted, goal_time, close, waiting, merge_mix([p.mix for p in plans])
    )
