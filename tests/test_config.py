"""Every shipped profile composes and validates; a bad key or value stops `fleet-train` at once
with one line naming it and exit code 2, before Ray starts and before any job of a sweep runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_cfg
from omegaconf import OmegaConf

from fleet.config import CONF_DIR, Config, ConfigError, validate
from fleet.runtime.cli import load_config, one_line, preflight, sweep_jobs

GROUPS = ("fleet", "model", "data", "privacy", "dropout", "tracking", "ray", "experiment", "matched")
PROFILES = [f"{g}={p.stem}" for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_every_group_has_profiles():
    for group in GROUPS:
        assert any(p.startswith(f"{group}=") for p in PROFILES), group
    assert "dropout=none" in PROFILES and "ray=cluster" in PROFILES and "tracking=disabled" in PROFILES


@pytest.mark.parametrize("choice", PROFILES)
def test_profile_composes_and_validates(choice, tmp_path):
    extra = [f"data.path={tmp_path}"] if choice == "data=arrow" else []  # the corpus is the user's
    (tmp_path / "meta.json").write_text("{}")  # a corpus folder, as far as validation looks
    cfg = load_config([choice, *extra])
    assert isinstance(cfg, Config)
    group, _, name = choice.partition("=")
    if group in ("fleet", "model", "data", "privacy", "dropout"):
        assert getattr(cfg, group).name == name
    if choice == "ray=cluster":
        assert cfg.ray.address == "auto"
    if group == "tracking":
        assert cfg.tracking.mode == name


def test_default_config_is_the_documented_one():
    cfg = load_config()
    assert (cfg.fleet.name, cfg.model.name, cfg.data.name, cfg.privacy.name) == (
        "small",
        "cifg_small",
        "synthetic",
        "dp_fedavg",
    )
    assert cfg.dropout.name == "none" and cfg.tracking.mode == "offline" and cfg.ray.address is None


def test_experiment_sweeps_expand_and_validate():
    assert preflight(["experiment=privacy_sweep"], multirun=True) == 5
    jobs = sweep_jobs(["experiment=privacy_sweep", "privacy.noise_multiplier=0.5,2", "fleet.goal=10,20"])
    assert len(jobs) == 4  # the command line replaces the experiment's grid for the same key
    assert set(jobs[0]) == {"experiment=privacy_sweep", "privacy.noise_multiplier=0.5", "fleet.goal=10"}
    assert {tuple(j) for j in sweep_jobs(["experiment=dp_vs_nondp"])} == {
        ("privacy=none", "experiment=dp_vs_nondp"),
        ("privacy=clip_only", "experiment=dp_vs_nondp"),
        ("privacy=dp_fedavg", "experiment=dp_vs_nondp"),
    }


def test_wandb_sweep_file_drives_fleet_train():
    sweep = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "wandb_sweep.yaml"))
    assert sweep["program"] == "fleet-train"
    assert "${args_no_hyphens}" in sweep["command"] and "${program}" in sweep["command"]
    fixed = [a for a in sweep["command"] if not a.startswith("${")]
    grid = [f"{k}={','.join(str(v) for v in p['values'])}" for k, p in sweep["parameters"].items()]
    assert preflight([*fixed, *grid], multirun=True) >= 2  # every point the agent can ask for is valid


def _fleet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["fleet.gol=3"], "error: fleet.gol: no such key"),
        (["+fleet.gol=3"], "error: fleet.gol: no such key"),
        (["fleet=tiny", "fleet.goal=5000"], "error: fleet.goal: must be <= fleet.population"),
        (["fleet.goal=many"], "error: fleet.goal: "),
        (["fleet=huge"], "error: fleet: no option 'huge'; expected one of gboard_es, small, tiny"),
        (["experiment=nope"], "error: experiment: no option 'nope'"),
        (["privacy.noise_multiplier=-1"], "error: privacy.noise_multiplier: must be >= 0"),
        (["fleet.goal=="], "error: Error parsing override 'fleet.goal=='"),
        (["tracking.mode=loud"], "error: tracking.mode: unknown value 'loud'"),
        (["model.device=cuda"], "error: model.device: 'cuda' needs a GPU for each shard"),
        # a sweep stops before its first job when any point is bad
        (["-m", "fleet=tiny", "fleet.goal=10,5000"], "error: fleet.goal: must be <= fleet.population"),
    ],
)
def test_bad_override_is_one_line_naming_the_key(args, expected, tmp_path):
    p = _fleet(*args, "hydra.run.dir=run", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(expected), p.stderr
    assert "HYDRA_FULL_ERROR" not in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.device=cuda"], "model.device: 'cuda' needs a GPU for each shard"),
        (["model.device=cuda:1", "ray.gpus_per_shard=1", "model.engine=fused"], "model.engine: 'fused' runs"),
        (["model.device=tpu"], "model.device: expected auto, cpu, cuda or cuda:N"),
        (["model.engine=vmap"], "model.engine: unknown value 'vmap'"),
        (["model.batch_devices=0"], "model.batch_devices: must be >= 1"),
        (["ray.gpus_per_shard=2"], "ray.gpus_per_shard: must be in [0, 1]"),
    ],
)
def test_engine_and_device_settings_are_checked(overrides, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        validate(make_cfg(*overrides))
    validate(make_cfg("model.device=cuda:0", "ray.gpus_per_shard=0.5", "model.engine=batched"))


def test_verbose_shows_the_traceback(tmp_path):
    p = _fleet("fleet.gol=3", "verbose=true", cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr and "fleet.gol" in p.stderr


def test_one_line_unwraps_an_error_raised_in_an_actor():
    class RemoteError(ConfigError):  # the shape of ray.exceptions.RayTaskError(ConfigError)
        pass

    e = RemoteError("ray::Coordinator.run_round()\n  File ...\nConfigError: data.path: empty")
    e.cause = ConfigError("data.path: empty")
    assert one_line(e) == "data.path: empty"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["data=arrow", "data.path=nowhere"], "error: data.path: 'nowhere' is not a corpus folder"),
        (["fleet=tiny", "tracking=online"], "error: tracking.mode: online needs a W&B login"),
        (["resume=broken"], "error: resume: cannot read the checkpoint"),
    ],
)
def test_errors_after_start_up_are_one_line_too_and_leave_no_empty_run_dir(args, expected, tmp_path):
    """Errors found once the job has started (a corpus, W&B's login, a checkpoint on disk): one
    line, exit 2, no Hydra line of its own, and no empty outputs/DATE/TIME left behind."""
    (tmp_path / "broken" / "state").mkdir(parents=True)
    from dataclasses import asdict

    from conftest import tiny_mean

    (tmp_path / "broken" / "config.json").write_text(json.dumps(asdict(tiny_mean())))
    (tmp_path / "broken" / "state" / "coordinator.pt").write_bytes(b"not a checkpoint")
    env = {k: v for k, v in ENV.items() if k != "WANDB_API_KEY"} | {"NETRC": str(tmp_path / "no-netrc")}
    p = subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(expected), p.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*"))
