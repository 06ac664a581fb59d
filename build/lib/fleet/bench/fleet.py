"""`python -m fleet.bench fleet`: population build time, memory per device, check-in + sampling.

For each population size it starts the shards (one per CPU) on a local Ray, measures the memory
of ALL processes of the session (proportional set size, so shared pages count once) before and
after the shards build their rows, and times the round's check-in and sampling over several
rounds of a diurnal fleet. Targets (2-core, 24 GiB machine): 1e7 devices under 2 GiB in total;
check-in + sampling under 1 s per round.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import psutil

from fleet.config import (
    Config,
    DataConfig,
    FleetConfig,
    ModelConfig,
    PrivacyConfig,
    TaskConfig,
    TrackingConfig,
)

GIB = 1024**3


def session_pss_by_process() -> dict[int, tuple[str, int]]:
    """pid -> (name, proportional set size) for this process and all its descendants (the local
    Ray session: GCS, raylet, workers), so shared pages count once and other users' processes
    not at all."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            name = p.name()
            if name.startswith("python"):  # Ray's Python daemons: name them by their script
                name = next((os.path.basename(a) for a in p.cmdline() if a.endswith(".py")), name)
            out[p.pid] = (name, p.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def session_pss() -> int:
    """Total proportional set size of this process and its descendants (see above)."""
    return sum(pss for _, pss in session_pss_by_process().values())


def bench_config(population: int, shards: int) -> Config:
    cfg = Config(
        fleet=FleetConfig(population=population, goal=500, min_reports=1),
        model=ModelConfig(),
        privacy=PrivacyConfig(),
        data=DataConfig(),
        task=TaskConfig(name="mean"),
        tracking=TrackingConfig(mode="disabled"),
    )
    cfg.ray.shards = shards
    cfg.progress = False
    return cfg


def measure(population: int, shards: int, rounds: int) -> dict:
    import ray

    from fleet.runtime.placement import fleet_actors

    base = session_pss()
    t0 = time.perf_counter()
    cfg = bench_config(population, shards)
    with fleet_actors(cfg, population) as (shard_handles, coordinator):
        infos = ray.get([s.info.remote() for s in shard_handles])
        ray.get(coordinator.get_params.remote())
        build = time.perf_counter() - t0
        after = session_pss()
        lines = [ray.get(coordinator.run_round.remote()) for _ in range(rounds)]
        checkin = np.median([x["timing"]["checkin_s"] for x in lines])
        sampling = np.median([x["timing"]["sampling_s"] for x in lines])
        plan = np.median([x["timing"]["plan_s"] for x in lines])
        peak = session_pss()
    time.sleep(1.0)
    return {
        "population": population,
        "shards": len(shard_handles),
        "build_s": build,
        "state_bytes_per_device": sum(i["state_bytes"] for i in infos) / population,
        "measured_bytes_per_device": (after - base) / population,
        "session_total_gib": peak / GIB,
        "checkin_s": float(checkin),
        "sampling_s": float(sampling),
        "plan_s": float(plan),
        "available": int(np.median([x["available"] for x in lines])),
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench fleet", description=__doc__)
    ap.add_argument("--populations", default="1e5,1e6,1e7")
    ap.add_argument("--shards", type=int, default=0, help="0: one per CPU")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    shards = args.shards or os.cpu_count() or 1
    rows = [measure(int(float(p)), shards, args.rounds) for p in args.populations.split(",")]
    ray.shutdown()
    print(
        f"{'devices':>10} {'shards':>6} {'build s':>8} {'state B/dev':>11} {'meas B/dev':>10} "
        f"{'total GiB':>9} {'check-in s':>10} {'sampling s':>10} {'plan s':>8}"
    )
    for r in rows:
        print(
            f"{r['population']:>10,} {r['shards']:>6} {r['build_s']:>8.2f} "
            f"{r['state_bytes_per_device']:>11.1f} "
            f"{r['measured_bytes_per_device']:>10.1f} {r['session_total_gib']:>9.2f} {r['checkin_s']:>10.4f} "
            f"{r['sampling_s']:>10.5f} {r['plan_s']:>8.4f}"
        )
    big = rows[-1]
    first = rows[0]
    grow = big["population"] / first["population"]
    print(
        f"\ngrowth x{grow:.0f} devices: check-in x{big['checkin_s'] / max(first['checkin_s'], 1e-9):.1f}, "
        f"sampling x{big['sampling_s'] / max(first['sampling_s'], 1e-9):.1f}, "
        f"build x{big['build_s'] / max(first['build_s'], 1e-9):.1f}"
    )
    ok_mem = big["session_total_gib"] < 2.0
    round_s = big["checkin_s"] + big["sampling_s"]
    ok_round = round_s < 1.0
    print(
        f"targets at {big['population']:,}: total memory {big['session_total_gib']:.2f} GiB < 2 GiB: "
        f"{'PASS' if ok_mem else 'FAIL'}; check-in + sampling {round_s:.3f} s < 1 s: "
        f"{'PASS' if ok_round else 'FAIL'}"
    )
