"""Shared fixtures: composed configs, in-process fleets, and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fleet.config import Config, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# Ray workers import test doubles as `tests.doubles:Name`; they inherit the environment.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Optimized BLT strategies (privacy=dp_blt), shared by the test workers and kept between runs,
# seeded with the ones the suite uses (jax-privacy's output for its inputs, keyed by its version:
# a new version optimizes them again; test_blt optimizes one afresh in a cache of its own).
os.environ.setdefault("FLEET_CACHE", str(ROOT / ".pytest_cache" / "fleet"))
_seeded = Path(os.environ["FLEET_CACHE"]) / "blt"
_seeded.mkdir(parents=True, exist_ok=True)
for _f in (ROOT / "tests" / "blt_strategies").glob("*.json"):
    if not (_seeded / _f.name).exists():
        (_seeded / _f.name).write_text(_f.read_text())

register_configs()


# A small next-word-prediction setup for in-process runs (test_nwp, test_memorization).
SMALL_NWP = (
    "fleet=tiny",
    "tracking.mode=disabled",
    "progress=false",
    "model.vocab_size=300",
    "model.embed_dim=16",
    "model.hidden_dim=32",
    "model.proj_dim=16",
    "fleet.examples_median=24",
    "fleet.examples_max=48",
    "data.eval_examples=600",
    "model.init_scale=1.0",  # small tied embeddings start on a plateau with the usual 0.1
    "train.batch_size=8",
)


# Fixed-size sampling (a cohort of exactly ceil(goal x overselect), the first `goal` arrivals
# counted) is accounted with RDP: dp-accounting has no PLD for it.
FIXED_SIZE = ("privacy.sampling=fixed_size", "privacy.accountant=rdp")


def write_users_jsonl(path: Path, per_user: tuple[int, int], users: int = 60, seed: int = 0) -> Path:
    """A raw JSONL corpus for ingestion tests: `users` users, each with a random number of texts
    in [per_user[0], per_user[1]) of 12 words drawn from 40."""
    import json

    import numpy as np

    g = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    with open(path, "w") as f:
        for u in range(users):
            for _ in range(int(g.integers(*per_user))):
                f.write(json.dumps({"user": f"user{u}", "text": " ".join(g.choice(words, 12))}) + "\n")
    return path


def make_cfg(*overrides: str) -> Config:
    """The composed config with overrides, as the typed dataclass the actors receive."""
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def in_process_fleet(cfg: Config, shards: int = 2, state_dir: Path | str | None = None):
    """Shards and a coordinator in this process, as `fleet.runtime.placement.start_actors` builds them in Ray:
    contiguous ranges, the run's start time, the same state dir."""
    from fleet.phones.population import shard_ranges
    from fleet.round.coordinator import Coordinator
    from fleet.round.devices import fleet_size
    from fleet.round.shard import ShardCore

    pop = fleet_size(cfg)
    sd = str(state_dir) if state_dir else None
    t0 = cfg.fleet.start_hour * 3600.0
    sh = [ShardCore(cfg, i, a, b, t0, sd) for i, (a, b) in enumerate(shard_ranges(pop, shards))]
    return sh, Coordinator(cfg, sh, pop, sd)


def tiny_mean(*overrides: str) -> Config:
    """A tiny always-available fleet training the mean-estimation task, no W&B, no progress bar."""
    return make_cfg(
        "fleet=tiny",
        "task.name=mean",
        "tracking.mode=disabled",
        "progress=false",
        "train.participation_audit=false",  # tested on its own (test_participation, test_run)
        *overrides,
    )


def participations_of(run_dir: Path) -> np.ndarray:
    """Every device's participation count in a run's committed checkpoint (the shards' files), in
    row order."""
    from fleet.round import checkpoint

    state = run_dir / checkpoint.STATE_DIR
    saved = checkpoint.load_coordinator(state)
    ranges = sorted({tuple(map(int, p.stem.split("_")[1:3])) for p in state.glob("shard_*_r*.npz")})
    return np.concatenate(
        [checkpoint.load_shard(state, a, b, saved["round"])["participations"] for a, b in ranges]
    )


def pytest_collection_modifyitems(items):
    """Whatever starts Ray (end-to-end runs, clusters, sweeps) or runs a notebook is slow: the
    fast tier (`pytest -m "not slow"`) is the in-process tests."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.path.name == "test_notebooks.py":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (actors are about 0.5 s and 100+ MiB each)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
