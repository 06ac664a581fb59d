"""Scale: what a device costs in memory, and the fast check-in path that 10 million devices need.

Budget: 10 million devices in 2 GiB on one machine, everything included, is 214 bytes a device.
Processes (Ray, torch, the coordinator) take a fixed share of that, so the per-device cost must
stay well under it; `python -m fleet.bench scale` measures the whole session.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_mean

from fleet import rng
from fleet.config import FleetConfig
from fleet.phones import availability, population
from fleet.round.shard import remote_shard_class

BUDGET = 2 * 1024**3 / 10_000_000  # bytes a device, all included
DEVICES = 1_000_000


def test_a_million_devices_cost_well_under_the_budget(ray_session):
    """Resident memory a shard actor gains per device, against one of 1,000 devices (same code
    loaded): rows, availability, participation and the check-in's working arrays, after rounds."""
    import psutil

    ray = ray_session
    cfg = tiny_mean(
        f"fleet.population={DEVICES}",
        "fleet.availability.model=diurnal",
        "fleet.min_separation_hours=24",
        "fleet.min_reports=1",
    )
    shard_cls = remote_shard_class(1, 0)
    small, big = shard_cls.remote(cfg, 0, 0, 1000), shard_cls.remote(cfg, 0, 0, DEVICES)
    try:
        for r in range(3):  # night hours, when the most devices are available
            t = 3600.0 * (1 + r)
            counts = ray.get([s.check_in.remote(r, t) for s in (small, big)])
            ray.get(
                [
                    s.plan.remote(r, t, t + 600.0, np.arange(min(c, 50)))
                    for s, c in zip((small, big), counts, strict=True)
                ]
            )
        infos = ray.get([small.info.remote(), big.info.remote()])
        pss = [psutil.Process(i["pid"]).memory_full_info().pss for i in infos]
    finally:
        for s in (small, big):
            ray.kill(s, no_restart=True)
    state = infos[1]["state_bytes"] / DEVICES
    resident = (pss[1] - pss[0]) / (DEVICES - 1000)
    # Held a device: time zone 4, nightly probability 2, schedule 8, the day's coins 2,
    # eligibility 1, participation 10 (27); every other column is `Derived`, generated when read.
    assert state <= 28, state
    assert resident < BUDGET / 2, (resident, state)  # the other half: fixed costs of processes


def _diurnal_by_definition(av: availability.Diurnal, t: float) -> np.ndarray:
    """Available at t: inside the daily window that opened last (in float64), present that day."""
    rel = t - av.open_s.astype(np.float64)
    day = np.floor(rel / availability.DAY)
    inside = rel - day * availability.DAY < av.len_s
    coin = rng.uniform(av.seed, "nightly", day.astype(np.int64), av.ids)
    return inside & (coin < av.prob)


def test_fast_diurnal_check_in_is_the_definition():
    """Check-in computes the phase in float32 from the time of day and hashes one day per group;
    it must pick exactly the devices the plain definition picks, across days and time zones."""
    f = FleetConfig(timezones=[-8.0, 1.0, 5.5, 13.0])
    cols = population.generate(f, 7, 0, 200_000)
    av = availability.make(f.availability, cols, 7)
    for t in (0.0, 1.5, 3600.0 * 5 + 0.25, 86_400.0 * 3 + 77_777.7, 1.44e6 + 12.34, 9.9e6):
        got = av.available(t)
        np.testing.assert_array_equal(got, _diurnal_by_definition(av, t))
        idx = np.flatnonzero(got)
        assert len(idx) > 1000 and np.all(av.window_end(t, idx) > t)


def test_the_scale_bench_keeps_the_peak_and_prints_its_verdicts(ray_session, capsys):
    """Two small fleets through the scale bench's measurement and report: the session's peak is
    sampled (never below the snapshot after the rounds), the first round is kept apart, and the
    verdicts name the round without training and its growth with the population."""
    from fleet.bench._scale_report import report
    from fleet.bench.scale import TINY, measure

    rows = [measure(pop, 1, [5, 10], TINY, warmup=1, rounds=1) for pop in (20_000, 40_000)]
    for r in rows:
        assert r["peak"]["total"] >= r["after"]["total"] > 0
        assert 0 < r["peak"]["shards"] < r["peak"]["total"]
        assert r["first"]["checkin_s"] >= 0 and r["first"]["overhead_s"] > 0
        assert r["state_bytes_per_device"] <= 28
        assert all(r["goals"][g]["overhead_max_s"] >= r["goals"][g]["overhead_s"] for g in (5, 10))
    report(rows, [5, 10], 0, {})
    out = capsys.readouterr().out
    assert "20,000 devices x 1 shard(s): round without training" in out
    assert "grows x" in out and "for x2 devices (no faster than the population)" in out
    assert "the first round without training" in out


def test_the_scale_bench_meters_each_round_call():
    """The bench's traffic table: bytes of every round call, pickled as Ray ships them, by phase,
    and the weights once (the in-process metered shard keeps the real shard's call signatures)."""
    from fleet.bench.scale import TINY, traffic

    out = traffic(4000, 2, 10, TINY, 1)
    assert set(out) == {"check_in", "plan", "train", "broadcast"}
    assert all(v > 0 for v in out.values()), out
    assert out["train"] > out["check_in"]  # a sum of updates outweighs two counts


@pytest.mark.slow
def test_the_w1_bench_sets_fp32_and_bf16_side_by_side(capsys):
    """`python -m fleet.bench w1` runs end to end and prints both precisions' matmul rates and
    engine rates and their ratio against the target (the figures themselves are the bench's)."""
    from fleet.bench import w1

    w1.main(["--devices", "1", "--passes", "1", "--rounds", "0"])
    out = capsys.readouterr().out
    for shape in w1.STEP_SHAPES:
        assert f"matmul {shape}, 1 thread: fp32 " in out and " bf16 " in out
    assert "engine fused fp32 alone" in out and "engine fused bf16 alone" in out
    assert "bf16 / fp32, engine alone:" in out and "target >= 1.8x" in out
