"""The audit's figures (exposure by canary, exposure over training) and their W&B logging."""

from __future__ import annotations

import io
import sys
from typing import Any

import numpy as np

from fleet.audits.memorization.statistics import CHANCE_BITS


def _exposure_axes(ax: Any, max_exposure: float, highest: float) -> None:
    """Log x, the log2|R| ceiling of exposure by rank dashed, room for extrapolated values above."""
    ax.axhline(max_exposure, color="0.5", ls="--", lw=1)
    ax.set(xscale="log", xlabel="devices x repeats (examples carrying the canary)", ylabel="exposure (bits)")
    ax.set_ylim(bottom=-0.5, top=max(max_exposure, highest) * 1.08 + 0.5)


def memorization_figures(result: dict, track: dict | None = None) -> dict[str, Any]:
    """The audit's plots as matplotlib Figures (no pyplot), by W&B media key.

    Exposure by rank (circles) and extrapolated (crosses) against devices x repeats; a filled
    circle is a canary that beam search extracted; the dashed line is log2|R|, the dotted one
    chance (1/ln 2). With a track (`read_track`), also each group's mean exposure over rounds.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    cs = result["canaries"]
    x = np.array([max(c["insertions"], 1) for c in cs], dtype=float)
    jitter = np.exp(0.06 * (np.arange(len(cs)) % 5 - 2))  # canaries of a group side by side
    ex = np.array([c["extracted"] for c in cs], dtype=bool)
    y = np.array([c["exposure"] for c in cs])
    y_ext = np.array([c["exposure_extrapolated"] for c in cs])
    ax.scatter(x * jitter, y, facecolors=np.where(ex, "C0", "none"), edgecolors="C0", label="exposure (rank)")
    ax.scatter(x * jitter, y_ext, marker="x", color="C1", label="exposure (skew-normal)")
    _exposure_axes(ax, result["max_exposure"], float(np.max(y_ext, initial=0.0)))
    ax.axhline(CHANCE_BITS, color="0.5", ls=":", lw=1)
    ax.set_title(f"{result['label']}: canary exposure (filled: extracted)")
    ax.legend(loc="upper left", fontsize=8)
    figs = {"memorization/exposure": fig}
    if track and track["rounds"]:
        figs["memorization/over_training"] = track_figure(result, track)
    return figs


def group_name(g: dict) -> str:
    if g["devices"] == 0:
        return "control"
    freq = f"x{g['repeats']}" if g["repeats"] is not None else f"p={g['prob']:g}"
    return f"{g['devices']} dev {freq}"


def track_figure(result: dict, track: dict) -> Any:
    """Each group's mean rank exposure against the round (a small fixed reference set)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    group = np.array([c["group"] for c in result["canaries"]])
    for i, g in enumerate(result["groups"]):
        mine = group == g["group"]
        style = {"color": "0.4", "ls": ":"} if g["devices"] == 0 else {"color": f"C{i % 10}", "ls": "-"}
        y = track["exposure"][:, mine].mean(axis=1)
        ax.plot(track["rounds"], y, marker="o", ms=3, label=group_name(g), **style)
    ax.axhline(track["max_exposure"], color="0.5", ls="--", lw=1)
    ax.set(xlabel="round", ylabel="mean exposure by rank (bits)", ylim=(-0.3, track["max_exposure"] + 0.5))
    ax.set_title(f"{result['label']}: exposure over training (|R| = {round(2 ** track['max_exposure'])})")
    ax.legend(loc="upper left", fontsize=7, ncols=2)
    return fig


def log_to_wandb(result: dict, figs: dict[str, Any]) -> bool:
    """Log the figures and aggregates to the active W&B run, if there is one (no import otherwise)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return False
    from PIL import Image

    media = {k: wandb.Image(Image.open(io.BytesIO(_png(f)))) for k, f in figs.items()}
    wandb.run.log(media)
    cs = result["canaries"]
    wandb.run.summary["memorization/extracted"] = sum(c["extracted"] for c in cs)
    wandb.run.summary["memorization/max_exposure"] = max(c["exposure"] for c in cs)
    for g in result["groups"]:
        for key in ("devices", "exposure", "exposure_extrapolated", "extracted"):
            wandb.run.summary[f"memorization/group{g['group']}/{key}"] = g[key]
    return True


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
