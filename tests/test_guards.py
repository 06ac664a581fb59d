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
from fleet.runtime.guards import Guard, abandonment, incident_text, progress_text
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


def test_the_advice_follows_the_drop_reason_and_crashed_rounds_are_named_apart():
    """A longer deadline is advised only for deadline drops; rounds lost to a shard crash (counts
    unknown: None) are named as such, not explained by counts they do not have."""
    cfg = SimpleNamespace(fleet=SimpleNamespace(goal=100, overselect=1.3, min_reports=None))

    def run(reason: str) -> list[dict]:
        return [
            {"round": r, "released": False, "abandoned": True, "available": 5000, "reported": 60,
             "waiting_for_limit": 0, "dropped": {reason: 70}}
            for r in range(4)
        ]  # fmt: skip

    assert "raise fleet.deadline_s" in abandonment(run("deadline"), cfg, 10**5)
    for reason in ("failure", "outage", "battery", "window_closed"):
        why = abandonment(run(reason), cfg, 10**5)
        assert f"{reason}: 70 of a round's" in why and "deadline_s" not in why, why
    crash = {"round": 9, "released": False, "abandoned": True, "available": None, "reported": None,
             "dropped": {}, "incident": "shard_crash"}  # fmt: skip
    why = abandonment([*run("failure"), crash], cfg, 10**5)
    assert why.startswith("abandoned 5 of 5 rounds (1 to shard crashes") and "4 with fewer" in why
    assert abandonment([crash, crash], cfg, 10**5).endswith("see the incidents above)")


def test_a_participation_limit_that_exhausts_the_fleet_warns_once():
    g = Guard(TrainConfig())
    plenty = _line(0, q=0.01, available=5000, waiting_for_limit=300)
    assert not g.check(plenty).warnings
    exhausted = _line(1, q=1.0, available=90, waiting_for_limit=2600)
    (w,) = g.check(exhausted).warnings
    assert "round 1: the participation limit is exhausting the fleet" in w and "2,600 more" in w
    assert not g.check({**exhausted, "round": 2}).warnings  # once
    assert not Guard(TrainConfig()).check(_line(0, q=1.0, available=90, waiting_for_limit=0)).warnings


def test_incidents_are_told_in_one_line_each():
    crash = {"round": 3, "incident": "shard_crash", "incident_detail": "a shard died during train",
             "recovery_s": 12.34, "restarted_shards": [1]}  # fmt: skip
    assert incident_text(crash) == (
        "round 3: a shard died during train; shard(s) 1 restarted in 12.3 s; the round was abandoned and "
        "released nothing (restarted shards restore their participation state from their files)"
    )
    lost = {**crash, "incident": "shard_lost", "lost_shards": [0, 2], "recovery_s": 120.2}
    assert incident_text(lost).startswith(
        "round 3: a shard died during train and shard(s) 0, 2 were not running again after 120 s"
    )
    assert "2 shard(s)" in incident_text({"round": 4, "shard_restarts": 2})
    assert incident_text(_line(5)) is None


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
        start_new_session=True,  # its own process group, as a scheduler's job
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
@pytest.mark.parametrize("how", ["SIGINT to the driver", "SIGTERM to the process group"])
def test_ctrl_c_and_sigterm_checkpoint_print_one_line_and_exit_130(tmp_path, how):
    """Ctrl-C, and SIGTERM sent to every process of the job as schedulers and `timeout` send it
    (the local Ray's processes included): the round in flight finishes, a checkpoint is written,
    one line says how to resume, and the resume goes on from it."""
    p = _fleet_train(
        "fleet=tiny", "task.name=tests.doubles:SlowMean", "train.rounds=500",
        "train.participation_audit=false", "fleet.min_reports=1", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    deadline = time.time() + 300
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    assert metrics.exists(), "the run did not start"
    if how.startswith("SIGINT"):
        p.send_signal(signal.SIGINT)
    else:
        os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert (
        lines[-1].startswith("interrupted after round ") and "resume with: fleet-train resume=" in lines[-1]
    )
    assert "Traceback" not in err and "SIGTERM received" not in err
    rounds = int(lines[-1].split()[3].rstrip(";"))
    from fleet.round import checkpoint

    assert checkpoint.load_coordinator(tmp_path / "run" / "state")["round"] == rounds
