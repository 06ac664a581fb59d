"""The participation audit's shard aggregates: merged across shards, summed over groups of fine bins.

Shards report histograms over fixed fine bins of each attribute (time zone, memory, speed,
examples); the audit merges them and reads groups as ranges of those bins, so no device row
ever leaves a shard.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fleet.phones.participation import ATTRIBUTES, attribute_bins


def add(a: Any, b: Any, key: str = "") -> Any:
    """Merge two shards' aggregates: dicts of arrays, summed, except those named `*_max`;
    1-D histograms may differ in length."""
    if isinstance(a, dict):
        return {k: add(a[k], b[k], k) for k in a}
    if key.endswith("_max"):
        return np.maximum(a, b)
    if isinstance(a, np.ndarray) and a.ndim == 1 and len(a) != len(b):
        m = max(len(a), len(b))
        return np.pad(a, (0, m - len(a))) + np.pad(b, (0, m - len(b)))
    return a + b


def merge(results: list[dict]) -> dict:
    out = results[0]
    for r in results[1:]:
        out = add(out, r)
    return out


def groups_of(f: Any, st: dict) -> dict[str, list[dict]]:
    """Groups of each attribute as ranges of fine bins: time zones and memory classes as they are,
    speed and example counts as population quintiles (from the merged population histogram)."""
    bins = attribute_bins(f)
    out = {}
    for a in ATTRIBUTES:
        e, h = bins[a], st[a]["devices"]
        if a in ("timezone", "memory"):
            ranges = [(i, i + 1) for i in np.flatnonzero(h)]
        else:
            ranges = quantile_ranges(h, 5)
        out[a] = [{"label": label(a, e[lo], e[hi], f), "bins": (int(lo), int(hi))} for lo, hi in ranges]
    return out


def quantile_ranges(hist: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Fine-bin ranges holding about 1/k of the devices each (fewer when atoms are heavy)."""
    nz = np.flatnonzero(hist)
    if len(nz) == 0:
        return []
    cum = np.cumsum(hist)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="left") + 1
    bounds = np.unique(np.clip(np.concatenate([[nz[0]], cuts, [nz[-1] + 1]]), nz[0], nz[-1] + 1))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if hist[a:b].sum() > 0]


def label(attr: str, lo: float, hi: float, f: Any) -> str:
    if attr == "timezone":
        return f"UTC{(lo + hi) / 2:+g}"
    if attr == "memory":
        if hi == math.inf:
            return f">= {lo:g} GB"
        return f"{lo:g}-{hi:g} GB" + (" (ineligible)" if hi <= f.min_memory_gb else "")
    if attr == "speed":
        return f"{10**lo / 1e9:.3g}-{10**hi / 1e9:.3g} GFLOP/s"
    return f"{int(lo)}-{int(hi) - 1} examples"


def sum_over_groups(arr: np.ndarray, gs: list[dict]) -> np.ndarray:
    """Sum a fine-binned array (first axis) over each group's bins."""
    return np.array([arr[g["bins"][0] : g["bins"][1]].sum(axis=0) for g in gs])


def safe_ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None
