"""Availability models, eligibility and the participation limit (who may be selected)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import tiny_mean

from fleet.config import AvailabilityConfig, FleetConfig
from fleet.phones import availability, population
from fleet.round.shard import ShardCore

HOUR = 3600.0


def _hourly_counts(fleet: FleetConfig, n: int, seed: int = 0) -> np.ndarray:
    cols = population.generate(fleet, seed, 0, n)
    av = availability.make(fleet.availability, cols, seed)
    return np.array([av.available(24 * HOUR + h * HOUR).sum() for h in range(24)])


def test_diurnal_swing_single_time_zone_is_about_4x():
    c = _hourly_counts(FleetConfig(timezones=[0.0]), 100_000)
    swing = c.max() / c.min()
    assert 3.0 < swing < 5.5, swing
    assert int(np.argmax(c)) in (0, 1, 2, 3, 4)  # fullest in the local night (UTC+0)
    assert int(np.argmin(c)) in range(9, 19)  # emptiest in the day


def test_time_zone_shifts_the_peak():
    c0 = _hourly_counts(FleetConfig(timezones=[0.0]), 50_000)
    c6 = _hourly_counts(FleetConfig(timezones=[6.0]), 50_000)
    # A fleet six hours ahead peaks six hours earlier in UTC.
    assert np.argmax(np.correlate(np.tile(c0, 2), c6, mode="valid")[:24]) == 6


def test_diurnal_window_end_is_in_the_future_and_within_the_window():
    f = FleetConfig()
    cols = population.generate(f, 1, 0, 20_000)
    av = availability.make(f.availability, cols, 1)
    t = 26 * HOUR
    idx = np.flatnonzero(av.available(t))
    end = av.window_end(t, idx)
    assert np.all(end > t)
    assert np.all(end - t <= cols["window_hours"][idx].astype(float) * HOUR + 1)
    # Just before the window ends the device is still available; just after it is not.
    some = idx[:200]
    e = av.window_end(t, some)
    for i, ei in zip(some, e, strict=True):
        assert av.available(ei - 1.0)[i] and not av.available(ei + 1.0)[i]


def test_markov_fraction_on_matches_stationary_distribution():
    cfg = AvailabilityConfig(model="markov", on_hours_mean=1.0, off_hours_mean=3.0)
    cols = population.generate(FleetConfig(availability=cfg), 0, 0, 20_000)
    av = availability.make(cfg, cols, 0)
    fractions = [av.available(h * HOUR).mean() for h in range(1, 40, 3)]
    assert abs(np.mean(fractions) - 0.25) < 0.02
    # window_end of available devices is when they switch off, in the future
    t = 50 * HOUR
    on = np.flatnonzero(av.available(t))
    assert np.all(av.window_end(t, on) > t)


def test_trace_drives_availability_exactly(tmp_path):
    ids = np.array([10, 11, 12], dtype=np.int64)
    trace = tmp_path / "trace.parquet"
    pq.write_table(
        pa.table({"device_id": [10, 10, 12], "start": [0.0, 500.0, 100.0], "end": [100.0, 600.0, 200.0]}),
        trace,
    )
    cfg = AvailabilityConfig(model="trace", trace_path=str(trace))
    cols = {"device_id": ids}
    av = availability.make(cfg, cols, 0)
    expect = {
        0.0: [True, False, False],
        99.0: [True, False, False],
        100.0: [False, False, True],
        150.0: [False, False, True],
        200.0: [False, False, False],
        550.0: [True, False, False],
        600.0: [False, False, False],
    }
    for t, want in expect.items():
        assert av.available(t).tolist() == want, t
    assert av.window_end(550.0, np.array([0]))[0] == 600.0


def _selected_positions(shard: ShardCore, t: float, r: int) -> np.ndarray:
    n = shard.check_in(r, t)
    shard.plan(r, t, t + 600, np.arange(n))  # select everyone available
    return shard._selected


def test_never_selected_unavailable_ineligible_or_recent():
    cfg = tiny_mean(
        "fleet.availability.model=diurnal",
        "fleet.population=5000",
        "fleet.min_separation_hours=24",
    )
    shard = ShardCore(cfg, 0, 0, 5000)
    t = 27 * HOUR
    sel = _selected_positions(shard, t, 0)
    available = shard.avail.available(t)
    assert np.all(available[sel])
    assert np.all(shard.eligible[sel])
    assert (~shard.eligible).sum() > 0 and not np.any(np.isin(np.flatnonzero(~shard.eligible), sel))
    # Devices that just took part are excluded until min_separation_hours have passed.
    shard.last_participation[sel[:50]] = t
    sel2 = _selected_positions(shard, t + 1.0, 1)
    assert not np.any(np.isin(sel[:50], sel2))
    assert np.all(np.isin(sel[50:], sel2))
    cols_ok = shard.avail.available(t + 24 * HOUR)
    sel3 = _selected_positions(shard, t + 24 * HOUR, 2)
    assert np.all(np.isin(sel[:50][cols_ok[sel[:50]]], sel3))
