"""Which devices a fleet has: a Parquet population's rows, an Arrow corpus's devices, or the config's
population; known before any actor starts (the driver, the planner and the audits ask)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fleet.config import Config, ConfigError, FleetConfig
from fleet.phones import population


def corpus_defines_devices(cfg: Config) -> bool:
    """With an Arrow corpus (and no Parquet population) the corpus's devices are the fleet."""
    return cfg.task.name == "nwp" and cfg.data.name == "arrow" and not cfg.fleet.path


def fleet_size(cfg: Config) -> int:
    """Number of devices: a Parquet population's rows, an Arrow corpus's devices, or the config's."""
    if corpus_defines_devices(cfg):
        from fleet.learning.data.corpus import make_corpus

        corpus = make_corpus(cfg)
        if corpus.num_devices == 0:
            raise ConfigError(
                f"data.path: {str(cfg.data.path)!r} holds no training devices (an empty corpus; "
                "its ingest_summary.json says why)"
            )
        _, counts = corpus.device_table(0, corpus.num_devices)
        if np.any(counts <= 0):  # checked here, before any actor starts, for a one-line error
            raise ConfigError(f"data.path: {int(np.sum(counts <= 0))} device(s) have no examples")
        return int(corpus.num_devices)
    return population.population_size(cfg.fleet)


def device_columns(cfg: Config, start: int, stop: int, corpus: Any = None) -> dict[str, Any]:
    """The columns of population rows [start, stop), as the shards and the canary plan both read
    them: a Parquet population's (all held), or the generated ones (most `Derived`: generated
    again when read); where the corpus defines the fleet, its device ids and example counts replace
    the generated ones (speed, schedule... stay synthetic)."""
    f = cfg.fleet
    if f.path:
        return population.load(f.path, start, stop, f.availability.model)
    cols = population.columns(f, cfg.seed, start, stop)
    if corpus_defines_devices(cfg):
        ids, counts = corpus.device_table(start, stop)
        if np.any(counts <= 0):
            raise ConfigError(f"data.path: {int(np.sum(counts <= 0))} device(s) have no examples")
        cols["device_id"], cols["num_examples"] = ids, counts.astype(np.int32)
    return cols


def memory_eligible(f: FleetConfig, cols: dict[str, Any]) -> np.ndarray:
    """The rows with the memory to train the model (fleet.min_memory_gb)."""
    return np.asarray(cols["memory_bytes"]) >= f.min_memory_gb * population.GB
