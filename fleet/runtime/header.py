"""What a run says before it starts: the fleet as built, the model, the mechanism, and the
privacy checks that refuse a budget no round can meet."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from fleet.config import ConfigError
from fleet.privacy.mechanism import default_delta

log = logging.getLogger(__name__)


def header(cfg: Any, pop: int, infos: list[dict], num_params: int, build_s: float, run_dir: Path) -> str:
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
