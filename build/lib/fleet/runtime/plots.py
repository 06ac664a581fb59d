"""The report's figures, one function each, built on matplotlib's Agg canvas (never pyplot).

The same functions feed `fleet-report`'s page and the W&B media at the end of a run: one
implementation, two sinks. Each returns None when no run has its data; dropout reasons are the
keys of each line's `dropped`, so a new reason gets plotted unasked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fleet.audits.stress import plot_stress
from fleet.runtime.runs import HEADLINE, Run, is_number

FUNNEL = (("available", "-"), ("selected", "--"), ("reported", ":"))


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
        counted = np.array([x["available"] is not None for x in r.lines])  # not a crashed round
        n = np.bincount(hours[counted], minlength=24)
        for ax, key in zip(axes[:2], ("available", "reported"), strict=True):
            values = [x[key] for x, c in zip(r.lines, counted, strict=True) if c]
            total = np.bincount(hours[counted], weights=values, minlength=24)
            ax.plot(np.flatnonzero(n), total[n > 0] / n[n > 0], "o-", color=_color(i, len(runs)), ms=3)
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
        counted = [x for x in r.lines if x["abandoned"] and x["reported"] is not None]  # not a crash
        lost = [(x["round"], max(x["reported"], 1)) for x in counted]
        if lost:
            ax.plot(*zip(*lost, strict=True), "x", color=_color(i, len(runs)), ms=7)
        for x in r.lines:  # a shard died: a gap in every line, and a mark where it happened
            if x.get("incident"):
                ax.axvline(x["round"], color=_color(i, len(runs)), ls="-.", lw=0.8, alpha=0.7)
    _by_round(ax, "cohort funnel", "devices")
    ax.set_yscale("log")
    stages = [Line2D([], [], color="k", ls=s, label=k) for k, s in FUNNEL]
    stages.append(Line2D([], [], color="k", ls="", marker="x", label="abandoned"))
    if any(x.get("incident") for r in runs for x in r.lines):
        stages.append(Line2D([], [], color="k", ls="-.", lw=0.8, label="shard crash (no counts)"))
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
            pts = [  # a crashed round's drops are unknown: a gap, not a zero
                (x["round"], np.nan if x.get("incident") else x["dropped"].get(reason, 0))
                for x in r.lines
                if "dropped" in x
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=_color(i, len(runs)), lw=1.2)
        _by_round(ax, f"dropped: {reason}", "devices")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1))  # a reason that never happened: a flat 0 of 1
        ax.yaxis.get_major_locator().set_params(integer=True)
    _legend(fig, runs)
    return fig


def _by_round_plot(runs: Sequence[Run], key: str, title: str, ylabel: str) -> Figure | None:
    """Each run's `key` after each round, one line a run (None when no run has it)."""
    have = [(i, r) for i, r in enumerate(runs) if r.has(key)]
    if not have:
        return None
    fig, (ax,) = _figure(width=6.0)
    for i, r in have:
        ax.plot(*r.series(key), color=_color(i, len(runs)), lw=1.5)
    _by_round(ax, title, ylabel)
    ax.set_ylim(bottom=0)
    _legend(fig, runs)
    return fig


def plot_epsilon(runs: Sequence[Run]) -> Figure | None:
    """The accountant's epsilon after each round (runs without DP have none)."""
    dp = [r for r in runs if r.has("epsilon") and r.summary.get("privacy")]
    delta = next((r.summary["privacy"].get("delta") for r in dp), None)
    title = "epsilon" + (f" at delta = {delta:.2g}" if delta else "")
    return _by_round_plot(runs, "epsilon", title, "epsilon")


def prefix_noise_rms(r: Run) -> float | None:
    """Root mean square over released rounds of the norm of the noise in the sum of the released
    updates (`prefix_noise_norm`): the noise the model is made of, whatever the mechanism."""
    _, v = r.series("prefix_noise_norm")
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.mean(v**2))) if len(v) else None


def plot_model_noise(runs: Sequence[Run]) -> Figure | None:
    """The noise in the sum of the released updates after each round: one noise vector a round for
    DP-FedAvg, a prefix of tree nodes for DP-FTRL, BLT's correlated noise that cancels in it."""
    return _by_round_plot(runs, "prefix_noise_norm", "noise in the sum of released updates (norm)", "norm")


def _metric_points(r: Run, metric: str, x_key: str) -> tuple[list[float], list[float]]:
    """(x, metric) at every evaluation, plus the final evaluation if the last line lacks it."""
    xs, ys = [], []
    for line in r.lines:
        if is_number(line.get(metric)) and is_number(line.get(x_key)):
            xs.append(float(line[x_key]))
            ys.append(float(line[metric]))
    final = r.summary.get("final", {}).get(metric)
    if r.lines and is_number(final) and metric not in r.lines[-1]:
        x = r.summary.get("privacy", {}).get("epsilon") if x_key == "epsilon" else r.lines[-1]["round"] + 1
        if is_number(x):
            xs.append(float(x))
            ys.append(float(final))
    return xs, ys


def eval_metric_names(runs: Sequence[Run]) -> list[str]:
    return sorted({m for r in runs for m in r.eval_metrics()})


def _panels(runs: Sequence[Run], metrics: Sequence[str] | None) -> dict[str, list[str]]:
    """Evaluation metrics to plot (all, or those asked for), each with its reference metrics.

    A metric named `<anything>_<m>` for a metric m (the unigram baseline `unigram_recall@1` of
    `recall@1`) is drawn as a dashed line on m's panel rather than as a panel of its own.
    """
    found = eval_metric_names(runs)
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
            if is_number(v):
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
    if metrics is None and any(r.has("train_loss") for r in runs):
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
    XX
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
        m for m in _panels(runs, metrics) if any(is_number(r.summary.get("final", {}).get(m)) for r in runs)
    ]
    points = [(i, r, *privacy_claims(r)) for i, r in enumerate(runs)]
    points = [(i, r, a, b) for i, r, a, b in points if is_number(a) and is_number(b)]
    if not panels or not points:
        return None
    m = next((h for h in HEADLINE if h in panels), panels[0])
    fig, (ax,) = _figure(width=6.5)
    for i, r, claim, real in points:
        y = r.summary.get("final", {}).get(m)
        if not is_number(y):
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
    "model_noise": plot_model_noise,
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
