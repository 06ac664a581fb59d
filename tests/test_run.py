"""End to end on Ray: a run writes metrics and summary, and never a device id (invariant 3)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
from conftest import tiny_mean

from fleet.phones import population
from fleet.runtime.driver import train


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
    assert re.search(
        r"ray: \S+, joined this process's existing Ray session: 1 node\(s\), 4 CPUs", caplog.text
    )
    assert f"DP-FedAvg, z={cfg.privacy.noise_multiplier:g}" in caplog.text
    # The header's textbook figure is what fleet-privacy prints for the command it names.
    header = re.search(r"textbook epsilon after 6 rounds (\S+) .*fleet-privacy ([^)]*)\)", caplog.text)
    from fleet.runtime.privacy_cli import main as fleet_privacy

    capfd.readouterr()
    fleet_privacy([*header.group(2).split(), "--accountant", "pld"])
    assert f"epsilon = {header.group(1)} at" in capfd.readouterr().out


def test_nothing_from_the_shards_private_state_reaches_the_outputs(ray_session, tmp_path):
    """state/ names who took part (journals and per-row participation, by row); metrics,
    summary, the report and W&B must not carry any of it. The participants' ids are read from
    state/ itself, then searched for everywhere else, W&B's offline files included."""
    from fleet.round import checkpoint
    from fleet.runtime import report

    cfg = tiny_mean(
        "fleet.id_mode=random",
        "fleet.population=1500",
        "fleet.min_reports=1",
        "train.rounds=4",
        "train.checkpoint_every=2",
        "ray.shards=2",
        "tracking.mode=offline",
        "tracking.media=false",
        "seed=3",
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    report.write_report([report.load_run(run_dir)], run_dir / "report")
    state = run_dir / checkpoint.STATE_DIR
    ids = population.generate(cfg.fleet, cfg.seed, 0, 1500)["device_id"]
    participants = set()
    for start, stop in ((0, 750), (750, 1500)):
        saved = checkpoint.load_shard(state, start, stop, None)
        rows = np.flatnonzero(saved["participations"])
        journal = checkpoint.read_journal(state, start, stop)
        rows = np.concatenate([rows, *(r for *_, r in journal)]) if journal else rows  # not yet committed
        participants.update(int(ids[start + r]) for r in rows)
    assert len(participants) >= 40  # four rounds of about 26
    outside = [p for p in run_dir.rglob("*") if p.is_file() and state not in p.parents]
    assert any("wandb" in p.parts for p in outside) and (run_dir / "report" / "report.html").exists()
    numbers = set()
    for p in outside:
        text = p.read_bytes()
        numbers.update(int(m) for m in re.findall(rb"\d{9,}", text))
        numbers.update(int.from_bytes(text[i : i + 8], "little") for i in range(0, len(text) - 7, 8))
    assert not numbers & participants


def test_private_telemetry_run_writes_only_the_release(ray_session, tmp_path):
    from fleet.round.coordinator import PRIVATE_KEYS

    cfg = tiny_mean(
        "privacy.telemetry=private",
        "fleet.min_reports=1",
        "train.rounds=4",
        "train.eval_every=2",
        "ray.shards=2",
        "train.participation_audit=true",
    )
    summary = train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(set(x) <= PRIVATE_KEYS | {"eval_distance"} for x in lines)
    assert "eval_distance" in lines[1] and not any("epsilon" in x for x in lines)
    assert "mean_reported" not in summary and "participation" not in summary
    assert summary["privacy"]["epsilon"] > 0 and "q" not in summary["privacy"]  # once, at the end
    assert not (tmp_path / "run" / "participation").exists()
    assert summary["privacy"]["covers"].startswith("the model (and the noised clip norm) only")


def test_the_readmes_own_task_example_runs_and_learns(tmp_path, monkeypatch):
    """The "Your own task" section's code, as a user would save it, trained on the tiny fleet
    with the default DP settings for the command it gives."""
    import sys

    from conftest import ROOT, in_process_fleet

    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own task", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].split()
    (tmp_path / "my_task.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_task", None)
    assert command[:2] == ["PYTHONPATH=.", "fleet-train"]
    overrides = [a for a in command[2:] if a != "tracking=disabled"]
    cfg = tiny_mean(*overrides, "fleet.min_reports=1")
    assert cfg.task.name == "my_task:LineTask"
    _, coord = in_process_fleet(cfg)
    start = coord.evaluate()["eval_distance"]
    for _ in range(cfg.train.rounds):
        coord.run_round()
    assert coord.evaluate()["eval_distance"] < 0.5 * start
