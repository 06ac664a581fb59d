"""Privacy under real availability: who actually trains, and what that does to epsilon.

DP-FedAvg's accounting assumes every device is sampled uniformly from the whole population each
round (q = goal / population). Real phones are sampled from those available at that moment: a phone
that charges only at night faces a higher chance of selection in the rounds it is available and
none in the others. The fleet knows every schedule, so this audit measures the gap:

1. participation: the distribution of per-device participation counts against the binomial that
   uniform sampling predicts, participation by hour, time zone, speed, memory and data size, and the
   share of the fleet that never trained;
2. per-device epsilon under the real schedule: a device available in released round r is sampled
   with probability q_r = cohort_r / available_r, and with 0 when it is not; its RDP is the sum of
   those rounds' curves (dp-accounting), reported as a distribution against the nominal epsilon.
   Devices with the same bitmap of available rounds (a pattern) share one computation. Rounds the
   participation limit excluded a device from count as available: that can only raise epsilon;
3. with a participation limit, the bound that needs no sampling assumption: at most one
   participation per separation window, each a Gaussian mechanism, composed without amplification;
4. bias: how the trained-on population differs from the fleet, and (given an evaluation callback)
   the model's metrics on held-out devices split by the same groups.

Everything per device is computed inside the shards (`fleet.phones.participation`) and leaves them as
histograms over fixed bins and per-pattern summaries (DESIGN.md invariant 3); the outputs
(participation/participation.json and PNGs in the run dir) hold no device id and no per-device row.

`run_audit(cfg, shards, lines, run_dir)` runs it on live shards at the end of a run; `fleet-audit
RUN_DIR --participation` (fleet.audits.cli) rebuilds the shards from the run's checkpoint afterwards.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dp_accounting import GaussianDpEvent, rdp
from scipy import stats

from fleet.atomic import write_json
from fleet.phones import population
from fleet.phones.availability import HOUR
from fleet.phones.participation import (
    ATTRIBUTES,
    RATIO_EDGES,
    attribute_bins,
    attribute_values,
    bin_index,
    epsilons,
)
from fleet.privacy.accountant import ORDERS, rdp_epsilon, round_rdp
from fleet.privacy.mechanism import Release, default_delta, neighbouring, noise_plan
from fleet.round.calls import call_all

log = logging.getLogger(__name__)

OUT_DIR = "participation"
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)

# Called with the held-out devices of one group (ids, example counts); returns metrics by name.
DeviceEvaluator = Callable[[np.ndarray, np.ndarray], Mapping[str, Any]]


# ---- entry point -------------------------------------------------------------------------------
def run_audit(
    cfg: Any,
    shards: list[Any],
    lines: Sequence[dict],
    run_dir: str | Path,
    *,
    with_participation: bool = True,
    cohort: str = "ledger",
    evaluate_devices: DeviceEvaluator | None = None,
    holdout_per_group: int = 50,
    figures: bool = True,
) -> dict:
    """Audit a run from its shards (live Ray actors or in-process ShardCores) and metrics lines.

    Writes RUN_DIR/participation/participation.json and the figures, logs a summary, returns the
    audit. `with_participation=False` when the shards hold no participation state (a run audited
    after the fact without a checkpoint): the schedule's privacy needs only the config and lines.
    `cohort` is "ledger" (each round's q_r as the run accounted it, the line's `q`; runs from
    before the ledger: selected / available) or "goal" (goal / available: the chance of being
    counted, smaller).
    `evaluate_devices`, if given, is called per group of held-out devices (fleet.audits.participation's
    `holdout_devices`) and its metrics are reported by group. `figures=False` skips the PNGs (a
    second or so each), for sweeps and tests; `participation_figures` rebuilds them from the JSON.
    """
    if cohort not in ("ledger", "goal"):
        raise ValueError(f"cohort: unknown value {cohort!r}; expected ledger or goal")
    wall0 = time.perf_counter()
    timing: dict[str, float] = {}
    f = cfg.fleet
    released = [x for x in lines if x.get("released")]
    t0 = time.perf_counter()
    # Population histograms come with it, so it is asked even when participation is not reported.
    st = _merge(call_all(shards, "participation_stats", [()] * len(shards)))
    timing["participation_s"] = time.perf_counter() - t0
    pop = int(st["devices"])  # the fleet that ran: a corpus's devices, a Parquet population's rows
    audit: dict[str, Any] = {
        "population": pop,
        "rounds": len(lines),
        "released_rounds": len(released),
        "goal": f.goal,
        "availability_model": f.availability.model,
    }
    groups = _groups(f, st)
    audit["groups"] = {a: [g["label"] for g in gs] for a, gs in groups.items()}
    if with_participation:
        audit["participation"] = participation_section(f, pop, released, st, groups)
        audit["bias"] = bias_section(st, groups)
    if evaluate_devices is not None:
        t0 = time.perf_counter()
        held = holdout_devices(cfg, groups, holdout_per_group, pop)
        callbacks = {
            a: {label: functools.partial(evaluate_devices, ids, n) for label, (ids, n) in by.items()}
            for a, by in held.items()
        }
        audit.setdefault("bias", {})["metrics_by_group"] = group_metrics(callbacks)
        timing["evaluation_s"] = time.perf_counter() - t0
    max_observed = len(st["count_hist"]) - 1 if with_participation else None
    audit["privacy"] = privacy_section(cfg, shards, pop, released, groups, max_observed, cohort, timing)
    out = Path(run_dir) / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        t0 = time.perf_counter()
        write_figures(audit, out)
        timing["figures_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - wall0
    audit["timing"] = timing
    write_json(out / "participation.json", audit)
    for text in summary_text(audit).splitlines():
        log.info(text)
    return audit


def after_training(run: Any) -> None:
    """Hook: who trained, and each device's epsilon under the real schedule, computed in the
    shards while they still hold their state and released as histograms only. Skipped under
    private telemetry, which releases no participation figures."""
    cfg = run.cfg
    if not (cfg.train.participation_audit and cfg.privacy.enabled):
        return
    if cfg.privacy.telemetry == "private":
        log.info("participation audit skipped: privacy.telemetry=private releases no participation figures")
        return
    audit = run_audit(cfg, run.shards, run.lines, run.run_dir, evaluate_devices=run.evaluate_devices)
    run.summary["participation"] = headline(audit)


# ---- merging shard aggregates ------------------------------------------------------------------
def _add(a: Any, b: Any, key: str = "") -> Any:
    """Merge two shards' aggregates: dicts of arrays, summed, except those named `*_max`;
    1-D histograms may differ in length."""
    if isinstance(a, dict):
        return {k: _add(a[k], b[k], k) for k in a}
    if key.endswith("_max"):
        return np.maximum(a, b)
    if isinstance(a, np.ndarray) and a.ndim == 1 and len(a) != len(b):
        m = max(len(a), len(b))
        return np.pad(a, (0, m - len(a))) + np.pad(b, (0, m - len(b)))
    return a + b


def _merge(results: list[dict]) -> dict:
    out = results[0]
    for r in results[1:]:
        out = _add(out, r)
    return out


# ---- groups: unions of the shards' fine bins ---------------------------------------------------
def _groups(f: Any, st: dict) -> dict[str, list[dict]]:
    """Groups of each attribute as ranges of fine bins: time zones and memory classes as they are,
    speed and example counts as population quintiles (from the merged population histogram)."""
    bins = attribute_bins(f)
    out = {}
    for a in ATTRIBUTES:
        e, h = bins[a], st[a]["devices"]
        if a in ("timezone", "memory"):
            ranges = [(i, i + 1) for i in np.flatnonzero(h)]
        else:
            ranges = _quantile_ranges(h, 5)
        out[a] = [{"label": _label(a, e[lo], e[hi], f), "bins": (int(lo), int(hi))} for lo, hi in ranges]
    return out


def _quantile_ranges(hist: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Fine-bin ranges holding about 1/k of the devices each (fewer when atoms are heavy)."""
    nz = np.flatnonzero(hist)
    if len(nz) == 0:
        return []
    cum = np.cumsum(hist)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, k) / k, side="left") + 1
    bounds = np.unique(np.clip(np.concatenate([[nz[0]], cuts, [nz[-1] + 1]]), nz[0], nz[-1] + 1))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if hist[a:b].sum() > 0]


