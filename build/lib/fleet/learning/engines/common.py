"""What the engines share: their contract, batching order, input checks and the loss clamp."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch

from fleet.learning.model import ModelShape

log = logging.getLogger(__name__)


# Probabilities are clamped here before the log that gives the reported loss, so a target the
# model rules out entirely costs at most -log(tiny) ~ 87 instead of inf (the gradient is exact).
TINY = float(torch.finfo(torch.float32).tiny)


class LocalSGD(NamedTuple):
    """A device's local training: plain minibatch SGD, `epochs` passes over its examples in
    batches of `batch_size`, step `lr` (the task's train.client_epochs, batch_size, client_lr)."""

    epochs: int
    batch_size: int
    lr: float


class Engine(Protocol):
    def train_device(
        self, params: np.ndarray, tokens: np.ndarray, sgd: LocalSGD, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """tokens: int array (n, seq_len+1) = [bos, w1..w_seq_len]; input tokens[:, :-1], target
        tokens[:, 1:]; pad targets are excluded from the loss (mean cross-entropy over non-pad
        targets per batch). `sgd`: minibatch SGD, batches in an order given by rng.permutation(n)
        each epoch. Returns (delta = local - params as flat float32, mean training loss)."""

    def train_devices(
        self, params: np.ndarray, jobs: Iterable[tuple[np.ndarray, np.random.Generator]], sgd: LocalSGD
    ) -> Iterator[tuple[np.ndarray, float]]:
        """`train_device` for each (tokens, rng) of a cohort, results in the cohort's order. `jobs`
        is consumed lazily, as far as the engine needs, so a shard never holds the whole cohort's
        data at once."""


class OneAtATime:
    """`train_devices` for engines that train devices one after another."""

    def train_devices(
        self, params: np.ndarray, jobs: Iterable[tuple[np.ndarray, np.random.Generator]], sgd: LocalSGD
    ) -> Iterator[tuple[np.ndarray, float]]:
        for tokens, order in jobs:
            yield self.train_device(params, tokens, sgd, order)


def batches(n: int, epochs: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of every step, in training order (the contract both engines share)."""
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out.extend(order[s : s + batch_size] for s in range(0, n, batch_size))
    return out


def check_inputs(params: np.ndarray, tokens: np.ndarray, shape: ModelShape) -> None:
    if params.shape != (shape.num_params(),):
        raise ValueError(f"params: expected shape ({shape.num_params()},), got {params.shape}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens: expected (n, seq_len + 1) with seq_len >= 1, got {tokens.shape}")
    # Checked on the host: on a GPU an id out of range is a device-side assert that poisons the
    # process's CUDA context for good, not an exception.
    if tokens.size and (tokens.min() < 0 or tokens.max() >= shape.vocab_total):
        raise ValueError(
            f"tokens: ids must be in [0, {shape.vocab_total}), got [{tokens.min()}, {tokens.max()}]"
        )
