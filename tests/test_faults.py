"""Losing a node mid-round on a real multi-node Ray cluster.

Each node is a `ray start` process tree of its own, each in its own temp dir on this host, all
under one private root: a head with no CPU (the driver and the coordinator), one-CPU worker nodes
for the two shards, and maybe a spare. A node is lost by SIGKILL of its raylet and every process
it runs, as when a machine dies. Two runs with the same seed lose the node hosting shard 1 in
round 1:
- with a spare node: Ray restarts the shard there, it replays its journal, the run finishes;
- with none: nothing can host the shard, the run checkpoints and exits 3 after
  `ray.recovery_timeout_s`; a node is added and `resume=` finishes the run.
Both must end with the same participation counts (each release counted once, the limit kept), the
same ledger (one entry per released round) and the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import participations_of

from fleet.privacy.ledger import LEDGER_FILE
from fleet.round import checkpoint

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
# Ray's token auth would be on wherever ~/.ray/auth_token exists; the nodes are found fast.
BASE_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
    "PYTHONPATH": str(ROOT),
}
RUN = (
    "fleet=tiny", "task.name=tests.doubles:SlowMeanSaysWhere", "fleet.population=50000", "fleet.goal=100",
    "fleet.min_reports=1", "fleet.min_separation_rounds=100", "train.rounds=5", "train.eval_every=5",
    "train.participation_audit=false", "ray.shards=2", "ray.cpus_per_shard=1", "seed=3",
    "tracking=disabled", "progress=false", "hydra.run.dir=run",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Nodes started with `ray start`, each with its own temp dir under one private root."""

    def __init__(self) -> None:
        # Short: Ray's socket paths must stay under the 107-byte limit.
        self.root = Path(tempfile.mkdtemp(prefix="ff", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        (self.root / "where").mkdir()
        self.env = BASE_ENV | {"FLEET_TEST_WHERE": str(self.root / "where")}

    def start(self, name: str) -> None:
        head = name == "head"
        args = [RAY, "start", f"--num-cpus={0 if head else 1}", f"--temp-dir={self.root / name}"]
        args += ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        args += [f"--dashboard-agent-listen-port={_free_port()}"]
        if head:
            args += [f"--port={self.port}", "--head", "--include-dashboard=false"]
            args += [f"--ray-client-server-port={_free_port()}"]
        else:
            args += [f"--address={self.address}"]
        subprocess.run(args, env=self.env, check=True, capture_output=True, timeout=120)

    def processes(self, name: str = "") -> list[psutil.Process]:
        """A node's processes: those naming its temp dir, and whatever its raylet runs (workers)."""
        mark = str(self.root / name)
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            if mark in " ".join(p.info["cmdline"] or []):
                out[p.pid] = p
                try:
                    out |= {c.pid: c for c in p.children(recursive=True)}
                except psutil.NoSuchProcess:
                    pass
        return list(out.values())

    def node_training_shard_1(self, round_idx: int) -> str | None:
        """The node whose processes include the one training shard 1's rows (ids from 25,000) in
        round `round_idx`, or None before that training has begun."""
        said = [(f, f.read_text().split()) for f in (self.root / "where").iterdir()]
        said = [(f, w) for f, w in said if len(w) == 2]  # a file being written is read next time
        pids = {int(f.name) for f, (r, top) in said if int(r) == round_idx and int(top) >= 25_000}
        names = [d.name for d in self.root.iterdir() if d.name != "where"]
        return next((n for n in names if pids & {p.pid for p in self.processes(n)}), None)

    def kill(self, name: str) -> None:
        for p in self.processes(name):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        self.kill("")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def two_shard_nodes() -> Iterator[Cluster]:
    """A head with no CPU and two one-CPU nodes, b and c, for the two shards; stopped after."""
    c = Cluster()
    try:
        for name in ("head", "b", "c"):
            c.start(name)
        yield c
    finally:
        c.stop()


def _fleet(c: Cluster, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", *args], cwd=cwd, env=c.env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _kill_a_shard_node_mid_round(c: Cluster, p: subprocess.Popen) -> str:
    """Lose shard 1's node once it trains round 1 (where SlowMeanSaysWhere holds it): after round
    0 is released and before shard 1 journals round 1, in every run."""
    end = time.monotonic() + 240
    while time.monotonic() < end and (victim := c.node_training_shard_1(1)) is None:
        assert p.poll() is None, p.communicate()[1][-4000:]
        time.sleep(0.05)
    assert victim is not None, "shard 1 never trained round 1"
    c.kill(victim)
    return victim


def _outcome(run: Path) -> dict:
    state = run / checkpoint.STATE_DIR
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(x) for x in (state / LEDGER_FILE).read_text().splitlines()]
    return {
        "lines": lines,
        "counts": participations_of(run),
        "ledger": ledger,
        "weights": checkpoint.released_model(checkpoint.load_coordinator(state)),
    }


@pytest.mark.slow
def test_losing_a_node_mid_round_with_and_without_a_spare(tmp_path):
    # With a spare node: the shard comes back on it within the run.
    spare = tmp_path / "spare"
    spare.mkdir()
    with two_shard_nodes() as c:
        c.start("d")
        p = _fleet(c, spare, *RUN, f"ray.address={c.address}")
        lost = _kill_a_shard_node_mid_round(c, p)
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-4000:]
    assert "round 1: " in out + err and "the round was abandoned" in out + err, out[-3000:]  # console
    with_spare = _outcome(spare / "run")

    # Without one: the run stops with exit 3, a node joins, it resumes.
    none = tmp_path / "none"
    none.mkdir()
    with two_shard_nodes() as c:
        t0 = time.monotonic()
        p = _fleet(c, none, *RUN, f"ray.address={c.address}", "ray.recovery_timeout_s=15")
        _kill_a_shard_node_mid_round(c, p)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 3, err[-4000:]
        last = err.strip().splitlines()[-1]
        assert "resume" in last and "Traceback" not in err, err[-4000:]
        assert time.monotonic() - t0 < 240
        c.start("d")
        p = _fleet(c, none, f"resume={none / 'run'}", "tracking=disabled", "progress=false")
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    resumed = _outcome(none / "run")

    for o in (with_spare, resumed):
        crashed = [x["round"] for x in o["lines"] if x.get("incident")]
        assert crashed == [1], (lost, [(x["round"], x.get("incident")) for x in o["lines"]])
        released = [x for x in o["lines"] if x["released"]]
        assert len(released) == 4 and len(o["ledger"]) == 4  # epsilon accounted once per release
        # The limit is once a run, so a journal replayed twice would show as a 2. Every report
        # of a released round is counted; so are the devices of the crashed round that trained
        # on the surviving shard (sent the model: they took part).
        assert o["counts"].max() == 1
        assert int(o["counts"].sum()) >= sum(x["reported"] for x in released)
    assert with_spare["lines"][-1]["epsilon"] == resumed["lines"][-1]["epsilon"]
    np.testing.assert_array_equal(with_spare["counts"], resumed["counts"])
    np.testing.assert_array_equal(with_spare["weights"], resumed["weights"])
