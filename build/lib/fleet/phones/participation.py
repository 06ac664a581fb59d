"""The shard-side half of the participation audit: aggregates over a shard's own devices.

Who trained, and how exposed each device was under the real availability schedule, is per-device
information; it is computed here, next to the rows, and leaves only as histograms over fixed bins
and per-pattern summaries that name no device (docs/ARCHITECTURE.md, invariant 3). The bins are fixed by the
config alone, so every shard uses the same ones and the driver merges them exactly by adding.
`fleet.audits.participation` is the driver-side half (merging, accounting, plots).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleet.config import FleetConfig
from fleet.phones import population
from fleet.phones.availability import HOUR

ATTRIBUTES = ("timezone", "speed", "memory", "examples")
# The population columns they are read from (only these are generated, where columns are `Derived`).
ATTRIBUTE_COLUMNS = ("tz_offset_hours", "flops", "memory_bytes", "num_examples")

# Per-device epsilon over the nominal one: an exact-zero bin (never available), then 16 bins per
# doubling from 1/256 to 256, then an overflow bin.
RATIO_EDGES = np.concatenate([[0.0, 1e-12], 2.0 ** np.arange(-8.0, 8.0 + 1 / 32, 1 / 16), [np.inf]])

# Patterns converted to epsilon per block: bounds the (block x rounds) and (block x orders) arrays.
_BLOCK = 4096
# Devices audited per block: bounds every per-device temporary of `schedule_privacy`.
DEVICE_BLOCK = 1 << 18


def attribute_bins(f: FleetConfig) -> dict[str, np.ndarray]:
    """Fine bin edges of each device attribute; groups (quintiles, classes) are unions of them."""
    examples = np.unique(np.round(np.geomspace(1.0, 2.0**20, 20 * 12 + 1)))
    return {
        "timezone": np.arange(-12.125, 14.2, 0.25),  # quarter-hour UTC offsets, -12 to +14
        "speed": np.linspace(5.0, 14.0, 9 * 32 + 1),  # log10 FLOP/s, 1/32 decade
        "memory": np.unique([0.0, f.min_memory_gb, 3.0, 4.0, 6.0, 8.0, 12.0, np.inf]),  # GB classes
        "examples": np.concatenate([[0.0], examples]),
    }


def attribute_values(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each attribute on the scale its bins use."""
    return {
        "timezone": cols["tz_offset_hours"].astype(np.float64),
        "speed": np.log10(np.maximum(cols["flops"].astype(np.float64), 1e-30)),
        "memory": cols["memory_bytes"].astype(np.float64) / population.GB,
        "examples": cols["num_examples"].astype(np.float64),
    }


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value; values outside the edges fall into the first or last bin."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def participation(
    cols: dict[str, np.ndarray],
    eligible: np.ndarray,
    participations: np.ndarray,
    last_participation: np.ndarray,
    f: FleetConfig,
    block: int = DEVICE_BLOCK,
) -> dict:
    """Participation counts as histograms: overall, by hour of last participation, by attribute.

    Walked `block` devices at a time, so its temporaries do not grow with the shard."""
    bins = attribute_bins(f)
    out: dict = {
        "devices": len(participations),
        "count_hist": np.zeros(1, dtype=np.int64),
        "count_hist_eligible": np.zeros(1, dtype=np.int64),
        "last_hour_utc": np.zeros(24, dtype=np.int64),
        "last_hour_local": np.zeros(24, dtype=np.int64),
    }
    for name, e in bins.items():
        out[name] = {k: np.zeros(len(e) - 1, dtype=np.int64) for k in _COUNTS}
    for s in range(0, len(participations), block):
        p = participations[s : s + block].astype(np.int64)
        ok = eligible[s : s + block]
        trained = p > 0
        tz = cols["tz_offset_hours"][s : s + block][trained]
        hour_utc = np.floor(last_participation[s : s + block][trained].astype(np.float64) / HOUR) % 24
        hour_local = np.floor(hour_utc + tz) % 24
        out["count_hist"] = _add(out["count_hist"], np.bincount(p))
        out["count_hist_eligible"] = _add(out["count_hist_eligible"], np.bincount(p[ok]))
        out["last_hour_utc"] += np.bincount(hour_utc.astype(np.int64), minlength=24)
        out["last_hour_local"] += np.bincount(hour_local.astype(np.int64), minlength=24)
        block_cols = {k: cols[k][s : s + block] for k in ATTRIBUTE_COLUMNS}
        for name, values in attribute_values(block_cols).items():
            b, m, g = bin_index(values, bins[name]), len(bins[name]) - 1, out[name]
            g["devices"] += np.bincount(b, minlength=m)
            g["eligible"] += np.bincount(b[ok], minlength=m)
            g["participants"] += np.bincount(b[trained], minlength=m)
            g["participations"] += np.bincount(b, weights=p, minlength=m).astype(np.int64)
    return out


