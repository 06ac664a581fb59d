"""Dropout scenarios and their semantics (issue 9)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXED_SIZE, in_process_fleet, tiny_mean

from fleet.config import DropoutConfig
from fleet.phones import dropout
from fleet.phones.timing import Reason
from fleet.round.shard import ShardCore

HOUR = 3600.0


def test_outage_of_one_time_zone_removes_exactly_those_devices_in_its_window():
    cfg = tiny_mean(
        "fleet.timezones=[0.0,3.0]",
        "fleet.low_memory_share=0",
        "dropout.outage_timezones=[3.0]",
        "dropout.outage_start_hour=1",
        "dropout.outage_hours=2",
    )
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
    tz = shard.cols["tz_offset_hours"]
    n3 = int((tz == 3.0).sum())
    assert 0 < n3 < len(tz)
    assert shard.check_in(0, 0.5 * HOUR) == len(tz)
    during = shard.check_in(1, 2.0 * HOUR)
    assert during == len(tz) - n3
    assert np.all(tz[shard._available] == 0.0)
    assert shard.check_in(2, 3.0 * HOUR) == len(tz)
    # A job running when the outage starts drops with reason `outage`, only in that zone.
    slow = tiny_mean(
        "fleet.timezones=[0.0,3.0]",
        "fleet.failure_prob_mean=0",
        "fleet.compute_flops_median=0.1",  # jobs take hours
        "fleet.deadline_s=1e6",
        "dropout.outage_timezones=[3.0]",
        "dropout.outage_start_hour=0.25",
        "dropout.outage_hours=2",
    )
    s2 = ShardCore(slow, 0, 0, slow.fleet.population)
    n = s2.check_in(0, 0.0)
    plan = s2.plan(0, 0.0, 1e6, np.arange(n))
    tz_sel = s2.cols["tz_offset_hours"][s2._selected]
    out = plan.reason == Reason.OUTAGE
    assert out.sum() > 0 and np.all(tz_sel[out] == 3.0)
    assert not np.any(plan.reason[tz_sel == 0.0] == Reason.OUTAGE)


def _completion_rate(overselect: float) -> float:
    cfg = tiny_mean(
        "fleet.goal=20",
        "fleet.min_reports=20",
        f"fleet.overselect={overselect}",
        "fleet.failure_prob_mean=0.02",
        "dropout.extra_failure=0.3",
    )
    _, coord = in_process_fleet(cfg, 1)
    lines = [coord.run_round() for _ in range(20)]
    return float(np.mean([not x["abandoned"] for x in lines]))


def test_raising_overselection_raises_the_completed_round_rate():
    low, high = _completion_rate(1.0), _completion_rate(1.8)
    assert low < 0.2 and high > 0.8, (low, high)


def test_wasted_compute_is_the_job_flops_of_trained_but_uncounted_devices():
    cfg = tiny_mean(
        "task.name=tests.doubles:NaNForOddDevices",
        "fleet.goal=15",
        "fleet.overselect=2.0",
        "fleet.min_reports=1",
        "fleet.failure_prob_mean=0.1",
        *FIXED_SIZE,
    )
    (shard,), coord = in_process_fleet(cfg, 1)
    line = coord.run_round()
    # Replay the same round by hand (all randomness is keyed by seed, round and device).
    total = shard.check_in(0, 0.0)
    ranks = coord.sampler.draw(0, total, 30)
    plan = shard.plan(0, 0.0, cfg.fleet.deadline_s, ranks)
    arrived = np.flatnonzero(plan.reason == Reason.REPORTED)
    order = arrived[np.argsort(plan.arrival[arrived], kind="stable")]
    accepted, late = order[:15], order[15:]
    ids = shard.cols["device_id"][shard._selected]
    invalid = accepted[ids[accepted] % 2 == 1]
    expect = plan.flops[late].sum() + plan.flops[invalid].sum()
    assert line["dropped"]["after_goal"] == len(late) > 0
    assert line["dropped"]["invalid"] == len(invalid) > 0
    assert line["wasted_flops"] == pytest.approx(expect, rel=1e-12)
    # aborted: the share of each dropped job done before it dropped, in FLOPs
    dropped = plan.reason != Reason.REPORTED
    aborted = (plan.flops * plan.done)[dropped].sum()
    assert aborted > 0 and line["aborted_flops"] == pytest.approx(aborted, rel=1e-12)


def test_below_goal_round_divides_by_the_goal():
    cfg = tiny_mean(
        "task.name=tests.doubles:UnitPush",
        "task.mean_dim=4",
        "privacy.noise_multiplier=0",
        "privacy.clip_norm=1.0",
        "fleet.goal=20",
        "fleet.min_reports=5",
        "fleet.overselect=1.0",
        "dropout.extra_failure=0.4",
        "train.server_optimizer=sgd",
    )
    _, coord = in_process_fleet(cfg, 1)
    before = coord.get_params().copy()
    line = coord.run_round()
    assert 5 <= line["reported"] < 20 and line["released"]
    step = coord.get_params() - before
    # each clipped update is (1/2, 1/2, 1/2, 1/2) * (1 - 2^-23); the sum divided by 20, not by reported
    np.testing.assert_allclose(step, np.full(4, 0.5 * line["reported"] / 20), rtol=1e-5)


def test_battery_aborts_long_jobs_more_often():
    cfg = tiny_mean(
        "fleet.failure_prob_mean=0",
        "fleet.compute_flops_median=1.0",
        "fleet.compute_flops_sigma=1.0",
        "fleet.deadline_s=1e7",
        "dropout.battery_tau_minutes=30",
    )
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
    n = shard.check_in(0, 0.0)
    plan = shard.plan(0, 0.0, 1e7, np.arange(n))
    compute = plan.flops / shard.cols["flops"][shard._selected]
    died = plan.reason == Reason.BATTERY
    assert 0 < died.sum() < n
    assert np.median(compute[died]) > 2 * np.median(compute[~died])


def test_failure_spike_hits_only_jobs_in_its_window():
    cfg = tiny_mean(
        "fleet.failure_prob_mean=0",
        "dropout.spike_start_hour=5",
        "dropout.spike_hours=1",
        "dropout.spike_failure=0.9",
    )
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
    n = shard.check_in(0, 0.0)
    before = shard.plan(0, 0.0, 600.0, np.arange(n))
    assert not np.any(before.reason == Reason.FAILURE)
    n = shard.check_in(1, 5.2 * HOUR)
    during = shard.plan(1, 5.2 * HOUR, 5.2 * HOUR + 600, np.arange(n))
    assert np.mean(during.reason == Reason.FAILURE) > 0.8


def test_active_hours_force_rounds_into_the_band():
    d = DropoutConfig(active_hours=[10.0, 14.0])
    assert dropout.next_active_time(d, 11 * HOUR) == 11 * HOUR
    assert dropout.next_active_time(d, 15 * HOUR) == 34 * HOUR
    assert dropout.next_active_time(d, 2 * HOUR) == 10 * HOUR
    wrap = DropoutConfig(active_hours=[22.0, 2.0])
    assert dropout.next_active_time(wrap, 23 * HOUR) == 23 * HOUR
    assert dropout.next_active_time(wrap, 1 * HOUR) == 1 * HOUR
    assert dropout.next_active_time(wrap, 12 * HOUR) == 22 * HOUR
    cfg = tiny_mean("dropout.active_hours=[10,14]", "fleet.round_interval_s=3600", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg, 1)
    hours = [coord.run_round()["hour_of_day"] for _ in range(8)]
    assert all(10 <= h < 14 for h in hours), hours


def test_bad_dropout_config_names_the_key():
    from fleet.config import ConfigError
    from fleet.privacy.mechanisms import validate

    with pytest.raises(ConfigError, match=r"^dropout.extra_failure:"):
        validate(tiny_mean("dropout.extra_failure=1.5"))
    with pytest.raises(ConfigError, match=r"^dropout.active_hours:"):
        validate(tiny_mean("dropout.active_hours=[5]"))


def test_knee_is_where_the_curve_turns():
    from fleet.audits.stress import knee

    x = np.array([1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    y = np.array([0.1, 0.8, 0.95, 0.97, 0.98, 0.99])  # saturates after 1.2-1.4
    assert knee(x, y) == 1
    assert knee(x, x) is None  # a straight line has no knee


def test_stress_page_from_a_sweep(tmp_path):
    import json

    from fleet.audits.stress import plot_stress, run_point
    from fleet.runtime.report import find_runs

    for i, (fail, over) in enumerate([(0.0, 1.0), (0.0, 1.5), (0.4, 1.0), (0.4, 1.5)]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"dropout": {"extra_failure": fail}, "fleet": {"overselect": over}})
        )
        lines = [
            {"round": r, "abandoned": r % 2 == 0 and fail > 0 and over < 1.2, "time_to_goal_s": 10.0 + r}
            for r in range(4)
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (d / "summary.json").write_text(json.dumps({"final": {"recall@1": 0.1}, "privacy": {"epsilon": 2.0}}))
    runs = find_runs([tmp_path])
    points = [run_point(r) for r in runs]
    assert sorted(p["success_rate"] for p in points) == [0.5, 1.0, 1.0, 1.0]
    fig = plot_stress(runs)
    assert fig is not None and len(fig.axes) == 8  # 4 outcomes x 2 swept knobs
