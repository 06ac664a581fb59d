"""`fleet-report RUN_DIR [RUN_DIR ...]`: the plots of a run or a sweep, as PNGs and one HTML page.

It reads only what every run writes (`metrics.jsonl`, `summary.json`, `.hydra/overrides.yaml`), so
it works on a finished run, on one still going, on runs copied off a cluster, and with W&B off.
The same figure functions feed W&B media at the end of a run (`fleet.runtime.tracking`): one
implementation, two sinks. Figures are built on matplotlib's Agg canvas directly, never through
pyplot, so nothing depends on a display or on global pyplot state (notebooks included).

Metrics are found, not listed: dropout reasons are the keys of each line's `dropped`, and the
evaluation metrics are those of the final evaluation in `summary.json` (or, while a run is still
going, the keys that look like evaluation metrics), so a new task's metrics get plotted unasked.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fleet.atomic import JSON_INF
from fleet.runtime.guards import incident_text
from fleet.runtime.plots import (  # noqa: F401 - the report's API: its figures by name
    PLOTS,
    eval_metric_names,
    figures,
    plot_dropout,
    plot_epsilon,
    plot_funnel,
    plot_metrics_by_round,
    plot_metrics_vs_epsilon,
    plot_participation_by_hour,
    plot_privacy_claims,
    prefix_noise_rms,
    privacy_claims,
)
from fleet.runtime.runs import HEADLINE, ReportError, Run, find_runs, load_run  # noqa: F401


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v >= JSON_INF else f"{v:.4g}"
    return "" if v is None else str(v)


def _table(runs: Sequence[Run]) -> str:
    metrics = eval_metric_names(runs)
    head = [
        "run",
        "directory",
        "rounds",
        "released",
        "abandoned",
        "stop",
        "epsilon",
        "delta",
        "epsilon covers",
    ]
    head += [*metrics, "noise RMS", "wall s"]
    rows = []
    for r in runs:
        s, priv = r.summary, r.summary.get("privacy", {})
        epsilon = priv.get("epsilon") if priv.get("dp") else ("inf" if priv else None)
        cells = [r.label, str(r.path), s.get("rounds", len(r.lines)), s.get("released_rounds")]
        cells += [s.get("abandoned_rounds"), s.get("stop_reason", "(running)"), epsilon, priv.get("delta")]
        covers = " ".join(x for x in (priv.get("covers"), priv.get("guarantee")) if x)
        cells.append(covers)
        cells += [*(s.get("final", {}).get(m) for m in metrics), prefix_noise_rms(r), s.get("wall_s")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _incidents(runs: Sequence[Run]) -> str:
    """What went wrong with the simulator's machines (a shard that died, was restarted or was lost),
    round by round, as the console said it: the rounds they cost are gaps in the plots."""
    items = [
        f"<li>{html.escape(r.label if len(runs) > 1 else '')} {html.escape(text)}</li>"
        for r in runs
        for x in r.lines
        if (text := incident_text(x))
    ]
    if not items:
        return ""
    return "<h2>incidents</h2><ul>" + "".join(items) + "</ul>"


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
    "img{max-width:100%;border:1px solid #eee;margin-bottom:1em}code{background:#f4f4f4}"
)


def write_report(runs: Sequence[Run], out: str | Path) -> Path:
    """Write one PNG per figure and report.html (images inlined, so the page travels alone)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, fig in figures(runs).items():
        data = png_bytes(fig)
        (out / f"{name}.png").write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        img = f'<img alt="{name}" src="data:image/png;base64,{b64}">'
        sections.append(f"<h2>{name.replace('_', ' ')}</h2>{img}")
    common = sorted(set.intersection(*(set(r.overrides) for r in runs))) if runs else []
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fleet report</title>"
        f"<style>{STYLE}</style></head><body><h1>fleet report: {len(runs)} run(s)</h1>"
        + (f"<p>common overrides: <code>{html.escape(' '.join(common))}</code></p>" if common else "")
        + _table(runs)
        + _incidents(runs)
        + "".join(sections)
        + "</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fleet-report",
        description="Plot runs (or sweep directories of runs) as PNGs and a self-contained HTML page.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or multirun sweep directories")
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        help="output folder (default: RUN_DIR/report, or the runs' common parent/report)",
    )
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except (OSError, ValueError) as e:  # ReportError, unreadable or malformed files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.out is None:
        paths = [p.resolve() for p in args.runs]
        args.out = Path(os.path.commonpath(paths) if len(paths) > 1 else paths[0]) / "report"
    print(write_report(runs, args.out))


if __name__ == "__main__":
    main()
