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
    BATTERY = 6
    OUTAGE = 7


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


def plan(t: float, duration: np.ndarray, events: dict[Reason, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrival time (inf if dropped) and Reason of each selected device.

    `events` maps a drop reason to the time it would strike each device (inf: never): a failure
    part-way, the window closing, the deadline, a battery abort, an outage. The earliest event
    that precedes the job's finish decides; with none of them first, the device reports.
    """
    finish = t + duration
    reasons = list(events)
    times = np.stack([np.broadcast_to(events[r], finish.shape) for r in reasons])
    first = np.argmin(times, axis=0)
    first_time = times[first, np.arange(len(finish))]
    dropped = first_time < finish
    codes = np.array([int(r) for r in reasons], dtype=np.int8)
    reason = np.where(dropped, codes[first], np.int8(Reason.REPORTED)).astype(np.int8)
    arrival = np.where(dropped, np.inf, finish)
    return arrival, reason
