"""The plan of a deployment (`fleet-plan`): what a dry run of every round says before any device trains.

A dry run (`train.dry_run`) is the training run without local training or a model: the same
check-in, secret-or-reproducible sampler, timing, dropout, deadline, participation limit and
mechanism, so the same ledger (in reproducible mode, entry for entry: tested). This hook turns it
into the answers a team needs before launch:

- the headline epsilon the run would print, and, for a mechanism that rests on sampling, each
  device's epsilon under the real schedule (a device available in released round r is sampled
  with q_r, else not: its RDP is the sum of those rounds' curves, dp-accounting's, as the
  participation audit computes it) as a distribution beside the textbook figure; a mechanism that
  assumes no sampling gives every device the headline;
- calibration: the smallest z whose headline, p90, p99 or worst device meets a target epsilon. The
  cohorts do not depend on the noise, so the dry run's ledger and availability patterns are the
  plan for every z: the ledger is recomputed with the mechanism's own accountant
  (`fleet.privacy.calibrate`), the per-device figures from the patterns;
- the deployment's shape: simulated days, rounds abandoned, reports per round, the share of the
  fleet that never trains, the participation histogram;
- RUN_DIR/plan/plan.json and two figures (the per-device distribution; epsilon against rounds
  for the median and the worst device beside the headline and the textbook).

What leaves the shards are aggregates (availability patterns with device counts, histograms), as
in the participation audit: no device is named.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from fleet.atomic import write_json
from fleet.audits.participation_groups import merge
from fleet.audits.participation_privacy import distribution, rounds_rdp
from fleet.config import Config
from fleet.phones.participation import epsilons
from fleet.privacy.accountant import ORDERS, round_rdp
from fleet.privacy.calibrate import noise_for_ledger, smallest_z
from fleet.privacy.ledger import LEDGER_FILE, read
from fleet.privacy.mechanisms import cohort_size, mechanism_class, run_delta
from fleet.privacy.sampled import SampledRelease, noise_plan
from fleet.privacy.segments import up4
from fleet.round.calls import call_all

OUT_DIR = "plan"
TARGETS = ("headline", "p99", "worst")
SHARES = {"p99": 0.99, "worst": 1.0}


@dataclasses.dataclass
class Devices:
    """The fleet's availability patterns over the released rounds (packed bits, as the shards
    return them), how many devices share each, each pattern's epsilon at the plan's z (computed in
    the shards, exactly as the participation audit does), and each round's q_r: per-device
    epsilon at another z for any subset of the patterns, by RDP."""

    patterns: np.ndarray  # patterns x words, uint64: bit r = available in released round r
    counts: np.ndarray  # devices per pattern
    eps: np.ndarray  # each pattern's epsilon at the plan's z
    times: np.ndarray  # each released round's time
    q: np.ndarray  # each released round's q_r
    sampling: str
    delta: float

    def curves(self, z_acc: float) -> np.ndarray:
        return rounds_rdp(self.sampling, self.q, z_acc)[0]

    def bits(self, rows: np.ndarray) -> np.ndarray:
        packed = np.ascontiguousarray(self.patterns[rows]).astype("<u8").view(np.uint8)
        return np.unpackbits(packed, axis=1, bitorder="little")[:, : len(self.q)].astype(np.float64)

    def epsilons(self, z_acc: float, rows: np.ndarray, block: int = 8192) -> np.ndarray:
        """Epsilon at `z_acc` of the patterns `rows`, a block at a time (memory: block x rounds)."""
        curves = self.curves(z_acc)
        out = [
            epsilons(_product(self.bits(rows[i : i + block]), curves), np.asarray(ORDERS), self.delta)
            for i in range(0, len(rows), block)
        ]
        return np.concatenate(out) if out else np.zeros(0)

    def by_round(self, pattern: int | None, z_acc: float) -> np.ndarray:
        """One pattern's epsilon after each released round (None: available in every round, the
        device the headline is about)."""
        bits = np.ones(len(self.q)) if pattern is None else self.bits(np.array([pattern]))[0]
        prefixes = np.tril(np.ones((len(self.q), len(self.q)))) * bits[None, :]
        return epsilons(_product(prefixes, self.curves(z_acc)), np.asarray(ORDERS), self.delta)


def _product(bits: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Each 0/1 row's sum of the rounds' RDP curves. An order at which some round's RDP is infinite
    is infinite for a row holding that round, kept out of the product (where 0 x inf is nan)."""
    infinite = np.isinf(curves)
    out = bits @ np.where(infinite, 0.0, curves)
    return np.where(bits @ infinite.astype(np.float64) > 0, np.inf, out)


