"""Dropout scenarios, composable with any fleet: the stresses users switch on by name.

- `extra_failure`: an independent per-job failure probability on top of each device's own;
- correlated outages: devices in some time zones (or all) are offline for a window: they do not
  check in, and a job running when the outage starts drops with reason `outage`;
- a fleet-wide failure spike: jobs that overlap the window fail with a probability;
- battery / thermal: a job aborts with probability 1 - exp(-compute time / tau), at a uniform
  point of its compute, so long jobs on slow devices are the ones that die (reason `battery`);
- the diurnal trough: rounds may only start in a band of hours (`active_hours`), so training
  is forced through the hours when few devices are eligible.
Deadline and over-selection are the fleet's own knobs (`fleet.deadline_s`, `fleet.overselect`).

Everything here is vectorised over a round's selected devices and keyed by (seed, round, device
id), so a scenario gives the same outcome whatever the number of shards.
"""

from __future__ import annotations

import numpy as np

from fleet import rng
from fleet.config import DropoutConfig
from fleet.phones.timing import Reason

HOUR = 3600.0


def _outage_window(d: DropoutConfig) -> tuple[float, float]:
    start = d.outage_start_hour * HOUR
    return start, start + d.outage_hours * HOUR


def outage_mask(d: DropoutConfig, tz: np.ndarray) -> np.ndarray | None:
    """Which devices the outage hits (None: no outage configured)."""
    if d.outage_hours <= 0 or not (d.outage_all or d.outage_timezones):
        return None
    if d.outage_all:
        return np.ones(len(tz), dtype=bool)
    return np.isin(tz, np.asarray(d.outage_timezones, dtype=tz.dtype))


def offline(d: DropoutConfig, t: float, tz: np.ndarray) -> np.ndarray | None:
    """Devices offline at time t because of an outage (None: nobody)."""
    hit = outage_mask(d, tz)
    start, end = _outage_window(d)
    if hit is None or not (start <= t < end):
        return None
    return hit


def job_events(
    d: DropoutConfig,
    seed: int,
    round_idx: int,
    ids: np.ndarray,
    t: float,
    duration: np.ndarray,
    compute_s: np.ndarray,
    tz: np.ndarray,
    failure_prob: np.ndarray,
) -> dict[Reason, np.ndarray]:
    """When each failure-like event would strike each selected device's job (inf: never)."""
    n = len(ids)
    p = 1.0 - (1.0 - failure_prob.astype(np.float64)) * (1.0 - d.extra_failure)
    fail = rng.uniform(seed, "failure", round_idx, ids) < p
    frac = rng.uniform(seed, "failure_at", round_idx, ids)
    fail_at = np.where(fail, t + frac * duration, np.inf)
    if d.spike_hours > 0 and d.spike_failure > 0:
        s0, s1 = d.spike_start_hour * HOUR, (d.spike_start_hour + d.spike_hours) * HOUR
        overlap = (t < s1) & (t + duration > s0)
        hit = overlap & (rng.uniform(seed, "spike", round_idx, ids) < d.spike_failure)
        lo, hi = np.maximum(t, s0), np.minimum(t + duration, s1)
        when = lo + rng.uniform(seed, "spike_at", round_idx, ids) * (hi - lo)
        fail_at = np.minimum(fail_at, np.where(hit, when, np.inf))
    events = {Reason.FAILURE: fail_at}
    if d.battery_tau_minutes is not None:
        p_abort = -np.expm1(-compute_s / (d.battery_tau_minutes * 60.0))
        dies = rng.uniform(seed, "battery", round_idx, ids) < p_abort
        compute_start = t + (duration - compute_s) * 0.5  # roughly after the download
        at = compute_start + rng.uniform(seed, "battery_at", round_idx, ids) * compute_s
        events[Reason.BATTERY] = np.where(dies, at, np.inf)
    hit = outage_mask(d, tz)
    if hit is not None:
        start, _ = _outage_window(d)
        strikes = hit & (start > t)
        events[Reason.OUTAGE] = np.where(strikes, start, np.inf) if n else np.zeros(0)
    return events


def next_active_time(d: DropoutConfig, t: float) -> float:
    """The first time >= t at which a round may start (the diurnal-trough scenario)."""
    if not d.active_hours:
        return t
    start, end = d.active_hours[0] * HOUR, d.active_hours[1] * HOUR
    day = np.floor(t / 86400.0) * 86400.0
    tod = t - day
    inside = start <= tod < end if start < end else (tod >= start or tod < end)
    if inside:
        return t
    nxt = day + start
    return float(nxt if nxt > t else nxt + 86400.0)
