"""Flat L2 clipping of a device's whole update: the per-device sensitivity bound S."""

from __future__ import annotations

import numpy as np


def clip(delta: np.ndarray, clip_norm: float | None) -> tuple[np.ndarray, float]:
    """Scale `delta` to L2 norm <= clip_norm (None: no clipping). Returns (clipped, original norm).

    The norm is taken in float64, so a huge float32 update cannot overflow to inf before
    clipping, and on one float64 copy, which is then scaled in place (two conversions alive at
    once cost 3.9 ms a device at 1.5M parameters against 2.3 ms, in page faults; same values).
    The scale is computed in float64 and then shrunk by one float32 ulp, so after the cast back
    to float32 the clipped norm cannot round up past the bound (invariant 1).
    """
    x = delta.astype(np.float64)  # a copy whatever the input's dtype: it is scaled in place below
    norm = float(np.sqrt(np.dot(x, x)))
    if clip_norm is None or norm <= clip_norm:
        return delta, norm
    x *= (clip_norm / norm) * (1.0 - 2.0**-23)
    return x.astype(np.float32), norm
