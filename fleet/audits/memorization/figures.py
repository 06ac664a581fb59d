"""The audit's figures, W&B logging, runs side by side, and `fleet-audit`'s memorization part."""

from __future__ import annotations

import io
import sys
from typing import Any

import numpy as np


def _exposure_axes(ax: Any, max_exposure: float, highest: float) -> None:
    """Log x, the log2|R| ceiling of exposure by rank dashed, room for extrapolated values above."""
    ax.axhline(max_exposure, color="0.5", ls="--", lw=1)
    ax.set(xscale="log", xlabel="devices x repeats (examples carrying the canary)", ylabel="exposure (bits)")
    ax.set_ylim(bottom=-0.5, top=max(max_exposure, highest) * 1.08 + 0.5)


def memorization_figures(result: dict) -> dict[str, Any]:
    """The audit's plot as a matplotlib Figure (no pyplot), by W&B media key.

    Exposure by rank (circles) and extrapolated (crosses) against devices x repeats; a filled
    circle is a canary that beam search extracted; the dashed line is log2|R|.
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
    ax.set_title(f"{result['label']}: canary exposure (filled: extracted)")
    ax.legend(loc="upper left", fontsize=8)
    return {"memorization/exposure": fig}


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
