"""The driver: start Ray (or join a cluster), the shards and the coordinator; stream rounds out.

Kept apart from the Hydra entry point so tests and notebooks can call `train(cfg, run_dir)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fleet import checkpoint, memorization, population
from fleet.config import Config, ConfigError, validate
from fleet.coordinator import Coordinator, default_delta
from fleet.guards import Guard, abandonment, progress_text
from fleet.shard import fleet_size, remote_shard_class
from fleet.tracking import Tracker, flatten

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
    global _started_locally
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), **kwargs)
        _started_locally = True
    return True


_started_locally = False  # this process started a local Ray (the CLI does, once per sweep)


def shard_count(cfg: Any, pop: int) -> int:
    """`ray.shards`, or as many shards as the cluster's CPUs (and GPUs, if shards take them) hold."""
    import ray

    if cfg.ray.shards:
        n = cfg.ray.shards
    else:
        total = ray.cluster_resources()
        n = int(total.get("CPU", 1) // cfg.ray.cpus_per_shard)
        if cfg.ray.gpus_per_shard:
            n = min(n, int(total.get("GPU", 0) // cfg.ray.gpus_per_shard))
    return max(1, min(n, pop))


def shard_bundle(cfg: Any) -> dict[str, float]:
    """The resources one shard reserves: its placement-group bundle and its actor's request."""
    bundle = {"CPU": float(cfg.ray.cpus_per_shard)}
    if cfg.ray.gpus_per_shard:
        bundle["GPU"] = float(cfg.ray.gpus_per_shard)
    return bundle


def reserve_shards(cfg: Any, n: int) -> Any:
    """A placement group of one bundle per shard, spread over the cluster's nodes.

    SPREAD puts bundles on distinct nodes where it can and several on one node where shards
    outnumber nodes (STRICT_SPREAD would refuse that). Reserving all bundles at once means a
    round never starts with part of the fleet unplaced, and a shard that Ray restarts comes back
    in its own bundle, with the same resources, on the same node while that node lives.
    A local Ray never grows, so a request it cannot hold fails at once; a cluster may be
    waiting for nodes (an autoscaler), so there we wait up to `ray.placement_timeout_s`.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = shard_bundle(cfg)
    need = f"{n} shard(s) x {bundle}"
    total = ray.cluster_resources()
    has = {k: total.get(k, 0.0) for k in bundle}
    if not cfg.ray.address and any(v * n > has[k] + 1e-9 for k, v in bundle.items()):
        raise ConfigError(
            f"ray.shards: {need} do not fit this Ray's {has}; lower ray.shards, "
            "ray.cpus_per_shard or ray.gpus_per_shard, or raise ray.num_cpus"
        )
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD")
    if not pg.wait(timeout_seconds=cfg.ray.placement_timeout_s):
        remove_placement_group(pg)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        raise ConfigError(
            f"ray.shards: {need} could not be placed within {cfg.ray.placement_timeout_s:g} s "
            f"on {len(nodes)} node(s) with {[{k: r.get(k, 0.0) for k in bundle} for r in nodes]}"
        )
    return pg


def start_actors(
    cfg: Any, pop: int, state_dir: Path | None = None, placement_group: Any = None
) -> tuple[list[Any], Any]:
    """Create the shard actors (contiguous id ranges), one per bundle of `placement_group`
    (reserved here, for the Ray session's lifetime, if not given: `fleet_actors` releases it),
    and the coordinator actor, on the driver's node with no CPU: it waits on the shards."""
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    pg = placement_group if placement_group is not None else reserve_shards(cfg, shard_count(cfg, pop))
    shard_cls = remote_shard_class(cfg.ray.cpus_per_shard, cfg.ray.gpus_per_shard)
    t0 = cfg.fleet.start_hour * 3600.0
    sd = str(state_dir) if state_dir else None
    shards = [
        shard_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote(cfg, i, a, b, t0, sd)
        for i, (a, b) in enumerate(population.shard_ranges(pop, len(pg.bundle_specs)))
    ]
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = None
    # Wait for every constructor: an error in one (a bad config only a shard can check, such as a
    # GPU it cannot see) surfaces here, at start-up, and no caller acts on actors still starting.
    try:
        _ready(shards)
        coordinator = (
            ray.remote(num_cpus=0)(Coordinator).options(scheduling_strategy=here).remote(cfg, shards, pop, sd)
        )
        _ready([coordinator])
    except BaseException:
        for a in [*shards, coordinator]:
            if a is not None:
                ray.kill(a, no_restart=True)
        raise
    return shards, coordinator


def _ready(actors: list[Any]) -> None:
    """Wait for the actors' constructors; a ConfigError raised in one is raised here as itself
    (one line naming the key), not as Ray's actor-died traceback."""
    import ray

    try:
        ray.get([a.__ray_ready__.remote() for a in actors])
    except ray.exceptions.RayActorError as e:
        found = re.findall(r"ConfigError: (.+)", str(e)) if e.actor_init_failed else []
        if found:
            raise ConfigError(found[-1].strip()) from e
        raise


@contextmanager
def fleet_actors(cfg: Any, pop: int, state_dir: Path | None = None) -> Iterator[tuple[list[Any], Any]]:
    """`start_actors` in a placement group of its own; on exit the actors and the group go, so the
    next job of a sweep (or test) sharing this Ray session finds the resources free again."""
    import ray
    from ray.util.placement_group import remove_placement_group

    pg = reserve_shards(cfg, shard_count(cfg, pop))
    shards: list[Any] = []
    coordinator = None
    try:
        shards, coordinator = start_actors(cfg, pop, state_dir, pg)
        yield shards, coordinator
    finally:
        for a in [*shards, coordinator]:
            if a is not None:
                ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def config_from_dict(d: dict) -> Config:
    """A typed Config from a saved (resolved) config dict, validated by the schema."""
    d = {k: v for k, v in d.items() if k != "hydra"}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def _metrics_before(path: Path, round_idx: int, secure: bool) -> list[dict]:
    """The metrics of rounds before the checkpoint, which a resumed run continues after.

    Later rounds are re-run. In reproducible mode they release the same outputs again, so their
    lines are dropped; in secure mode their outputs were released and stay accounted, so their
    lines stay in the file, marked `superseded` (the report draws the re-run instead)."""
    if not path.exists():
        return []
    kept, lost = [], []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break  # a torn last line from a crash
        if line["round"] < round_idx:
            kept.append(line)
        elif secure:
            lost.append(line | {"superseded": True})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in kept + lost))
    os.replace(tmp, path)
    return kept + lost


def cluster_line(cfg: Any, started: bool) -> str:
    """Which Ray this run is on: its address, nodes, CPUs and GPUs, and whether this run started
    it or joined it (`ray.address`), so a run never lands on someone else's cluster unsaid."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    if cfg.ray.address:
        how = f"joined (ray.address={cfg.ray.address})"
    elif started or _started_locally:
        how = "local, started by fleet"
    else:
        how = "joined this process's existing Ray session"
    return (
        f"ray: {ray.get_runtime_context().gcs_address}, {how}: {len(nodes)} node(s), "
        f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    )


def _header(cfg: Any, pop: int, infos: list[dict], num_params: int, build_s: float, run_dir: Path) -> str:
    """What is about to run, in a few lines: the fleet as built, the model, the mechanism."""
    engines = sorted({i["engine"] for i in infos if i.get("engine")})
    p, f = cfg.privacy, cfg.fleet
    if p.enabled and p.mechanism == "dp_ftrl":
        from fleet.config import separation_rounds

        restart = f"a new tree every {p.restart_every} rounds" if p.restart_every else "one tree"
        privacy = (
            f"DP-FTRL, z={p.noise_multiplier:g}, clip S={p.clip_norm:g}, {restart}, each device at most "
            f"once in {separation_rounds(cfg)} released rounds"
        )
    elif p.enabled:
        clip = f"adaptive clip from {p.initial_clip:g}" if p.adaptive else f"clip S={p.clip_norm:g}"
        privacy = f"DP-FedAvg, z={p.noise_multiplier:g}, {clip}, {p.sampling} sampling"
    else:
        privacy = "no DP (privacy=none)"
    return "\n".join(
        [
            f"fleet: {pop:,} devices ({f.availability.model} availability) in {len(infos)} shard(s), "
            f"{sum(i['state_bytes'] for i in infos) / pop:.0f} bytes of state per device, "
            f"ready in {build_s:.1f} s",
            f"task: {cfg.task.name}; "
            + (f"model {cfg.model.name}: " if cfg.task.name == "nwp" else "")
            + f"{num_params:,} parameters"
            + (f"; local training: {', '.join(engines)}" if engines else ""),
            f"rounds: {cfg.train.rounds}, goal {f.goal} reports ({f.overselect:g}x selected); {privacy}",
            *_privacy_header(cfg, pop),
            f"outputs: {run_dir}",
        ]
    )


def _privacy_header(cfg: Any, pop: int) -> list[str]:
    """The textbook figure for the planned rounds, as `fleet-privacy` prints it for the same
    settings, and what the run accounts instead."""
    p, f = cfg.privacy, cfg.fleet
    if not p.enabled or p.mechanism == "dp_ftrl":
        return []
    from fleet.privacy.accountant import nominal_epsilon
    from fleet.privacy.mechanism import noise_plan

    delta = p.delta if p.delta is not None else default_delta(pop)
    z_acc = noise_plan(p, f.goal).accounted
    eps = nominal_epsilon(p.accountant, p.sampling, f.goal / pop, z_acc, cfg.train.rounds, delta)
    return [
        f"privacy: textbook epsilon after {cfg.train.rounds} rounds {eps:.4g} at delta {delta:.3g} "
        f"(q = goal / population = {f.goal / pop:.3g}, {p.accountant.upper()}; fleet-privacy "
        f"--population {pop} --goal {f.goal} --rounds {cfg.train.rounds} --noise {p.noise_multiplier:g}"
        + (f" --sampling {p.sampling} --accountant {p.accountant}" if p.sampling != "poisson" else "")
        + (" (adaptive clipping: --noise is the total)" if p.adaptive else "")
        + "); the run accounts each round's real q_r = "
        + f"min(1, {math.ceil(f.goal * f.overselect)} / available)",
    ]


def check_privacy_budget(cfg: Any, pop: int) -> float:
    """The run's delta, after refusing settings no round can satisfy (one line, before start-up):
    a target epsilon below what a single round costs even at the smallest q_r (every device
    available), and warning when delta is not below 1 / population."""
    p, f = cfg.privacy, cfg.fleet
    delta = p.delta if p.delta is not None else default_delta(pop)
    if not p.enabled:
        return delta
    if delta >= 1.0 / pop:
        log.warning(
            "privacy.delta = %.3g is not below 1 / population = %.3g: a guarantee that fails with "
            "that probability may fail for a whole device",
            delta,
            1.0 / pop,
        )
    if p.target_epsilon is None or p.mechanism == "dp_ftrl":
        return delta
    from fleet.privacy.accountant import noise_for_epsilon, nominal_epsilon
    from fleet.privacy.mechanism import noise_plan

    cohort = math.ceil(f.goal * f.overselect)
    q_floor = min(1.0, cohort / pop)
    z_acc = noise_plan(p, f.goal).accounted
    one = nominal_epsilon(p.accountant, p.sampling, q_floor, z_acc, 1, delta)
    if one > p.target_epsilon:
        scale = p.noise_multiplier / z_acc if z_acc > 0 else 1.0
        z = noise_for_epsilon(
            p.accountant, p.sampling, q_floor, cfg.train.rounds, delta, p.target_epsilon, scale
        )
        raise ConfigError(
            f"privacy.target_epsilon: {p.target_epsilon:g} is unreachable: one round costs at least "
            f"{one:.4g} (q >= {cohort} / {pop}, z = {p.noise_multiplier:g}); "
            f"privacy.noise_multiplier={z:.4g} would allow {cfg.train.rounds} rounds"
        )
    return delta


def _summary(
    cfg: Any,
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
        out["mean_reported"] = float(np.mean([x["reported"] for x in current])) if current else math.nan
        out["pure_noise_rounds"] = sum(1 for x in current if x.get("pure_noise"))
    return out


# What may change when a run is resumed: how long it goes on, how it is watched and where it runs.
# Anything else would make the resumed run a different run from the one checkpointed.
RESUMABLE = (
    "train.rounds",
    "train.eval_every",
    "train.checkpoint_every",
    "train.max_wall_seconds",
    "train.stop_on_divergence",
    "train.divergence_factor",
    "train.divergence_rounds",
    "train.guard_warmup_rounds",
    "train.min_signal_to_noise",
    "train.guard_window",
    "train.max_pure_noise_rounds",
    "train.participation_audit",
    "privacy.target_epsilon",
    "tracking.",
    "progress",
    "verbose",
    "ray.address",
    "ray.num_cpus",
    "ray.dashboard",
    "ray.log_to_driver",
    "ray.placement_timeout_s",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the round in flight finished and a checkpoint was written."""

    def __init__(self, run_dir: Path, rounds: int):
        super().__init__(f"interrupted after round {rounds}")
        self.run_dir, self.rounds = run_dir, rounds


def resumed_config(saved: dict, overrides: list[str]) -> dict:
    """The saved config with the command line's overrides that a resume may change; one line
    naming the others."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = OmegaConf.create({k: v for k, v in saved.items() if k != "hydra"})
    refused = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key, value = o.key_or_group, o.value()
        if key in ("resume", "hydra") or key.startswith("hydra."):
            continue
        if isinstance(OmegaConf.select(out, key), DictConfig):  # a profile: fleet=tiny, tracking=online
            profile = _profile(key, value)
            same = all(OmegaConf.select(out, f"{key}.{k}") == v for k, v in flatten(profile, ".").items())
            value = OmegaConf.merge(OmegaConf.select(out, key), profile)
        else:
            same = OmegaConf.select(out, key) == value
        if same:
            continue  # the command line repeated as it was: nothing changes
        if not any(key == r.rstrip(".") or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
            refused.append(key)
            continue
        OmegaConf.update(out, key, value, force_add=False)
    if refused:
        raise ConfigError(
            f"resume: {', '.join(refused)} cannot change on resume (the run would no longer be the one "
            f"checkpointed); these can: {', '.join(r.rstrip('.') for r in RESUMABLE)}"
        )
    return OmegaConf.to_container(out, resolve=True)


def _profile(group: str, name: str) -> dict:
    """A config group's profile, as its YAML file sets it (read directly: a resume runs inside
    Hydra's app, where composing again is not allowed)."""
    from fleet.cli import CONF_DIR

    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"{group}: no option {name!r}")
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}


