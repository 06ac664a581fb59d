"""Cluster mode: shards placed by resources over several nodes, the same model as on one node.

The two-node cluster (`ray.cluster_utils.Cluster`: two raylets on this machine, each with its own
custom resource) runs in a child process with a private Ray temp dir, so it neither meets the
session-wide Ray of `ray_session` nor lets anyone else's `ray.init()` find it and connect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_mean

from fleet.config import ConfigError
from fleet.round import checkpoint
from fleet.runtime.driver import train
from fleet.runtime.placement import fleet_actors

HERE = Path(__file__).resolve().parent


def _cfg(*extra: str):
    """A short DP run of two shards of two CPUs each: on two 2-CPU nodes, one shard per node."""
    return tiny_mean(
        "fleet.population=4000",
        "fleet.availability.model=diurnal",
        "fleet.min_reports=1",
        "fleet.failure_prob_mean=0.1",
        "train.rounds=4",
        "train.eval_every=2",
        "ray.shards=2",
        "ray.cpus_per_shard=2",
        "seed=5",
        *extra,
    )


def _weights(run_dir: Path) -> np.ndarray:
    return checkpoint.released_model(checkpoint.load_coordinator(run_dir / "state"))


def _train_on_two_nodes(run_dir: Path) -> None:
    """Child process: start a head and a worker node, train through `ray.address`, write where
    every actor ran to RUN_DIR/placement.json."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=2, resources={"node_b": 1})
        cluster.wait_for_nodes()
        seen: dict = {}

        def where(line: dict, shards: list, coordinator) -> None:
            if seen:
                return
            seen["shards"] = [i["node_id"] for i in ray.get([s.info.remote() for s in shards])]
            seen["coordinator"] = ray.get(
                coordinator.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
            )
            seen["driver"] = ray.get_runtime_context().get_node_id()
            seen["nodes"] = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}

        train(_cfg(f"ray.address={cluster.address}"), run_dir, on_round=where)
        (run_dir / "placement.json").write_text(json.dumps(seen))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_node_cluster_trains_the_same_model_as_one_node(ray_session, tmp_path):
    two = tmp_path / "two_nodes"
    # A short private temp dir: Ray's socket paths must stay under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    cluster = subprocess.Popen(
        [sys.executable, __file__, str(two)],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        one = tmp_path / "one_node"
        train(_cfg(), one)  # meanwhile, the session's single 4-CPU node: both shards on it
        _, err = cluster.communicate(timeout=240)
    finally:
        cluster.kill()  # only if it overran: Ray's reaper then stops the cluster's processes
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert cluster.returncode == 0, err[-4000:]
    placed = json.loads((two / "placement.json").read_text())
    assert len(placed["nodes"]) == 2
    # One shard on each node (a 2-CPU bundle fits a 2-CPU node once), the coordinator with the driver.
    assert sorted(placed["shards"]) == sorted(placed["nodes"])
    assert {"node_a", "node_b"} == {
        r for n in placed["shards"] for r in placed["nodes"][n] if r.startswith("node_")
    }
    assert placed["coordinator"] == placed["driver"]
    np.testing.assert_allclose(_weights(two), _weights(one), rtol=1e-12, atol=0)
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["released"] for x in lines)


def _wait(predicate, timeout: float = 30.0) -> bool:
    """Poll (Ray's resource view and actor restarts settle asynchronously)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_placement_and_restart_honour_cpus_per_shard(ray_session):
    import ray
    from ray.util.placement_group import placement_group_table

    cfg = tiny_mean("ray.cpus_per_shard=2", "fleet.population=3000")  # ray.shards=0: as many as fit
    with fleet_actors(cfg, 3000) as (shards, coordinator):
        infos = ray.get([s.info.remote() for s in shards])
        assert len(shards) == 2  # 4 CPUs / 2 per shard
        assert [i["resources"] for i in infos] == [{"CPU": 2.0}, {"CPU": 2.0}]
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert [g["bundles"] for g in groups] == [{0: {"CPU": 2.0}, 1: {"CPU": 2.0}}]
        assert _wait(lambda: ray.available_resources().get("CPU", 0.0) == 0.0)

        ray.kill(shards[0], no_restart=False)

        def restarted() -> bool:
            try:
                return ray.get(shards[0].info.remote(), timeout=5)["pid"] != infos[0]["pid"]
            except (
                ray.exceptions.RayActorError,
                ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError,
            ):
                return False

        assert _wait(restarted, 60.0)
        back = ray.get(shards[0].info.remote())
        # Back in its own bundle: the same CPUs, the same node, and nothing taken from outside it.
        assert back["resources"] == {"CPU": 2.0} and back["node_id"] == infos[0]["node_id"]
        assert ray.available_resources().get("CPU", 0.0) == 0.0
        assert ray.get(coordinator.run_round.remote())["round"] == 0
    # Leaving releases the actors and their bundles for the next job in this Ray session.
    assert _wait(lambda: ray.available_resources().get("CPU", 0.0) == 4.0)
    assert not [g for g in placement_group_table().values() if g["state"] == "CREATED"]


def test_shards_that_cannot_fit_a_local_ray_fail_at_once(ray_session):
    import ray

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^ray.shards: 3 shard\(s\) x \{'CPU': 2.0\} do not fit"):
        with fleet_actors(tiny_mean("ray.shards=3", "ray.cpus_per_shard=2"), 2000):
            pass
    assert time.monotonic() - t0 < 10
    assert _wait(lambda: ray.available_resources().get("CPU", 0.0) == 4.0)


def test_a_shard_that_refuses_to_start_stops_the_run_with_one_line(ray_session):
    """A check only a shard can make (a GPU it cannot see) fails at start-up, as the ConfigError
    it raised, and leaves nothing running."""
    import ray

    with pytest.raises(ConfigError, match=r"^model.device: 'cuda' but this shard sees no CUDA device$"):
        with fleet_actors(tiny_mean("task.name=tests.doubles:NeedsAGpu", "ray.shards=2"), 2000):
            pass
    assert _wait(lambda: ray.available_resources().get("CPU", 0.0) == 4.0)


if __name__ == "__main__":
    _train_on_two_nodes(Path(sys.argv[1]))


def _wait_for_exec(*procs: subprocess.Popen) -> None:
    """Until each child has exec'd: just after fork its cmdline is empty or still ours."""
    import psutil

    deadline = time.monotonic() + 30
    while any(psutil.Process(p.pid).cmdline()[1:2] != ["-c"] for p in procs):
        assert time.monotonic() < deadline, "a child never exec'd"
        time.sleep(0.01)


