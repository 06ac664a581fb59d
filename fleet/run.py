"""The driver: start Ray (or join a cluster), the shards and the coordinator; stream rounds out.

Kept apart from the Hydra entry point so tests and notebooks can call `train(cfg, run_dir)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fleet import checkpoint, population
from fleet.config import Config, ConfigError, validate
from fleet.coordinator import Coordinator
from fleet.shard import fleet_size, remote_shard_class
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


def start_actors(cfg: Any, pop: int, state_dir: Path | None = None) -> tuple[list[Any], Any]:
    """Create the shard actors (contiguous id ranges) and the coordinator actor."""
    import ray

    n = shard_count(cfg, pop)
    shard_cls = remote_shard_class(cfg.ray.cpus_per_shard, cfg.ray.gpus_per_shard)
    t0 = cfg.fleet.start_hour * 3600.0
    sd = str(state_dir) if state_dir else None
    shards = [
        shard_cls.options(scheduling_strategy="SPREAD").remote(cfg, i, a, b, t0, sd)
        for i, (a, b) in enumerate(population.shard_ranges(pop, n))
    ]
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(cfg, shards, pop, sd)
    return shards, coordinator


def config_from_dict(d: dict) -> Config:
    """A typed Config from a saved (resolved) config dict, validated by the schema."""
    d = {k: v for k, v in d.items() if k != "hydra"}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def _metrics_before(path: Path, round_idx: int) -> list[dict]:
    """Keep the metrics of rounds before the checkpoint; later ones are re-run on resume."""
    if not path.exists():
        return []
    kept = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break  # a torn last line from a crash
        if line["round"] >= round_idx:
            break
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in kept))
    os.replace(tmp, path)
    return kept


def train(
    cfg: Any,
    run_dir: str | Path,
    config_dict: dict | None = None,
    on_round: Callable[[dict, list, Any], None] | None = None,
) -> dict:
    """Run (or, with cfg.resume, continue) a training job; metrics.jsonl and summary.json in run_dir.

    `on_round(line, shards, coordinator)` is called after each logged round (tests use it to
    inject crashes).
    """
    import ray

    if cfg.resume:
        run_dir = Path(cfg.resume)
        config_dict = checkpoint.load_run_config(run_dir)
        cfg = config_from_dict(config_dict)
        cfg.resume = str(run_dir)
    validate(cfg)
    pop = fleet_size(cfg)
    if cfg.fleet.goal > pop:
        raise ConfigError(f"fleet.goal: must be <= the population ({cfg.fleet.goal} > {pop})")
    run_dir = Path(run_dir)
    state_dir = run_dir / checkpoint.STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if config_dict is None:
        config_dict = asdict(cfg) if is_dataclass(cfg) else {}
    if not cfg.resume:
        checkpoint.save_config(run_dir, config_dict)
    started = init_ray(cfg, run_dir)
    wall0 = time.perf_counter()
    shards, coordinator = start_actors(cfg, pop, state_dir)
    try:
        infos = ray.get([s.info.remote() for s in shards])
        first = ray.get(coordinator.resume.remote()) if cfg.resume else 0
        lines = _metrics_before(run_dir / "metrics.jsonl", first)
        build_s = time.perf_counter() - wall0
        tracker = Tracker(run_dir, cfg, config_dict, cfg.train.rounds)
        tracker.bar.update(first)
        stop_reason = "rounds"
        pending = None
        try:
            for r in range(first, cfg.train.rounds):
                if ray.get(coordinator.budget_exhausted.remote()):
                    stop_reason = "target_epsilon"
                    break
                pending = coordinator.run_round.remote()
                line = ray.get(pending)
                pending = None
                tracker.log(line)
                lines.append(line)
                if (r + 1) % cfg.train.checkpoint_every == 0:
                    ray.get(coordinator.checkpoint.remote())
                if on_round is not None:
                    on_round(line, shards, coordinator)
                limit = cfg.train.max_wall_seconds
                if limit is not None and time.perf_counter() - wall0 > limit:
                    stop_reason = "max_wall_seconds"
                    break
        except KeyboardInterrupt:
            # Ctrl-C: let the round in flight finish (it may already be released), then checkpoint.
            if pending is not None:
                line = ray.get(pending)
                tracker.log(line)
                lines.append(line)
            stop_reason = "interrupted"
        ray.get(coordinator.checkpoint.remote())
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
            "incidents": ray.get(coordinator.get_incidents.remote()),
            "final": final_eval,
            "privacy": ray.get(coordinator.privacy_summary.remote()),
            "run_dir": str(run_dir),
        }
        tracker.finish(summary)
        if stop_reason == "interrupted":
            raise KeyboardInterrupt
        return summary
    finally:
        for a in [*shards, coordinator]:
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
