"""`python -m fleet.bench scale`: how a fleet's cost grows with its population, shards and cohort.

For each population (default 1e5, 1e6, 1e7) and shard count (1 to 4) it starts the shards on a
local Ray (one logical CPU each: more shards than cores oversubscribes them, which the table
shows), times the build, measures the memory of the whole Ray session (proportional set size of
every process, so shared pages count once; split into shards, coordinator, and Ray's own
processes with the driver), then runs rounds of real next-word-prediction training (a tiny
CIFG-LSTM by default, `--model cifg_small` for the default job's model) at each cohort goal
(default 50 and 200) and splits the median round into the coordinator's timing phases:
check-in, sampling, plan, training and aggregation. Round overhead is everything but training.

It also meters the bytes each round moves between coordinator and shards (in-process, pickled
as Ray would ship them) at two populations, to show the traffic does not depend on the
population: counts at check-in, ranks and arrival times for the cohort at plan, one weight
broadcast and one clipped sum per shard at training.

Memory per device is the slope of the shard processes' memory between the smallest and largest
population at the same shard count (what each extra device costs; only shards hold devices, and
Ray's own processes add noise to the session's total); a larger population is then estimated on
paper as the session's fixed cost + slope x devices, and its check-in by scaling the measured one
with the devices per shard.

Targets (2-core, 24 GiB machine): 1e7 devices under 2 GiB in total; round overhead under 1 s at
1e7 devices; training time proportional to the cohort (time per trained device within 30%
between the smallest and largest goal). `--quick` shrinks everything to about a minute.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import psutil

from fleet.bench._metered_shard import MeteredShard
from fleet.bench.fleet import GIB, bench_config, session_pss_by_process
from fleet.config import Config, DataConfig, ModelConfig, TaskConfig
from fleet.privacy.mechanisms import validate

MIB = 1024**2
# The model of the test suite's small NWP runs: training is real but cheap, so a whole sweep fits
# in minutes on two cores and the round overhead is not hidden under training time.
TINY = ModelConfig(name="tiny", vocab_size=300, embed_dim=16, hidden_dim=32, proj_dim=16, init_scale=1.0)
MODELS = {"tiny": TINY, "cifg_small": ModelConfig()}
PHASES = ("checkin_s", "sampling_s", "plan_s", "training_s", "aggregation_s")
MEMORY_TARGET_GIB = 2.0
OVERHEAD_TARGET_S = 1.0
PROPORTIONAL_TOLERANCE = 0.3


def scale_config(population: int, shards: int, goal: int, model: ModelConfig) -> Config:
    """The population benchmark's diurnal fleet, training next-word prediction with `model`."""
    cfg = bench_config(population, shards)
    cfg.fleet.goal = goal
    cfg.model = model
    cfg.task = TaskConfig(name="nwp")
    cfg.data = DataConfig(eval_examples=200)
    # The default job's local data (median 16 sentences, at most 64): cheap local jobs keep the
    # sweep to minutes; the cost per device is what the cohort table measures.
    cfg.fleet.examples_median, cfg.fleet.examples_max = 16.0, 64
    cfg.train.batch_size = 8
    cfg.train.eval_every = 10**9  # no held-out evaluation inside the timed rounds
    validate(cfg)
    return cfg


def _round_summary(lines: list[dict]) -> dict:
    """Medians of a goal's timed rounds: wall time, each phase, overhead, devices trained."""
    out = {k: float(np.median([x["timing"][k] for x in lines])) for k in PHASES}
    out["round_s"] = float(np.median([x["wall_s"] for x in lines]))
    out["overhead_s"] = float(np.median([x["wall_s"] - x["timing"]["training_s"] for x in lines]))
    out["reported"] = float(np.mean([x["reported"] for x in lines]))
    out["train_per_device_s"] = float(
        np.median([x["timing"]["training_s"] / max(x["reported"], 1) for x in lines])
    )
    out["training_sum_s"] = float(sum(x["timing"]["training_s"] for x in lines))
    out["trained_sum"] = int(sum(x["reported"] for x in lines))
    return out


