"""The participation audit's figures, built from its dict alone (Agg canvas, no pyplot), so
fleet-report and W&B media can draw a loaded participation.json."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fleet.phones.participation import (
    ATTRIBUTES,
)


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()


def participation_figures(audit: dict) -> dict[str, Figure]:
    """Every figure the audit has data for, by name; built from the audit dict alone (Agg canvas,
    no pyplot), so fleet-report and W&B media can call it on a loaded participation.json."""
    makers = {
        "participation_counts": _fig_counts,
        "participation_by_hour": _fig_hours,
        "participation_by_group": _fig_groups,
        "bias": _fig_bias,
        "metrics_by_group": _fig_metrics,
        "epsilon_per_device": _fig_epsilon,
        "epsilon_by_group": _fig_epsilon_groups,
    }
    figs = {name: make(audit) for name, make in makers.items()}
    return {name: fig for name, fig in figs.items() if fig is not None}


def _fig_counts(audit: dict) -> Figure | None:
    part = audit.get("participation")
    if not part:
        return None
    c = part["counts"]
    fig, (ax,) = _figure(width=6.5)
    obs = np.asarray(c["observed"], dtype=float)
    ax.bar(np.arange(len(obs)), obs, color="C0", alpha=0.7, label="observed")
    ks = np.arange(len(c["uniform_binomial"]))
    ax.plot(ks, c["uniform_binomial"], "o-", color="C3", ms=3, label=f"uniform, q = {part['nominal_q']:.3g}")
    ax.plot(ks, c["uniform_poisson_same_mean"], "s--", color="C2", ms=3, label="Poisson, same mean")
    ax.set(
        yscale="log",
        xlabel="participations per device",
        ylabel="devices",
        title=f"participation counts (dispersion {part['dispersion'] or 0:.2f})",
    )
    ax.set_ylim(bottom=0.5)
    ax.legend(fontsize="small")
    return fig


def _fig_hours(audit: dict) -> Figure | None:
    part = audit.get("participation")
    if not part:
        return None
    h = part["by_hour"]
    fig, axes = _figure(2)
    rounds = np.asarray(h["rounds_utc"], dtype=float)
    seen = rounds > 0
    for key, style in (("available_utc", "o-"), ("reported_utc", "s-")):
        per = np.asarray(h[key], dtype=float)[seen] / rounds[seen]
        axes[0].plot(np.flatnonzero(seen), per, style, ms=3, label=key.removesuffix("_utc") + " per round")
    axes[0].set(title="released rounds by UTC hour", xlabel="hour of day (UTC)", yscale="log")
    axes[0].legend(fontsize="small")
    for key, color in (("last_participation_local", "C0"), ("last_participation_utc", "C1")):
        axes[1].step(np.arange(24), h[key], where="mid", color=color, label=key.replace("_", " "))
    axes[1].set(title="hour of each device's last participation", xlabel="hour of day", ylabel="devices")
    axes[1].legend(fontsize="small")
    for ax in axes:
        ax.set(xlim=(-0.5, 23.5), xticks=range(0, 24, 3))
    return fig


def _group_axes(n: int) -> tuple[Figure, list]:
    return _figure(min(n, 2), math.ceil(n / 2), width=6.0, height=3.6)


def _fig_groups(audit: dict) -> Figure | None:
    part = audit.get("participation")
    if not part:
        return None
    by = part["by_group"]
    fig, axes = _group_axes(len(by))
    for ax, (a, rows) in zip(axes, by.items(), strict=False):
        x = np.arange(len(rows))
        ax.bar(x, [r["share_trained"] or 0 for r in rows], color="C0")
        ax.set(title=f"share that trained, by {a}", ylabel="share of devices")
        ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize="small")
        twin = ax.twinx()
        twin.plot(x, [r["mean_participations"] or 0 for r in rows], "o-", color="C3")
        twin.set_ylim(bottom=0)
        twin.set_ylabel("mean participations", color="C3")
    return fig


def _fig_bias(audit: dict) -> Figure | None:
    bias = {a: v for a, v in audit.get("bias", {}).items() if a in ATTRIBUTES}
    if not bias:
        return None
    fig, axes = _group_axes(len(bias))
    for ax, (a, b) in zip(axes, bias.items(), strict=False):
        x = np.arange(len(b["labels"]))
        ax.bar(x - 0.2, b["population_share"], 0.4, label="population", color="C7")
        ax.bar(x + 0.2, b["participations_share"], 0.4, label="participation-weighted", color="C0")
        ax.set(title=f"{a}: trained-on vs fleet (TV {b['tv_distance']:.3f})", ylabel="share")
        ax.set_xticks(x, b["labels"], rotation=30, ha="right", fontsize="small")
        ax.legend(fontsize="small")
    return fig


def _fig_metrics(audit: dict) -> Figure | None:
    mg = audit.get("bias", {}).get("metrics_by_group")
    if not mg:
        return None
    metrics = sorted({m for by in mg.values() for res in by.values() for m in res})
    if not metrics:
        return None
    fig, axes = _figure(len(mg), len(metrics), width=4.5, height=3.2)
    for j, m in enumerate(metrics):
        for i, (a, by) in enumerate(mg.items()):
            ax = axes[j * len(mg) + i]
            labels = list(by)
            ax.bar(np.arange(len(labels)), [by[g].get(m, np.nan) for g in labels], color=f"C{i}")
            ax.set(title=f"{m} by {a} (held-out devices)")
            ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize="x-small")
    return fig


def _fig_epsilon(audit: dict) -> Figure | None:
    priv = audit["privacy"]
    rs = priv.get("real_schedule")
    if not rs:
        return None
    fig, axes = _figure(2, width=6.0, height=4.0)
    nominal = priv["nominal"]["epsilon"]
    # The log-spaced ratio bins only: the first two hold devices never (or barely) available, the
    # last one those beyond 256x nominal; the title gives the first.
    edges = np.asarray(rs["ratio_histogram"]["edges"])[2:-1] * nominal
    hists = [("real schedule", rs, {"fill": True, "alpha": 0.6, "color": "C0"})]
    best = priv.get("participation_limit", {}).get("per_device")
    if best:
        hists.append(("better of schedule and limit", best, {"color": "C5", "lw": 1.5}))
    for label, dist, style in hists:
        axes[0].stairs(np.asarray(dist["ratio_histogram"]["devices"])[2:-1], edges, label=label, **style)
    marks = [
        ("nominal", nominal, "k"),
        ("nominal, over-selection", priv["nominal_overselected"]["epsilon"], "C2"),
        ("median device", rs["median"], "C1"),
        ("p99 device", rs["p99"], "C3"),
        ("worst device", rs["max"], "C4"),
    ]
    if "participation_limit" in priv:
        marks.append(("participation limit only", priv["participation_limit"]["epsilon"], "C5"))
    marks = [m for m in marks if math.isfinite(m[1]) and m[1] > 0]
    for label, v, color in marks:
        axes[0].axvline(v, color=color, ls="--", lw=1.2, label=f"{label}: {v:.3g}")
    used = np.flatnonzero(np.asarray(rs["ratio_histogram"]["devices"])[2:-1])
    span = [v for _, v, _ in marks] + ([edges[used[0]], edges[used[-1] + 1]] if len(used) else [])
    if span:
        axes[0].set_xlim(min(span) / 1.5, max(span) * 1.5)
    axes[0].set(
        xscale="log",
        xlabel=f"epsilon at delta = {priv['delta']:.2g}",
        ylabel="devices",
        title=f"per-device epsilon; {rs['distinct_patterns']} patterns, "
        f"{rs['share_never_available']:.1%} never available",
    )
    axes[0].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    avail = np.asarray(rs["available_rounds"], dtype=float)
    axes[1].stairs(avail, np.arange(len(avail) + 1) - 0.5, fill=True, color="C0")
    axes[1].set(
        xlabel="released rounds in which the device was available",
        ylabel="devices",
        title="exposure: available rounds per device",
    )
    return fig


def _fig_epsilon_groups(audit: dict) -> Figure | None:
    rs = audit["privacy"].get("real_schedule")
    if not rs:
        return None
    by = rs["by_group"]
    nominal = audit["privacy"]["nominal"]["epsilon"]
    fig, axes = _group_axes(len(by))
    for ax, (a, rows) in zip(axes, by.items(), strict=False):
        x = np.arange(len(rows))
        ax.bar(x - 0.27, [r["median_ratio"] or 0 for r in rows], 0.27, label="median", color="C1")
        ax.bar(x, [r["p99_ratio"] or 0 for r in rows], 0.27, label="p99", color="C3")
        ax.bar(
            x + 0.27, [r["max"] / nominal if nominal else 0 for r in rows], 0.27, label="worst", color="C4"
        )
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set(title=f"per-device epsilon / nominal, by {a}", ylabel="ratio to nominal")
        ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize="small")
        ax.legend(fontsize="small")
    return fig