def test_auto_refuses_a_ray_that_a_running_process_started_or_another_user_owns(tmp_path):
    """`ray.address=auto` takes the newest Ray on the host. The session directory says who
    started it (its name ends in the starter's pid) and whose it is (its owner)."""
    from fleet.runtime.placement import foreign_cluster

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    standing = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "ray", "start", "--block"]
    )
    try:
        _wait_for_exec(sleeper, standing)
        by_init = tmp_path / f"session_2026-12-02_10-00-00_000001_{sleeper.pid}"
        by_init.mkdir()
        assert f"process {sleeper.pid} started it with ray.init" in foreign_cluster(by_init)
        by_ray_start = tmp_path / f"session_2026-12-02_10-00-00_000001_{standing.pid}"
        by_ray_start.mkdir()
        assert foreign_cluster(by_ray_start) is None  # `ray start --block`: made to be joined
        exited = tmp_path / "session_2026-12-02_10-00-00_000001_999999999"
        exited.mkdir()
        assert foreign_cluster(exited) is None  # the starter is gone: `ray start`, or long done
        ours = tmp_path / f"session_2026-12-02_10-00-00_000001_{os.getpid()}"
        ours.mkdir()
        assert foreign_cluster(ours) is None
        os.chown(exited, 65534, 65534)
        assert "another user (uid 65534)" in foreign_cluster(exited)
    finally:
        sleeper.kill()
        standing.kill()


@pytest.mark.slow
def test_fleet_train_with_auto_will_not_join_a_test_sessions_ray(tmp_path):
    """The probe's case: a test process holds a Ray it started with ray.init; `ray=cluster` in
    another process found it through `auto` and ran there unsaid. Now it is one line and exit 2,
    and ray.join_foreign=true joins it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "RAY_AUTH_MODE": "disabled"}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
         "print(ray.get_runtime_context().gcs_address, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        address = holder.stdout.readline().strip()
        probe = (
            "import sys, ray\n"
            "from conftest import make_cfg\n"
            "from fleet.config import ConfigError\n"
            "from fleet.runtime.placement import init_ray\n"
            "try:\n"
            "    init_ray(make_cfg('fleet=tiny', 'ray=cluster', *sys.argv[1:]))\n"
            "except ConfigError as e:\n"
            "    print('refused:', e); sys.exit(2)\n"
            "print('joined', ray.get_runtime_context().gcs_address)\n"
        )
        env["RAY_ADDRESS"] = address  # what `auto` resolves to, whatever else runs on this host
        refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "not a standing cluster" in refused.stdout and f"process {holder.pid}" in refused.stdout
        assert len(refused.stdout.strip().splitlines()) == 1
        joined = subprocess.run(
            [sys.executable, "-c", probe, "ray.join_foreign=true"], capture_output=True, text=True, env=env
        )
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert f"joined {address}" in joined.stdout
    finally:
        holder.kill()


def test_a_named_ray_where_nothing_answers_is_one_line_not_minutes_of_retries(monkeypatch):
    """ray.init at an address where nothing listens retries for minutes; fleet checks the port
    first (for up to REACH_S, a head may still be starting) and says so in one line."""
    import socket

    import ray

    from fleet.runtime import placement

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert placement.reachable(f"127.0.0.1:{port}", 1.0)
        assert placement.reachable(f"ray://127.0.0.1:{port}", 1.0)
    assert not placement.reachable(f"127.0.0.1:{port}", 1.0)  # closed now
    assert placement.reachable("not-an-address", 1.0)  # left to Ray's own error
    monkeypatch.setattr(placement, "REACH_S", 1.0)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    t0 = time.monotonic()
    where = f"127.0.0.1:{port}"
    with pytest.raises(ConfigError, match=rf"^ray.address={where}: nothing answers at {where} "):
        placement.init_ray(tiny_mean(f"ray.address=127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 10
