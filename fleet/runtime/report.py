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
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from fleet.atomic import JSON_INF
from fleet.audits.stress import plot_stress

# Evaluation metrics of the tasks we ship, for runs with no summary.json yet.
EVAL_METRIC = re.compile(r"^(\w*recall@\d+\w*|eval_\w+|perplexity)$")
FUNNEL = (("available", "-"), ("selected", "--"), ("reported", ":"))
# A run's headline evaluation (the progress bar's, the privacy_claims plot's): NWP's recall@1, the
# mean task's distance.
HEADLINE = ("recall@1", "eval_distance")


class ReportError(ValueError):
    """A path that holds no run."""


@dataclass
class Run:
    """One run's outputs as written by the Tracker."""

    path: Path
    lines: list[dict]
    summary: dict
    overrides: list[str]
    label: str

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(round, value) over the rounds where `key` holds a number."""
        pts = [(x["round"], x[key]) for x in self.lines if _is_number(x.get(key))]
        if not pts:
            return np.zeros(0), np.zeros(0)
        r, v = zip(*pts, strict=True)
        return np.asarray(r, dtype=float), np.asarray(v, dtype=float)

    def eval_metrics(self) -> list[str]:
        final = self.summary.get("final")
        if final:
            return sorted(k for k, v in final.items() if _is_number(v))
        return sorted({k for x in self.lines for k in x if EVAL_METRIC.match(k)})


def _is_number(v: Any) -> bool:
    """A finite number: not a bool, not NaN, not an infinity as JSON holds it (an epsilon of
    clipping without noise is infinite, written as JSON_INF, and would break an axis)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < JSON_INF


def load_run(path: str | Path) -> Run:
    """Read one run directory (a run still going has no summary.json yet)."""
    path = Path(path)
    lines = []
    for text in (path / "metrics.jsonl").read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break  # the line a running job is writing, or one a crash tore
        if not line.get("superseded"):  # released before a crash, re-run after (still accounted)
            lines.append(line)
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.exists() else []
    return Run(path, lines, summary, overrides, label=path.name)


