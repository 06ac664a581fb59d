"""The device table: one row per phone, generated from distributions or loaded from Parquet.

A phone is a row, never an object: each shard holds its contiguous range of rows as numpy columns.
Generation is keyed by (seed, row index) through `fleet.rng`, so a shard builds its own rows
without the driver ever holding the whole table, the rows do not depend on how many shards there
are, and any row can be generated again: a shard holds only the `HELD` columns (6 of the 40 bytes
a device) and reads the others as `Derived` columns, for the rows it needs. A Parquet population
is held whole (its rows cannot be generated).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleet import rng
from fleet.config import ConfigError, FleetConfig

GB = 1024**3
GENERATE_BLOCK = 1 << 20  # rows generated at a time

# Column name -> in-memory dtype. Parquet files may hold wider types; they are cast on load.
COLUMNS: dict[str, np.dtype] = {
    "device_id": np.dtype(np.int64),
    "tz_offset_hours": np.dtype(np.float32),
    "start_hour": np.dtype(np.float16),  # local hour the charging window opens
    "window_hours": np.dtype(np.float16),  # its length
    "nightly_prob": np.dtype(np.float16),  # chance the window happens on a given day
    "flops": np.dtype(np.float32),  # achieved training FLOP/s
    "downlink": np.dtype(np.float32),  # bytes/s
    "uplink": np.dtype(np.float32),  # bytes/s
    "memory_bytes": np.dtype(np.float32),
    "failure_prob": np.dtype(np.float16),  # chance a job fails part-way
    "num_examples": np.dtype(np.int32),
}

# Schedule parameters only the diurnal model reads; a Parquet fleet for another model may omit them.
DIURNAL_COLUMNS = ("start_hour", "window_hours", "nightly_prob")

# What a shard holds of a synthetic population: the columns every check-in reads for every device
# (the time zone, for outages; the nightly probability, for each day's coin). The rest are
# `Derived`: read only for a cohort, or once at build time, or by the audit block by block.
HELD = ("tz_offset_hours", "nightly_prob")


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, as equal as possible."""
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(shards)]


def _lognormal(seed: int, stream: str, idx: np.ndarray, median: float, sigma: float) -> np.ndarray:
    return median * np.exp(sigma * rng.normal(seed, stream, 0, idx))


