"""What a run says before it starts: the fleet as built, the model, the mechanism (whose own lines
come from its class, `fleet.privacy.mechanisms`)."""

from __future__ import annotations

from pathlib import Path

from fleet.config import Config
from fleet.privacy.mechanisms import mechanism_class


def header(cfg: Config, pop: int, infos: list[dict], num_params: int, build_s: float, run_dir: Path) -> str:
    """What is about to run, in a few lines: the fleet as built, the model, the mechanism."""
    engines = sorted({i["engine"] for i in infos if i.get("engine")})
    f = cfg.fleet
    privacy, *more = mechanism_class(cfg.privacy).header(cfg, pop)
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
            *more,
            f"outputs: {run_dir}",
        ]
    )