def _run_dirs(path: Path) -> list[Path]:
    """A run directory, or a sweep directory whose subdirectories (0, 1, ..., 10) are runs."""
    if (path / "metrics.jsonl").exists():
        return [path]
    subs = [d for d in path.iterdir() if (d / "metrics.jsonl").exists()] if path.is_dir() else []
    if not subs:
        raise ReportError(f"{path}: no metrics.jsonl here or in its subdirectories")
    return sorted(subs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load runs and label each by the overrides that tell it apart from the others."""
    runs = [load_run(d) for p in paths for d in _run_dirs(Path(p))]
    if len(runs) > 1:
        common = set.intersection(*(set(r.overrides) for r in runs))
        for r in runs:
            r.label = " ".join(o for o in r.overrides if o not in common) or r.path.name
    return runs


# ---- figures ---------------------------------------------------------------------------------
def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def _by_round(ax: Any, title: str, ylabel: str) -> None:
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _telemetry(r: Run) -> bool:
    """Whether the run wrote the simulator's per-round telemetry (not under private telemetry)."""
    return bool(r.lines) and all("available" in x and "hour_of_day" in x for x in r.lines)


def _color(i: int, n: int) -> Any:
    """Run i's colour among n: matplotlib's ten, twenty from tab20, beyond that a colormap's
    evenly spaced shades (never the same colour twice)."""
    from matplotlib import colormaps

    if n <= 10:
        return f"C{i}"
    if n <= 20:
        return colormaps["tab20"](i)
    return colormaps["viridis"](i / (n - 1))


def _legend(fig: Figure, runs: Sequence[Run]) -> None:
    """One legend for the whole figure, naming the runs (none for a single run), outside the plots
    below them, in as many columns as the figure's width holds."""
    if len(runs) > 1:
        handles = [Line2D([], [], color=_color(i, len(runs)), label=r.label) for i, r in enumerate(runs)]
        longest = max(len(r.label) for r in runs)
        per_row = max(1, min(len(runs), int(fig.get_figwidth() * 72 / (7 * longest + 40))))
        fig.set_figheight(fig.get_figheight() + 0.25 * math.ceil(len(runs) / per_row))  # room for it
        fig.legend(handles=handles, loc="outside lower center", ncols=per_row, fontsize="small")


def plot_participation_by_hour(runs: Sequence[Run]) -> Figure | None:
    """Check-ins, reports and rounds by simulated UTC hour: the diurnal swing of the fleet."""
    if not any(_telemetry(r) for r in runs):
        return None
    fig, axes = _figure(3)
    titles = ("available at check-in (mean)", "reported per round (mean)", "rounds run")
    for i, r in enumerate(runs):
        if not _telemetry(r):
            continue
        hours = np.floor([x["hour_of_day"] for x in r.lines]).astype(int) % 24
        rounds = np.bincount(hours, minlength=24)
        seen = rounds > 0
        for ax, key in zip(axes[:2], ("available", "reported"), strict=True):
            total = np.bincount(hours, weights=[x[key] for x in r.lines], minlength=24)
            ax.plot(np.flatnonzero(seen), total[seen] / rounds[seen], "o-", color=_color(i, len(runs)), ms=3)
        axes[2].plot(np.flatnonzero(seen), rounds[seen], "o-", color=_color(i, len(runs)), ms=3)
    for ax, title in zip(axes, titles, strict=True):
        ax.set(title=title, xlabel="hour of day (UTC)", xlim=(-0.5, 23.5), xticks=range(0, 24, 3))
        ax.set_ylim(bottom=0)
    _legend(fig, runs)
    return fig


def plot_funnel(runs: Sequence[Run]) -> Figure | None:
    """Available -> selected -> reported each round; abandoned rounds marked with x."""
    if not any(_telemetry(r) for r in runs):
        return None
    fig, (ax,) = _figure(width=7.0)
    for i, r in enumerate(runs):
        if not _telemetry(r):
            continue
        for key, style in FUNNEL:
            ax.plot(*r.series(key), style, color=_color(i, len(runs)), lw=1.2)
        lost = [(x["round"], max(x["reported"], 1)) for x in r.lines if x["abandoned"]]
        if lost:
            ax.plot(*zip(*lost, strict=True), "x", color=_color(i, len(runs)), ms=7)
    _by_round(ax, "cohort funnel", "devices")
    ax.set_yscale("log")
    stages = [Line2D([], [], color="k", ls=s, label=k) for k, s in FUNNEL]
    stages.append(Line2D([], [], color="k", ls="", marker="x", label="abandoned"))
    ax.legend(handles=stages, fontsize="small")
    _legend(fig, runs)
    return fig


def plot_dropout(runs: Sequence[Run]) -> Figure | None:
    """Selected devices lost each round, one panel per reason."""
    # the reasons that happened: a panel of zeros says nothing
    reasons = sorted({k for r in runs for x in r.lines for k, v in x.get("dropped", {}).items() if v})
    if not reasons:
        return None
    fig, axes = _grid(len(reasons), width=4.0, height=3.0)
    for ax, reason in zip(axes, reasons, strict=True):
        for i, r in enumerate(runs):
            pts = [(x["round"], x["dropped"].get(reason, 0)) for x in r.lines if "dropped" in x]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=_color(i, len(runs)), lw=1.2)
        _by_round(ax, f"dropped: {reason}", "devices")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1))  # a reason that never happened: a flat 0 of 1
        ax.yaxis.get_major_locator().set_params(integer=True)
    _legend(fig, runs)
    return fig


def plot_epsilon(runs: Sequence[Run]) -> Figure | None:
    """The accountant's epsilon after each round (runs without DP have none)."""
    dp = [(i, r) for i, r in enumerate(runs) if len(r.series("epsilon")[0])]
    if not dp:
        return None
    fig, (ax,) = _figure(width=6.0)
    for i, r in dp:
        ax.plot(*r.series("epsilon"), color=_color(i, len(runs)), lw=1.5)
    delta = next((r.summary["privacy"].get("delta") for _, r in dp if r.summary.get("privacy")), None)
    title = "epsilon" + (f" at delta = {delta:.2g}" if delta else "")
    _by_round(ax, title, "epsilon")
    ax.set_ylim(bottom=0)
    _legend(fig, runs)
    return fig


