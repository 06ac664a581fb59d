"""No DP (`privacy=none`): plain FedAvg, the non-private baseline.

A fixed-size cohort of K = ceil(goal x overselect) available devices, the first `goal` arrivals
counted, no clipping, no noise, the average over the devices that reported. Nothing is accounted;
the ledger still records which rounds were released, so a resume counts them like any mechanism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fleet.privacy.mechanisms.base import Cohort, Mechanism, ShardSums, cohort_size


@dataclass(frozen=True)
class PlainRelease:
    round: int

    def to_json(self) -> dict:
        return asdict(self)


class NoDP(Mechanism):
    """FedAvg without privacy."""

    name = "none"
    dp = False

    def __init__(self, cfg: Any, population: int, init_params: np.ndarray, noise, server, state_dir):
        super().__init__(cfg, population, init_params, noise, server, state_dir)
        self.server = server(init_params)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Nothing to check: no privacy setting is read."""

    @classmethod
    def header(cls, cfg: Any, population: int) -> list[str]:
        return ["no DP (privacy=none)"]

    @classmethod
    def parse(cls, entry: dict) -> PlainRelease:
        return PlainRelease(int(entry["round"]))

    def cohort(self, available: int) -> Cohort:
        k = min(cohort_size(self.cfg.fleet), available)
        return Cohort(k / available if available else 0.0, k, poisson=False, closes_on_goal=True)

    def _entry(self, r: int, available: int) -> PlainRelease:
        return PlainRelease(r)

    def release(self, r: int, sums: ShardSums) -> dict:
        if sums.reported > 0:
            self.server.step((sums.total / sums.reported).astype(np.float32))
        self._commit()
        return {}

    @property
    def params(self) -> np.ndarray:
        return self.server.params()

    def _state(self) -> dict:
        return {"server": self.server.state()}

    def _load(self, state: dict) -> None:
        self.server.load_state(state["server"])

    def summary(self) -> dict:
        return {"dp": False, "epsilon": None, "covers": "nothing: no DP (privacy=none)"}
