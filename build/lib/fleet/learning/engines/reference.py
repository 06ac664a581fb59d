"""The reference engine: the eager model and autograd, the ground truth the others are held to."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.nn import functional

from fleet.learning.engines.common import LocalSGD, OneAtATime, batches, check_inputs
from fleet.learning.model import PAD_ID, ModelShape, NWPModel, get_flat, set_flat

log = logging.getLogger(__name__)


class ReferenceEngine(OneAtATime):
    """Plain eager PyTorch, one device at a time: the ground truth for every other engine."""

    precision = "fp32"

    def __init__(self, shape: ModelShape, pad_id: int | None = PAD_ID):
        self.shape = shape
        self.pad_id = pad_id
        self.model = NWPModel(
            shape.vocab_total, shape.embed_dim, shape.hidden_dim, shape.proj_dim, shape.cell
        )

    def train_device(
        self, params: np.ndarray, tokens: np.ndarray, sgd: LocalSGD, rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        epochs, batch_size, lr = sgd
        check_inputs(params, tokens, self.shape)
        set_flat(self.model, params)
        tok = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a writable copy
        ignore = -100 if self.pad_id is None else self.pad_id
        loss_sum, count = 0.0, 0
        for rows in batches(len(tok), epochs, batch_size, rng):
            batch = tok[torch.from_numpy(rows)]
            target = batch[:, 1:].reshape(-1)
            n = int((target != ignore).sum())
            if n == 0:
                continue
            logits = self.model(batch[:, :-1])
            loss = functional.cross_entropy(
                logits.reshape(-1, self.shape.vocab_total), target, ignore_index=ignore
            )
            self.model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in self.model.parameters():
                    p.sub_(lr * p.grad)
            loss_sum += loss.item() * n
            count += n
        delta = get_flat(self.model) - np.asarray(params, dtype=np.float32)
        return delta, loss_sum / count if count else math.nan