def _label(attr: str, lo: float, hi: float, f: Any) -> str:
    if attr == "timezone":
        return f"UTC{(lo + hi) / 2:+g}"
    if attr == "memory":
        if hi == math.inf:
            return f">= {lo:g} GB"
        return f"{lo:g}-{hi:g} GB" + (" (ineligible)" if hi <= f.min_memory_gb else "")
    if attr == "speed":
        return f"{10**lo / 1e9:.3g}-{10**hi / 1e9:.3g} GFLOP/s"
    return f"{int(lo)}-{int(hi) - 1} examples"


def _by_group(arr: np.ndarray, gs: list[dict]) -> np.ndarray:
    """Sum a fine-binned array (first axis) over each group's bins."""
    return np.array([arr[g["bins"][0] : g["bins"][1]].sum(axis=0) for g in gs])


# ---- 1. participation --------------------------------------------------------------------------
def participation_section(
    f: Any, pop: int, released: Sequence[dict], st: dict, groups: dict[str, list[dict]]
) -> dict:
    """Observed participation against uniform sampling, by hour and by group."""
    r_count = len(released)
    q = f.goal / pop
    obs = st["count_hist"].astype(np.float64)
    n = obs.sum()
    k = np.arange(len(obs))
    mean = float((k * obs).sum() / n)
    var = float(((k - mean) ** 2 * obs).sum() / n)
    kmax = max(len(obs) - 1, int(stats.binom.ppf(1 - 1e-9, r_count, q)) if r_count else 0)
    ks = np.arange(kmax + 1)
    binom = stats.binom.pmf(ks, r_count, q)
    poisson = stats.poisson.pmf(ks, mean)
    obs_full = np.pad(obs, (0, kmax + 1 - len(obs))) / n
    eligible = st["count_hist_eligible"].astype(np.float64)
    by_hour = _hour_of_day(released)
    by_hour["last_participation_utc"] = st["last_hour_utc"].tolist()
    by_hour["last_participation_local"] = st["last_hour_local"].tolist()
    by_group = {}
    for a, gs in groups.items():
        agg = {
            key: _by_group(st[a][key], gs)
            for key in ("devices", "eligible", "participants", "participations")
        }
        by_group[a] = [
            {
                "label": g["label"],
                "devices": int(agg["devices"][i]),
                "eligible": int(agg["eligible"][i]),
                "participants": int(agg["participants"][i]),
                "participations": int(agg["participations"][i]),
                "share_trained": _ratio(agg["participants"][i], agg["devices"][i]),
                "mean_participations": _ratio(agg["participations"][i], agg["devices"][i]),
            }
            for i, g in enumerate(gs)
        ]
    return {
        "nominal_q": q,
        "counts": {
            "observed": st["count_hist"].tolist(),
            "uniform_binomial": (n * binom).tolist(),
            "uniform_poisson_same_mean": (n * poisson).tolist(),
        },
        "mean": mean,
        "variance": var,
        "dispersion": var / mean if mean > 0 else None,
        "max": int(len(obs) - 1),
        "tv_distance_binomial": float(0.5 * np.abs(obs_full - binom).sum()),
        "tv_distance_poisson_same_mean": float(0.5 * np.abs(obs_full - poisson).sum()),
        "never_trained": {
            "share": float(obs[0] / n),
            "share_of_eligible": _ratio(eligible[0], eligible.sum()),
            "uniform_expected": float((1 - q) ** r_count),
        },
        "by_hour": by_hour,
        "by_group": by_group,
    }


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _hour_of_day(released: Sequence[dict]) -> dict:
    """Released rounds, reports and check-ins by simulated UTC hour, from the metrics lines."""
    hours = np.floor([x["hour_of_day"] for x in released]).astype(np.int64) % 24
    return {
        "rounds_utc": np.bincount(hours, minlength=24).tolist(),
        "reported_utc": np.bincount(hours, weights=[x["reported"] for x in released], minlength=24).tolist(),
        "available_utc": np.bincount(
            hours, weights=[x["available"] for x in released], minlength=24
        ).tolist(),
    }


