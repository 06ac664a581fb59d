"""`fleet-train` / `python -m fleet`: the Hydra main.

Errors a user can fix (a bad value, a missing file) stop with one line naming the key and exit
code 2; `verbose=true` shows the traceback.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fleet.config import ConfigError, register_configs

log = logging.getLogger("fleet")


def _train(cfg: DictConfig) -> dict | None:
    from fleet.run import train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        obj = OmegaConf.to_object(cfg)
        summary = train(obj, run_dir, OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as e:
        if cfg.get("verbose"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(_summary_text(summary, run_dir))
    return summary


def _summary_text(s: dict, run_dir: str) -> str:
    parts = [f"run dir: {run_dir}", f"rounds: {s['rounds']} ({s['released_rounds']} released, "
             f"{s['abandoned_rounds']} abandoned; stop: {s['stop_reason']})"]
    priv = s["privacy"]
    if priv.get("dp"):
        parts.append(f"epsilon: {priv['epsilon']:.4g} at delta {priv['delta']:.3g}")
    else:
        parts.append("epsilon: inf (no DP)")
    for k, v in sorted(s["final"].items()):
        parts.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return "\n".join(parts)


def main() -> None:
    register_configs()
    hydra.main(version_base=None, config_path="../conf", config_name="config")(_train)()


if __name__ == "__main__":
    main()
