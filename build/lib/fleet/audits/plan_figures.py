"""The plan's figures (fleet.audits.plan): who gets which epsilon, and how it grows round by round."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float = 6.0, height: float = 3.8) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def figures(plan: dict) -> dict[str, Figure]:
    out = {}
    priv = plan.get("privacy", {})
    curves = plan.get("by_round")
    if not priv.get("dp") or not curves or not curves.get("round"):
        return out
    fig, ax = _figure()
    x = curves["round"]
    h = priv["headline"]
    if "every_round_device" in curves:  # the headline's device, by the per-device accountant
        ax.plot(
            x, curves["every_round_device"], color="C0", lw=2, label="a device available every round (RDP)"
        )
    else:
        ax.plot(x, curves["headline"], color="C0", lw=2, label=f"headline ({h['accountant'].upper()})")
    for key, style, color, label in (
        ("textbook", ":", "k", "textbook, q = cohort / population (RDP)"),
        ("median_device", "-", "C2", "median device, real schedule (RDP)"),
        ("worst_device", "--", "C3", "worst device, real schedule (RDP)"),
    ):
        if key in curves:
            ax.plot(x, curves[key], ls=style, color=color, lw=1.3, label=label)
    title = f"{plan['mechanism']}: epsilon by round (headline {h['epsilon']:.3g}, {h['accountant'].upper()})"
    ax.set(xlabel="round", ylabel="epsilon", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    out["plan_epsilon_by_round"] = fig
    d = priv.get("per_device", {})
    if "worst" in d:
        fig, ax = _figure()
        names = ["median", "p90", "p99", "worst"]
        vals = [d[k] for k in names]
        ax.bar(names, vals, color="C2")
        ax.axhline(d["textbook_rdp"], color="k", ls=":", label="textbook (RDP)")
        ax.axhline(
            priv["headline"]["epsilon"],
            color="C0",
            label=f"headline ({priv['headline']['accountant'].upper()})",
        )
        ax.set(ylabel="epsilon", title="per-device epsilon under the real schedule (RDP)")
        ax.legend(fontsize="small")
        out["plan_epsilon_by_device"] = fig
    return out


def write_figures(plan: dict, out: Path) -> None:
    for name, fig in figures(plan).items():
        fig.savefig(out / f"{name}.png", dpi=110)
