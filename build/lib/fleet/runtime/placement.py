"""Where the actors run: a local Ray or a cluster, the shards' placement group, start-up and release."""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.config import Config, ConfigError
from fleet.phones import population
from fleet.round.coordinator import Coordinator
from fleet.round.shard import remote_shard_class

log = logging.getLogger(__name__)


def init_ray(cfg: Config, run_dir: Path | None = None) -> bool:
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
        target = announce(cfg.ray.address)
        if not reachable(target, REACH_S):
            raise ConfigError(
                f"ray.address={cfg.ray.address}: nothing answers at {target} (tried for {REACH_S:.0f} s). "
                f"Is the head running (`ray status --address {target}`), and is the port open from here? "
                "(README: Running on a Ray cluster)"
            )
        try:
            ray.init(address=cfg.ray.address, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            first = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
            raise ConfigError(
                f"ray.address={cfg.ray.address}: cannot join the Ray at {target}: {first}. Is it running "
                f"(`ray status --address {target}`)? A cluster with Ray's token authentication on needs "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the head's ~/.ray/auth_token) set here too "
                "(README: Running on a Ray cluster)"
            ) from None
        if cfg.ray.address == "auto" and not cfg.ray.join_foreign:
            session = ray._private.worker._global_node.get_session_dir_path()
            why = foreign_cluster(session)
            if why:
                address = ray.get_runtime_context().gcs_address
                ray.shutdown()
                raise ConfigError(
                    f"ray.address: auto found the Ray at {address}, which is not a standing cluster: {why}. "
                    "Start one with `ray start --head` (or use ray=local), or set ray.join_foreign=true "
                    "to run there anyway"
                )
    else:
        # The local Ray's processes (GCS, raylet, and the workers the raylet starts) inherit a
        # blocked SIGTERM: a scheduler or `timeout` signalling the whole process group then stops
        # the driver alone, which checkpoints and shuts them down itself (`ray.shutdown` kills them
        # with SIGKILL). Ray blocks SIGINT in them for the same reason.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _started_locally = True
    return True


_started_locally = False  # this process started a local Ray (the CLI does, once per sweep)

REACH_S = 15.0  # how long a named Ray's port may take to answer (a head still starting)


def reachable(target: str, within_s: float) -> bool:
    """Whether anything accepts a TCP connection at a Ray address (`HOST:PORT` or `ray://HOST:PORT`)
    within `within_s`. `ray.init` at an address where nothing listens retries for minutes, saying
    only that the GCS timed out; this answers first. An address it cannot parse is left to Ray."""
    import socket
    import time

    hostport = target.removeprefix("ray://").split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True
    end = time.monotonic() + within_s
    while True:
        try:
            wait = max(0.5, end - time.monotonic())
            with socket.create_connection((host.strip("[]"), int(port)), timeout=wait):
                return True
        except OSError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.5)


def announce(address: str) -> str:
    """Say which Ray a run is about to join before it joins, and return its address. `auto` is
    resolved as Ray resolves it (RAY_ADDRESS, else the last `ray start` on this host), so a run
    never lands on a cluster the user did not name without a line saying which one first."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError):
        found = None
    if found is None:
        raise ConfigError(
            "ray.address: auto found no running Ray on this host: start one with `ray start --head` "
            "(README: Running on a Ray cluster), name one with ray.address=HOST:PORT, or use ray=local"
        )
    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the last `ray start` on this host"
    log.info("ray.address=auto: joining the Ray at %s (from %s)", found, source)
    return found


def foreign_cluster(session_dir: str | Path) -> str | None:
    """Why the Ray that `address=auto` found is someone else's, or None for a standing cluster.

    `auto` joins the newest Ray on the host, whoever started it. A cluster made to be joined was
    started by `ray start` (its starter has exited, or is `ray start --block`). One that a running
    process started with `ray.init` (a test session, a notebook, another fleet-train) lives and
    dies with that process, and another user's is not ours to load: both are refused unless the
    user asks. The session directory is named for its starter's pid and owned by its user.
    """
    import psutil

    path = Path(session_dir)
    if path.exists() and path.stat().st_uid != os.getuid():
        return f"it belongs to another user (uid {path.stat().st_uid})"
    tail = path.name.rsplit("_", 1)[-1]
    if not tail.isdigit() or int(tail) == os.getpid():
        return None
    try:
        args = psutil.Process(int(tail)).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None  # the starter has exited: `ray start`, or a driver long gone
    names = [Path(a).name for a in args]
    if "ray" in names and "start" in names[names.index("ray") :]:
        return None
    return f"process {tail} started it with ray.init and is still running ({' '.join(args)[:80]})"


def shard_count(cfg: Config, pop: int) -> int:
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


def shard_bundle(cfg: Config) -> dict[str, float]:
    """The resources one shard reserves: its placement-group bundle and its actor's request."""
    bundle = {"CPU": float(cfg.ray.cpus_per_shard)}
    if cfg.ray.gpus_per_shard:
        bundle["GPU"] = float(cfg.ray.gpus_per_shard)
    return bundle


def reserve_shards(cfg: Config, n: int) -> Any:
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
    cfg: Config, pop: int, state_dir: Path | None = None, placement_group: Any = None
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
def fleet_actors(cfg: Config, pop: int, state_dir: Path | None = None) -> Iterator[tuple[list[Any], Any]]:
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


def cluster_line(cfg: Config, started: bool) -> str:
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