# ---- 4. bias -----------------------------------------------------------------------------------
def bias_section(st: dict, groups: dict[str, list[dict]]) -> dict:
    """Population vs trained-on shares per group; the total-variation distance sums each up."""
    out = {}
    for a, gs in groups.items():
        dev = _by_group(st[a]["devices"], gs).astype(np.float64)
        part = _by_group(st[a]["participants"], gs).astype(np.float64)
        weighted = _by_group(st[a]["participations"], gs).astype(np.float64)
        shares = {
            "population": dev / max(dev.sum(), 1),
            "participants": part / max(part.sum(), 1),
            "participations": weighted / max(weighted.sum(), 1),
        }
        out[a] = {
            "labels": [g["label"] for g in gs],
            **{f"{k}_share": v.tolist() for k, v in shares.items()},
            "tv_distance": float(0.5 * np.abs(shares["participations"] - shares["population"]).sum()),
        }
    return out


def holdout_devices(
    cfg: Any, groups: dict[str, list[dict]], per_group: int, pop: int
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Held-out devices by group: rows past the end of the population, drawn from the configured
    distributions, so they are never in the fleet and never trained; up to `per_group` a group.
    Their data must come from a corpus that has any device (synthetic): an Arrow corpus that
    defines the fleet has no rows for them."""
    f = cfg.fleet
    size = max(2000, 40 * per_group)
    cols = population.generate(f, cfg.seed, pop, pop + size)
    values = attribute_values(cols)
    bins = attribute_bins(f)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for a, gs in groups.items():
        b = bin_index(values[a], bins[a])
        out[a] = {}
        for g in gs:
            rows = np.flatnonzero((b >= g["bins"][0]) & (b < g["bins"][1]))[:per_group]
            if len(rows):
                out[a][g["label"]] = (cols["device_id"][rows], cols["num_examples"][rows])
    return out


def group_metrics(
    callbacks: Mapping[str, Mapping[str, Callable[[], Mapping[str, Any]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Call one evaluation per group and keep its numeric results, whatever the task returns."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attr, by_label in callbacks.items():
        out[attr] = {}
        for label, fn in by_label.items():
            res = fn()
            out[attr][label] = {
                k: float(v)
                for k, v in res.items()
                if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            }
    return out


# ---- 2 and 3. privacy --------------------------------------------------------------------------
def rounds_rdp(sampling: str, q: np.ndarray, z: float) -> tuple[np.ndarray, dict]:
    """RDP curves (rows, at ORDERS) of released rounds for a device available in them: the run
    accountant's own upper bounds (exact dp-accounting curves on a grid, `round_rdp`)."""
    qs, inverse = np.unique(np.asarray(q, dtype=np.float64), return_inverse=True)
    curves = np.array([round_rdp(Release(0, sampling, float(v), 0, 0, z)) for v in qs])
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
    cfg: Any,
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
    if not p.enabled:
        return {"dp": False}
    if p.mechanism == "dp_ftrl":  # no sampling assumption: every device has the run's figure
        return {
            "dp": True,
            "mechanism": "dp_ftrl",
            "delta": p.delta if p.delta is not None else default_delta(pop),
            "run": {
                "epsilon": released[-1].get("epsilon") if released else 0.0,
                "accountant": p.accountant,
                "note": "DP-FTRL rests on the participation limit alone: every device's epsilon",
            },
        }
    z = noise_plan(p, f.goal).accounted  # under the sampling's neighbouring relation
    delta = p.delta if p.delta is not None else default_delta(pop)
    r_count = len(released)

    def textbook(q: float) -> float:
        return rdp_epsilon(r_count * round_rdp(Release(0, p.sampling, min(1.0, q), 0, 0, z)), delta)

    nominal = textbook(f.goal / pop)
    k = min(math.ceil(f.goal * f.overselect), pop)
    out: dict[str, Any] = {
        "dp": True,
        "delta": delta,
        "noise_multiplier": p.noise_multiplier,
        "accounted_noise_multiplier": z,
        "sampling": p.sampling,
        "cohort": cohort,
        "accountant": "rdp (per device; the run's headline used privacy.accountant)",
        "nominal": {"epsilon": nominal, "q": f.goal / pop},
        "nominal_overselected": {"epsilon": textbook(k / pop), "q": k / pop},
        "run": {
            "epsilon": released[-1].get("epsilon") if released else 0.0,
            "accountant": p.accountant,
            "note": "each round's q_r, a device available in every released round",
        },
    }
    if z <= 0 or r_count == 0:
        return out
    limit = None
    if f.min_separation_hours > 0:
        span = released[-1]["sim_time"] - released[0]["sim_time"]
        most = min(r_count, math.floor(span / (f.min_separation_hours * HOUR)) + 1)
        limit = gaussian_epsilons(z, most, delta, p.sampling)
        out["participation_limit"] = {
            "separation_hours": f.min_separation_hours,
            "max_participations": most,
            "max_observed": max_observed,
            "epsilon": float(limit[most]),
        }
    t0 = time.perf_counter()
    avail = np.array([x["available"] for x in released], dtype=np.float64)
    if cohort == "goal":
        q = np.minimum(1.0, f.goal / avail)
    else:
        q = np.array([x["q"] if x.get("q") is not None else x["selected"] / x["available"] for x in released])
    curves, info = rounds_rdp(p.sampling, q, z)
    timing["rdp_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    times = np.array([x["sim_time"] for x in released], dtype=np.float64)
    args = (times, curves, np.asarray(ORDERS), delta, nominal)
    res = call_all(shards, "schedule_privacy", [args] * len(shards))
    timing["schedule_s"] = time.perf_counter() - t0
    eps, rounds, counts = (np.concatenate([r[key] for r in res]) for key in ("eps", "rounds", "counts"))
    patterns = np.concatenate([r["patterns"] for r in res])
    keys = np.ascontiguousarray(patterns).view(np.dtype((np.void, 8 * patterns.shape[1])))
    rs = _distribution(eps, counts, nominal)
    rs.update(info)
    rs["distinct_patterns"] = len(np.unique(keys))
    rs["share_never_available"] = float(counts[rounds == 0].sum() / counts.sum())
    rs["available_rounds"] = np.bincount(rounds, weights=counts, minlength=r_count + 1).astype(int).tolist()
    rs["by_group"] = _eps_by_group(_merge([{a: r[a] for a in ATTRIBUTES} for r in res]), groups)
    out["real_schedule"] = rs
    if limit is not None:
        # Both bounds hold for every device, so the smaller does; a device available in j rounds
        # can take part in at most min(j, most) of them.
        best = np.minimum(eps, limit[np.minimum(rounds, len(limit) - 1)])
        out["participation_limit"]["per_device"] = _distribution(best, counts, nominal)
    return out


def _distribution(eps: np.ndarray, counts: np.ndarray, nominal: float) -> dict:
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


def _eps_by_group(merged: dict, groups: dict[str, list[dict]]) -> dict:
    """Mean, worst and (to the ratio bins' resolution) median and p99 epsilon of each group."""
    out = {}
    for a, gs in groups.items():
        hist = _by_group(merged[a]["ratio_hist"], gs)
        sums = _by_group(merged[a]["eps_sum"], gs)
        out[a] = [
            {
                "label": g["label"],
                "devices": int(hist[i].sum()),
                "mean": _ratio(sums[i], hist[i].sum()),
                "max": float(merged[a]["eps_max"][g["bins"][0] : g["bins"][1]].max()),
                "median_ratio": _hist_quantile(hist[i], 0.5),
                "p99_ratio": _hist_quantile(hist[i], 0.99),
            }
            for i, g in enumerate(gs)
        ]
    return out


def _hist_quantile(hist: np.ndarray, q: float) -> float | None:
    """Upper edge of the ratio bin holding the q-quantile (0 for the exact-zero bin)."""
    total = hist.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return 0.0 if i == 0 else float(RATIO_EDGES[i + 1])


# ---- outputs -----------------------------------------------------------------------------------
def headline(audit: dict) -> dict[str, float | int | None]:
    """The audit's few headline numbers, flat (for logs, summaries and W&B)."""
    out: dict[str, float | int | None] = {"released_rounds": audit["released_rounds"]}
    part = audit.get("participation")
    if part:
        out["never_trained_share"] = part["never_trained"]["share"]
        out["never_trained_uniform"] = part["never_trained"]["uniform_expected"]
        out["participation_dispersion"] = part["dispersion"]
        out["participation_max"] = part["max"]
    priv = audit["privacy"]
    if priv.get("mechanism") == "dp_ftrl":
        out["epsilon_every_device"] = priv["run"]["epsilon"]
    elif priv.get("dp"):
        out["epsilon_nominal"] = priv["nominal"]["epsilon"]
        out["epsilon_nominal_overselected"] = priv["nominal_overselected"]["epsilon"]
        rs = priv.get("real_schedule")
        if rs:
            out.update({f"epsilon_device_{k}": rs[k] for k in ("median", "p99", "max")})
            out["distinct_patterns"] = rs["distinct_patterns"]
            out["share_above_nominal"] = rs["share_above_nominal"]
            out["share_never_available"] = rs["share_never_available"]
        if "participation_limit" in priv:
            out["epsilon_participation_limit"] = priv["participation_limit"]["epsilon"]
            best = priv["participation_limit"].get("per_device")
            if best:
                out.update({f"epsilon_device_with_limit_{k}": best[k] for k in ("median", "p99", "max")})
    return out


def summary_text(audit: dict) -> str:
    """A few lines for the log and the console."""
    h = headline(audit)
    lines = [
        f"participation audit: {audit['population']} devices, {audit['released_rounds']} released rounds"
    ]
    if "never_trained_share" in h:
        lines.append(
            f"  never trained: {h['never_trained_share']:.1%} (uniform sampling predicts "
            f"{h['never_trained_uniform']:.1%}); most participations by one device: {h['participation_max']}"
        )
    if "epsilon_every_device" in h:
        lines.append(
            f"  DP-FTRL: epsilon {h['epsilon_every_device']:.4g} for every device (no sampling assumption: "
            "the participation limit alone)"
        )
    if "epsilon_nominal" in h:
        run = audit["privacy"].get("run", {})
        text = "  epsilon by RDP (the audit's accountant"
        if run.get("epsilon") is not None:
            text += f"; the run's {run['accountant'].upper()} headline: {run['epsilon']:.4g}"
        text += f"): textbook (q = goal / population) {h['epsilon_nominal']:.4g}"
        if "epsilon_device_median" in h:
            text += (
                f"; per device under the real schedule: median {h['epsilon_device_median']:.4g}, "
                f"p99 {h['epsilon_device_p99']:.4g}, worst {h['epsilon_device_max']:.4g} "
                f"({h['distinct_patterns']} availability patterns, "
                f"{h['share_above_nominal']:.1%} above nominal, "
                f"{h['share_never_available']:.1%} never available: epsilon 0)"
            )
        lines.append(text)
        if "epsilon_participation_limit" in h:
            text = f"  participation limit alone: {h['epsilon_participation_limit']:.4g}"
            if "epsilon_device_with_limit_median" in h:
                text += (
                    f"; per device, the better of both bounds: median "
                    f"{h['epsilon_device_with_limit_median']:.4g}, "
                    f"p99 {h['epsilon_device_with_limit_p99']:.4g}, "
                    f"worst {h['epsilon_device_with_limit_max']:.4g}"
                )
            lines.append(text)
    return "\n".join(lines)


def write_figures(audit: dict, out: Path) -> None:
    from fleet.audits.participation_figures import participation_figures

    """The audit's figures as PNGs in `out`."""
    for name, fig in participation_figures(audit).items():
        fig.savefig(out / f"{name}.png", dpi=110)
