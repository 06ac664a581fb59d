"""The participation audit's privacy part: per-device epsilon under the real schedule, and the bound
that a participation limit gives without any sampling assumption.

A device available in released round r is sampled with q_r = cohort_r / available_r, and with 0
when it is not; its RDP is the sum of those rounds' curves (dp-accounting), computed inside the
shards once per availability pattern, and reported as a distribution against the nominal epsilon.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from dp_accounting import GaussianDpEvent, rdp

from fleet.audits.participation_groups import merge, safe_ratio, sum_over_groups
from fleet.config import Config
from fleet.phones.availability import HOUR
from fleet.phones.participation import ATTRIBUTES, RATIO_EDGES, bin_index, epsilons
from fleet.privacy.accountant import ORDERS, rdp_epsilon, round_rdp
from fleet.privacy.mechanisms import cohort_size, mechanism_class, run_delta
from fleet.privacy.sampled import SampledRelease, neighbouring, noise_plan
from fleet.round.calls import call_all

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def rounds_rdp(sampling: str, q: np.ndarray, z: float) -> tuple[np.ndarray, dict]:
    """RDP curves (rows, at ORDERS) of released rounds for a device available in them: the run
    accountant's own upper bounds (exact dp-accounting curves on a grid, `round_rdp`)."""
    qs, inverse = np.unique(np.asarray(q, dtype=np.float64), return_inverse=True)
    curves = np.array([round_rdp(SampledRelease(0, sampling, float(v), 0, 0, z)) for v in qs])
    return curves[inverse.ravel()], {"distinct_q": len(qs)}


def gaussian_epsilons(z: float, most: int, delta: float, sampling: str = "poisson") -> np.ndarray:
    """Epsilon of j Gaussian mechanisms (noise multiplier z under the sampling's relation, no
    sampling amplification), j = 0..most.

    One dp-accounting curve; composition adds RDP, so j of them is j times the curve."""
    acc = rdp.RdpAccountant(list(ORDERS), neighbouring(sampling))
    acc.compose(GaussianDpEvent(z), 1)
    curve = np.asarray(acc.rdp, dtype=np.float64)
    return epsilons(np.arange(most + 1)[:, None] * curve, np.asarray(ORDERS), delta)


def privacy_section(
    cfg: Config,
    shards: list[Any],
    pop: int,
    released: Sequence[dict],
    groups: dict[str, list[dict]],
    max_observed: int | None,
    cohort: str,
    timing: dict[str, float],
) -> dict:
    """Nominal epsilon, per-device epsilon under the real schedule, and the limit-only bound."""
    p, f = cfg.privacy, cfg.fleet
    cls = mechanism_class(p)
    if not cls.dp:
        return {"dp": False}
    if not cls.amplified_by_sampling:
        return _every_device_section(cfg, cls.name, pop, released)
    z = noise_plan(p, f.goal).accounted  # under the sampling's neighbouring relation
    delta = run_delta(p, pop)
    out = _nominal_section(cfg, pop, released, cohort, z, delta)
    if z <= 0 or len(released) == 0:
        return out
    limit = _participation_limit(cfg, released, max_observed, z, delta, out)
    nominal = out["nominal"]["epsilon"]
    eps, rounds, counts, rs = _real_schedule(cfg, shards, released, groups, cohort, z, delta, nominal, timing)
    out["real_schedule"] = rs
    if limit is not None:
        # Both bounds hold for every device, so the smaller does; a device available in j rounds
        # can take part in at most min(j, most) of them.
        best = np.minimum(eps, limit[np.minimum(rounds, len(limit) - 1)])
        out["participation_limit"]["per_device"] = distribution(best, counts, nominal)
    return out


def _every_device_section(cfg: Config, mechanism: str, pop: int, released: Sequence[dict]) -> dict:
    """A mechanism with no sampling assumption gives every device the run's own figure, so the
    section is that figure alone: no schedule to recompute."""
    p = cfg.privacy
    return {
        "dp": True,
        "mechanism": mechanism,
        "every_device": True,
        "delta": run_delta(p, pop),
        "run": {
            "epsilon": released[-1].get("epsilon") if released else 0.0,
            "accountant": p.accountant,
            "note": "no sampling assumption (the participation limit alone): every device's epsilon",
        },
    }


def _nominal_section(
    cfg: Config, pop: int, released: Sequence[dict], cohort: str, z: float, delta: float
) -> dict[str, Any]:
    """The section's head: the textbook epsilons (uniform q over the population, with and without
    over-selection) that the per-device figures are set against, and the run's own headline."""
    p, f = cfg.privacy, cfg.fleet
    r_count = len(released)

    def textbook(q: float) -> float:
        return rdp_epsilon(r_count * round_rdp(SampledRelease(0, p.sampling, min(1.0, q), 0, 0, z)), delta)

    k = min(cohort_size(f), pop)
    return {
        "dp": True,
        "delta": delta,
        "noise_multiplier": p.noise_multiplier,
        "accounted_noise_multiplier": z,
        "sampling": p.sampling,
        "cohort": cohort,
        "accountant": "rdp (per device; the run's headline used privacy.accountant)",
        "nominal": {"epsilon": textbook(f.goal / pop), "q": f.goal / pop},
        "nominal_overselected": {"epsilon": textbook(k / pop), "q": k / pop},
        "run": {
            "epsilon": released[-1].get("epsilon") if released else 0.0,
            "accountant": p.accountant,
            "note": "each round's q_r, a device available in every released round",
        },
    }


