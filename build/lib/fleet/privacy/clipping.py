"""Flat L2 clipping of a device's whole update: the per-device sensitivity bound S."""

from __future__ import annotations

import numpy as np


def l2_norm(delta: np.ndarray) -> float:
    """L2 norm in float64, so a huge float32 update cannot overflow to inf before clipping."""
    return float(np.sqrt(np.dot(delta.astype(np.float64, copy=False), delta.astype(np.float64, copy=False))))


def clip(delta: np.ndarray, clip_norm: float | None) -> tuple[np.ndarray, float]:
    """Scale `delta` to L2 norm <= clip_norm (None: no clipping). Returns (clipped, original norm).

    The scale is computed in float64 and then shrunk by one float32 ulp, so after the cast back
    to float32 the clipped norm cannot round up past the bound (invariant 1).
    """
    norm = l2_norm(delta)
    if clip_norm is None or norm <= clip_norm:
        return delta, norm
    scale = (clip_norm / norm) * (1.0 - 2.0**-23)
    return (delta.astype(np.float64) * scale).astype(np.float32), norm
