"""The privacy mechanisms, one object each behind one interface (`base.Mechanism`), and their registry.

| `privacy.mechanism` | class | guarantee rests on |
| --- | --- | --- |
| (`privacy=none`) | `none.NoDP` | nothing: the non-private baseline |
| `dp_fedavg` | `fedavg.GaussianFedAvg` | a secret uniform sample of the available devices (amplification) |
| `dp_ftrl` | `ftrl.TreeFTRL` | the participation limit alone (tree aggregation) |
| `dp_blt` | `blt.BLTFTRL` | the participation limit alone (BLT correlated noise, jax-privacy) |

Adding a mechanism: a module here with a `Mechanism` subclass, and its line in `MECHANISMS`. Nothing
outside `fleet/privacy/` compares mechanism names (a test keeps it so): it asks this registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fleet.config import Config, ConfigError
from fleet.config import validate as validate_settings
from fleet.privacy.mechanisms.base import (
    Cohort,
    Mechanism,
    ModelStep,
    ServerFactory,
    ShardSums,
    check_delta_for,
    cohort_size,
    default_delta,
    run_delta,
)
from fleet.privacy.mechanisms.blt import BLTFTRL
from fleet.privacy.mechanisms.fedavg import GaussianFedAvg
from fleet.privacy.mechanisms.ftrl import TreeFTRL
from fleet.privacy.mechanisms.none import NoDP
from fleet.privacy.noise import NoiseSource

MECHANISMS: dict[str, type[Mechanism]] = {
    "none": NoDP,
    "dp_fedavg": GaussianFedAvg,
    "dp_ftrl": TreeFTRL,
    "dp_blt": BLTFTRL,
}


def mechanism_class(privacy: Any) -> type[Mechanism]:
    """The class of the mechanism a privacy config names (`enabled: false` is `none`)."""
    name = privacy.mechanism if privacy.enabled else "none"
    try:
        return MECHANISMS[name]
    except KeyError:
        names = ", ".join(k for k in MECHANISMS if k != "none")
        raise ConfigError(f"privacy.mechanism: unknown value {name!r}; expected one of {names}") from None


def validate(cfg: Config) -> None:
    """Every setting of a composed config, before anything starts: the config's own checks
    (`fleet.config.validate`), then the mechanism's, each error one line naming its key."""
    validate_settings(cfg)
    mechanism_class(cfg.privacy).validate(cfg)


def check_population(cfg: Config, population: int) -> float:
    """The checks that need the population (known once the fleet or corpus is read), before
    start-up: delta below 1 / population and a reachable target. Returns the run's delta."""
    cls = mechanism_class(cfg.privacy)
    if not cls.dp:
        return run_delta(cfg.privacy, population)
    delta = check_delta_for(cfg, population)
    cls.check_budget(cfg, population)
    return delta


def prepare(cfg: Config) -> None:
    """The mechanism's slow set-up, on the driver before start-up (BLT: its strategy, cached)."""
    mechanism_class(cfg.privacy).prepare(cfg)


def limit_rounds(cfg: Config) -> int:
    """The participation limit in released rounds that the shards enforce."""
    return mechanism_class(cfg.privacy).limit_rounds(cfg)


def build(
    cfg: Config, population: int, init_params: np.ndarray, server: ServerFactory, state_dir: str | Path | None
) -> Mechanism:
    """The run's mechanism, with its one noise source."""
    noise = NoiseSource(cfg.rng, cfg.seed)
    return mechanism_class(cfg.privacy)(cfg, population, init_params, noise, server, state_dir)


__all__ = [
    "MECHANISMS",
    "Cohort",
    "Mechanism",
    "ModelStep",
    "ServerFactory",
    "ShardSums",
    "build",
    "check_population",
    "cohort_size",
    "default_delta",
    "limit_rounds",
    "mechanism_class",
    "prepare",
    "run_delta",
    "validate",
]