def _participation_limit(
    cfg: Config, released: Sequence[dict], max_observed: int | None, z: float, delta: float, out: dict
) -> np.ndarray | None:
    """The bound a minimum separation gives without sampling: at most one participation per window
    over the released span. Adds `participation_limit` to `out`; returns epsilon by participation
    count (None without a limit), which the per-device bound indexes."""
    f = cfg.fleet
    if not f.min_separation_hours > 0:
        return None
    span = released[-1]["sim_time"] - released[0]["sim_time"]
    most = min(len(released), math.floor(span / (f.min_separation_hours * HOUR)) + 1)
    limit = gaussian_epsilons(z, most, delta, cfg.privacy.sampling)
    out["participation_limit"] = {
        "separation_hours": f.min_separation_hours,
        "max_participations": most,
        "max_observed": max_observed,
        "epsilon": float(limit[most]),
    }
    return limit


def _round_q(cfg: Config, released: Sequence[dict], cohort: str) -> np.ndarray:
    """Each released round's sampling probability for an available device: goal / available, or
    the ledger's q (selected / available for lines from before the ledger)."""
    avail = np.array([x["available"] for x in released], dtype=np.float64)
    if cohort == "goal":
        return np.minimum(1.0, cfg.fleet.goal / avail)
    return np.array([x["q"] if x.get("q") is not None else x["selected"] / x["available"] for x in released])


def _real_schedule(
    cfg: Config,
    shards: list[Any],
    released: Sequence[dict],
    groups: dict[str, list[dict]],
    cohort: str,
    z: float,
    delta: float,
    nominal: float,
    timing: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Per-device epsilon under the real schedule, computed in the shards once per availability
    pattern. Returns the per-pattern eps, available-round counts and device counts (the limit's
    per-device bound needs them) and the `real_schedule` section."""
    t0 = time.perf_counter()
    curves, info = rounds_rdp(cfg.privacy.sampling, _round_q(cfg, released, cohort), z)
    timing["rdp_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    times = np.array([x["sim_time"] for x in released], dtype=np.float64)
    args = (times, curves, np.asarray(ORDERS), delta, nominal)
    res = call_all(shards, "schedule_privacy", [args] * len(shards))
    timing["schedule_s"] = time.perf_counter() - t0
    eps, rounds, counts = (np.concatenate([r[key] for r in res]) for key in ("eps", "rounds", "counts"))
    patterns = np.concatenate([r["patterns"] for r in res])
    keys = np.ascontiguousarray(patterns).view(np.dtype((np.void, 8 * patterns.shape[1])))
    rs = distribution(eps, counts, nominal)
    rs.update(info)
    rs["distinct_patterns"] = len(np.unique(keys))
    rs["share_never_available"] = float(counts[rounds == 0].sum() / counts.sum())
    rs["available_rounds"] = (
        np.bincount(rounds, weights=counts, minlength=len(released) + 1).astype(int).tolist()
    )
    rs["by_group"] = eps_by_group(merge([{a: r[a] for a in ATTRIBUTES} for r in res]), groups)
    return eps, rounds, counts, rs


def distribution(eps: np.ndarray, counts: np.ndarray, nominal: float) -> dict:
    """Exact quantiles over devices of per-pattern epsilons (`counts` devices each), and their
    histogram over ratio-to-nominal bins."""
    order = np.argsort(eps, kind="stable")
    cum = np.cumsum(counts[order])
    total = int(cum[-1])
    at = {
        f"{q:g}": float(eps[order][min(np.searchsorted(cum, q * total, side="left"), len(cum) - 1)])
        for q in QUANTILES
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = bin_index(eps / nominal, RATIO_EDGES)
    return {
        "devices": total,
        "mean": float((eps * counts).sum() / total),
        "median": at["0.5"],
        "p99": at["0.99"],
        "max": at["1"],
        "quantiles": at,
        "share_above_nominal": float(counts[eps > nominal * (1 + 1e-9)].sum() / total),
        "ratio_histogram": {
            "edges": RATIO_EDGES.tolist(),
            "devices": np.bincount(ratio, weights=counts, minlength=len(RATIO_EDGES) - 1)
            .astype(int)
            .tolist(),
        },
    }


def eps_by_group(merged: dict, groups: dict[str, list[dict]]) -> dict:
    """Mean, worst and (to the ratio bins' resolution) median and p99 epsilon of each group."""
    out = {}
    for a, gs in groups.items():
        hist = sum_over_groups(merged[a]["ratio_hist"], gs)
        sums = sum_over_groups(merged[a]["eps_sum"], gs)
        out[a] = [
            {
                "label": g["label"],
                "devices": int(hist[i].sum()),
                "mean": safe_ratio(sums[i], hist[i].sum()),
                "max": float(merged[a]["eps_max"][g["bins"][0] : g["bins"][1]].max()),
                "median_ratio": hist_quantile(hist[i], 0.5),
                "p99_ratio": hist_quantile(hist[i], 0.99),
            }
            for i, g in enumerate(gs)
        ]
    return out


def hist_quantile(hist: np.ndarray, q: float) -> float | None:
    """Upper edge of the ratio bin holding the q-quantile (0 for the exact-zero bin)."""
    total = hist.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return 0.0 if i == 0 else float(RATIO_EDGES[i + 1])
