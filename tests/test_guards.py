"""A run that tells the truth while it runs: divergence, rounds with nothing to learn from,
abandoned rounds, Ctrl-C, and what a resume may change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT, SMALL_NWP, in_process_fleet, make_cfg, tiny_mean

from fleet.config import ConfigError, TrainConfig
from fleet.runtime.guards import Guard, abandonment, progress_text
from fleet.runtime.resume import resumed_config


def _line(r: int, **kw) -> dict:
    return {"round": r, "released": True, "abandoned": False, "reported": 20, **kw}


def test_a_loss_that_stays_far_above_its_best_stops_the_run_and_says_why():
    g = Guard(TrainConfig())
    # one spike (a noisy loss near its floor) is not a divergence; three rounds in a row are
    for r, loss in enumerate([6.9, 6.5, 6.0, 30.0, 7.0, 11.9, 25.0, 31.0]):
        assert g.check(_line(r, train_loss=loss, signal_to_noise=0.05)).stop is None
    v = g.check(_line(8, train_loss=45.0, signal_to_noise=0.03))
    assert v.stop.startswith("the training loss rose to 45 in round 8, over 4x its best (6) for 3 rounds")
    assert "signal-to-noise" in v.stop and "raise fleet.goal" in v.stop
    nan = Guard(TrainConfig()).check(_line(0, train_loss=float("nan")))
    assert nan.stop == "the training loss is nan in round 0"
    lenient = Guard(TrainConfig(stop_on_divergence=False, divergence_rounds=1))
    lenient.check(_line(0, train_loss=1.0))
    v = lenient.check(_line(1, train_loss=5.0))
    assert v.stop is None and v.warnings[0].startswith("diverging: the training loss rose")


def test_an_evaluation_below_its_baseline_after_warm_up_stops_the_run():
    g = Guard(TrainConfig(guard_warmup_rounds=10))
    assert g.check(_line(4, **{"recall@1": 0.01, "unigram_recall@1": 0.07})).stop is None  # warming up
    v = g.check(_line(9, **{"recall@1": 0.01, "unigram_recall@1": 0.07}))
    assert v.stop == "recall@1 is 0.01 after round 9, below the unigram baseline's 0.07"
    assert g.check(_line(10, **{"recall@1": 0.09, "unigram_recall@1": 0.07})).stop is None


def test_rounds_with_nothing_to_learn_from_are_said_and_then_stop_the_run():
    g = Guard(TrainConfig(max_pure_noise_rounds=3))
    for r in range(2):
        v = g.check(_line(r, reported=0, pure_noise=True))
        assert v.stop is None and v.warnings == [f"round {r} released noise alone: every update was invalid"]
    v = g.check(_line(2, reported=0, pure_noise=True))
    assert v.stop.startswith("3 released rounds in a row had no valid update")


def test_a_low_signal_to_noise_ratio_warns_once():
    g = Guard(TrainConfig(min_signal_to_noise=0.05, guard_window=3))
    warnings = [w for r in range(6) for w in g.check(_line(r, signal_to_noise=0.01)).warnings]
    assert len(warnings) == 1 and warnings[0].startswith("signal-to-noise below 0.05 for 3 released rounds")


@pytest.mark.slow
def test_the_suggested_tiny_dp_run_is_stopped_with_the_reason():
    """`fleet=tiny` with the DP defaults diverges: z S / goal = 0.025 of noise a coordinate, every
    round, on 46,656 parameters, with server momentum 0.9, swamps 20 clipped updates. The guard
    stops it within a few rounds of the loss taking off, and names the cause."""
    cfg = make_cfg(
        "fleet=tiny", "tracking.mode=disabled", "progress=false", "train.participation_audit=false"
    )
    _, coord = in_process_fleet(cfg)
    g = Guard(cfg.train)
    stop = None
    for _ in range(30):
        stop = g.check(coord.run_round()).stop
        if stop:
            break
    assert stop and stop.startswith("the training loss rose to") and "signal-to-noise" in stop
    assert coord.round < 20


@pytest.mark.slow
def test_the_same_fleet_learns_with_a_cohort_the_noise_allows():
    cfg = make_cfg(*SMALL_NWP, "fleet.goal=200", "fleet.population=4000", "train.participation_audit=false")
    _, coord = in_process_fleet(cfg)
    g = Guard(cfg.train)
    lines = [coord.run_round() for _ in range(20)]
    assert not any(g.check(x).stop for x in lines)
    final = coord.evaluate()
    assert final["recall@1"] > final["unigram_recall@1"]


def test_abandoned_rounds_are_counted_and_explained():
    f = SimpleNamespace(goal=100, overselect=1.3, min_reports=None)
    cfg = SimpleNamespace(fleet=f)
    lines = [
        {"round": r, "released": r % 3 == 0, "abandoned": r % 3 != 0, "available": 90, "reported": 60,
         "waiting_for_limit": 2600, "dropped": {"deadline": 5, "window_closed": 1}}
        for r in range(9)
    ]  # fmt: skip
    assert (
        progress_text(lines) == "3 released, 6 abandoned; dropped most for deadline (45), window_closed (9)"
    )
    why = abandonment(lines, cfg, 2700)
    assert why.startswith("abandoned 6 of 9 rounds")
    assert "participation limit: on average 2,600 of 2,700 devices waited" in why
    assert "too few devices available: 90 a round on average for a cohort of 130" in why
    assert abandonment(lines[:1], cfg, 2700) is None


def test_resume_may_extend_a_run_but_not_change_it():
    saved = {
        "train": {"rounds": 10, "eval_every": 5},
        "fleet": {"goal": 20},
        "privacy": {"target_epsilon": None},
    }
    out = resumed_config(saved, ["resume=/x", "train.rounds=40", "privacy.target_epsilon=2.5"])
    assert (
        out["train"]["rounds"] == 40
        and out["privacy"]["target_epsilon"] == 2.5
        and out["fleet"]["goal"] == 20
    )
    with pytest.raises(ConfigError, match=r"^resume: fleet.goal, fleet cannot change on resume"):
        resumed_config(saved, ["train.rounds=40", "fleet.goal=30", "fleet=tiny"])


@pytest.mark.slow
def test_a_resumed_run_goes_on_to_the_new_round_count(ray_session, tmp_path):
    from fleet.runtime.driver import train

    run = tmp_path / "run"
    train(tiny_mean("train.rounds=3", "fleet.min_reports=1", "ray.shards=1"), run)
    summary = train(tiny_mean(f"resume={run}", "ray.shards=1"), tmp_path / "x", overrides=["train.rounds=5"])
    assert summary["rounds"] == 5


def _fleet_train(*args: str, cwd) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", *args, "tracking=disabled", "progress=false"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_divergence_exits_with_code_3_and_one_line(tmp_path):
    p = _fleet_train("fleet=tiny", "train.rounds=30", "train.participation_audit=false", cwd=tmp_path)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped after round ") and "checkpoint saved" in last
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    p = _fleet_train(
        "fleet=tiny", "task.name=tests.doubles:SlowMean", "train.rounds=500",
        "train.participation_audit=false", "fleet.min_reports=1", cwd=tmp_path,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.rglob("metrics.jsonl")):
        time.sleep(0.5)
    metrics = list(tmp_path.rglob("metrics.jsonl"))
    assert metrics, "the run did not start"
    while time.time() < deadline and not metrics[0].read_text().strip():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert (
        lines[-1].startswith("interrupted after round ") and "resume with: fleet-train resume=" in lines[-1]
    )
    assert "Traceback" not in err