def _metric_points(r: Run, metric: str, x_key: str) -> tuple[list[float], list[float]]:
    """(x, metric) at every evaluation, plus the final evaluation if the last line lacks it."""
    xs, ys = [], []
    for line in r.lines:
        if _is_number(line.get(metric)) and _is_number(line.get(x_key)):
            xs.append(float(line[x_key]))
            ys.append(float(line[metric]))
    final = r.summary.get("final", {}).get(metric)
    if r.lines and _is_number(final) and metric not in r.lines[-1]:
        x = r.summary.get("privacy", {}).get("epsilon") if x_key == "epsilon" else r.lines[-1]["round"] + 1
        if _is_number(x):
            xs.append(float(x))
            ys.append(float(final))
    return xs, ys


def _metrics(runs: Sequence[Run]) -> list[str]:
    return sorted({m for r in runs for m in r.eval_metrics()})


def _panels(runs: Sequence[Run], metrics: Sequence[str] | None) -> dict[str, list[str]]:
    """Evaluation metrics to plot (all, or those asked for), each with its reference metrics.

    A metric named `<anything>_<m>` for a metric m (the unigram baseline `unigram_recall@1` of
    `recall@1`) is drawn as a dashed line on m's panel rather than as a panel of its own.
    """
    found = _metrics(runs)
    chosen = found if metrics is None else list(metrics)
    refs = {m: [k for k in found if k.endswith(f"_{m}")] for m in chosen}
    shown_as_ref = {k for ks in refs.values() for k in ks}
    return {m: refs[m] for m in chosen if m not in shown_as_ref}


