"""Workload W1 without fleet: the model, the devices' data, the hyperparameters and the
minibatch order, bit-for-bit as fleet's plain PyTorch baseline (`fleet.bench.baselines.PlainLoop`)
has them, for the peer frameworks' scripts (pfl_w1.py, flower_w1.py), which run in a venv that
has no fleet.

W1 (fleet/bench/train.py): a tied-embedding LSTM, vocabulary 10,000, embedding 96, 670 units,
projection 96 (about 1.54M parameters), embedding U(-0.1, 0.1). Device i holds
`default_rng(i).zipf(1.2, (64, 21)) - 1` clipped to 9,999: input the first 20 columns, target
the last 20. One local epoch, batch 16, client SGD lr 0.5. Cohort 50 of 10,000 devices, DP clip
1.0, z = 1.0 (noise N(0, (z * clip)^2) on the sum of the clipped updates), average over the
cohort, server SGD lr 1.0 with Nesterov momentum 0.9.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional

VOCAB = 10_000
EMBED = 96
HIDDEN = 670
PROJ = 96
SEQ_LEN = 20
EXAMPLES = 64  # sequences a device
ZIPF_A = 1.2

POPULATION = 10_000
COHORT = 50
LOCAL_EPOCHS = 1
BATCH_SIZE = 16
CLIENT_LR = 0.5
SERVER_LR = 1.0
SERVER_MOMENTUM = 0.9  # Nesterov
CLIP = 1.0
NOISE_MULTIPLIER = 1.0
SEED = 0  # fleet's default Config.seed, and the seed fleet.bench.train gives PlainLoop


def cores() -> int:
    return len(os.sched_getaffinity(0))


# ---- the model -------------------------------------------------------------------------------
def build_model(seed: int = SEED) -> W1Model:
    """W1's model, initialised exactly as PlainLoop initialises it (same seed, same draw order)."""
    torch.manual_seed(seed)
    return W1Model()


class W1Model(nn.Module):
    """nn.Embedding(10,000, 96) + nn.LSTM(96, 670, proj_size=96); logits = h @ embedding^T.

    Parameters in PlainLoop's order: emb.weight, then the LSTM's. `loss(x, y)` is the mean
    token cross-entropy PlainLoop uses; `metrics` exists because pfl requires it (W1 does not
    evaluate: it returns a constant without running the model)."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, EMBED)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        self.lstm = nn.LSTM(EMBED, HIDDEN, proj_size=PROJ, batch_first=True)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return out @ self.emb.weight.t()

    def loss(self, x, y):
        return functional.cross_entropy(self(x).reshape(-1, self.vocab), y.reshape(-1))

    def metrics(self, x, y, eval=False):  # noqa: A002 (pfl's signature)
        from pfl.metrics import Weighted

        return {"w1 does not evaluate": Weighted(0.0, 1)}


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the data --------------------------------------------------------------------------------
def w1_tokens(device_id: int) -> np.ndarray:
    """Device i's 64 sequences of 21 token ids, exactly as fleet.bench._workload.w1_tokens."""
    return np.minimum(
        np.random.default_rng(int(device_id)).zipf(ZIPF_A, (EXAMPLES, SEQ_LEN + 1)) - 1, VOCAB - 1
    )


# fleet.rng.hash_one (this project's own code), copied so that the minibatch order is PlainLoop's.
_MASK = 0xFFFFFFFFFFFFFFFF


def _mix_int(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _hash_one(seed: int, stream: str, counter: int, device_id: int) -> int:
    key = _mix_int(_mix_int(seed & _MASK) ^ zlib.crc32(stream.encode()))
    h = ((device_id & _MASK) * 0xBF58476D1CE4E5B9 + 0x9E3779B97F4A7C15) & _MASK
    h ^= _mix_int(key ^ ((counter & _MASK) * 0x9E3779B97F4A7C15 & _MASK))
    return _mix_int(h)


def order(device_id: int, round_idx: int, seed: int = SEED) -> np.ndarray:
    """The permutation of the device's 64 sequences in round `round_idx` (PlainLoop's)."""
    gen = np.random.Generator(np.random.PCG64(_hash_one(seed, "w1_order", round_idx, int(device_id))))
    return gen.permutation(EXAMPLES)


def device_batches(device_id: int, round_idx: int, examples: int = EXAMPLES):
    """(inputs, targets) as int64 torch tensors, rows in this round's order: iterating them in
    slices of 16 gives PlainLoop's minibatches. `examples` < 64 keeps the first rows of that
    order (smoke tests only)."""
    tok = w1_tokens(device_id)[order(device_id, round_idx)[:examples]]
    tok = torch.from_numpy(np.ascontiguousarray(tok)).long()
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def cohort_of(round_idx: int, population: int = POPULATION, cohort: int = COHORT, seed: int = SEED):
    """Round r's cohort, as PlainLoop draws it: `cohort` distinct devices, uniformly."""
    return np.random.default_rng([seed, round_idx]).choice(population, cohort, replace=False)


def local_sgd(model, x, y, lr: float = CLIENT_LR, batch_size: int = BATCH_SIZE, epochs: int = LOCAL_EPOCHS):
    """PlainLoop's local training: plain SGD over the rows in order, mean token loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for s in range(0, len(x), batch_size):
            loss = model.loss(x[s : s + batch_size], y[s : s + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
