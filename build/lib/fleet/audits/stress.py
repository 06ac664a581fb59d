"""The dropout stress report: what each knob does to rounds, utility and privacy, knees marked.

An `experiment=dropout_stress` sweep varies the failure rate, the over-selection and the deadline.
For each knob this averages every run's outcome over the other knobs and draws the curve of
round success rate, time to reach the goal, final recall@1 and epsilon against it. The knee of
each curve (where the marginal effect turns: the point farthest from the chord joining the ends,
after scaling both axes to [0, 1]) is marked, since that is where a user sets the knob.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

KNOBS = {
    "dropout.extra_failure": "failure rate",
    "fleet.overselect": "over-selection",
    "fleet.deadline_s": "deadline (s)",
}
OUTCOMES = {
    "success_rate": "round success rate",
    "time_to_goal_s": "time to goal (s)",
    "recall@1": "final recall@1",
    "epsilon": "epsilon",
}


def _knob(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def run_point(run: Any) -> dict[str, float]:
    """One run's knobs (from config.json) and outcomes (from metrics and summary)."""
    cfg_file = run.path / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    point: dict[str, float] = {}
    for k in KNOBS:
        v = _knob(config, k)
        if isinstance(v, (int, float)):
            point[k] = float(v)
    lines = run.lines
    if lines:
        point["success_rate"] = float(np.mean([not x["abandoned"] for x in lines]))
        goals = [x["time_to_goal_s"] for x in lines if x.get("time_to_goal_s") is not None]
        point["time_to_goal_s"] = float(np.mean(goals)) if goals else math.nan
    final = run.summary.get("final", {})
    point["recall@1"] = float(final.get("recall@1", math.nan))
    eps = run.summary.get("privacy", {}).get("epsilon")
    point["epsilon"] = float(eps) if isinstance(eps, (int, float)) else math.nan
    return point


def knee(x: np.ndarray, y: np.ndarray) -> int | None:
    """Index of the knee of a curve: farthest point from the chord, axes scaled to [0, 1]."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    idx = np.flatnonzero(ok)
    xs, ys = x[ok], y[ok]
    span_x, span_y = np.ptp(xs), np.ptp(ys)
    if span_x == 0 or span_y == 0:
        return None
    xn, yn = (xs - xs.min()) / span_x, (ys - ys.min()) / span_y
    dx, dy = xn[-1] - xn[0], yn[-1] - yn[0]
    dist = np.abs(dy * (xn - xn[0]) - dx * (yn - yn[0])) / math.hypot(dx, dy)
    best = int(np.argmax(dist))
    return int(idx[best]) if 0 < best < len(xs) - 1 else None


def curves(points: Sequence[dict[str, float]]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """knob -> outcome -> (knob values, outcome averaged over the other knobs)."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for k in KNOBS:
        values = sorted({p[k] for p in points if k in p})
        if len(values) < 2:
            continue
        out[k] = {}
        for o in OUTCOMES:
            groups: dict[float, list[float]] = defaultdict(list)
            for p in points:
                if k in p and math.isfinite(p.get(o, math.nan)):
                    groups[p[k]].append(p[o])
            ys = np.array([np.mean(groups[v]) if groups[v] else math.nan for v in values])
            out[k][o] = (np.asarray(values), ys)
    return out


def plot_stress(runs: Sequence[Any]) -> Figure | None:
    """Success, time to goal, recall and epsilon against each swept knob; None if nothing swept."""
    c = curves([run_point(r) for r in runs])
    if not c:
        return None
    knobs = list(c)
    fig = Figure(figsize=(4.2 * len(knobs), 3.0 * len(OUTCOMES)), layout="constrained")
    axes = fig.subplots(len(OUTCOMES), len(knobs), squeeze=False)
    for j, k in enumerate(knobs):
        for i, o in enumerate(OUTCOMES):
            ax = axes[i][j]
            x, y = c[k][o]
            ax.plot(x, y, "o-")
            kn = knee(x, y)
            if kn is not None:
                ax.axvline(x[kn], color="tab:red", ls="--", lw=1)
                ax.annotate(
                    "knee", (x[kn], y[kn]), textcoords="offset points", xytext=(5, 5), color="tab:red"
                )
            ax.set_xlabel(KNOBS[k])
            ax.set_ylabel(OUTCOMES[o])
            ax.grid(alpha=0.3)
    fig.suptitle("dropout stress: each knob, averaged over the others")
    return fig
