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
histograms over fixed bins and per-pattern summaries (docs/ARCHITECTURE.md, invariant 3); the outputs
(participation/participation.json and PNGs in the run dir) hold no device id and no per-device row.

This module runs the audit and holds parts 1 and 4; part 2 and 3 are `participation_privacy`,
the shard aggregates and their groups `participation_groups`, the plots `participation_figures`.
`run_audit(cfg, shards, lines, run_dir)` runs it on live shards at the end of a run; `fleet-audit
RUN_DIR --participation` (fleet.audits.cli) rebuilds the shards from the run's checkpoint afterwards.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fleet.atomic import write_json
from fleet.audits.participation_groups import groups_of, merge, safe_ratio, sum_over_groups
from fleet.audits.participation_privacy import privacy_section
from fleet.config import Config
from fleet.phones import population
from fleet.phones.participation import (
    attribute_bins,
    attribute_values,
    bin_index,
)
from fleet.round.calls import call_all

log = logging.getLogger(__name__)

OUT_DIR = "participation"

# Called with the held-out devices of one group (ids, example counts); returns metrics by name.
DeviceEvaluator = Callable[[np.ndarray, np.ndarray], Mapping[str, Any]]


# ---- entry point -------------------------------------------------------------------------------
def run_audit(
    cfg: Config,
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
    st = _participation_stats(shards, timing)
    pop = int(st["devices"])  # the fleet that ran: a corpus's devices, a Parquet population's rows
    audit: dict[str, Any] = {
        "population": pop,
        "rounds": len(lines),
        "released_rounds": len(released),
        "goal": f.goal,
        "availability_model": f.availability.model,
    }
    groups = groups_of(f, st)
    audit["groups"] = {a: [g["label"] for g in gs] for a, gs in groups.items()}
    if with_participation:
        audit["participation"] = participation_section(f, pop, released, st, groups)
        audit["bias"] = bias_section(st, groups)
    if evaluate_devices is not None:
        t0 = time.perf_counter()
        metrics = _metrics_by_group(cfg, groups, pop, evaluate_devices, holdout_per_group)
        audit.setdefault("bias", {})["metrics_by_group"] = metrics
        timing["evaluation_s"] = time.perf_counter() - t0
    max_observed = len(st["count_hist"]) - 1 if with_participation else None
    audit["privacy"] = privacy_section(cfg, shards, pop, released, groups, max_observed, cohort, timing)
    _write_outputs(audit, Path(run_dir) / OUT_DIR, figures, timing, wall0)
    return audit


def _participation_stats(shards: list[Any], timing: dict[str, float]) -> dict:
    """The shards' participation aggregates, merged and timed. Population histograms come with
    them, so they are asked even when participation is not reported."""
    t0 = time.perf_counter()
    st = merge(call_all(shards, "participation_stats", [()] * len(shards)))
    timing["participation_s"] = time.perf_counter() - t0
    return st


def _metrics_by_group(
    cfg: Config,
    groups: dict[str, list[dict]],
    pop: int,
    evaluate_devices: DeviceEvaluator,
    holdout_per_group: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """The model's metrics on held-out devices of each group: one `evaluate_devices` call per
    group, bound to its devices, so the bias section can set quality beside participation."""
    held = holdout_devices(cfg, groups, holdout_per_group, pop)
    callbacks = {
        a: {label: functools.partial(evaluate_devices, ids, n) for label, (ids, n) in by.items()}
        for a, by in held.items()
    }
    return group_metrics(callbacks)


def _write_outputs(audit: dict, out: Path, figures: bool, timing: dict[str, float], wall0: float) -> None:
    """Finish the audit's timing and write it: the figures (unless off), participation.json
    (which carries the timing) and the summary lines in the log."""
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
    # Seconds to minutes at 1e8 devices (measured 40 s): said before, so a finished bar that
    # waits is not read as a hang.
    log.info(
        "participation audit: each shard walks its devices (who trained, each one's epsilon under the "
        "real schedule; about 0.6 s per million devices in a shard, measured at 1e8)"
    )
    audit = run_audit(cfg, run.shards, run.lines, run.run_dir, evaluate_devices=run.evaluate_devices)
    run.summary["participation"] = headline(audit)


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
            key: sum_over_groups(st[a][key], gs)
            for key in ("devices", "eligible", "participants", "participations")
        }
        by_group[a] = [
            {
                "label": g["label"],
                "devices": int(agg["devices"][i]),
                "eligible": int(agg["eligible"][i]),
                "participants": int(agg["participants"][i]),
                "participations": int(agg["participations"][i]),
                "share_trained": safe_ratio(agg["participants"][i], agg["devices"][i]),
                "mean_participations": safe_ratio(agg["participations"][i], agg["devices"][i]),
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
            "share_of_eligible": safe_ratio(eligible[0], eligible.sum()),
            "uniform_expected": float((1 - q) ** r_count),
        },
        "by_hour": by_hour,
        "by_group": by_group,
    }


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
        dev = sum_over_groups(st[a]["devices"], gs).astype(np.float64)
        part = sum_over_groups(st[a]["participants"], gs).astype(np.float64)
        weighted = sum_over_groups(st[a]["participations"], gs).astype(np.float64)
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
    cfg: Config, groups: dict[str, list[dict]], per_group: int, pop: int
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
    if priv.get("every_device"):
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
            f"  epsilon {h['epsilon_every_device']:.4g} for every device (no sampling assumption: "
            "the participation limit alone)"
        )
    if "epsilon_nominal" in h:
        run = audit["privacy"].get("run", {})
        text = "  epsilon by RDP (the audit's accountant"
        if run.get("epsilon") is not None:
            text += f"; the run's {run['accountant'].upper()} headline: {run['epsilon']:.4g}"
        text += (
            f"): textbook (q = goal / population) {h['epsilon_nominal']:.4g}, with over-selection "
            f"(q = ceil(goal x overselect) / population) {h['epsilon_nominal_overselected']:.4g}"
        )
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
