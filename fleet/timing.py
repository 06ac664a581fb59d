"""How long a phone's job takes, and why a selected phone might not be counted.

A job's duration is known when the phone is selected: download (model bytes / downlink) +
compute (FLOPs of its local epochs / device speed) + upload (update bytes / uplink). So the round's
outcome is planned before any training: a device drops out if its failure happens first, if its
availability window closes first, or if it would miss the deadline. Dropped devices are never
trained, so dropout costs nothing to simulate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Reason(IntEnum):
    """Fate of a selected device. Codes are stable: they are stored in metrics as names."""

    REPORTED = 0
    WINDOW_CLOSED = 1
    FAILURE = 2
    DEADLINE = 3
    AFTER_GOAL = 4
    INVALID = 5


DROP_REASONS = [r for r in Reason if r != Reason.REPORTED]


@dataclass(frozen=True)
class JobCost:
    """What one device's job moves and computes; provided by the task."""

    download_bytes: float
    upload_bytes: float


def job_seconds(
    cost: JobCost, flops: np.ndarray, downlink: np.ndarray, uplink: np.ndarray, speed: np.ndarray
) -> np.ndarray:
    """Download + compute + upload time of each device's job."""
    return (
        cost.download_bytes / downlink.astype(np.float64)
        + flops / speed.astype(np.float64)
        + cost.upload_bytes / uplink.astype(np.float64)
    )


def plan(
    t: float,
    deadline: float,
    duration: np.ndarray,
    window_end: np.ndarray,
    fail: np.ndarray,
    fail_frac: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Arrival time (inf if dropped) and Reason of each selected device.

    The earliest of the events that precede the job's finish decides: a failure (at `fail_frac`
    of the job), the window closing, or the deadline. With none of them first, it reports.
    """
    finish = t + duration
    fail_at = np.where(fail, t + fail_frac * duration, np.inf)
    events = np.stack([fail_at, window_end, np.full_like(finish, deadline)])
    first = np.argmin(events, axis=0)
    first_time = events[first, np.arange(len(finish))]
    dropped = first_time < finish
    codes = np.array([Reason.FAILURE, Reason.WINDOW_CLOSED, Reason.DEADLINE], dtype=np.int8)
    reason = np.where(dropped, codes[first], np.int8(Reason.REPORTED)).astype(np.int8)
    arrival = np.where(dropped, np.inf, finish)
    return arrival, reason