def _grid(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    """n panels, three to a row, spare cells hidden."""
    ncols = min(3, n)
    fig, axes = _figure(ncols, math.ceil(n / ncols), width, height)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _draw_refs(ax: Any, runs: Sequence[Run], refs: list[str]) -> None:
    for k in refs:
        for i, r in enumerate(runs):
            v = r.summary.get("final", {}).get(k, next((x[k] for x in reversed(r.lines) if k in x), None))
            if _is_number(v):
                ax.axhline(v, color=_color(i, len(runs)), ls="--", lw=0.8, label=k if i == 0 else None)


def plot_metrics_vs_epsilon(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> Figure | None:
    """Utility against privacy: each run's path as it trains, and the sweep's final points joined."""
    panels = _panels(runs, metrics)
    curves = {m: [(i, _metric_points(r, m, "epsilon")) for i, r in enumerate(runs)] for m in panels}
    shown = [m for m in panels if any(xs for _, (xs, _) in curves[m])]
    if not shown:
        return None
    fig, axes = _grid(len(shown))
    for ax, m in zip(axes, shown, strict=True):
        finals = []
        for i, (xs, ys) in curves[m]:
            if xs:
                ax.plot(xs, ys, "o-", color=_color(i, len(runs)), ms=3, lw=1, alpha=0.6)
                finals.append((xs[-1], ys[-1]))
                ax.plot(xs[-1], ys[-1], "o", color=_color(i, len(runs)), ms=8)
        if len(finals) > 1:
            ax.plot(*zip(*sorted(finals), strict=True), "k-", lw=1, label="final")
        _draw_refs(ax, runs, panels[m])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.set(title=f"{m} against epsilon", xlabel="epsilon", ylabel=m)
    _legend(fig, runs)
    return fig


def plot_metrics_by_round(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> Figure | None:
    """Training loss and the evaluation metrics over rounds."""
    panels = _panels(runs, metrics)
    if metrics is None and any(len(r.series("train_loss")[0]) for r in runs):
        panels = {"train_loss": [], **panels}
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (k, refs) in zip(axes, panels.items(), strict=True):
        for i, r in enumerate(runs):
            xs, ys = _metric_points(r, k, "round")
            if xs:
                ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", color=_color(i, len(runs)), ms=3, lw=1.2)
        _draw_refs(ax, runs, refs)
        if refs:
            ax.legend(fontsize="small")
        _by_round(ax, k, k)
    _legend(fig, runs)
    return fig


def privacy_claims(r: Run) -> tuple[float | None, float | None]:
    """(what the mechanism's textbook analysis claims, what holds for every device under the
    fleet's real availability). DP-FedAvg: the textbook figure (q = goal / population) and the
    ledger's (each round's real q_r, a device available in every round). DP-FTRL rests on no
    sampling, only on the participation limit the shards enforce: both are its figure."""
    priv = r.summary.get("privacy") or {}
    if not priv.get("dp"):
        return None, None
    textbook = (priv.get("textbook") or {}).get("epsilon")
    return (textbook if textbook is not None else priv.get("epsilon")), priv.get("epsilon")


def plot_privacy_claims(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> Figure | None:
    """Each run's final headline metric against the epsilon it would claim (hollow) and the epsilon
    that holds for every device under real availability (filled), joined by an arrow."""
    panels = [
        m for m in _panels(runs, metrics) if any(_is_number(r.summary.get("final", {}).get(m)) for r in runs)
    ]
    points = [(i, r, *privacy_claims(r)) for i, r in enumerate(runs)]
    points = [(i, r, a, b) for i, r, a, b in points if _is_number(a) and _is_number(b)]
    if not panels or not points:
        return None
    m = next((h for h in HEADLINE if h in panels), panels[0])
    fig, (ax,) = _figure(width=6.5)
    for i, r, claim, real in points:
        y = r.summary.get("final", {}).get(m)
        if not _is_number(y):
            continue
        color = _color(i, len(runs))
        ax.plot([claim], [y], "o", mfc="none", mec=color, ms=9)
        ax.plot([real], [y], "o", color=color, ms=9)
        if real != claim:
            ax.annotate("", xy=(real, y), xytext=(claim, y), arrowprops={"arrowstyle": "->", "color": color})
    _draw_refs(ax, runs, _panels(runs, [m])[m])
    ax.set(
        xscale="log",
        xlabel="epsilon (hollow: textbook claim; filled: what holds under real availability)",
        ylabel=m,
        title=f"{m} against the privacy each run claims and has",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower right")
    _legend(fig, runs)
    return fig


PLOTS = {
    "participation_by_hour": plot_participation_by_hour,
    "funnel": plot_funnel,
    "dropout": plot_dropout,
    "epsilon": plot_epsilon,
    "metrics_vs_epsilon": plot_metrics_vs_epsilon,
    "privacy_claims": plot_privacy_claims,
    "metrics_by_round": plot_metrics_by_round,
    "dropout_stress": plot_stress,  # a sweep over failure rate, over-selection or deadline
}


def figures(runs: Sequence[Run]) -> dict[str, Figure]:
    """Every plot the runs have data for, by name (the PNG's stem and the W&B media key)."""
    out = {}
    # a diverged run's values (norms of 1e9, losses of inf) overflow in matplotlib's transforms:
    # its warnings would reach the console for nothing the plot can do about
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, plot in PLOTS.items():
            fig = plot(runs)
            if fig is not None:
                out[name] = fig
    return out


# ---- the HTML page ---------------------------------------------------------------------------
def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if v >= JSON_INF else f"{v:.4g}"
    return "" if v is None else str(v)


def _table(runs: Sequence[Run]) -> str:
    metrics = _metrics(runs)
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
    head += [*metrics, "wall s"]
    rows = []
    for r in runs:
        s, priv = r.summary, r.summary.get("privacy", {})
        epsilon = priv.get("epsilon") if priv.get("dp") else ("inf" if priv else None)
        cells = [r.label, str(r.path), s.get("rounds", len(r.lines)), s.get("released_rounds")]
        cells += [s.get("abandoned_rounds"), s.get("stop_reason", "(running)"), epsilon, priv.get("delta")]
        covers = " ".join(x for x in (priv.get("covers"), priv.get("guarantee")) if x)
        cells.append(covers)
        cells += [*(s.get("final", {}).get(m) for m in metrics), s.get("wall_s")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


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
