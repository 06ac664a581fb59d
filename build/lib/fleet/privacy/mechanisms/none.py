"""No DP (`privacy=none`): the non-private baseline, DP-FedAvg with its clip and noise off.

It runs DP-FedAvg's protocol so that a comparison measures the noise and the clip, not a change
of protocol: the same sampling (`privacy.sampling`, Poisson by default: each available device with
q_r = min(1, K / available_r), every arrival counted) and the same aggregation (the sum of the
updates over the goal, a fixed denominator), with no clip and no noise. `privacy=clip_only` is
the arm between: DP-FedAvg's clip, no noise. Nothing is accounted; the ledger still records which
rounds were released, so a resume counts them like any mechanism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fleet.config import Config
from fleet.privacy.mechanisms.base import Cohort, ShardSums, choice, sampled_cohort
from fleet.privacy.mechanisms.server_model import ServerModel
from fleet.privacy.sampled import SAMPLINGS


@dataclass(frozen=True)
class PlainRelease:
    round: int

    def to_json(self) -> dict:
        return asdict(self)


class NoDP(ServerModel):
    """FedAvg without privacy."""

    name = "none"
    dp = False

    def __init__(self, cfg: Config, population: int, init_params: np.ndarray, noise, server, state_dir):
        super().__init__(cfg, population, init_params, noise, server, state_dir)
        self.server = server(init_params)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        """The sampling is the only privacy setting read."""
        choice(cfg.privacy.sampling, "privacy.sampling", tuple(SAMPLINGS))

    @classmethod
    def header(cls, cfg: Config, population: int) -> list[str]:
        return [
            f"no DP (privacy=none): DP-FedAvg's {cfg.privacy.sampling} sampling and sum over the goal, "
            "no clip, no noise"
        ]

    @classmethod
    def parse(cls, entry: dict) -> PlainRelease:
        return PlainRelease(int(entry["round"]))

    def cohort(self, available: int) -> Cohort:
        return sampled_cohort(self.cfg, available)

    def _entry(self, r: int, available: int) -> PlainRelease:
        return PlainRelease(r)

    def release(self, r: int, sums: ShardSums) -> dict:
        self.server.step((sums.total / self.cfg.fleet.goal).astype(np.float32))  # as DP-FedAvg, z = 0
        self._commit()
        return {}

    def summary(self) -> dict:
        return {"dp": False, "epsilon": None, "covers": "nothing: no DP (privacy=none)"}