_COUNTS = ("devices", "eligible", "participants", "participations")


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of two histograms of possibly different lengths (counts 0, 1, 2, ...)."""
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def epsilons(rdp: np.ndarray, orders: np.ndarray, delta: float) -> np.ndarray:
    """Epsilon at `delta` of each row of RDP values, as dp-accounting's `compute_epsilon` gives it.

    The same conversion (Canonne, Kamath and Steinke 2020, Prop. 12, with dp-accounting's special
    cases), vectorised: a fleet has tens of thousands of distinct availability patterns and
    `compute_epsilon` costs about 0.4 ms a call. Tests hold the two equal.
    """
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
    eps = np.where(a > 1.01, eps, np.inf)
    eps = np.where((rdp < 0) | (delta**2 + np.expm1(-rdp) > 0), 0.0, eps)
    return np.maximum(eps.min(axis=-1), 0.0)


def availability_bitmaps(reachable: Callable[[float], np.ndarray], n: int, times: np.ndarray) -> np.ndarray:
    """Each device's bitmap of the rounds at `times` it was reachable in: bit r of word r // 64."""
    rows = np.zeros((n, max(1, -(-len(times) // 64))), dtype=np.uint64)  # a block of devices is contiguous
    for r, t in enumerate(times):
        word = rows[:, r // 64]
        word[reachable(float(t))] |= np.uint64(1) << np.uint64(r % 64)
    return rows


def schedule_privacy(
    reachable: Callable[[float], np.ndarray] | np.ndarray,
    cols: dict[str, np.ndarray],
    f: FleetConfig,
    times: np.ndarray,
    rdp: np.ndarray,
    orders: np.ndarray,
    delta: float,
    nominal: float,
    block: int = DEVICE_BLOCK,
) -> dict:
    """Each device's epsilon when it can only be sampled in the released rounds it was available.

    `rdp[r]` is the RDP curve of released round r (at time `times[r]`, ascending) for a device
    available then; `reachable(t)` says which devices could be sampled at t (availability,
    eligibility, outages), asked at ascending times, so a Markov model fresh from the run's start
    replays the run's states exactly. A device's bitmap of available rounds is its pattern; devices
    sharing one share one computation. The participation limit is ignored: counting its excluded
    rounds as available can only raise epsilon. Returned per pattern (no device named): the bitmap,
    epsilon, available rounds and device count; per attribute bin: epsilon/nominal histograms, sum
    and max.

    Memory: the bitmaps (8 bytes per device per 64 rounds) are the only per-device arrays held for
    the whole shard; everything else is done `block` devices at a time, so a shard of millions of
    devices audits in little more than its bitmaps.
    """
    n = len(cols["device_id"])
    # `reachable` may be the bitmaps already built (`availability_bitmaps`) for these times.
    rows = reachable if isinstance(reachable, np.ndarray) else availability_bitmaps(reachable, n, times)
    nb = rows.shape[1]
    # An order at which some round's RDP is infinite is infinite for every pattern holding that
    # round; kept out of the product, where 0 * inf would be nan.
    infinite = np.isinf(rdp)
    finite = np.where(infinite, 0.0, rdp)
    bins = attribute_bins(f)
    nr = len(RATIO_EDGES) - 1
    groups = {
        name: {
            "ratio_hist": np.zeros((len(e) - 1, nr), dtype=np.int64),
            "eps_sum": np.zeros(len(e) - 1),
            "eps_max": np.zeros(len(e) - 1),
        }
        for name, e in bins.items()
    }
    found = []  # (patterns, eps, available rounds, devices) of each block
    for s in range(0, n, block):
        part = rows[s : s + block]
        keys = part.view(np.dtype((np.void, 8 * nb))).ravel()
        _, first, inverse, counts = np.unique(
            keys, return_index=True, return_inverse=True, return_counts=True
        )
        patterns = part[first]
        eps, rounds = _pattern_privacy(patterns, finite, infinite, orders, delta)
        found.append((patterns, eps, rounds, counts))
        device_eps = eps[inverse.ravel()]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = bin_index(device_eps / nominal, RATIO_EDGES)
        block_cols = {k: cols[k][s : s + block] for k in ATTRIBUTE_COLUMNS}
        _add_to_groups(groups, bins, block_cols, device_eps, ratio)
    if not found:
        found.append((rows, np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
    return _merge_patterns(found, nb) | groups


def _add_to_groups(
    groups: dict, bins: dict, cols: dict[str, np.ndarray], device_eps: np.ndarray, ratio: np.ndarray
) -> None:
    """A block of devices' epsilons into each attribute bin's histogram (over epsilon / nominal),
    sum and max: the per-attribute summaries are kept without any per-device array."""
    nr = len(RATIO_EDGES) - 1
    for name, values in attribute_values(cols).items():
        b, g = bin_index(values, bins[name]), groups[name]
        m = len(g["eps_sum"])
        g["ratio_hist"] += np.bincount(b * nr + ratio, minlength=m * nr).reshape(m, nr)
        g["eps_sum"] += np.bincount(b, weights=device_eps, minlength=m)
        np.maximum.at(g["eps_max"], b, device_eps)


def _merge_patterns(found: list[tuple], nb: int) -> dict:
    """Blocks share patterns: one entry per distinct pattern, its devices summed over the blocks."""
    patterns, eps, rounds, counts = (np.concatenate(x) for x in zip(*found, strict=True))
    keys = np.ascontiguousarray(patterns).view(np.dtype((np.void, 8 * nb))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=counts, minlength=len(first)).astype(np.int64)
    return {"patterns": patterns[first], "eps": eps[first], "rounds": rounds[first], "counts": counts}


def _pattern_privacy(
    patterns: np.ndarray, finite: np.ndarray, infinite: np.ndarray, orders: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Epsilon and number of available rounds of each bitmap, `_BLOCK` bitmaps at a time (bounds
    the bitmaps x rounds and bitmaps x orders arrays)."""
    r_count = len(finite)
    eps = np.zeros(len(patterns))
    rounds = np.zeros(len(patterns), dtype=np.int64)
    some_infinite = bool(infinite.any())
    for s in range(0, len(patterns), _BLOCK):
        # bit r of a bitmap is bit r % 64 of word r // 64: bit r of its little-endian bytes
        packed = np.ascontiguousarray(patterns[s : s + _BLOCK]).astype("<u8").view(np.uint8)
        bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :r_count].astype(np.float64)
        rdp = bits @ finite
        if some_infinite:
            rdp = np.where(bits @ infinite > 0, np.inf, rdp)
        eps[s : s + _BLOCK] = epsilons(rdp, orders, delta)
        rounds[s : s + _BLOCK] = bits.sum(axis=1)
    return eps, rounds
