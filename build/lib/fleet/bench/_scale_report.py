"""The scale bench's report: its tables, how each phase grows with population and cohort, the
on-paper estimate and the targets (`fleet.bench.scale` measures; this prints)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fleet.bench.fleet import GIB
from fleet.round.coordinator import PHASES

MIB = 1024**2
MEMORY_TARGETS_GIB = {10**7: 2.0, 10**8: 16.0}  # peak of the whole session, by population
OVERHEAD_TARGET_S = 1.0
PROPORTIONAL_TOLERANCE = 0.3


def _ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b > 0 else "n/a"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass
class _Sweep:
    """The sweep's rows by (population, shards) and its extremes: what every summary compares."""

    rows: list[dict]
    goals: list[int]
    at: dict[tuple[int, int], dict]
    shard_counts: list[int]
    lo_pop: int
    hi_pop: int
    lo_goal: int
    hi_goal: int

    @classmethod
    def of(cls, rows: list[dict], goals: list[int]) -> _Sweep:
        pops = sorted({r["population"] for r in rows})
        at = {(r["population"], r["shards"]): r for r in rows}
        shard_counts = sorted({r["shards"] for r in rows})
        return cls(rows, goals, at, shard_counts, pops[0], pops[-1], goals[0], goals[-1])


def report(rows: list[dict], goals: list[int], paper: int, traffic_rows: dict[int, dict]) -> None:
    """Print the tables, the growth with population and cohort, the paper estimate and the targets."""
    cores = os.cpu_count() or 1
    _print_tables(rows, goals)
    sweep = _Sweep.of(rows, goals)
    print()
    slopes = _print_growth(sweep)
    if traffic_rows:
        _print_traffic(traffic_rows)
    if paper and slopes:
        _print_paper(sweep, paper, slopes)
    _print_memory_split(sweep)
    print(f"\ntargets (load average {os.getloadavg()[0]:.1f} on {cores} cores):")
    for s in sweep.shard_counts:
        _print_targets(sweep, s)


def _print_tables(rows: list[dict], goals: list[int]) -> None:
    """Print the two raw tables, memory by fleet and round phases by goal, before any summary."""
    print(
        f"\n{'devices':>11} {'shards':>6} {'build s':>8} {'state B/dev':>11} {'peak GiB':>8} "
        f"{'shards MiB':>10} {'coord MiB':>9} {'ray+drv MiB':>11} {'after GiB':>9} {'load':>5}"
    )
    for r in rows:
        m = r["peak"]
        print(
            f"{r['population']:>11,} {r['shards']:>6} {r['build_s']:>8.1f} "
            f"{r['state_bytes_per_device']:>11.1f} {m['total'] / GIB:>8.2f} "
            f"{m['shards'] / MIB:>10.0f} {m['coordinator'] / MIB:>9.0f} "
            f"{m['rest'] / MIB:>11.0f} {r['after']['total'] / GIB:>9.2f} {r['load']:>5.1f}"
        )
    print(
        "(memory at the session's peak, and after the rounds)\nthe first round without training, s "
        "(its aggregation includes the accountant's first privacy-loss distributions, built once per "
        "grid point of the sampling probability and cached):"
    )
    for r in rows:
        if r["first"]:
            x = r["first"]
            phases = ", ".join(f"{k[:-2]} {x[k]:.3f}" for k in PHASES if k != "training_s")
            print(f"  {r['population']:>11,} x {r['shards']}: {x['overhead_s']:.3f} ({phases})")
    print(
        f"\n{'devices':>11} {'shards':>6} {'goal':>5} {'trained':>7} {'round s':>8} {'check-in':>8} "
        f"{'sampling':>8} {'plan':>7} {'training':>8} {'aggreg.':>7} {'overhead':>8} {'ms/device':>9}"
    )
    for r in rows:
        for g in goals:
            x = r["goals"][g]
            print(
                f"{r['population']:>11,} {r['shards']:>6} {g:>5} {x['reported']:>7.0f} {x['round_s']:>8.3f} "
                f"{x['checkin_s']:>8.3f} {x['sampling_s']:>8.4f} {x['plan_s']:>7.3f} {x['training_s']:>8.3f} "
                f"{x['aggregation_s']:>7.4f} {x['overhead_s']:>8.3f} {1e3 * x['train_per_device_s']:>9.2f}"
            )


def _print_growth(sweep: _Sweep) -> dict[int, float]:
    """Print how each phase grows with population and cohort; the shards' bytes per device by shard count."""
    lo_pop, hi_pop, lo_goal, hi_goal, at = sweep.lo_pop, sweep.hi_pop, sweep.lo_goal, sweep.hi_goal, sweep.at
    slopes = {}
    for s in sweep.shard_counts:
        if hi_pop > lo_pop and (lo_pop, s) in at and (hi_pop, s) in at:
            a, b = at[(lo_pop, s)], at[(hi_pop, s)]
            # Only the shards hold devices: their slope is free of the noise of Ray's own processes.
            slopes[s] = (b["after"]["shards"] - a["after"]["shards"]) / (hi_pop - lo_pop)
            session = (b["after"]["total"] - a["after"]["total"]) / (hi_pop - lo_pop)
            phases = ", ".join(
                f"{k[:-2]} {_ratio(b['goals'][hi_goal][k], a['goals'][hi_goal][k])}"
                for k in (*PHASES, "overhead_s")
            )
            print(
                f"growth with population x{hi_pop / lo_pop:.0f} ({s} shard(s), goal {hi_goal}): {phases}; "
                f"memory {slopes[s]:.1f} B per device in the shards ({session:.1f} over the session)"
            )
    for s in sweep.shard_counts:
        if (hi_pop, s) in at and hi_goal != lo_goal:
            x, y = at[(hi_pop, s)]["goals"][lo_goal], at[(hi_pop, s)]["goals"][hi_goal]
            phases = ", ".join(f"{k[:-2]} {_ratio(y[k], x[k])}" for k in (*PHASES, "overhead_s"))
            print(
                f"growth with cohort x{hi_goal / lo_goal:.0f} ({hi_pop:,} devices, {s} shard(s)): trained "
                f"{_ratio(y['reported'], x['reported'])}, {phases}"
            )
    return slopes