def _memory(infos: list[dict], coordinator_pid: int) -> dict:
    """Session memory now, split into the shards, the coordinator and the rest (Ray + driver)."""
    procs = session_pss_by_process()
    shard_pids = {i["pid"] for i in infos}
    total = sum(pss for _, pss in procs.values())
    shards = sum(pss for pid, (_, pss) in procs.items() if pid in shard_pids)
    coord = procs.get(coordinator_pid, ("", 0))[1]
    rest: dict[str, int] = {}
    for pid, (name, pss) in procs.items():
        if pid not in shard_pids and pid != coordinator_pid and pss > 0:  # 0: exiting
            name = "driver" if pid == os.getpid() else name
            rest[name] = rest.get(name, 0) + pss
    return {
        "total": total,
        "shards": shards,
        "coordinator": coord,
        "rest": total - shards - coord,
        "processes": {"shards": shards, "coordinator": coord, **rest},
    }


def measure(
    population: int, shards: int, goals: list[int], model: ModelConfig, warmup: int, rounds: int
) -> dict:
    """Build one fleet, then run `warmup` + `rounds` rounds at each goal (a coordinator per goal
    over the same shards: the shards do not depend on the goal)."""
    import ray

    from fleet.round.coordinator import Coordinator
    from fleet.runtime.placement import fleet_actors

    cfgs = {g: scale_config(population, shards, g, model) for g in goals}
    t0 = time.perf_counter()
    with fleet_actors(cfgs[goals[0]], population) as (handles, coordinator):
        infos = ray.get([s.info.remote() for s in handles])
        ray.get(coordinator.get_params.remote())
        build_s = time.perf_counter() - t0
        coordinator_pid = ray.get(coordinator.__ray_call__.remote(lambda _: os.getpid()))
        pids = {coordinator_pid, *(i["pid"] for i in infos)}
        by_goal = {}
        for g in goals:
            c = (
                coordinator
                if g == goals[0]
                else ray.remote(num_cpus=0)(Coordinator).remote(cfgs[g], handles, population)
            )
            pids.add(ray.get(c.__ray_call__.remote(lambda _: os.getpid())))
            for _ in range(warmup):
                ray.get(c.run_round.remote())
            by_goal[g] = _round_summary([ray.get(c.run_round.remote()) for _ in range(rounds)])
            if c is not coordinator:
                ray.kill(c)
        after = _memory(infos, coordinator_pid)
        load = os.getloadavg()[0]
        infos = ray.get([s.info.remote() for s in handles])  # state now includes what rounds add
    _wait_exit(pids)
    return {
        "population": population,
        "shards": len(handles),
        "load": load,
        "build_s": build_s,
        "state_bytes_per_device": sum(i["state_bytes"] for i in infos) / population,
        "after": after,
        "goals": by_goal,
    }


def _wait_exit(pids: set[int], timeout: float = 30.0) -> None:
    """Let killed actors' processes go, so the next measurement's memory does not hold them."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=timeout)


def traffic(population: int, shards: int, goal: int, model: ModelConfig, rounds: int) -> dict:
    """Bytes per round between the coordinator and all shards, by phase, in-process."""
    from fleet.phones.population import shard_ranges
    from fleet.round.coordinator import Coordinator

    cfg = scale_config(population, shards, goal, model)
    fleet = [MeteredShard(cfg, i, a, b) for i, (a, b) in enumerate(shard_ranges(population, shards))]
    coordinator = Coordinator(cfg, fleet, population)
    for _ in range(rounds):
        coordinator.run_round()
    out = {k: sum(s.bytes[k] for s in fleet) / rounds for k in ("check_in", "plan", "train")}
    out["broadcast"] = float(coordinator.get_params().nbytes)
    return out


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
    print(f"\ntargets at {sweep.hi_pop:,} devices (load average {os.getloadavg()[0]:.1f} on {cores} cores):")
    for s in sweep.shard_counts:
        if (sweep.hi_pop, s) in sweep.at:
            _print_targets(sweep, s)


def _print_tables(rows: list[dict], goals: list[int]) -> None:
    """Print the two raw tables, memory by fleet and round phases by goal, before any summary."""
    print(
        f"\n{'devices':>11} {'shards':>6} {'build s':>8} {'state B/dev':>11} {'total GiB':>9} "
        f"{'shards MiB':>10} {'coord MiB':>9} {'ray+drv MiB':>11} {'load':>5}"
    )
    for r in rows:
        m = r["after"]
        print(
            f"{r['population']:>11,} {r['shards']:>6} {r['build_s']:>8.1f} "
            f"{r['state_bytes_per_device']:>11.1f} {m['total'] / GIB:>9.2f} "
            f"{m['shards'] / MIB:>10.0f} {m['coordinator'] / MIB:>9.0f} "
            f"{m['rest'] / MIB:>11.0f} {r['load']:>5.1f}"
        )
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
    """Print where the largest session's memory goes, process by process."""
    at_hi = (r for r in sweep.rows if r["population"] == sweep.hi_pop)
    biggest = max(at_hi, key=lambda r: r["after"]["total"])
    print(f"\nwhere the memory goes, {sweep.hi_pop:,} devices x {biggest['shards']} shard(s) (MiB, PSS):")
    procs = sorted(biggest["after"]["processes"].items(), key=lambda kv: -kv[1])
    print("  " + ", ".join(f"{name} {pss / MIB:.0f}" for name, pss in procs))


