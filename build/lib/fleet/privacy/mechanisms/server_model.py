"""The mechanisms whose released model is their server optimizer's (DP-FedAvg, the no-DP baseline).

See docs/ARCHITECTURE.md for the release boundary this model sits behind.
"""

from __future__ import annotations

import numpy as np

from fleet.privacy.mechanisms.base import Mechanism, ModelStep


class ServerModel(Mechanism):
    """A mechanism whose released model is its server optimizer's (DP-FedAvg, the no-DP baseline):
    the model, and all the state kept beside the ledger, are the optimizer's."""

    server: ModelStep

    @property
    def params(self) -> np.ndarray:
        return self.server.params()

    def _state(self) -> dict:
        return {"server": self.server.state()}

    def _load(self, state: dict) -> None:
        self.server.load_state(state["server"])
