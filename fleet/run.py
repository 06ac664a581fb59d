"""The driver: start Ray (or join a cluster), the shards and the coordinator; stream rounds out.

Kept apart from the Hydra entry point so tests and notebooks can call `train(cfg, run_dir)`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet import population
from fleet.config import ConfigError, validate
from fleet.coordinator import Coordinator
from fleet.shard import remote_shard_class
from fleet.tracking import Tracker

log = logging.getLogger(__name__)


def init_ray(cfg: Any, run_dir: Path | None = None) -> bool:
    """Start a local Ray sized by config, or join `ray.address`. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": bool(cfg.ray.dashboard),
        "log_to_driver": bool(cfg.ray.log_to_driver),
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), **kwargs)
    return True


def shard_count(cfg: Any, pop: int) -> int:
    import ray

    if cfg.ray.shards:
        n = cfg.ray.shards
    else:
        n = int(ray.cluster_resources().get("CPU", 1) // max(cfg.ray.cpus_per_shard, 1e-9))
    return max(1, min(n, pop))


def start_actors(cfg: Any, pop: int) -> tuple[list[Any], Any]:
    """Create the shard actors (contiguous id ranges) and the coordinator actor."""
    import ray

    n = shard_count(cfg, pop)
    shard_cls = remote_shard_class(cfg.ray.cpus_per_shard, cfg.ray.gpus_per_shard)
    t0 = cfg.fleet.start_hour * 3600.0
    shards = [
        shard_cls.options(scheduling_strategy="SPREAD").remote(cfg, i, a, b, t0)
        for i, (a, b) in enumerate(population.shard_ranges(pop, n))
    ]
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(cfg, shards, pop)
    return shards, coordinator


def train(cfg: Any, run_dir: str | Path, config_dict: dict | None = None) -> dict:
    """Run a whole training job; writes metrics.jsonl and summary.json into run_dir."""
    import ray

    validate(cfg)
    pop = population.population_size(cfg.fleet)
    if cfg.fleet.goal > pop:
        raise ConfigError(f"fleet.goal: must be <= the population ({cfg.fleet.goal} > {pop})")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = init_ray(cfg, run_dir)
    wall0 = time.perf_counter()
    shards, coordinator = start_actors(cfg, pop)
    try:
        infos = ray.get([s.info.remote() for s in shards])
        build_s = time.perf_counter() - wall0
        if config_dict is None:
            config_dict = asdict(cfg) if is_dataclass(cfg) else {}
        tracker = Tracker(run_dir, cfg, config_dict, cfg.train.rounds)
        stop_reason = "rounds"
        lines: list[dict] = []
        for _ in range(cfg.train.rounds):
            if ray.get(coordinator.budget_exhausted.remote()):
                stop_reason = "target_epsilon"
                break
            line = ray.get(coordinator.run_round.remote())
            tracker.log(line)
            lines.append(line)
            limit = cfg.train.max_wall_seconds
            if limit is not None and time.perf_counter() - wall0 > limit:
                stop_reason = "max_wall_seconds"
                break
        final_eval = ray.get(coordinator.evaluate.remote())
        summary = {
            "rounds": len(lines),
            "released_rounds": sum(1 for x in lines if x["released"]),
            "abandoned_rounds": sum(1 for x in lines if x["abandoned"]),
            "stop_reason": stop_reason,
            "population": pop,
            "shards": len(shards),
            "build_s": build_s,
            "wall_s": time.perf_counter() - wall0,
            "sim_hours": (lines[-1]["sim_time"] + lines[-1]["round_duration_s"]) / 3600.0 if lines else 0.0,
            "state_bytes_per_device": sum(i["state_bytes"] for i in infos) / pop,
            "mean_reported": float(np.mean([x["reported"] for x in lines])) if lines else math.nan,
            "final": final_eval,
            "privacy": ray.get(coordinator.privacy_summary.remote()),
        }
        tracker.finish(summary)
        return summary
    finally:
        for a in [*shards, coordinator]:
            ray.kill(a)
        if started:
            ray.shutdown()
