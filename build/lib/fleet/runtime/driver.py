"""The driver: start Ray (or join a cluster), the shards and the coordinator; stream rounds out.

Kept apart from the Hydra entry point so tests and notebooks can call `train(cfg, run_dir)`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet.config import Config, ConfigError, config_from_dict
from fleet.privacy.mechanisms import check_population, prepare, validate
from fleet.round import checkpoint
from fleet.round.devices import fleet_size
from fleet.runtime import hooks
from fleet.runtime.guards import Guard, abandonment, incident_text, progress_text
from fleet.runtime.header import header
from fleet.runtime.placement import cluster_line, fleet_actors, init_ray
from fleet.runtime.resume import Interrupted, ShardsLost, metrics_before, resumed_config
from fleet.runtime.tracking import Tracker

log = logging.getLogger(__name__)


def _summary(
    cfg: Config,
    lines: list[dict],
    stop_reason: str,
    pop: int,
    infos: list[dict],
    num_params: int,
    build_s: float,
    wall0: float,
    run_dir: Path,
) -> dict:
    """The run's summary; under private telemetry only what the release already shows (how many
    rounds released) and what does not depend on who took part."""
    current = [x for x in lines if not x.get("superseded")]
    out = {
        "rounds": len(current),
        "released_rounds": sum(1 for x in current if x["released"]),
        "abandoned_rounds": sum(1 for x in current if x["abandoned"]),
        "superseded_rounds": len(lines) - len(current),
        "stop_reason": stop_reason,
        "population": pop,
        "shards": len(infos),
        "build_s": build_s,
        "state_bytes_per_device": sum(i["state_bytes"] for i in infos) / pop,
        "model_params": num_params,
        "telemetry": cfg.privacy.telemetry,
        "run_dir": str(run_dir),
    }
    if cfg.privacy.telemetry != "private":
        out["wall_s"] = time.perf_counter() - wall0
        out["sim_hours"] = (
            (current[-1]["sim_time"] + current[-1]["round_duration_s"]) / 3600.0 if current else 0.0
        )
        reported = [x["reported"] for x in current if x["reported"] is not None]  # None: a crash
        out["mean_reported"] = float(np.mean(reported)) if reported else math.nan
        out["pure_noise_rounds"] = sum(1 for x in current if x.get("pure_noise"))
    return out


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what schedulers, `timeout` and `kill` send) stops the run as Ctrl-C does: the round
    in flight finishes, a checkpoint is written, and the resume command is printed. Ray's driver
    would otherwise dump a C++ stack and exit 15 with nothing saved. A second SIGTERM while
    stopping is logged and ignored (the checkpoint is being written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, lambda *_: log.warning("SIGTERM again: still checkpointing"))
        log.warning("SIGTERM: stopping after the round in flight, with a checkpoint")
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@dataclass
class _Loop:
    """What the round loop leaves for the end of the run: why it stopped, and the lines."""

    lines: list[dict]
    stop_reason: str = "rounds"
    diverged: str | None = None
    lost: str | None = None


def train(
    cfg: Config,
    run_dir: str | Path,
    config_dict: dict | None = None,
    on_round: Callable[[dict, list, Any], None] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Run (or, with cfg.resume, continue) a training job; metrics.jsonl and summary.json in run_dir.

    With a resume, `overrides` (the command line's) may extend or re-watch the run (`RESUMABLE`).
    `on_round(line, shards, coordinator)` is called after each logged round (tests use it to
    inject crashes).
    """
    import ray

    cfg, run_dir, config_dict, pop = _prepare(cfg, Path(run_dir), config_dict, overrides)
    cfg = hooks.before_start(cfg, run_dir)  # e.g. the canary plan the shards read
    started = init_ray(cfg, run_dir)
    wall0 = time.perf_counter()
    actors = ExitStack()  # the shards, the coordinator and their placement group, released at the end
    shards, coordinator = actors.enter_context(fleet_actors(cfg, pop, run_dir / checkpoint.STATE_DIR))
    actors.enter_context(terminate_as_interrupt())
    try:
        infos = ray.get([s.info.remote() for s in shards])
        first = ray.get(coordinator.resume.remote()) if cfg.resume else 0
        loop = _Loop(metrics_before(run_dir / "metrics.jsonl", first, cfg.rng == "secure"))
        build_s = time.perf_counter() - wall0
        num_params = int(ray.get(coordinator.get_params.remote()).size)
        log.info("%s", header(cfg, pop, infos, num_params, build_s, run_dir))
        log.info("%s", cluster_line(cfg, started))
        tracker = Tracker(run_dir, cfg, config_dict, cfg.train.rounds)
        actors.callback(tracker.close_console)  # also when the run fails: the console comes back
        tracker.bar.update(first)
        current = [x for x in loop.lines if not x.get("superseded")]  # the resumed run's rounds so far
        tracker.released = sum(bool(x["released"]) for x in current)
        tracker.abandoned = sum(bool(x["abandoned"]) for x in current)
        _run_rounds(cfg, run_dir, first, loop, tracker, shards, coordinator, on_round, wall0)
        ray.get(coordinator.checkpoint.remote())
        final = ray.get(coordinator.evaluate.remote())
        summary = _summary(cfg, loop.lines, loop.stop_reason, pop, infos, num_params, build_s, wall0, run_dir)
        _finish(cfg, run_dir, pop, loop, summary, final, shards, coordinator)
        tracker.finish(summary)
        if loop.stop_reason == "interrupted":
            raise Interrupted(run_dir, len(loop.lines))
        if loop.lost:
            raise ShardsLost(run_dir, len(loop.lines), loop.lost)
        return summary
    finally:
        actors.close()
        if started:
            ray.shutdown()