def quantile(eps: np.ndarray, counts: np.ndarray, share: float) -> float:
    """The epsilon of the device at `share` of the fleet (devices sorted by epsilon)."""
    order = np.argsort(eps, kind="stable")
    cum = np.cumsum(counts[order])
    return float(eps[order][min(np.searchsorted(cum, share * cum[-1], side="left"), len(cum) - 1)])


def after_training(run: Any) -> None:
    """Hook: the plan of a dry run (nothing for a training run)."""
    if not run.cfg.train.dry_run:
        return
    plan = make_plan(run.cfg, run.shards, run.lines, run.summary, Path(run.run_dir))
    run.summary["plan"] = headline(plan)


def make_plan(cfg: Config, shards: list, lines: list[dict], summary: dict, run_dir: Path) -> dict:
    p, f = cfg.privacy, cfg.fleet
    cls = mechanism_class(p)
    released = [x for x in lines if x.get("released")]
    st = merge(call_all(shards, "participation_stats", [()] * len(shards)))
    pop = int(st["devices"])
    plan: dict[str, Any] = {
        "mechanism": cls.name,
        "population": pop,
        "shape": shape(cfg, lines, released, st),
    }
    if not cls.dp:
        plan["privacy"] = {"dp": False}
        _write(plan, run_dir, None)
        return plan
    priv = summary.get("privacy", {})
    delta = run_delta(p, pop)
    textbook = (priv.get("textbook") or {}).get("epsilon")
    out: dict[str, Any] = {
        "dp": True,
        "headline": {"epsilon": priv.get("epsilon"), "accountant": p.accountant, "delta": delta},
        "textbook": textbook,
        "noise_multiplier": p.noise_multiplier,
        "noise_on_average_update": p.noise_multiplier * p.clip_norm / f.goal,
        "clip_norm": p.clip_norm,
    }
    z_acc = _accounted(p, f.goal)
    devices = None
    if cls.amplified_by_sampling and released:
        times = np.array([x["sim_time"] for x in released], dtype=np.float64)
        q = np.array([x["q"] for x in released], dtype=np.float64)
        devices = _devices(cfg, shards, times, q, delta, z_acc(p.noise_multiplier))
    if devices is not None:
        z0 = z_acc(p.noise_multiplier)
        nominal = float(_textbook_rdp(cfg, devices, z0)[-1])
        d = distribution(devices.eps, devices.counts, nominal)
        out["per_device"] = {
            "accountant": "rdp (per device, the participation audit's)",
            "textbook_rdp": nominal,
            "median": d["median"],
            "p90": d["quantiles"]["0.9"],
            "p99": d["p99"],
            "worst": d["max"],
            "share_above_textbook": d["share_above_nominal"],
        }
    elif not cls.amplified_by_sampling:
        out["per_device"] = {"every_device": True, "epsilon": priv.get("epsilon")}
    else:
        out["per_device"] = {"released_rounds": 0}
    plan["privacy"] = out
    target = cfg.plan.target_epsilon
    if target is not None and released:  # (nothing released: nothing to calibrate)
        plan["calibration"] = calibrate(
            cfg, cls, shards, pop, delta, devices, z_acc, run_dir, target, cfg.plan.target_for
        )
    _write(plan, run_dir, _curves(cfg, released, devices, z_acc))
    return plan


def _accounted(p: Any, goal: int) -> Any:
    """z -> the noise multiplier the per-device accounting uses (the sampling's relation, the
    adaptive split)."""

    def z_acc(z: float) -> float:
        return noise_plan(dataclasses.replace(p, noise_multiplier=z), goal).accounted

    return z_acc


