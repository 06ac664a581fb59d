"""Continuing a run: what may change on resume, the saved config with those changes, and the
metrics lines a resumed run keeps."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fleet.config import CONF_DIR, ConfigError
from fleet.runtime.tracking import flatten

log = logging.getLogger(__name__)


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
    "ray.recovery_timeout_s",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the round in flight finished and a checkpoint was written."""

    def __init__(self, run_dir: Path, rounds: int):
        super().__init__(f"interrupted after round {rounds}")
        self.run_dir, self.rounds = run_dir, rounds


class ShardsLost(RuntimeError):
    """Shards that died and were not running again within `ray.recovery_timeout_s`: the run
    checkpointed what it had and stopped (exit code 3); it resumes once the cluster has room."""

    def __init__(self, run_dir: Path, rounds: int, why: str):
        super().__init__(why)
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
    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"{group}: no option {name!r}")
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}


def metrics_before(path: Path, round_idx: int, secure: bool) -> list[dict]:
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
