"""Federated mean estimation: the smallest real task, for testing the round without a model.

Device i holds n_i vectors around its own mean m_i = mu + offset_i (non-IID). Local training is
minibatch SGD on 0.5 ||w - x||^2, so each update pulls the model toward the device's data; the
global optimum is the example-weighted mean, and the held-out metric is the distance to mu.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from fleet import rng
from fleet.phones.timing import JobCost

if TYPE_CHECKING:
    from fleet.config import Config


class MeanTask:
    def __init__(self, cfg: Config, role: str):
        self.dim = cfg.task.mean_dim
        self.seed = cfg.seed
        self.epochs = cfg.train.client_epochs
        self.batch = cfg.train.batch_size
        self.lr = cfg.train.client_lr
        self.mu = rng.device_generator(self.seed, "mean_mu", 0, 0).normal(0.0, 1.0, self.dim)
        self.cost = JobCost(download_bytes=4.0 * self.dim, upload_bytes=4.0 * self.dim)

    def init_params(self) -> np.ndarray:
        return np.zeros(self.dim, dtype=np.float32)

    def job_flops(self, num_examples: np.ndarray) -> np.ndarray:
        return 4.0 * self.dim * self.epochs * np.asarray(num_examples, dtype=np.float64)

    def device_data(self, device_id: int, n: int) -> np.ndarray:
        g = rng.device_generator(self.seed, "mean_data", 0, int(device_id))
        center = self.mu + g.normal(0.0, 0.5, self.dim)
        return (center + g.normal(0.0, 1.0, (max(int(n), 1), self.dim))).astype(np.float32)

    def client_updates(
        self, params: np.ndarray, device_ids: np.ndarray, num_examples: np.ndarray, round_idx: int
    ) -> Iterator[tuple[np.ndarray, float]]:
        for dev, n in zip(device_ids, num_examples, strict=True):
            x = self.device_data(dev, n)
            g = rng.device_generator(self.seed, "mean_order", round_idx, int(dev))
            w = params.astype(np.float64)
            loss = 0.0
            for _ in range(self.epochs):
                order = g.permutation(len(x))
                for s in range(0, len(x), self.batch):
                    b = x[order[s : s + self.batch]]
                    diff = w - b.mean(axis=0)
                    w = w - self.lr * diff
            loss = float(0.5 * np.mean(np.sum((x - w) ** 2, axis=1)))
            yield (w - params).astype(np.float32), loss

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        return {"eval_distance": float(np.linalg.norm(params - self.mu))}
