"""The planner (`fleet-plan`): a dry run is the training run without training, so its ledger is the
run's; its calibrated z meets the target when a run uses it; the command line as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import in_process_fleet, tiny_mean

from fleet.audits import participation
from fleet.audits.plan import make_plan

# A diurnal fleet small enough for in-process rounds; a limit so that q_r depends on earlier cohorts.
FLEET = (
    "fleet=small",
    "fleet.population=4000",
    "fleet.goal=20",
    "task.name=mean",
    "fleet.min_separation_rounds=3",
    "train.rounds=30",
)
MECHANISMS = {
    "dp_fedavg": ("privacy=dp_fedavg",),
    "dp_fedavg_fixed": ("privacy=dp_fedavg", "privacy.sampling=fixed_size", "privacy.accountant=rdp"),
    "dp_ftrl": ("privacy=dp_ftrl",),
    "dp_blt": ("privacy=dp_blt",),
}


def _rounds(cfg, rounds: int, state_dir=None):
    shards, coord = in_process_fleet(cfg, 2, state_dir)
    lines = [coord.run_round() for _ in range(rounds)]
    return shards, coord, lines


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_dry_run_has_the_training_runs_ledger_entry_for_entry(mechanism):
    """Same config and seed, reproducible mode: the plan's ledger, cohorts and epsilon are the
    training run's, to the last digit (the model never decides who checks in or is drawn)."""
    got = {}
    for dry in ("false", "true"):
        cfg = tiny_mean(*FLEET, *MECHANISMS[mechanism], f"train.dry_run={dry}")
        _, coord, lines = _rounds(cfg, 30)
        got[dry] = (
            [r.to_json() for r in coord.mechanism.ledger.releases],
            [(x["available"], x["selected"], x["reported"], x["released"], x.get("epsilon")) for x in lines],
            coord.mechanism.epsilon(),
        )
    assert got["true"] == got["false"]
    assert len(got["true"][0]) == 30 and got["true"][2] > 0
    assert any(x["released"] for x in lines) and "recall@1" not in lines[-1]


def _plan(cfg, state_dir: Path) -> dict:
    shards, coord, lines = _rounds(cfg, cfg.train.rounds, state_dir / "state")
    summary = {"privacy": coord.privacy_summary()}
    return make_plan(cfg, shards, lines, summary, state_dir)


@pytest.mark.parametrize("mechanism", ["dp_fedavg", "dp_blt"])
def test_the_headline_calibration_meets_its_target_in_a_run(mechanism, tmp_path):
    target = 2.0
    cfg = tiny_mean(*FLEET, *MECHANISMS[mechanism], "train.dry_run=true", f"plan.target_epsilon={target}")
    plan = _plan(cfg, tmp_path / "plan")
    z = plan["calibration"]["noise_multiplier"]
    assert plan["calibration"]["for"] == "headline" and z != cfg.privacy.noise_multiplier
    run = tiny_mean(*FLEET, *MECHANISMS[mechanism], f"privacy.noise_multiplier={z}")
    _, coord, _ = _rounds(run, 30)
    assert target * 0.999 <= coord.mechanism.epsilon() <= target


@pytest.mark.parametrize("target_for", ["p99", "worst"])
def test_a_calibration_for_the_devices_meets_it_under_the_real_schedule(target_for, tmp_path):
    """The per-device figure at the calibrated z, as the participation audit of a training run with
    that z computes it, is at most the target (and close to it: the z is the smallest)."""
    target = 3.0
    common = (*FLEET, "privacy=dp_fedavg", "fleet.availability.model=diurnal")
    cfg = tiny_mean(
        *common, "train.dry_run=true", f"plan.target_epsilon={target}", f"plan.target_for={target_for}"
    )
    plan = _plan(cfg, tmp_path / "plan")
    z = plan["calibration"]["noise_multiplier"]
    run = tiny_mean(*common, f"privacy.noise_multiplier={z}")
    shards, _, lines = _rounds(run, 30)
    audit = participation.run_audit(run, shards, lines, tmp_path / "run", figures=False)
    rs = audit["privacy"]["real_schedule"]
    got = rs["p99"] if target_for == "p99" else rs["max"]
    assert target * 0.99 <= got <= target * (1 + 1e-9)
    # and the plan's per-device distribution at its own z is the audit's at that z
    base = tiny_mean(*common)
    shards, _, lines = _rounds(base, 30)
    audit = participation.run_audit(base, shards, lines, tmp_path / "base", figures=False)
    d = plan["privacy"]["per_device"]
    assert d["p99"] == pytest.approx(audit["privacy"]["real_schedule"]["p99"], rel=1e-9)
    assert d["worst"] == pytest.approx(audit["privacy"]["real_schedule"]["max"], rel=1e-9)


def test_the_plan_describes_the_deployment(tmp_path):
    cfg = tiny_mean(*FLEET, "privacy=dp_fedavg", "train.dry_run=true")
    plan = _plan(cfg, tmp_path)
    s = plan["shape"]
    assert s["rounds"] == 30 and s["released_rounds"] + s["abandoned_rounds"] == 30
    assert sum(s["participation_histogram"]) == 4000 and 0 < s["never_trained_share"] < 1
    assert s["simulated_days"] > 0 and s["reports_per_round"]["goal"] == 20
    curves = plan["by_round"]
    assert len(curves["median_device"]) == len(curves["round"]) == s["released_rounds"]
    assert np.all(np.diff(curves["worst_device"]) >= -1e-12)  # epsilon only grows
    assert curves["worst_device"][-1] == pytest.approx(plan["privacy"]["per_device"]["worst"])
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["privacy"]["headline"]["epsilon"] == plan["privacy"]["headline"]["epsilon"]
    assert {p.name for p in (tmp_path / "plan").glob("*.png")} == {
        "plan_epsilon_by_round.png",
        "plan_epsilon_by_device.png",
    }


def test_bad_plan_settings_are_refused_naming_the_key():
    from fleet.config import ConfigError
    from fleet.privacy.mechanisms import validate

    with pytest.raises(ConfigError, match="plan.target_for: unknown value 'p50'"):
        validate(tiny_mean("plan.target_for=p50"))
    with pytest.raises(ConfigError, match="plan.target_epsilon: must be > 0"):
        validate(tiny_mean("plan.target_epsilon=-1"))


@pytest.mark.slow  # a real fleet-plan process, on Ray
def test_fleet_plan_as_a_user_runs_it(tmp_path):
    out = tmp_path / "plan"
    args = [
        sys.executable,
        "-m",
        "fleet.runtime.plan_cli",
        "fleet=tiny",
        "fleet.population=3000",
        "task.name=mean",
    ]
    args += [
        "train.rounds=20",
        "tracking=disabled",
        "progress=false",
        "--target-epsilon",
        "5",
        "--out",
        str(out),
    ]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "headline epsilon" in p.stdout and "epsilon 5 for the headline" in p.stdout
    plan = json.loads((out / "plan" / "plan.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert plan["privacy"]["headline"]["epsilon"] == summary["privacy"]["epsilon"]
    assert summary["plan"]["calibrated_noise_multiplier"] == plan["calibration"]["noise_multiplier"]
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    bad = subprocess.run([*args[:3], "--for", "p50"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_calibration_refuses_a_run_without_noise():
    from fleet.privacy.calibrate import noise_for_ledger

    cfg = tiny_mean("privacy.noise_multiplier=0", "privacy.allow_zero_noise=true")
    with pytest.raises(ValueError, match="no noise"):
        noise_for_ledger(None, cfg, 100, [], "pld", 1e-3, 1.0)
    assert dataclasses.is_dataclass(cfg.plan)
