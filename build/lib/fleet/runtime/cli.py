"""`fleet-train` / `python -m fleet`: the Hydra main.

Before anything starts, every job the command line asks for (each point of a `--multirun` sweep,
the experiment's own sweep included) is composed and validated, so a bad key or value stops at
once with one line naming it (`error: fleet.goal: must be <= ...`) and exit code 2, rather than
after Ray is up or halfway through a sweep. Hydra's own multi-line errors are reduced to that one
line too; `verbose=true` (or `hydra.verbose=...`, or HYDRA_FULL_ERROR=1) shows the traceback.

Each job's W&B run joins its multirun's group, tagged with the job's overrides. Ray is started
once per process and kept for all the jobs of a multirun (starting it costs about 10 s on two
cores, more than a small job), and its driver-side messages go to `ray.log` in the run directory,
not to the console where the progress bar is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fleet.config import CONF_DIR, Config, ConfigError, register_configs
from fleet.privacy.mechanisms import validate
from fleet.runtime.resume import ShardsLost

CONFIG_NAME = "config"
# Errors a user fixes by changing the command line or a profile: one line, exit code 2.
USER_ERRORS = (ConfigError, HydraException, OmegaConfBaseException)
WANDB_TAG_MAX = 64  # W&B rejects longer tags


def compose_config(
    overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = CONFIG_NAME
) -> DictConfig:
    """The config `fleet-train` would run, composed outside a Hydra app (notebooks, tests)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None, job_name="fleet"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def load_config(overrides: Sequence[str] = (), config_name: str = CONFIG_NAME) -> Config:
    """The composed, validated config as the typed dataclass that `fleet.runtime.driver.train` takes."""
    cfg = OmegaConf.to_object(compose_config(overrides, config_name=config_name))
    validate(cfg)
    return cfg


def sweep_jobs(overrides: Sequence[str], config_name: str = CONFIG_NAME) -> list[list[str]]:
    """Each job's overrides in a multirun, expanded as Hydra's basic sweeper does: the config's
    `hydra.sweeper.params` (an experiment's grid) first, then the command line, which wins."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(list(overrides)) if not o.is_sweep_override()]
    params = OmegaConf.select(compose_config(fixed, True, config_name), "hydra.sweeper.params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    return BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]


def preflight(overrides: Sequence[str], multirun: bool, config_name: str = CONFIG_NAME) -> int:
    """Compose and validate every job before any starts; returns how many there are."""
    jobs = sweep_jobs(overrides, config_name) if multirun else [list(overrides)]
    for job in jobs:
        load_config(job, config_name)
    return len(jobs)


def one_line(e: BaseException) -> str:
    """A user error as `key: what is wrong`, on one line."""
    if isinstance(getattr(e, "cause", None), ConfigError):
        e = e.cause  # raised in a Ray actor's method: Ray's wrapper adds the remote traceback
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = ", ".join(o for o in e.options if not o.startswith("base_"))  # schemas, not profiles
        return f"{group}: no option {name!r}; expected one of {options}"
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is not None and getattr(cause, "full_key", None):
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            return f"{cause.full_key}: no such key"
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    text = [s.strip() for s in str(e).splitlines() if s.strip() and not s.startswith("See https://")]
    return " ".join(text) or type(e).__name__


def wants_traceback(overrides: Sequence[str]) -> bool:
    """`verbose=true`, `hydra.verbose=...` or HYDRA_FULL_ERROR=1: show errors in full."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in ("verbose", "hydra.verbose") and value.lower() not in ("", "false", "null", "[]"):
            return True
    return False


def sweep_group(sweep_dir: str) -> str:
    """The W&B group of a multirun: its sweep directory's last two parts (`DATE-TIME` by default)."""
    return "-".join(Path(sweep_dir).parts[-2:])


_ray_key: tuple | None = None  # the settings the running Ray was started with


def ensure_ray(cfg: Config) -> None:
    """Start Ray for this process once, or again if a job of the sweep asks for a different one."""
    global _ray_key
    import ray

    from fleet.runtime.placement import init_ray

    key = (cfg.ray.address, cfg.ray.num_cpus, cfg.ray.dashboard, cfg.ray.log_to_driver)
    if ray.is_initialized() and key != _ray_key:
        ray.shutdown()
    if not ray.is_initialized():
        init_ray(cfg)
        _ray_key = key


def log_ray_to(path: Path) -> None:
    """Send Ray's driver-side logging (start-up notices, warnings) to a file in the run dir."""
    import ray  # noqa: F401  (importing ray installs its console handler, which we replace)

    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(logging.FileHandler(path))


_failed: list[BaseException] = []  # a user error inside a job, reported by main in one line
_verbose = False  # the user asked for tracebacks (main sets it before Hydra's env var)


