"""End to end on Ray: a run writes metrics and summary, and never a device id (invariant 3)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
from conftest import tiny_mean

from fleet import population
from fleet.run import train


def test_run_writes_outputs_and_leaks_no_device_id(ray_session, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    cfg = tiny_mean(
        "fleet.id_mode=random",
        "fleet.availability.model=diurnal",
        "fleet.population=3000",
        "fleet.failure_prob_mean=0.2",
        "fleet.min_reports=1",
        "train.rounds=6",
        "train.eval_every=3",
        "ray.shards=2",
        "seed=11",
        "train.participation_audit=true",
    )
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and summary["rounds"] == 6
    for line in lines:
        assert line["selected"] == line["reported"] + sum(line["dropped"].values())
        for key in (
            "round",
            "sim_time",
            "hour_of_day",
            "available",
            "abandoned",
            "round_duration_s",
            "wall_s",
        ):
            assert key in line
    assert "eval_distance" in lines[2] and summary["privacy"]["epsilon"] > 0
    assert (run_dir / "participation" / "participation.json").exists()
    assert summary["participation"]["released_rounds"] == 6

    ids = population.generate(cfg.fleet, cfg.seed, 0, 3000)["device_id"]
    assert ids.min() > 10**12
    # Every output file and the captured logs, searched for any device id in decimal or hex.
    texts = [p.read_bytes().decode("utf-8", "replace") for p in run_dir.rglob("*") if p.is_file()]
    out, err = capfd.readouterr()
    texts += [out, err, caplog.text]
    numbers = set()
    for text in texts:
        numbers.update(int(m) for m in re.findall(r"\d{9,}", text))
        numbers.update(int(m, 16) for m in re.findall(r"[0-9a-fA-F]{12,}", text))
    leaked = numbers & set(int(x) for x in ids)
    assert not leaked
    assert np.isfinite(summary["state_bytes_per_device"]) and summary["state_bytes_per_device"] < 100
    # The start-up header says what runs: the fleet as built, the parameter count, the mechanism.
    assert summary["model_params"] == cfg.task.mean_dim
    assert "fleet: 3,000 devices (diurnal availability) in 2 shard(s)" in caplog.text
    assert f"task: mean; {cfg.task.mean_dim:,} parameters" in caplog.text
    assert f"DP-FedAvg, z={cfg.privacy.noise_multiplier:g}" in caplog.text
