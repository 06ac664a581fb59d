"""The server optimizer: how DP-FedAvg's averaged, noised update moves the model."""

from __future__ import annotations

import numpy as np


class ServerOptimizer:
    """The server optimizer applied to the averaged update (a pseudo-gradient of -update)."""

    def __init__(self, params: np.ndarray, kind: str, lr: float, momentum: float):
        import torch  # here, not at module level: the driver imports this module and needs no torch

        self.weights = torch.nn.Parameter(torch.from_numpy(params.astype(np.float32).copy()))
        if kind == "sgd":
            self.opt = torch.optim.SGD([self.weights], lr=lr)
        elif kind == "sgdm":
            self.opt = torch.optim.SGD([self.weights], lr=lr, momentum=momentum, nesterov=True)
        elif kind == "momentum":  # heavy ball
            self.opt = torch.optim.SGD([self.weights], lr=lr, momentum=momentum)
        elif kind == "adam":
            self.opt = torch.optim.Adam([self.weights], lr=lr)
        else:
            raise ValueError(f"train.server_optimizer: unknown value {kind!r}")

    def step(self, update: np.ndarray) -> np.ndarray:
        import torch

        self.weights.grad = torch.from_numpy(-update.astype(np.float32))
        self.opt.step()
        return self.params()

    def params(self) -> np.ndarray:
        return self.weights.detach().numpy().copy()

    def state(self) -> dict:
        return {"weights": self.params(), "opt": self.opt.state_dict()}

    def load_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            self.weights.copy_(torch.from_numpy(state["weights"]))
        self.opt.load_state_dict(state["opt"])
