"""fleet-report: PNGs and one self-contained HTML page from run directories, several runs of a
sweep overlaid and told apart by their overrides; plots follow whatever metrics are present."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_mean
from omegaconf import OmegaConf

from fleet.runtime import plots, report
from fleet.runtime.driver import train

# What every run gets; other plots (the dropout stress page) appear only for sweeps that need them.
ALL_PLOTS = {
    "participation_by_hour",
    "funnel",
    "dropout",
    "epsilon",
    "model_noise",
    "metrics_vs_epsilon",
    "privacy_claims",
    "metrics_by_round",
}


@pytest.fixture(scope="module")
def sweep_dir(ray_session, tmp_path_factory) -> Path:
    """Two real runs laid out as a Hydra multirun (numbered subdirectories with overrides)."""
    root = tmp_path_factory.mktemp("sweep")
    for num, z in enumerate(("0.5", "2")):
        overrides = ["fleet=tiny", "task.name=mean", f"privacy.noise_multiplier={z}"]
        cfg = tiny_mean("train.rounds=4", "train.eval_every=2", "ray.shards=1", overrides[-1])
        run_dir = root / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
        train(cfg, run_dir)
    return root


def fleet_report(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleet.runtime.report", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a real sweep in a subprocess
def test_report_of_a_sweep_overlays_its_runs(sweep_dir):
    p = fleet_report(sweep_dir)
    assert p.returncode == 0, p.stderr
    out = sweep_dir / "report"
    assert Path(p.stdout.strip()) == out / "report.html"
    assert {f.stem for f in out.glob("*.png")} == ALL_PLOTS
    for f in out.glob("*.png"):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(ALL_PLOTS)
    assert not re.search(r"""src=["'](?!data:)""", page)  # self-contained: nothing to fetch
    # the legend names what differs; what all runs share is said once
    assert "privacy.noise_multiplier=0.5" in page and "privacy.noise_multiplier=2" in page
    assert "common overrides: <code>fleet=tiny task.name=mean</code>" in page


@pytest.mark.slow  # a real sweep in a subprocess
def test_report_of_one_run_goes_in_its_directory(sweep_dir, tmp_path):
    run = sweep_dir / "1"
    p = fleet_report(run, "--out", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    assert {f.stem for f in (tmp_path / "r").glob("*.png")} == ALL_PLOTS
    runs = report.find_runs([run])
    assert runs[0].label == "1" and runs[0].eval_metrics() == ["eval_distance"]


def test_missing_run_is_one_line_error(tmp_path):
    p = fleet_report(tmp_path / "nope")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nope" in p.stderr


def _write_run(path: Path, lines: list[dict], summary: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _line(r: int, **extra) -> dict:
    base = {"round": r, "hour_of_day": r % 24, "available": 500 + r, "selected": 13, "reported": 10}
    return {**base, "abandoned": False, "epsilon": None, "dropped": {"deadline": 3}, **extra}


def test_plots_follow_the_metrics_present(tmp_path):
    # no DP (epsilon None), a task's own metric known only from the final evaluation
    plain = _write_run(
        tmp_path / "plain",
        [_line(r, train_loss=1.0 / (r + 1)) for r in range(5)],
        {"rounds": 5, "final": {"my_score": 0.7}, "privacy": {"dp": False, "epsilon": None}},
    )
    (run,) = report.find_runs([plain])
    assert run.eval_metrics() == ["my_score"]
    figs = report.figures([run])
    assert set(figs) == {"participation_by_hour", "funnel", "dropout", "metrics_by_round"}
    titles = [ax.get_title() for ax in figs["metrics_by_round"].axes]
    assert titles == ["train_loss", "my_score"]

    # recall on eval rounds of a DP run still going (no summary yet): found by name; its unigram
    # baseline is a reference line on the recall panel, not a panel of its own
    evals = {"recall@1": 0.3, "unigram_recall@1": 0.2}
    dp = _write_run(
        tmp_path / "dp",
        [_line(r, epsilon=0.1 * (r + 1), **(evals if r % 2 else {})) for r in range(6)],
    )
    (run,) = report.find_runs([dp])
    assert run.eval_metrics() == ["recall@1", "unigram_recall@1"]
    figs = report.figures([run])
    (ax,) = figs["metrics_vs_epsilon"].axes
    assert "epsilon" in figs and ax.get_title() == "recall@1 against epsilon"
    assert [line.get_label() for line in ax.get_lines() if line.get_linestyle() == "--"] == [
        "unigram_recall@1"
    ]
    assert [a.get_title() for a in report.plot_metrics_by_round([run], ["recall@1"]).axes] == ["recall@1"]
    assert report.write_report([run], tmp_path / "out").exists()


def test_clipping_without_noise_has_an_infinite_epsilon_and_a_report_all_the_same(tmp_path):
    """privacy=clip_only: DP's clipping, z = 0, epsilon infinite, written to JSON as 1e308. The
    memorization sweep's middle arm died drawing that on an axis; it is no number to plot."""
    from fleet.atomic import jsonable

    inf = jsonable(float("inf"))
    clip = _write_run(
        tmp_path / "clip",
        [_line(r, epsilon=inf, recall=0.1 + 0.01 * r) for r in range(6)],
        {
            "rounds": 6,
            "final": {"recall@1": 0.2},
            "privacy": {"dp": True, "epsilon": inf, "textbook": {"epsilon": inf}},
        },
    )
    (run,) = report.find_runs([clip])
    figs = report.figures([run])
    assert "epsilon" not in figs and "privacy_claims" not in figs
    for fig in figs.values():
        report.png_bytes(fig)  # draws
    page = report.write_report([run], tmp_path / "out")
    assert "1e+308" not in page.read_text()


def test_torn_last_line_of_a_running_job_is_left_out(tmp_path):
    run = _write_run(tmp_path / "running", [_line(0), _line(1)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "avail')
    assert [x["round"] for x in report.load_run(run).lines] == [0, 1]


def test_empty_run_gives_a_page_without_plots(tmp_path):
    empty = _write_run(tmp_path / "empty", [])
    page = report.write_report(report.find_runs([empty]), tmp_path / "out").read_text()
    assert "<table>" in page and "data:image/png" not in page


def test_twenty_runs_stay_readable_and_inside_the_figure(tmp_path):
    """20 runs with long labels: distinct colours, and no artist (legend, titles, tick labels)
    falls outside its figure. Only the drop reasons that happened get a panel."""
    from fleet.runtime import report

    runs = []
    for k in range(20):
        lines = [
            _line(r, epsilon=0.1 * r * (k + 1), dropped={"failure": k % 3, "deadline": 0, "window_closed": 0})
            for r in range(5)
        ]
        path = _write_run(tmp_path / f"run{k}", lines, {"final": {"eval_distance": 1.0 / (k + 1)}})
        run = report.load_run(path)
        run.label = f"privacy.noise_multiplier={k / 7:.4f} fleet.goal={10 * k}"
        runs.append(run)
    colors = {plots._color(i, 20) for i in range(20)}
    assert len(colors) == 20
    figs = report.figures(runs)
    assert figs
    for name, fig in figs.items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        # each axes with what it draws (title, labels, tick labels), and the figure's legends
        extents = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
        extents += [leg.get_window_extent(renderer) for leg in fig.legends]
        for ext in extents:
            assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, (name, ext, box)
            assert ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, (name, ext, box)
    dropout = figs["dropout"]
    titles = {ax.get_title() for ax in dropout.axes if ax.get_visible()}
    assert titles == {"dropped: failure"}