def train(
    cfg: Any,
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

    if cfg.resume:
        run_dir = Path(cfg.resume)
        config_dict = resumed_config(checkpoint.load_run_config(run_dir), overrides or [])
        cfg = config_from_dict(config_dict)
        cfg.resume = str(run_dir)
        checkpoint.load_coordinator(
            run_dir / checkpoint.STATE_DIR
        )  # a corrupt one: one line, before start-up
    validate(cfg)
    if cfg.tracking.mode == "online":
        from fleet.tracking import wandb_logged_in

        if not wandb_logged_in():
            raise ConfigError(
                "tracking.mode: online needs a W&B login: run `wandb login` (or set WANDB_API_KEY), "
                "or use tracking=offline and `wandb sync` later"
            )
    pop = fleet_size(cfg)
    if cfg.fleet.goal > pop:
        raise ConfigError(f"fleet.goal: must be <= the population ({cfg.fleet.goal} > {pop})")
    check_privacy_budget(cfg, pop)
    run_dir = Path(run_dir)
    state_dir = run_dir / checkpoint.STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if config_dict is None:
        config_dict = asdict(cfg) if is_dataclass(cfg) else {}
    if not cfg.resume:
        checkpoint.save_config(run_dir, config_dict)
    memorization.prepare(cfg, run_dir)  # canary plan for the shards (RUN_DIR/canaries/), if any
    started = init_ray(cfg, run_dir)
    wall0 = time.perf_counter()
    actors = ExitStack()  # the shards, the coordinator and their placement group, released at the end
    shards, coordinator = actors.enter_context(fleet_actors(cfg, pop, state_dir))
    try:
        infos = ray.get([s.info.remote() for s in shards])
        first = ray.get(coordinator.resume.remote()) if cfg.resume else 0
        lines = _metrics_before(run_dir / "metrics.jsonl", first, cfg.rng == "secure")
        build_s = time.perf_counter() - wall0
        num_params = int(ray.get(coordinator.get_params.remote()).size)
        log.info("%s", _header(cfg, pop, infos, num_params, build_s, run_dir))
        log.info("%s", cluster_line(cfg, started))
        tracker = Tracker(run_dir, cfg, config_dict, cfg.train.rounds)
        tracker.bar.update(first)
        stop_reason = "rounds"
        diverged = None
        guard = Guard(cfg.train)
        pending = None
        try:
            for r in range(first, cfg.train.rounds):
                pending = coordinator.run_round.remote()
                line = ray.get(pending)
                pending = None
                if line.get("stop"):  # releasing this round would pass privacy.target_epsilon
                    stop_reason = line["stop"]
                    break
                tracker.log(line)
                lines.append(line)
                verdict = guard.check(line)
                for warning in verdict.warnings:
                    tracker.warn(warning)
                if (r + 1) % cfg.train.eval_every == 0:
                    log.info("round %d: %s", r + 1, progress_text(lines))
                if verdict.stop:
                    stop_reason, diverged = "diverged", verdict.stop
                    tracker.warn(f"diverged: {diverged}")
                    break
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
        summary = _summary(cfg, lines, stop_reason, pop, infos, num_params, build_s, wall0, run_dir)
        summary["incidents"] = ray.get(coordinator.get_incidents.remote())
        summary["final"] = final_eval
        summary["privacy"] = ray.get(coordinator.privacy_summary.remote())
        if diverged:
            summary["diverged"] = diverged
        why = abandonment(lines, cfg, pop)
        if why:
            summary["abandonment"] = why
            log.warning("%s", why)
        if memorization.planted(cfg) and cfg.memorization.audit and stop_reason != "interrupted":
            memorization.run_audit(run_dir, cfg)  # before finish: its figures go to the W&B run
        private = cfg.privacy.telemetry == "private"
        if private and cfg.train.participation_audit and cfg.privacy.enabled:
            log.info(
                "participation audit skipped: privacy.telemetry=private releases no participation figures"
            )
        if (
            cfg.train.participation_audit
            and stop_reason != "interrupted"
            and cfg.privacy.enabled
            and not private
        ):
            # Who trained and the epsilon of each device under the real schedule, computed in the
            # shards while they still hold their state; released as histograms only.
            def evaluate(ids: np.ndarray, n: np.ndarray) -> dict:
                return ray.get(coordinator.evaluate_devices.remote(ids, n))

            from fleet import participation  # here: it loads matplotlib, scipy and dp-accounting

            audit = participation.run_audit(cfg, shards, lines, run_dir, evaluate_devices=evaluate)
            summary["participation"] = participation.headline(audit)
        tracker.finish(summary)
        if stop_reason == "interrupted":
            raise Interrupted(run_dir, len(lines))
        return summary
    finally:
        actors.close()
        if started:
            ray.shutdown()