def _train(cfg: DictConfig) -> dict | None:
    """Hydra's task: one job. A user error is kept for `main` to print in one line (raised out of
    here, Hydra would add a line of its own), and the job's run directory goes if it holds no run."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return _run_job(cfg, hc, run_dir)
    except ShardsLost as e:  # exit here: Hydra would log it as a failed job, and a sweep stops
        if _verbose:
            raise
        print(
            f"error: {e}; checkpoint saved after round {e.rounds}; once the cluster can host every shard "
            f"again, resume with: fleet-train resume={e.run_dir}",
            file=sys.stderr,
        )
        sys.exit(3)
    except USER_ERRORS as e:
        if _verbose:
            raise
        if not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name):  # Hydra's DATE folder, if empty
                with contextlib.suppress(OSError):
                    run_dir.parent.rmdir()
        _failed.append(e)
        return None


def _run_job(cfg: DictConfig, hc: Any, run_dir: Path) -> dict:
    from fleet.runtime.driver import train

    if hc.mode == RunMode.MULTIRUN:
        cfg.tracking.group = cfg.tracking.group or sweep_group(hc.sweep.dir)
        cfg.tracking.tags = [*cfg.tracking.tags, *(o[:WANDB_TAG_MAX] for o in hc.overrides.task)]
    obj: Any = OmegaConf.to_object(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_ray_to(run_dir / "ray.log")
    ensure_ray(obj)
    summary = train(
        obj, run_dir, OmegaConf.to_container(cfg, resolve=True), overrides=list(hc.overrides.task)
    )
    print(_summary_text(summary, summary["run_dir"]))  # with resume=..., the resumed run's dir
    if summary.get("diverged") and hc.mode != RunMode.MULTIRUN:
        print(
            f"error: stopped after round {summary['rounds']}: {summary['diverged']}; checkpoint saved "
            f"(train.stop_on_divergence=false to go on)",
            file=sys.stderr,
        )
        sys.exit(3)
    return summary


def _summary_text(s: dict, run_dir: str) -> str:
    parts = [
        f"run dir: {run_dir}",
        f"rounds: {s['rounds']} ({s['released_rounds']} released, "
        f"{s['abandoned_rounds']} abandoned; stop: {s['stop_reason']})",
    ]
    priv = s["privacy"]
    if priv.get("dp"):
        q = priv.get("q")
        if priv.get("rho_zcdp") is not None:
            span = f"{priv['mechanism']}, rho {priv['rho_zcdp']:.4g} zCDP"
        elif q and q["min"] is not None:
            span = f"{priv['sampling']} sampling, q_r {q['min']:.3g} to {q['max']:.3g}"
        elif q:
            span = f"{priv['sampling']} sampling, no round released"
        else:  # private telemetry: the q_r describe the samples and stay out
            span = f"{priv['mechanism']}"
        parts.append(
            f"epsilon: {priv['epsilon']:.4g} at delta {priv['delta']:.3g} ({priv['accountant'].upper()}, "
            f"{span}; {priv['device']})"
        )
        parts.append(f"  covers: {priv['covers']}")
        parts.append(f"  {priv['guarantee']}")
        parts.append(f"  public: {priv['public']}")
        if priv.get("assumes"):
            parts.append(f"  assumes: {priv['assumes']}")
        if priv.get("depends_on"):
            parts.append(f"  depends on: {priv['depends_on']}")
        t = priv["textbook"]
        if t:
            parts.append(
                f"  textbook figure, q = ceil(goal x overselect) / population = {t['q']:.3g}: "
                f"{t['epsilon']:.4g} (real availability does not give it)"
            )
        if priv.get("pure_noise_rounds"):
            parts.append(f"  {priv['pure_noise_rounds']} released round(s) had no valid update: pure noise")
    else:
        parts.append("epsilon: inf (no DP)")
    for k, v in sorted(s["final"].items()):
        parts.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(parts)


def main() -> None:
    global _verbose
    args = get_args_parser().parse_args()
    verbose = _verbose = wants_traceback(args.overrides)
    # Hydra then raises instead of printing its own multi-line report; we print one line instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        if not (
            args.help
            or args.hydra_help
            or args.info
            or args.shell_completion
            or args.config_path
            or args.config_dir
        ):
            preflight(args.overrides, args.multirun, args.config_name or CONFIG_NAME)
        register_configs()
        hydra.main(version_base=None, config_path=CONF_DIR, config_name=CONFIG_NAME)(_train)()
        if _failed:
            raise _failed[0]
    except USER_ERRORS as e:
        if verbose:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if verbose:
            raise
        from fleet.runtime.resume import Interrupted

        if isinstance(e, Interrupted):
            print(
                f"interrupted after round {e.rounds}; checkpoint saved; "
                f"resume with: fleet-train resume={e.run_dir}",
                file=sys.stderr,
            )
        else:
            print("interrupted before the first round; nothing to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
