"""A run's outputs as the report reads them: metrics.jsonl, summary.json and the Hydra overrides.

Only what every run writes, so it works on a finished run, on one still going, on runs copied off
a cluster, and with W&B off. Evaluation metrics are found, not listed: those of the final
evaluation in summary.json or, while a run is still going, the keys that look like evaluation
metrics.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fleet.atomic import JSON_INF

# Evaluation metrics of the tasks we ship, for runs with no summary.json yet.
EVAL_METRIC = re.compile(r"^(\w*recall@\d+\w*|eval_\w+|perplexity)$")


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
        """(round, value) over the rounds where `key` holds a number, NaN where it is null (a round a
        shard crash left uncounted: a gap in a line, not a zero)."""
        pts = [
            (x["round"], x[key] if x[key] is not None else math.nan)
            for x in self.lines
            if key in x and (x[key] is None or is_number(x[key]))
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        r, v = zip(*pts, strict=True)
        return np.asarray(r, dtype=float), np.asarray(v, dtype=float)

    def has(self, key: str) -> bool:
        """Whether `key` holds a number in some round."""
        return bool(np.isfinite(self.series(key)[1]).any())

    def eval_metrics(self) -> list[str]:
        final = self.summary.get("final")
        if final:
            return sorted(k for k, v in final.items() if is_number(v))
        return sorted({k for x in self.lines for k in x if EVAL_METRIC.match(k)})


def is_number(v: Any) -> bool:
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