def _print_traffic(traffic_rows: dict[int, dict]) -> None:
    """Print the metered bytes per round, to show they do not grow with the population."""
    print("\nbytes per round, coordinator <-> all shards (pickled as Ray ships them):")
    for pop, t in sorted(traffic_rows.items()):
        print(
            f"  {pop:>11,} devices: check-in {t['check_in']:,.0f}, plan {t['plan']:,.0f}, "
            f"train {t['train']:,.0f} (+ one weight broadcast of {t['broadcast']:,.0f})"
        )


def _print_paper(sweep: _Sweep, paper: int, slopes: dict[int, float]) -> None:
    """Print the estimate for a population too large to build: fixed cost + slope x devices."""
    print(f"\non paper, {paper:,} devices (fixed cost + measured B/device x devices; check-in x devices):")
    for s, slope in slopes.items():
        big = sweep.at[(sweep.hi_pop, s)]
        fixed = big["after"]["total"] - slope * sweep.hi_pop
        grow = paper / sweep.hi_pop
        x = big["goals"][sweep.hi_goal]
        overhead = x["overhead_s"] + x["checkin_s"] * (grow - 1)
        print(
            f"  {s} shard(s): memory {(fixed + slope * paper) / GIB:.1f} GiB, check-in "
            f"{x['checkin_s'] * grow:.2f} s, round overhead {overhead:.2f} s"
        )


def _print_memory_split(sweep: _Sweep) -> None:
    """Print where the largest session's memory goes at its peak, process by process."""
    at_hi = (r for r in sweep.rows if r["population"] == sweep.hi_pop)
    biggest = max(at_hi, key=lambda r: r["peak"]["total"])
    print(
        f"\nwhere the peak memory goes, {sweep.hi_pop:,} devices x {biggest['shards']} shard(s) (MiB, PSS):"
    )
    procs = sorted(biggest["peak"]["processes"].items(), key=lambda kv: -kv[1])
    print("  " + ", ".join(f"{name} {pss / MIB:.0f}" for name, pss in procs))


def _print_targets(sweep: _Sweep, s: int) -> None:
    """Print the verdicts for `s` shards: peak memory where a target is set, the round without
    training at every population (first round included) and its growth, proportionality."""
    mine = sorted((r for r in sweep.rows if r["shards"] == s), key=lambda r: r["population"])
    for r in mine:
        pop, peak = r["population"], r["peak"]["total"] / GIB
        over = max(r["goals"][g]["overhead_max_s"] for g in sweep.goals)
        first = r["first"].get("checkin_s", 0.0)
        target = MEMORY_TARGETS_GIB.get(pop)
        memory = f"peak memory {peak:.2f} GiB < {target:g} GiB: {_verdict(peak < target)}; " if target else ""
        ok = max(over, first) <= OVERHEAD_TARGET_S
        print(
            f"  {pop:,} devices x {s} shard(s): {memory}round without training (slowest timed) {over:.3f} s, "
            f"first round's check-in (two days hashed) {first:.3f} s; <= {OVERHEAD_TARGET_S:g} s: "
            f"{_verdict(ok)}"
        )
    if len(mine) > 1:
        a, b = mine[0], mine[-1]
        grow = b["goals"][sweep.hi_goal]["overhead_s"] / a["goals"][sweep.hi_goal]["overhead_s"]
        pops = b["population"] / a["population"]
        print(
            f"  {s} shard(s): round without training grows x{grow:.1f} for x{pops:.0f} devices "
            f"(no faster than the population): {_verdict(grow <= pops)}"
        )
    lo_goal, hi_goal, rows = sweep.lo_goal, sweep.hi_goal, sweep.rows
    if hi_goal != lo_goal:
        # Pooled over every population: training does not depend on it, and pooling evens out
        # the noise of a shared machine.
        per = {
            g: sum(r["goals"][g]["training_sum_s"] for r in rows if r["shards"] == s)
            / max(sum(r["goals"][g]["trained_sum"] for r in rows if r["shards"] == s), 1)
            for g in (lo_goal, hi_goal)
        }
        rel = per[hi_goal] / per[lo_goal]
        ok = abs(rel - 1.0) <= PROPORTIONAL_TOLERANCE
        print(
            f"  {s} shard(s): training s per trained device, goal {hi_goal} / goal {lo_goal} = {rel:.2f} "
            f"({1e3 * per[hi_goal]:.1f} / {1e3 * per[lo_goal]:.1f} ms, all populations; "
            f"proportional within {PROPORTIONAL_TOLERANCE:.0%}): {_verdict(ok)}"
        )