def generate(cfg: FleetConfig, seed: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of the synthetic population described by `cfg`, every column held."""
    return columns(cfg, seed, start, stop, held=tuple(COLUMNS))  # type: ignore[return-value]


def columns(
    cfg: FleetConfig, seed: int, start: int, stop: int, held: tuple[str, ...] = HELD
) -> dict[str, np.ndarray | Derived]:
    """Rows [start, stop) as a shard keeps them: the `held` columns in memory, the others as
    `Derived` columns that generate the rows asked for, the same values bit for bit.

    Held columns are built block by block into their final arrays: a block's float64 draws take
    about 100 bytes a row before the cast, and a shard of 5 million rows would otherwise hold them
    all at once. Rows are keyed by index, so blocks change nothing.
    """
    out: dict[str, np.ndarray | Derived] = {k: Derived(cfg, seed, k, start, stop) for k in COLUMNS}
    if held:
        cols = {k: np.empty(stop - start, dtype=COLUMNS[k]) for k in held}
        for a in range(start, stop, GENERATE_BLOCK):
            b = min(a + GENERATE_BLOCK, stop)
            idx = np.arange(a, b, dtype=np.int64)
            for k in held:
                cols[k][a - start : b - start] = column_values(cfg, seed, k, idx)
        out.update(cols)
    return out


class Derived:
    """A population column that is not held in memory: indexing it generates the rows asked for.

    A synthetic row is a function of (seed, row index), so a column that a round reads only for
    its cohort (speeds, memory, failure probability, examples, the id) costs nothing per device
    until read; a shard of 50 million phones keeps about 6 of its 40 bytes of columns a device.
    Supports what the shards ask of a column: a slice, an index or boolean array, `len`, and
    `numpy.asarray` (the whole range, generated block by block).
    """

    nbytes = 0  # nothing held per device
    # Arithmetic and comparisons would have to generate the whole range: refused (TypeError),
    # never a silent `False` for `column == value`. Say `numpy.asarray(column)` to get it all.
    __array_ufunc__ = None
    __hash__ = None  # type: ignore[assignment]

    def _refuse(self, other: object) -> bool:
        raise TypeError(f"{self.name} is a Derived column: index it, or numpy.asarray it first")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]

    def __init__(self, cfg: FleetConfig, seed: int, name: str, start: int, stop: int):
        self.cfg, self.seed, self.name = cfg, seed, name
        self.start, self.n = start, stop - start
        self.dtype = COLUMNS[name]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice | np.ndarray | int) -> np.ndarray:
        if isinstance(key, slice):
            rows = np.arange(*key.indices(self.n), dtype=np.int64)
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                if rows.shape != (self.n,):
                    raise IndexError(f"boolean index of shape {rows.shape} for {self.n} rows")
                rows = np.flatnonzero(rows)
            elif not np.issubdtype(rows.dtype, np.integer):
                raise IndexError(f"rows must be integers or a boolean mask, not {rows.dtype}")
            rows = rows.astype(np.int64, copy=False)
            if rows.size and (rows.min() < -self.n or rows.max() >= self.n):
                raise IndexError(f"row index out of range for {self.n} rows")
            rows = np.where(rows < 0, rows + self.n, rows)
        values = column_values(self.cfg, self.seed, self.name, self.start + rows.ravel())
        return values.reshape(rows.shape)[()] if rows.ndim == 0 else values.reshape(rows.shape)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.n, dtype=self.dtype)
        for a in range(0, self.n, GENERATE_BLOCK):
            out[a : a + GENERATE_BLOCK] = self[a : a + GENERATE_BLOCK]
        return out if dtype is None else out.astype(dtype, copy=False)


def column_values(cfg: FleetConfig, seed: int, name: str, idx: np.ndarray) -> np.ndarray:
    """Column `name` of rows `idx` (any rows, any order), in its in-memory dtype.

    Every draw is keyed by (seed, stream, row), elementwise: a row's value does not depend on
    which other rows are generated with it, which `Derived` columns rest on.
    """
    a = cfg.availability
    if name == "device_id":
        if cfg.id_mode == "random":
            # Large random 63-bit ids (unique with overwhelming probability): what a real fleet's
            # opaque identifiers look like, and what the secrecy tests search outputs for.
            v = (rng.hash64(seed, "device_id", 0, idx) >> np.uint64(1)).astype(np.int64)
        else:
            v = idx.copy()
    elif name == "tz_offset_hours":
        zones = np.asarray(cfg.timezones, dtype=np.float64)
        weights = np.asarray(cfg.timezone_weights or [1.0] * len(zones), dtype=np.float64)
        cum = np.cumsum(weights / weights.sum())
        zi = np.searchsorted(cum, rng.uniform(seed, "timezone", 0, idx), side="right")
        v = zones[np.minimum(zi, len(zones) - 1)]
    elif name == "start_hour":
        night = rng.uniform(seed, "night_share", 0, idx) < a.night_share
        night_start = a.start_hour_mean + a.start_hour_std * rng.normal(seed, "start_hour", 0, idx)
        any_start = 24.0 * rng.uniform(seed, "start_hour_day", 0, idx)
        v = np.mod(np.where(night, night_start, any_start), 24.0)
    elif name == "window_hours":
        v = np.clip(
            _lognormal(seed, "window_hours", idx, a.window_hours_median, a.window_hours_sigma), 0.25, 23.0
        )
    elif name == "nightly_prob":
        u = rng.uniform(seed, "nightly_prob", 0, idx)
        v = a.nightly_prob_min + (a.nightly_prob_max - a.nightly_prob_min) * u
    elif name == "flops":
        v = _lognormal(seed, "flops", idx, cfg.compute_flops_median, cfg.compute_flops_sigma)
    elif name == "downlink":
        v = _lognormal(seed, "downlink", idx, cfg.downlink_median, cfg.downlink_sigma)
    elif name == "uplink":
        v = _lognormal(seed, "uplink", idx, cfg.uplink_median, cfg.uplink_sigma)
    elif name == "memory_bytes":
        low = rng.uniform(seed, "low_memory", 0, idx) < cfg.low_memory_share
        low_mem = (0.5 + (cfg.min_memory_gb - 0.5) * rng.uniform(seed, "memory_low", 0, idx)) * GB
        high = _lognormal(seed, "memory", idx, cfg.memory_gb_median, cfg.memory_gb_sigma)
        v = np.where(
            low, np.minimum(low_mem, cfg.min_memory_gb * GB * 0.999), np.maximum(high, cfg.min_memory_gb) * GB
        )
    elif name == "failure_prob":
        # Exponential per-device failure probability with the configured mean (heavy right tail).
        u = rng.uniform(seed, "failure_prob", 0, idx)
        v = np.minimum(-cfg.failure_prob_mean * np.log1p(-u), 0.95)
    elif name == "num_examples":
        ex = np.ceil(_lognormal(seed, "examples", idx, cfg.examples_median, cfg.examples_sigma))
        v = np.clip(ex, 1, cfg.examples_max)
    else:
        raise KeyError(name)
    return np.asarray(v).astype(COLUMNS[name], copy=False)


def to_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """Columns as an Arrow table with portable types (float16 widened to float32)."""
    arrays = {}
    for k, v in cols.items():
        arrays[k] = pa.array(v.astype(np.float32) if v.dtype == np.float16 else v)
    return pa.table(arrays)


def save(path: str | Path, cols: dict[str, np.ndarray]) -> None:
    """Write a population to Parquet (row groups of 1M rows, so shards can read ranges)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(to_table(cols), tmp, row_group_size=1 << 20)
    tmp.replace(path)


def required_columns(availability_model: str) -> list[str]:
    if availability_model == "diurnal":
        return list(COLUMNS)
    return [c for c in COLUMNS if c not in DIURNAL_COLUMNS]


def parquet_rows(path: str | Path, key: str = "fleet.path") -> int:
    """Number of rows in a Parquet population, with a one-line error if it cannot be read."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {str(path)!r}") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{key}: cannot read Parquet file {str(path)!r}: {e}") from None


def read_rows(
    path: str | Path, start: int, stop: int, columns: list[str], key: str = "fleet.path"
) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that overlap them."""
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {str(path)!r}") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{key}: cannot read Parquet file {str(path)!r}: {e}") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConfigError(f"{key}: {str(path)!r} lacks column(s) {', '.join(missing)}")
    groups, offset, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset + n > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    try:
        table = pf.read_row_groups(groups, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{key}: corrupt Parquet file {str(path)!r}: {e}") from None
    return table.slice(start - first, stop - start)


def load(path: str | Path, start: int, stop: int, availability_model: str) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a Parquet population, checked and cast to the in-memory types."""
    need = required_columns(availability_model)
    table = read_rows(path, start, stop, need)
    cols = {}
    for name in need:
        col = table.column(name)
        if col.null_count:
            raise ConfigError(f"fleet.path: column {name} has {col.null_count} missing value(s)")
        cols[name] = col.to_numpy().astype(COLUMNS[name])
    for name in DIURNAL_COLUMNS:
        cols.setdefault(name, np.zeros(len(table), dtype=COLUMNS[name]))
    _check_loaded(cols)
    return cols


def _check_loaded(cols: dict[str, np.ndarray]) -> None:
    for name in ("flops", "downlink", "uplink"):
        if not np.all(cols[name] > 0):
            raise ConfigError(f"fleet.path: column {name} must be > 0 for every device")
    fp = cols["failure_prob"]
    if not np.all((fp >= 0) & (fp <= 1)):
        raise ConfigError("fleet.path: column failure_prob must be in [0, 1]")
    if not np.all(cols["num_examples"] >= 0):
        raise ConfigError("fleet.path: column num_examples must be >= 0")
    if not np.all(cols["memory_bytes"] >= 0):
        raise ConfigError("fleet.path: column memory_bytes must be >= 0")


def population_size(cfg: FleetConfig) -> int:
    return parquet_rows(cfg.path) if cfg.path else cfg.population


def summary(cols: dict[str, np.ndarray], min_memory_gb: float) -> dict[str, float]:
    """Aggregate description of a population (no device ids)."""
    n = len(cols["device_id"])
    return {
        "devices": n,
        "low_memory_share": float(np.mean(cols["memory_bytes"] < min_memory_gb * GB)) if n else math.nan,
        "examples_mean": float(np.mean(cols["num_examples"])) if n else math.nan,
        "flops_median": float(np.median(cols["flops"])) if n else math.nan,
    }
