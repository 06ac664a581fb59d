"""The round: funnel accounting, over-selection, deadline, goal, min_reports, abandonment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import FIXED_SIZE, in_process_fleet, tiny_mean
from scipy import stats

from fleet.phones import timing
from fleet.phones.timing import Reason


def _funnel_ok(line: dict) -> None:
    assert line["selected"] == line["reported"] + sum(line["dropped"].values())


def test_funnel_sums_and_overselection():
    cfg = tiny_mean("fleet.failure_prob_mean=0.2", "fleet.goal=40", "fleet.overselect=1.5", *FIXED_SIZE)
    _, coord = in_process_fleet(cfg)
    for _ in range(5):
        line = coord.run_round()
        _funnel_ok(line)
        assert line["selected"] == math.ceil(40 * 1.5)
        assert line["reported"] <= 40
        assert line["dropped"]["failure"] > 0
        if line["dropped"]["after_goal"] > 0:
            assert line["reported"] == 40  # late arrivals exist only once the goal is met


def test_deadline_and_window_drops_are_reasons():
    """Slow devices, a short deadline and availability windows of minutes: some jobs miss the
    deadline, others lose their window first; each is dropped for its own reason."""
    cfg = tiny_mean(
        "fleet.compute_flops_median=40",  # the mean task's jobs take tens of seconds
        "fleet.compute_flops_sigma=1.5",
        "fleet.deadline_s=60",
        "fleet.availability.model=markov",
        "fleet.availability.on_hours_mean=0.01",  # windows of about 36 s
        "fleet.availability.off_hours_mean=0.02",
        "fleet.failure_prob_mean=0",
        "fleet.min_reports=1",
    )
    _, coord = in_process_fleet(cfg)
    lines = [coord.run_round() for _ in range(3)]
    for line in lines:
        _funnel_ok(line)
    assert sum(x["dropped"]["deadline"] for x in lines) > 0
    assert sum(x["dropped"]["window_closed"] for x in lines) > 0
    assert sum(x["dropped"]["failure"] for x in lines) == 0


def test_plan_picks_the_earliest_event():
    duration = np.array([10.0, 10.0, 10.0, 200.0, 50.0])
    fail = np.array([False, False, True, False, True])
    arrival, reason = timing.plan(
        0.0,
        duration,
        {
            Reason.FAILURE: np.where(fail, np.array([0.5, 0.5, 0.5, 0.5, 0.9]) * duration, np.inf),
            Reason.WINDOW_CLOSED: np.array([np.inf, 5.0, np.inf, np.inf, 60.0]),
            Reason.DEADLINE: np.full(5, 100.0),
        },
    )
    assert reason.tolist() == [
        Reason.REPORTED,
        Reason.WINDOW_CLOSED,
        Reason.FAILURE,
        Reason.DEADLINE,
        Reason.FAILURE,
    ]
    assert arrival[0] == 10.0 and np.all(np.isinf(arrival[1:]))


def test_poisson_cohort_is_binomial_and_not_capped_by_the_goal():
    """Poisson sampling: each available device joins with q = ceil(goal x overselect) / available,
    so the cohort size is Binomial(available, q); every arrival before the deadline counts."""
    cfg = tiny_mean(
        "fleet.failure_prob_mean=0", "fleet.goal=20", "fleet.overselect=1.5", "fleet.min_reports=1"
    )
    _, coord = in_process_fleet(cfg, 1)
    lines = [coord.run_round() for _ in range(60)]
    n = lines[0]["available"]
    assert all(x["available"] == n and x["q"] == 30 / n for x in lines)
    sizes = np.array([x["selected"] for x in lines])
    assert len(set(sizes.tolist())) > 5  # it varies round to round
    # The sizes' mean and variance are those of Binomial(n, 30 / n): a chi-square test on the
    # variance and a z-test on the mean, both two-sided at 1e-3.
    q = 30 / n
    assert abs(sizes.mean() - 30) < 3.3 * np.sqrt(n * q * (1 - q) / len(sizes))
    chi2 = (len(sizes) - 1) * sizes.var(ddof=1) / (n * q * (1 - q))
    assert stats.chi2.ppf(5e-4, len(sizes) - 1) < chi2 < stats.chi2.ppf(1 - 5e-4, len(sizes) - 1)
    assert any(x["reported"] > 20 for x in lines)  # the goal does not cap a Poisson cohort
    assert all(x["dropped"]["after_goal"] == 0 and x["reported"] == x["selected"] for x in lines)


def test_first_goal_arrivals_win_and_round_closes_at_goal():
    cfg = tiny_mean("fleet.failure_prob_mean=0", "fleet.goal=10", "fleet.overselect=2.0", *FIXED_SIZE)
    shards, coord = in_process_fleet(cfg)
    line = coord.run_round()
    assert line["reported"] == 10 and line["dropped"]["after_goal"] == 10
    # The round closed at the 10th arrival, before the deadline.
    assert 0 < line["round_duration_s"] < cfg.fleet.deadline_s


def test_abandoned_round_changes_nothing():
    cfg = tiny_mean(
        "fleet.failure_prob_mean=0.9", "fleet.goal=50", "fleet.min_reports=50", "fleet.overselect=1.0"
    )
    shards, coord = in_process_fleet(cfg)
    before = coord.get_params().copy()
    line = coord.run_round()
    assert line["abandoned"] and not line["released"]
    _funnel_ok(line)
    np.testing.assert_array_equal(coord.get_params(), before)
    assert coord.mechanism.accountant.releases == [] and line["epsilon"] == 0.0
    for s in shards:
        assert np.all(np.isinf(s.last_participation))  # nobody's participation was recorded


def test_participation_recorded_for_counted_devices_only():
    cfg = tiny_mean(
        "fleet.failure_prob_mean=0.3", "fleet.goal=30", "fleet.overselect=1.5", "fleet.min_reports=1"
    )
    shards, coord = in_process_fleet(cfg)
    line = coord.run_round()
    assert sum(int(np.isfinite(s.last_participation).sum()) for s in shards) == line["reported"]
    assert sum(int(s.participations.sum()) for s in shards) == line["reported"]


def test_a_task_may_choose_its_training_order_but_not_who_counts():
    """A task's cohort_order changes the order the shard hands it the cohort (a lockstep engine
    groups similar devices), never which devices count or what the round releases."""
    from tests.doubles import LargestFirst

    base = (
        "fleet.failure_prob_mean=0.2",
        "fleet.goal=30",
        "fleet.min_reports=1",
        "privacy.noise_multiplier=0.5",
    )
    shards_a, plain = in_process_fleet(tiny_mean(*base))
    LargestFirst.seen.clear()
    shards_b, ordered = in_process_fleet(tiny_mean(*base, "task.name=tests.doubles:LargestFirst"))
    for _ in range(3):
        a, b = plain.run_round(), ordered.run_round()
        assert (a["reported"], a["dropped"]) == (b["reported"], b["dropped"])
    np.testing.assert_allclose(ordered.get_params(), plain.get_params(), rtol=1e-6, atol=1e-9)
    for sa, sb in zip(shards_a, shards_b, strict=True):
        np.testing.assert_array_equal(sa.participations, sb.participations)
    assert LargestFirst.seen and all(s == sorted(s, reverse=True) for s in LargestFirst.seen)
    assert any(len(set(s)) > 1 for s in LargestFirst.seen)  # the order was not trivially sorted
    _, broken = in_process_fleet(tiny_mean(*base, "task.name=tests.doubles:NotAPermutation"))
    with pytest.raises(RuntimeError, match="cohort_order did not return a permutation"):
        broken.run_round()


@pytest.mark.parametrize("availability_model", ["always", "diurnal", "markov"])
def test_each_availability_model_gives_the_check_ins_it_describes(availability_model):
    """always: every eligible device every round; markov: on about on / (on + off) of the time;
    diurnal: a night peak and a day trough, the fleet's ~4x swing."""
    cfg = tiny_mean(
        f"fleet.availability.model={availability_model}",
        "fleet.population=4000",
        "fleet.min_reports=1",
        "fleet.round_interval_s=3600",  # an hour between rounds: a day in 24
    )
    shards, coord = in_process_fleet(cfg)
    eligible = sum(int(s.eligible.sum()) for s in shards)
    lines = [coord.run_round() for _ in range(24)]
    for line in lines:
        _funnel_ok(line)
    share = np.array([x["available"] for x in lines]) / eligible
    if availability_model == "always":
        assert np.all(share == 1.0)
    elif availability_model == "markov":
        a = cfg.fleet.availability
        assert abs(share.mean() - a.on_hours_mean / (a.on_hours_mean + a.off_hours_mean)) < 0.05
    else:
        hours = np.array([x["hour_of_day"] + 1.0 for x in lines]) % 24  # local time, UTC+1
        night = share[(hours < 5) | (hours >= 23)].mean()
        day = share[(hours >= 10) & (hours < 17)].mean()
        assert night > 2 * day > 0
