"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync it, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# How an infinity is written to JSON (which has none): readers treat |x| >= this as infinite.
JSON_INF = 1e308


def jsonable(x: Any) -> Any:
    """`x` as JSON can hold it: numpy scalars as numbers, nan as null, infinities as +-JSON_INF."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (JSON_INF if x > 0 else -JSON_INF)
    return x


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True))
    os.replace(tmp, path)
