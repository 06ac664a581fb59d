"""Tracking: a multirun's jobs are offline W&B runs in one group whose history is metrics.jsonl,
with the report's plots as media; the progress bar shows epsilon, the headline metric and the
funnel. W&B never touches the network here (offline mode, read back from the run's .wandb log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleet.runtime.cli import sweep_group
from fleet.runtime.tracking import Tracker, wandb_values

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the one offline W&B run under run_dir, via W&B's own log reader."""
    logs = list(run_dir.glob("wandb/offline-run-*/*.wandb"))
    assert len(logs) == 1, logs
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(logs[0])],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("multirun")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet",
            "--multirun",
            "fleet=tiny",
            "task.name=mean",
            "train.rounds=3",
            "train.eval_every=2",
            "ray.num_cpus=2",
            "privacy.noise_multiplier=0.5,1",
            f"hydra.sweep.dir={root / 'sweep'}",
        ],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return root / "sweep", p


@pytest.mark.slow  # a real sweep in a subprocess
def test_multirun_makes_one_run_dir_per_point(sweep):
    sweep_dir, p = sweep
    runs = sorted(d for d in sweep_dir.iterdir() if d.is_dir())
    assert [d.name for d in runs] == ["0", "1"]
    for d in runs:
        assert len(read_lines(d)) == 3
        assert json.loads((d / "summary.json").read_text())["rounds"] == 3
        assert (d / "fleet.log").exists() and (d / "ray.log").exists()
    assert p.stdout.count("run dir:") == 2
    assert "Started a local Ray instance" not in p.stderr  # Ray's notices go to ray.log


@pytest.mark.slow  # a real sweep in a subprocess
def test_multirun_wandb_runs_share_a_group_and_mirror_metrics(sweep):
    sweep_dir, _ = sweep
    groups = set()
    for num, z in (("0", "0.5"), ("1", "1")):
        run_dir = sweep_dir / num
        records = wandb_records(run_dir)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        groups.add(run["run_group"])
        assert f"privacy.noise_multiplier={z}" in run["tags"] and "fleet=tiny" in run["tags"]
        assert run["config"]["update"]["privacy"]["noise_multiplier"] == float(z)

        history = {}
        for r in records:
            if r["type"] == "history":
                history.setdefault(r["history"]["step"].get("num", 0), {}).update(r["history"]["item"])
        lines = read_lines(run_dir)
        assert sorted(history) == [x["round"] for x in lines]
        for line in lines:
            logged = history[line["round"]]
            for key, value in wandb_values(line).items():
                assert logged[key] == (value if isinstance(value, int) else pytest.approx(value)), key
        last = history[lines[-1]["round"]]
        for name in ("funnel", "dropout", "epsilon", "participation_by_hour", "metrics_vs_epsilon"):
            assert last[f"plots/{name}._type"] == "image-file"
        assert len(list(run_dir.glob("wandb/offline-run-*/files/media/images/plots/*.png"))) >= 5

        summary = {}
        for r in records:
            if r["type"] == "summary":
                summary.update(r["summary"]["update"])
        final = json.loads((run_dir / "summary.json").read_text())
        assert summary["final/eval_distance"] == pytest.approx(final["final"]["eval_distance"])
        assert summary["privacy/epsilon"] == pytest.approx(final["privacy"]["epsilon"])
    assert groups == {sweep_group(str(sweep_dir))}


def _cfg(mode: str = "disabled", progress: bool = True, media: bool = True) -> SimpleNamespace:
    tracking = SimpleNamespace(mode=mode, project="fleet", entity=None, group=None, tags=[], media=media)
    return SimpleNamespace(tracking=tracking, progress=progress, resume=None)


def _line(r: int, **extra) -> dict:
    line = {
        "round": r,
        "hour_of_day": r / 10,
        "available": 900,
        "selected": 26,
        "reported": 20,
        "abandoned": False,
        "released": True,
        "epsilon": 0.5 + r / 100,
        "dropped": {"failure": 1, "after_goal": 5},
    }
    return {**line, **extra}


def test_progress_bar_shows_epsilon_metric_and_funnel(tmp_path):
    t = Tracker(tmp_path, _cfg(), {}, total_rounds=3)
    t.log(_line(0, **{"recall@1": 0.125}))
    t.log(_line(1, abandoned=True, reported=12))
    assert t.bar.n == 2
    assert "eps=0.51" in t.bar.postfix and "recall@1=0.125" in t.bar.postfix  # kept between evals
    assert "funnel=900>26>12 abandoned" in t.bar.postfix
    t.finish({"rounds": 2, "final": {"recall@1": 0.2}})
    assert len(read_lines(tmp_path)) == 2
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2
    assert not (tmp_path / "wandb").exists()  # disabled means no W&B at all


def test_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = Tracker(tmp_path, _cfg("offline", progress=False, media=False), {"seed": 0}, total_rounds=4)
    first.log(_line(0))
    first.finish({"rounds": 1})
    resumed = _cfg("offline", progress=False, media=False)
    resumed.resume = str(tmp_path)
    again = Tracker(tmp_path, resumed, {"seed": 0}, total_rounds=4)
    again.log(_line(1))
    again.finish({"rounds": 2})
    assert again.wandb.id == first.wandb.id == (tmp_path / "wandb_run_id").read_text()
    # Every offline run directory is this one run's (W&B adds "-1" when two start in one second).
    names = [p.name for p in tmp_path.glob("wandb/offline-run-*")]
    assert names and all(f"-{first.wandb.id}" in n for n in names)


def test_log_lines_go_above_the_bar_on_lines_of_their_own(tmp_path, capsys):
    """A console log line while the bar is up (Hydra's handler on the root logger writes to the
    terminal the bar draws on) is printed on its own line, not appended to the bar's."""
    import logging
    import sys

    console = logging.StreamHandler(sys.stderr)  # as Hydra's: a StreamHandler on the console
    logging.root.addHandler(console)
    old_level = logging.root.level
    logging.root.setLevel(logging.INFO)
    try:
        t = Tracker(tmp_path, _cfg(), {}, total_rounds=3)
        t.log(_line(0))
        logging.getLogger("fleet.runtime.driver").info("round 1: a line of progress")
        t.log(_line(1))
        t.finish({"rounds": 2})
        assert console in logging.root.handlers  # handed back when the bar goes
        logging.getLogger("fleet.runtime.driver").info("after the bar")
    finally:
        logging.root.removeHandler(console)
        logging.root.setLevel(old_level)
    err = capsys.readouterr().err
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # what a terminal leaves visible
    assert "round 1: a line of progress" in shown, err
    assert "after the bar" in shown
    assert any("2/3" in s for s in err.split("\r"))  # the bar was drawn on the same stream
