"""The FederatedCorpus protocol: what the fleet asks of a dataset, and the baseline it is held to.

A corpus maps a device id to that device's examples. Shards call `examples` for each device they
train, so it must be cheap and must not need the whole dataset in memory: the synthetic corpus
regenerates a device's data from (seed, device id), the Arrow corpus reads only that device's rows
of a memory-mapped Parquet file.

An example is one sequence of seq_len+1 int32 ids, [bos, w1, ..., w_seq_len]: model input is
[:, :-1], target [:, 1:]. A sentence shorter than seq_len ends with eos and is padded with 0; pad
targets count neither in the loss nor in recall (ids and specials: `fleet.learning.data.vocab`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fleet.config import Config, validate_data
from fleet.learning.data.vocab import OOV, PAD


class FederatedCorpus(Protocol):
    """What the fleet asks of a dataset. A stored corpus (num_devices not None, `ArrowCorpus`)
    also has `device_table(start, stop) -> (device_ids int64, num_examples int32)` for rows
    [start, stop) of its device index, from which each shard builds its part of the population."""

    vocab_size: int  # V words, without the 4 specials
    seq_len: int
    num_devices: int | None  # devices stored (arrow); None when any id has data (synthetic)

    def examples(self, device_id: int, n: int | None = None) -> np.ndarray:
        """A training device's examples, int32 (n, seq_len+1).

        synthetic: exactly n (default data.max_examples_per_device), deterministic in
        (seed, device id), and prefix-stable (the first k do not depend on n).
        arrow: the device's stored examples in ingest order, at most n and at most
        data.max_examples_per_device; an unknown device raises KeyError.
        """

    def num_examples(self, device_ids: np.ndarray) -> np.ndarray | None:
        """Examples per device as the fleet should see them (int32), or None where the corpus
        can produce any number (synthetic: the population's num_examples column decides)."""

    def eval_examples(self) -> np.ndarray:
        """Held-out devices' examples, concatenated, at most data.eval_examples rows.

        Deterministic; the devices are disjoint from every training device.
        """

    def unigram(self) -> np.ndarray:
        """Target-token frequencies, float64 over the V+4 ids, summing to 1.

        Words, eos and oov have their frequency as a target; pad and bos are 0. Canaries that
        want words only should restrict to ids >= 4 and renormalise.
        """

    def vocab(self) -> list[str]:
        """id -> token, specials "<pad>", "<bos>", "<eos>", "<oov>" first."""


def make_corpus(cfg: Config) -> FederatedCorpus:
    """The corpus named by cfg.data, for cfg.model's vocabulary and sequence length."""
    validate_data(cfg)
    if cfg.data.name == "arrow":
        from fleet.learning.data.arrow import ArrowCorpus

        return ArrowCorpus(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
    from fleet.learning.data.synthetic import SyntheticCorpus

    return SyntheticCorpus(cfg.data, cfg.model.vocab_size, cfg.model.seq_len, cfg.seed)


def unigram_baseline_recall(corpus: FederatedCorpus) -> dict[str, float]:
    """Recall of always predicting the most frequent targets, on the held-out examples.

    The floor a next-word model must clear. `recall@k`: over every non-pad target, the k most
    frequent ids of `corpus.unigram()` (eos and oov included). `recall@k_no_oov`: oov targets
    are left out and oov is never predicted, as in TFF's accuracy-without-OOV metric.
    """
    targets = corpus.eval_examples()[:, 1:].ravel()
    targets = targets[targets != PAD]
    order = np.argsort(-corpus.unigram(), kind="stable")
    no_oov = order[order != OOV]
    kept = targets[targets != OOV]
    out = {}
    for k in (1, 3):
        out[f"recall@{k}"] = _hit_rate(targets, order[:k])
        out[f"recall@{k}_no_oov"] = _hit_rate(kept, no_oov[:k])
    return out


def _hit_rate(targets: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.isin(targets, predicted).mean()) if targets.size else float("nan")