def _print_targets(sweep: _Sweep, s: int) -> None:
    """Print the verdicts for `s` shards at the largest population: memory, overhead, proportionality."""
    big = sweep.at[(sweep.hi_pop, s)]
    total = big["after"]["total"] / GIB
    over = max(big["goals"][g]["overhead_s"] for g in sweep.goals)
    print(
        f"  {s} shard(s): total memory {total:.2f} GiB < {MEMORY_TARGET_GIB:g} GiB: "
        f"{_verdict(total < MEMORY_TARGET_GIB)}; round overhead {over:.3f} s < {OVERHEAD_TARGET_S:g} s: "
        f"{_verdict(over < OVERHEAD_TARGET_S)}"
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


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench scale", description=__doc__)
    ap.add_argument("--populations", default="1e5,1e6,1e7")
    ap.add_argument("--shards", default="1,2,3,4", help="shard counts (one logical CPU each)")
    ap.add_argument("--goals", default="50,200", help="cohort goals, smallest first")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per goal")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per goal before those")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--paper", type=float, default=1e8, help="population to estimate (0: none)")
    ap.add_argument("--no-traffic", action="store_true", help="skip metering the bytes per round")
    ap.add_argument("--quick", action="store_true", help="1e5 and 1e6 devices, 1-2 shards, 1 round")
    args = ap.parse_args(argv)
    if args.quick:
        args.populations, args.shards, args.rounds = "1e5,1e6", "1,2", 1
    pops = [int(float(p)) for p in args.populations.split(",")]
    shard_counts = [int(s) for s in args.shards.split(",")]
    goals = [int(g) for g in args.goals.split(",")]
    model = replace(MODELS[args.model])
    import ray

    cores = os.cpu_count() or 1
    print(
        f"scale: {cores} cores, {psutil.virtual_memory().total / GIB:.0f} GiB, load average "
        f"{os.getloadavg()[0]:.1f}; model {args.model}; goals {goals}; {args.rounds} timed round(s) per goal"
    )
    ray.init(
        num_cpus=max(max(shard_counts), cores),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    rows = []
    try:
        for pop in pops:
            for s in shard_counts:
                t0 = time.perf_counter()
                rows.append(measure(pop, s, goals, model, args.warmup, args.rounds))
                print(
                    f"  measured {pop:,} devices x {s} shard(s) in {time.perf_counter() - t0:.0f} s "
                    f"(session {rows[-1]['after']['total'] / GIB:.2f} GiB)",
                    flush=True,
                )
    finally:
        ray.shutdown()
    # In this process, after the Ray sessions: its shards' memory must not count in theirs.
    traffic_rows = {}
    if not args.no_traffic:
        for pop in (min(pops), min(max(pops), 10**6)):
            traffic_rows[pop] = traffic(pop, max(1, min(shard_counts)), goals[0], model, 2)
    report(rows, goals, int(args.paper), traffic_rows)