def _devices(
    cfg: Config, shards: list, times: np.ndarray, q: np.ndarray, delta: float, z_acc: float
) -> Devices:
    """Each availability pattern over the released rounds and its epsilon at `z_acc`, computed in
    the shards (the participation audit's `schedule_privacy`) and merged across them."""
    curves = rounds_rdp(cfg.privacy.sampling, q, z_acc)[0]
    args = (times, curves, np.asarray(ORDERS), delta, 1.0)
    res = call_all(shards, "schedule_privacy", [args] * len(shards))
    patterns = np.concatenate([r["patterns"] for r in res])
    counts = np.concatenate([r["counts"] for r in res]).astype(np.float64)
    eps = np.concatenate([r["eps"] for r in res])
    keys = np.ascontiguousarray(patterns).view(np.dtype((np.void, 8 * patterns.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)  # shards share patterns
    merged = np.bincount(inverse.ravel(), weights=counts, minlength=len(first))
    return Devices(patterns[first], merged, eps[first], times, q, cfg.privacy.sampling, delta)


def _device_z(
    cfg: Config, shards: list, devices: Devices, z_acc: Any, target: float, share: float
) -> tuple[float, float]:
    """The smallest z whose device at `share` of the fleet has epsilon <= target.

    Searched on the fleet's tail only: the patterns of the devices with the largest epsilon at the
    plan's z, twice as many devices as lie above `share` (at least 0.1% of the fleet), every other
    device taken to be below them (at the fleet's scale there are millions of patterns). That
    ordering need not hold at another z, so the z found is checked by one more exact pass in the
    shards, and the tail is widened fourfold until the check holds."""
    order = np.argsort(devices.eps, kind="stable")[::-1]  # largest first
    cum = np.cumsum(devices.counts[order])
    total = cum[-1]
    tail = max(2 * (1 - share), 1e-3)
    while True:
        rows = order[: int(np.searchsorted(cum, tail * total)) + 1]
        below = total - devices.counts[rows].sum()

        def eps(z: float, rows=rows, below=below) -> float:
            top = devices.epsilons(z_acc(z), rows)
            return quantile(np.append(top, 0.0), np.append(devices.counts[rows], below), share)

        z = smallest_z(eps, target, cfg.privacy.noise_multiplier, rtol=1e-3)
        check = _devices(cfg, shards, devices.times, devices.q, devices.delta, z_acc(z))
        verified = quantile(check.eps, check.counts, share)
        if verified <= target * (1 + 1e-9) or tail >= 1:
            return z, verified
        tail = min(1.0, tail * 4)


def calibrate(
    cfg: Config,
    cls: Any,
    shards: list,
    pop: int,
    delta: float,
    devices: Devices | None,
    z_acc: Any,
    run_dir: Path,
    target: float,
    target_for: str,
) -> dict:
    """The smallest z that meets `target` for the headline or a share of the devices."""
    p, f = cfg.privacy, cfg.fleet
    if devices is None or target_for == "headline":
        releases = read(run_dir / "state" / LEDGER_FILE, cls.parse)
        z = noise_for_ledger(cls, cfg, pop, releases, p.accountant, delta, target)
        how = f"the headline ({p.accountant.upper()}, the run's accountant)"
        if devices is None and target_for != "headline":
            how += ": every device has it (no sampling assumed)"
    else:
        z, verified = _device_z(cfg, shards, devices, z_acc, target, SHARES[target_for])
        how = f"the {target_for} device under the real schedule (RDP, per device; verified: {verified:.4g})"
    return {
        "target_epsilon": target,
        "for": target_for,
        "meets": how,
        "noise_multiplier": z,
        "noise_on_average_update": z * p.clip_norm / f.goal,
        "clip_norm": p.clip_norm,
    }


def shape(cfg: Config, lines: list[dict], released: list[dict], st: dict) -> dict:
    """How the deployment unfolds: time, rounds, reports, who trains."""
    f = cfg.fleet
    hist = np.asarray(st["count_hist"], dtype=np.float64)
    reports = np.array([x["reported"] for x in released], dtype=np.float64)
    days = 0.0
    if lines:
        last = lines[-1]
        end = last["sim_time"] + (last.get("round_duration_s") or 0.0)
        days = (end - lines[0]["sim_time"]) / 86400.0
    return {
        "rounds": len(lines),
        "released_rounds": len(released),
        "abandoned_rounds": sum(1 for x in lines if x.get("abandoned")),
        "simulated_days": days,
        "rounds_per_day": len(lines) / days if days > 0 else None,
        "reports_per_round": {
            "goal": f.goal,
            "median": float(np.median(reports)) if len(reports) else None,
            "min": float(reports.min()) if len(reports) else None,
            "max": float(reports.max()) if len(reports) else None,
        },
        "never_trained_share": float(hist[0] / hist.sum()) if hist.sum() else None,
        "participation_histogram": hist.astype(int).tolist(),
    }


def _curves(cfg: Config, released: list[dict], devices: Devices | None, z_acc: Any) -> dict:
    """Epsilon after each released round: the headline, and the median and worst devices' with the
    textbook's (q = cohort / population every round) for a mechanism resting on sampling."""
    out: dict[str, Any] = {"round": [x["round"] for x in released]}
    out["headline"] = [x.get("epsilon") for x in released]
    if devices is None or not released:
        return out
    z = z_acc(cfg.privacy.noise_multiplier)
    order = np.argsort(devices.eps, kind="stable")
    cum = np.cumsum(devices.counts[order])
    median = int(order[np.searchsorted(cum, 0.5 * cum[-1])])
    out["every_round_device"] = devices.by_round(None, z).tolist()
    out["median_device"] = devices.by_round(median, z).tolist()
    out["worst_device"] = devices.by_round(int(order[-1]), z).tolist()
    out["textbook"] = _textbook_rdp(cfg, devices, z).tolist()
    return out


def _textbook_rdp(cfg: Config, devices: Devices, z_acc: float) -> np.ndarray:
    """The textbook epsilon by RDP after each released round: q = cohort / population every round."""
    q = min(1.0, cohort_size(cfg.fleet) / devices.counts.sum())
    one = round_rdp(SampledRelease(0, cfg.privacy.sampling, q, 0, 0, z_acc))
    k = np.arange(1, len(devices.q) + 1)[:, None]
    return epsilons(k * one[None, :], np.asarray(ORDERS), devices.delta)


def headline(plan: dict) -> dict:
    """The plan's few numbers, flat (summary.json and W&B)."""
    out: dict[str, Any] = {
        "rounds": plan["shape"]["rounds"],
        "simulated_days": plan["shape"]["simulated_days"],
    }
    priv = plan.get("privacy", {})
    if priv.get("dp"):
        out["epsilon_headline"] = priv["headline"]["epsilon"]
        out["epsilon_textbook"] = priv["textbook"]
        for k in ("median", "p90", "p99", "worst"):
            if k in priv["per_device"]:
                out[f"epsilon_device_{k}"] = priv["per_device"][k]
    cal = plan.get("calibration")
    if cal:
        out["calibrated_noise_multiplier"] = cal["noise_multiplier"]
    return out


def _write(plan: dict, run_dir: Path, curves: dict | None) -> None:
    out = run_dir / OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if curves is not None:
        plan["by_round"] = curves
    write_json(out / "plan.json", plan)
    from fleet.audits.plan_figures import write_figures

    write_figures(plan, out)


def summary_text(plan: dict) -> str:
    """The plan as a few console lines."""
    s, priv = plan["shape"], plan.get("privacy", {})
    rep = s["reports_per_round"]
    lines = [
        f"plan: {s['rounds']} rounds ({s['released_rounds']} released, {s['abandoned_rounds']} abandoned) "
        f"over {s['simulated_days']:.1f} simulated days; reports per round: median "
        f"{_g(rep['median'])} (goal {rep['goal']}); never trains: {_pct(s['never_trained_share'])} of "
        f"{plan['population']:,} devices"
    ]
    if not priv.get("dp"):
        lines.append("  no DP in this config (privacy=none): epsilon is infinite, no noise to calibrate")
    else:
        h = priv["headline"]
        lines.append(
            f"  headline epsilon {_g(h['epsilon'])} at delta {h['delta']:.3g} ({h['accountant'].upper()}, "
            f"what the run prints)"
            + (f"; textbook {_g(priv['textbook'])}" if priv["textbook"] is not None else "")
        )
        d = priv["per_device"]
        if d.get("every_device"):
            lines.append("  every device: the headline (no sampling assumed)")
        elif "worst" not in d:
            lines.append("  no released round: no device has taken part")
        else:
            lines.append(
                f"  per device under the real schedule (RDP): median {_g(d['median'])}, p90 {_g(d['p90'])}, "
                f"p99 {_g(d['p99'])}, worst {_g(d['worst'])}; textbook by RDP {_g(d['textbook_rdp'])}"
            )
        lines.append(
            f"  z = {priv['noise_multiplier']:g}: noise std on the average update z S / goal = "
            f"{priv['noise_on_average_update']:.3g} (clip S = {priv['clip_norm']:g})"
        )
    cal = plan.get("calibration")
    if cal:
        lines.append(
            f"  epsilon {cal['target_epsilon']:g} for {cal['meets']}: z = {up4(cal['noise_multiplier'])} "
            f"(noise std on the average update {cal['noise_on_average_update']:.3g})"
        )
    return "\n".join(lines)


def _g(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