def _prepare(
    cfg: Config, run_dir: Path, config_dict: dict | None, overrides: list[str] | None
) -> tuple[Any, Path, dict, int]:
    """Everything checked before anything starts: the resumed run's config, the mechanism's
    rules, a W&B login, the population; the run directory and its config written."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        config_dict = resumed_config(checkpoint.load_run_config(run_dir), overrides or [])
        cfg = config_from_dict(config_dict)
        cfg.resume = str(run_dir)
        checkpoint.load_coordinator(run_dir / checkpoint.STATE_DIR)  # a corrupt one: one line, now
    validate(cfg)
    if cfg.tracking.mode == "online":
        from fleet.runtime.tracking import wandb_logged_in

        if not wandb_logged_in():
            raise ConfigError(
                "tracking.mode: online needs a W&B login: run `wandb login` (or set WANDB_API_KEY), "
                "or use tracking=offline and `wandb sync` later"
            )
    pop = fleet_size(cfg)
    if cfg.fleet.goal > pop:
        raise ConfigError(f"fleet.goal: must be <= the population ({cfg.fleet.goal} > {pop})")
    check_population(cfg, pop)  # delta below 1 / population, a reachable target
    prepare(cfg)  # e.g. the BLT's strategy, optimized once and cached
    (run_dir / checkpoint.STATE_DIR).mkdir(parents=True, exist_ok=True)
    if config_dict is None:
        config_dict = asdict(cfg) if is_dataclass(cfg) else {}
    if not cfg.resume:
        checkpoint.save_config(run_dir, config_dict)
    return cfg, run_dir, config_dict, pop


def _run_rounds(
    cfg: Config,
    run_dir: Path,
    first: int,
    loop: _Loop,
    tracker: Tracker,
    shards: list,
    coordinator: Any,
    on_round: Callable[[dict, list, Any], None] | None,
    wall0: float,
) -> None:
    """Rounds from `first` until the last, a stop (target epsilon, divergence, a lost shard, the
    wall-clock limit) or Ctrl-C / SIGTERM, which let the round in flight finish."""
    import ray

    guard = Guard(cfg.train)
    pending = None
    live = hooks.Run(
        cfg, run_dir, shards, loop.lines, weights=lambda: ray.get(coordinator.get_params.remote())
    )
    try:
        for r in range(first, cfg.train.rounds):
            pending = coordinator.run_round.remote()
            line = ray.get(pending)
            pending = None
            if line.get("stop"):  # releasing this round would pass privacy.target_epsilon
                loop.stop_reason = line["stop"]
                return
            tracker.log(line)
            loop.lines.append(line)
            if incident := incident_text(line):
                tracker.warn(incident)
            if line.get("incident") == "shard_lost":  # not running again within ray.recovery_timeout_s
                loop.stop_reason, loop.lost = "shard_lost", incident
                return
            live.round = r + 1
            hooks.call(hooks.DURING_TRAINING, live)  # e.g. the canaries' exposure every k rounds
            verdict = guard.check(line)
            for warning in verdict.warnings:
                tracker.warn(warning)
            if (r + 1) % cfg.train.eval_every == 0:
                log.info("round %d: %s", r + 1, progress_text(loop.lines))
            if verdict.stop:
                loop.stop_reason, loop.diverged = "diverged", verdict.stop
                tracker.warn(f"diverged: {verdict.stop}")
                return
            if (r + 1) % cfg.train.checkpoint_every == 0:
                ray.get(coordinator.checkpoint.remote())
            if on_round is not None:
                on_round(line, shards, coordinator)
            limit = cfg.train.max_wall_seconds
            if limit is not None and time.perf_counter() - wall0 > limit:
                loop.stop_reason = "max_wall_seconds"
                return
    except KeyboardInterrupt:
        # Ctrl-C: let the round in flight finish (it may already be released), then checkpoint.
        if pending is not None:
            line = ray.get(pending)
            tracker.log(line)
            loop.lines.append(line)
        loop.stop_reason = "interrupted"


def _finish(
    cfg: Config,
    run_dir: Path,
    pop: int,
    loop: _Loop,
    summary: dict,
    final: dict,
    shards: list,
    coordinator: Any,
) -> None:
    """The summary's parts from the coordinator (final evaluation, incidents, privacy), the
    abandonment diagnosis, and the audits, unless the run was interrupted or lost shards."""
    import ray

    summary["incidents"] = ray.get(coordinator.get_incidents.remote())
    summary["final"] = final
    summary["privacy"] = ray.get(coordinator.privacy_summary.remote())
    if loop.diverged:
        summary["diverged"] = loop.diverged
    why = abandonment(loop.lines, cfg, pop)
    if why:
        summary["abandonment"] = why
        log.warning("%s", why)
    if loop.stop_reason not in ("interrupted", "shard_lost"):  # the audits ask every shard

        def evaluate(ids: np.ndarray, n: np.ndarray) -> dict:
            return ray.get(coordinator.evaluate_devices.remote(ids, n))

        run = hooks.Run(cfg, run_dir, shards, loop.lines, summary, loop.stop_reason, evaluate)
        hooks.call(hooks.AFTER_TRAINING, run)  # the audits; their figures go to the W&B run
