"""What the fleet trains. The round never looks inside: it moves flat float32 vectors.

A task is built inside each actor from the config (`make_task`), so nothing heavy is pickled.
`task.name` is `nwp`, `mean`, or an import path `package.module:Class` for a user's own task
(tests use that to plant adversarial devices).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fleet.phones.timing import JobCost

if TYPE_CHECKING:
    from fleet.config import Config


class Task(Protocol):
    cost: JobCost  # bytes down and up per job

    def init_params(self) -> np.ndarray:
        """Initial flat float32 parameters (server side)."""

    def job_flops(self, num_examples: np.ndarray) -> np.ndarray:
        """FLOPs of each device's local job, vectorised over devices (the timing model uses it)."""

    def client_updates(
        self, params: np.ndarray, device_ids: np.ndarray, num_examples: np.ndarray, round_idx: int
    ) -> Iterator[tuple[np.ndarray, float]]:
        """For each device in turn, its update (local - global, flat float32) and training loss."""

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """Held-out metrics of the global model (server side)."""

    # Optional: `cohort_order(num_examples) -> permutation`, the order in which the shard hands
    # the accepted devices to `client_updates` (default: as sampled). A lockstep engine groups
    # devices of similar size with it; which devices count, and their updates, do not change.


def make_task(cfg: Config, role: str) -> Task:
    """Build the configured task; `role` is "client" (in a shard) or "server" (coordinator)."""
    name = cfg.task.name
    if name == "mean":
        from fleet.learning.tasks.mean import MeanTask

        return MeanTask(cfg, role)
    if name == "nwp":
        from fleet.learning.tasks.nwp import NWPTask

        return NWPTask(cfg, role)
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)(cfg, role)
    raise ValueError(f"task.name: unknown task {name!r}")
