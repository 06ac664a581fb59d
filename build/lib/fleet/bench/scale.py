"""`python -m fleet.bench scale`: how a fleet's cost grows with its population, shards and cohort.

For each population (default 1e6, 1e7, 1e8) and shard count (default 1 and 2) it starts the
shards on a local Ray (one logical CPU each: more shards than cores oversubscribes them), times
the build, samples the memory of the whole Ray session every half second from the first actor
to the last round (proportional set size of every process, so shared pages count once) and
keeps its peak, split into shards, coordinator, and Ray's own processes with the driver. Then it
runs rounds of real next-word-prediction training (a tiny CIFG-LSTM by default, `--model
cifg_small` for the default job's model) at each cohort goal (default 50 and 200) and splits the
median round into the coordinator's timing phases: check-in, sampling, plan, training and
aggregation. A round without training (its overhead) is everything but training; the first
round's is shown apart, as it hashes two simulated days of availability coins, not one.

It also meters the bytes each round moves between coordinator and shards (in-process, pickled
as Ray would ship them) at two populations, to show the traffic does not depend on the
population: counts at check-in, ranks and arrival times for the cohort at plan, one weight
broadcast and one clipped sum per shard at training.

Memory per device is the slope of the shard processes' memory between the smallest and largest
population at the same shard count (what each extra device costs; only shards hold devices);
a population too large for this machine is then estimated on paper as the session's fixed cost +
slope x devices, and its check-in by scaling the measured one with the devices per shard.

Targets (2-core, 24 GiB machine): peak memory under 2 GiB at 1e7 devices and under 16 GiB at
1e8; a round without training in at most 1 s at every population, first round included, growing
no faster than the population; training time proportional to the cohort (time per trained device
within 30% between the smallest and largest goal). `--quick` shrinks everything to about a minute.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import replace

import numpy as np
import psutil

from fleet.bench._metered_shard import MeteredShard
from fleet.bench._scale_report import report
from fleet.bench.fleet import GIB, bench_config, session_pss_by_process
from fleet.config import Config, DataConfig, ModelConfig, TaskConfig
from fleet.privacy.mechanisms import validate
from fleet.round.coordinator import PHASES

MIB = 1024**2
# The model of the test suite's small NWP runs: training is real but cheap, so a whole sweep fits
# in minutes on two cores and the round overhead is not hidden under training time.
TINY = ModelConfig(name="tiny", vocab_size=300, embed_dim=16, hidden_dim=32, proj_dim=16, init_scale=1.0)
MODELS = {"tiny": TINY, "cifg_small": ModelConfig()}


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
    out["overhead_max_s"] = float(np.max([x["wall_s"] - x["timing"]["training_s"] for x in lines]))
    out["reported"] = float(np.mean([x["reported"] for x in lines]))
    out["train_per_device_s"] = float(
        np.median([x["timing"]["training_s"] / max(x["reported"], 1) for x in lines])
    )
    out["training_sum_s"] = float(sum(x["timing"]["training_s"] for x in lines))
    out["trained_sum"] = int(sum(x["reported"] for x in lines))
    return out


def _split(procs: dict[int, tuple[str, int]], shard_pids: set[int], coordinator_pid: int) -> dict:
    """Session memory (`session_pss_by_process`), split into the shards, the coordinator and the
    rest (Ray + driver)."""
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
    with _PeakMemory() as peak, fleet_actors(cfgs[goals[0]], population) as (handles, coordinator):
        infos = ray.get([s.info.remote() for s in handles])
        ray.get(coordinator.get_params.remote())
        build_s = time.perf_counter() - t0
        coordinator_pid = ray.get(coordinator.__ray_call__.remote(lambda _: os.getpid()))
        peak.split = lambda procs: _split(procs, {i["pid"] for i in infos}, coordinator_pid)
        pids = {coordinator_pid, *(i["pid"] for i in infos)}
        by_goal, first = {}, None
        for g in goals:
            c = (
                coordinator
                if g == goals[0]
                else ray.remote(num_cpus=0)(Coordinator).remote(cfgs[g], handles, population)
            )
            pids.add(ray.get(c.__ray_call__.remote(lambda _: os.getpid())))
            for _ in range(warmup):
                line = ray.get(c.run_round.remote())
                overhead = line["wall_s"] - line["timing"]["training_s"]
                first = first or {**line["timing"], "overhead_s": overhead}
            by_goal[g] = _round_summary([ray.get(c.run_round.remote()) for _ in range(rounds)])
            if c is not coordinator:
                ray.kill(c)
        after = _split(session_pss_by_process(), {i["pid"] for i in infos}, coordinator_pid)
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
        # The samples may miss a peak between them; the snapshot after the rounds is one more.
        "peak": max(peak.at_peak or after, after, key=lambda m: m["total"]),
        "first": first or {},
        "goals": by_goal,
    }


class _PeakMemory:
    """Samples the session's memory every `every` seconds in a thread; keeps the largest total,
    split as `split` (set once the actors' pids are known) splits it."""

    def __init__(self, every: float = 0.5):
        self.every, self.split = every, None
        self.at_peak: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            procs = session_pss_by_process()
            total = sum(pss for _, pss in procs.values())
            if self.split is not None and (self.at_peak is None or total > self.at_peak["total"]):
                self.at_peak = self.split(procs)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench scale", description=__doc__)
    ap.add_argument("--populations", default="1e6,1e7,1e8")
    ap.add_argument("--shards", default="1,2", help="shard counts (one logical CPU each)")
    ap.add_argument("--goals", default="50,200", help="cohort goals, smallest first")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per goal")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per goal before those")
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--paper", type=float, default=1e9, help="population to estimate (0: none)")
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
                    f"(peak {rows[-1]['peak']['total'] / GIB:.2f} GiB)",
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
