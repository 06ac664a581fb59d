"""`python -m fleet.bench privacy`: what the ledger costs a round, and how close its figure is.

A run's accountant sees a different q_r every round (q_r = cohort / available_r, and a diurnal
fleet's available count swings about 4x over a day). This drives the run's own `Accountant` with
such a sequence: `rounds` releases of a diurnal q_r (one simulated day per `rounds_per_day`
rounds), timing the per-round ledger update (`epsilon_with`, the look-ahead the target-epsilon stop
uses, then `record`), for each accountant. It prints the update time at the first rounds and at
the last (the target: under 50 ms at round 2,000), how many distinct grid points were built,
and the figure against an independent dp-accounting composition of the exact (unbucketed) events
at a 10x finer PLD discretisation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fleet.privacy.accountant import Accountant, pld_interval
from fleet.privacy.sampled import SampledRelease


def diurnal_q(rounds: int, cohort: int, population: int, rounds_per_day: int, seed: int = 0) -> np.ndarray:
    """q_r = cohort / available_r with available swinging 4x over a day, plus a little noise."""
    r = np.arange(rounds)
    share = 0.25 + 0.15 * (1 + np.cos(2 * np.pi * r / rounds_per_day))  # 0.25 ... 0.55 of the fleet
    noise = np.random.default_rng(seed).normal(1.0, 0.01, rounds)
    available = np.maximum(cohort, (population * share * noise).astype(np.int64))
    return available


def reference_epsilon(releases: list[SampledRelease], kind: str, delta: float, interval: float) -> float:
    """dp-accounting on the exact events, one compose per round, independent of our bucketing."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    from fleet.privacy.accountant import ORDERS

    if kind == "pld":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval / 10)
    else:
        relation = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS), relation)
    for r in releases:
        gauss = dp_accounting.GaussianDpEvent(r.noise_multiplier)
        acc.compose(dp_accounting.PoissonSampledDpEvent(r.q, gauss))
    return float(acc.get_epsilon(delta))


def run(
    kind: str, rounds: int, population: int, cohort: int, z: float, rounds_per_day: int, reference: bool
) -> dict:
    delta = population**-1.1
    available = diurnal_q(rounds, cohort, population, rounds_per_day)
    interval = pld_interval(cohort / population, z, rounds, delta)
    acc = Accountant(kind, delta, interval)
    times = []
    wall0 = time.perf_counter()
    for r, n in enumerate(available):
        rel = SampledRelease(r, "poisson", min(1.0, cohort / int(n)), int(n), cohort, z)
        t0 = time.perf_counter()
        acc.epsilon_with(rel)
        acc.record(rel)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    t0 = time.perf_counter()
    ref = reference_epsilon(acc.releases, kind, delta, interval) if reference else None
    ref_s = time.perf_counter() - t0
    t = np.array(times) * 1e3
    tail = t[-min(100, len(t)) :]
    return {
        "kind": kind,
        "epsilon": acc.epsilon(),
        "reference": ref,
        "excess": acc.epsilon() / ref - 1 if ref else None,
        "first10_ms": float(t[:10].mean()),
        "last100_mean_ms": float(tail.mean()),
        "last100_max_ms": float(tail.max()),
        "distinct_q": len({r.q for r in acc.releases}),
        "interval": interval,
        "wall_s": wall,
        "reference_s": ref_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench privacy", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--population", type=int, default=100_000)
    ap.add_argument("--cohort", type=int, default=130)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--rounds-per-day", type=int, default=144, help="one round every 10 simulated minutes")
    ap.add_argument("--accountants", default="pld,rdp")
    ap.add_argument("--reference", action="store_true", help="also compose the exact events (slow)")
    args = ap.parse_args(argv)
    print(
        f"ledger update per round: {args.rounds} releases, q_r = {args.cohort} / available_r, available "
        f"25-55% of {args.population:,} over a day of {args.rounds_per_day} rounds, z = {args.noise}"
    )
    ok = True
    for kind in args.accountants.split(","):
        res = run(
            kind, args.rounds, args.population, args.cohort, args.noise, args.rounds_per_day, args.reference
        )
        passed = res["last100_max_ms"] < 50
        ok &= passed
        ref = (
            f" vs exact events {res['reference']:.4f} (+{res['excess']:.3%}, {res['reference_s']:.0f} s)"
            if res["reference"] is not None
            else ""
        )
        print(
            f"  {kind}: epsilon {res['epsilon']:.4f}{ref}; update {res['first10_ms']:.1f} ms (first 10 "
            f"rounds, building grid points), {res['last100_mean_ms']:.1f} ms mean / "
            f"{res['last100_max_ms']:.1f} ms max (last 100): {'PASS' if passed else 'FAIL'} (< 50 ms); "
            f"{res['distinct_q']} distinct q_r; PLD interval {res['interval']:.2g}; "
            f"whole run {res['wall_s']:.1f} s"
        )
    print("all PASS" if ok else "some FAIL")


if __name__ == "__main__":
    main()
