"""The embedded default corpus: a hidden n-gram language, generated on demand per device.

Why synthetic: a run must work from a fresh clone, with no download, at any population size, and
a device's data must cost nothing to store (10 million devices) and nothing to ship between actors.
So a device's examples are a pure function of (seed, device id), regenerated whenever it trains.

The language (fixed by the seed):
- Shared grammar: every context token c (bos or a word) has `branching` distinct successor
  words, drawn without replacement from a Zipf(`zipf_a`) distribution over the V words, so
  frequent words follow many contexts and the corpus unigram has a Zipfian tail. The successors
  are ranked in a random order per context and weighted Zipf(`successor_zipf_a`) by rank:
  the larger the exponent, the more predictable the next word (1.5 gives a bigram model about
  25% top-1 recall against the unigram's 8% at V=2000).
- Topics: each of `device_topics` topics ranks the vocabulary its own way (the global Zipf rank
  jittered by a lognormal factor, `_TOPIC_RANK_SIGMA`) and has its own successor sets drawn
  from that ranking. Each step follows the topic with probability `topic_strength`, else the
  shared grammar: what follows a word, and which words are common, depend on what the user
  talks about, while a model that ignores topics still predicts well from the shared part.
- Order n > 2: the tokens before the last one pick one of `_VARIANTS` shared rankings, so a
  model that sees further back predicts better than a bigram model.
- Devices (non-IID): each has a topic mix ~ Dirichlet(`topic_alpha`) over the topics; each
  sentence draws one topic from it. Sentence lengths are geometric (mean
  `MEAN_SENTENCE_WORDS`), so some examples end with eos and padding and some fill seq_len.

Sampling is vectorised over a device's examples (one table gather per position), well under a
millisecond for 256 examples. Examples are prefix-stable: the first k of `examples(d, n)` do not
depend on n, because each example's randomness is one row of a single uniform draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fleet import rng
from fleet.learning.data.vocab import BOS, EOS, NUM_SPECIAL, PAD, SPECIALS

MEAN_SENTENCE_WORDS = 12.0
_TOPIC_RANK_SIGMA = 1.5  # how far (log-rank) a topic moves words from their global frequency
_VARIANTS = 4  # shared successor orders selected by the older context (order > 2 only)
_UNIGRAM_DEVICES = 64  # devices sampled (from their own stream) to estimate the unigram

# Separate streams: training devices, held-out devices and the unigram sample can never share
# examples, whatever the ids the fleet uses.
TRAIN_STREAM = "synthetic_data"
EVAL_STREAM = "synthetic_eval"
UNIGRAM_STREAM = "synthetic_unigram"
LANGUAGE_STREAM = "synthetic_language"


class SyntheticCorpus:
    """A FederatedCorpus over any device id (int64), generated from (seed, device id)."""

    num_devices = None  # any id has data; the population decides which devices exist

    def __init__(self, data: Any, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.order = int(data.ngram_order)
        self.topics = int(data.device_topics)
        self.topic_alpha = float(data.topic_alpha)
        self.default_n = int(data.max_examples_per_device)
        self.eval_devices = int(data.eval_devices)
        self.eval_n = int(data.eval_examples)
        self.strength = float(data.topic_strength)
        self._table, self._rank_cdf, self._variant_of = _language(
            self.vocab_size,
            int(data.branching),
            float(data.zipf_a),
            float(data.successor_zipf_a),
            self.topics,
            self.order,
            self.seed,
        )
        self._vt = self.vocab_size + NUM_SPECIAL
        self._branching = int(data.branching)
        self._variants = _VARIANTS if self.order > 2 else 1
        self._eval: np.ndarray | None = None
        self._unigram: np.ndarray | None = None

    # ---- FederatedCorpus -----------------------------------------------------------------
    def examples(self, device_id: int, n: int | None = None) -> np.ndarray:
        """Exactly n (default `max_examples_per_device`) examples of a training device."""
        return self._generate(TRAIN_STREAM, int(device_id), self.default_n if n is None else n)

    def num_examples(self, device_ids: np.ndarray) -> None:
        """None: any count can be generated, so the population's own column decides."""
        return None

    def eval_examples(self) -> np.ndarray:
        """`eval_examples` examples from `eval_devices` held-out devices (their own stream)."""
        if self._eval is None:
            per = -(-self.eval_n // self.eval_devices)
            parts = [self._generate(EVAL_STREAM, d, per) for d in range(self.eval_devices)]
            self._eval = np.concatenate(parts)[: self.eval_n]
        return self._eval

    def unigram(self) -> np.ndarray:
        """Frequencies of the targets (words and eos; pad and bos are 0), float64 over V+4 ids.

        Estimated from devices of a third stream, so it is neither fitted on the eval set nor
        on any training device.
        """
        if self._unigram is None:
            counts = np.zeros(self.vocab_size + NUM_SPECIAL, dtype=np.float64)
            for d in range(_UNIGRAM_DEVICES):
                t = self._generate(UNIGRAM_STREAM, d, self.default_n)[:, 1:]
                counts += np.bincount(t.ravel(), minlength=counts.size)
            counts[PAD] = 0.0
            self._unigram = counts / counts.sum()
        return self._unigram

    def vocab(self) -> list[str]:
        return list(SPECIALS) + [f"w{i}" for i in range(self.vocab_size)]

    # ---- generation ----------------------------------------------------------------------
    def _generate(self, stream: str, device_id: int, n: int) -> np.ndarray:
        g = rng.device_generator(self.seed, stream, 0, device_id)
        theta = g.dirichlet(np.full(self.topics, self.topic_alpha))
        # One uniform row per example: [topic, length, one per position] (prefix-stable).
        u = g.random((n, self.seq_len + 2))
        topic = np.minimum(np.searchsorted(np.cumsum(theta), u[:, 0], side="right"), self.topics - 1)
        length = 1 + np.floor(np.log1p(-u[:, 1]) / np.log1p(-1.0 / MEAN_SENTENCE_WORDS))
        # Each position's uniform picks the mixture component (topical below topic_strength,
        # shared above) and, rescaled, the Zipf rank within it; neither depends on the context,
        # so both are computed for all positions at once and a step is a single gather.
        up, s = u[:, 2:], self.strength
        topical = up < s
        scaled = np.where(topical, up / max(s, 1e-300), (up - s) / max(1.0 - s, 1e-300))
        rank = np.minimum(np.searchsorted(self._rank_cdf, scaled, side="right"), self._branching - 1)
        topic_row = (self._variants + topic.astype(np.int64))[:, None] * self._vt
        block = np.where(topical, topic_row, 0) * self._branching + rank
        out = np.empty((n, self.seq_len + 1), dtype=np.int32)
        out[:, 0] = BOS
        variant = np.zeros(n, dtype=np.int64)
        for i in range(self.seq_len):
            if self.order > 2:  # shared order chosen by the tokens before the previous one
                variant[:] = 0
                for lag in range(2, self.order):
                    if i + 1 - lag >= 0:
                        variant += self._variant_of[lag - 2][out[:, i + 1 - lag]]
                    else:
                        variant += self._variant_of[lag - 2][PAD]
                shared_row = (variant % self._variants) * self._vt
                cell = block[:, i] + np.where(topical[:, i], 0, shared_row * self._branching)
            else:
                cell = block[:, i]
            out[:, i + 1] = self._table[cell + out[:, i].astype(np.int64) * self._branching]
        pos = np.arange(self.seq_len + 1)
        length = length[:, None]
        out[pos == length + 1] = EOS
        out[pos > length + 1] = PAD
        return out


def _language(
    vocab_size: int, branching: int, zipf_a: float, successor_a: float, topics: int, order: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The hidden language as lookup tables.

    Returns (table, rank_cdf, variant_of). table[(row * (V+4) + context) * B + rank] is the word
    of that Zipf rank after `context`; row is a shared variant (0..variants-1; variants = 4 for
    order > 2, else 1) or variants + topic (topics have successor sets of their own). rank_cdf is
    the Zipf(`successor_zipf_a`) CDF over the B ranks. variant_of[lag-2][token] maps older
    context tokens to a shared variant (order > 2).
    """
    g = rng.device_generator(seed, LANGUAGE_STREAM, 0, 0)
    vt = vocab_size + NUM_SPECIAL
    variants = _VARIANTS if order > 2 else 1
    # Shared successor sets; each shared variant ranks them its own way.
    succ = _distinct_zipf(g, vt, vocab_size, branching, zipf_a) + NUM_SPECIAL
    perm = np.argsort(g.random((variants, vt, branching)), axis=2)
    shared = np.take_along_axis(np.broadcast_to(succ, perm.shape), perm, axis=2)
    # Topics have their own successor sets, drawn from the topic's own word ranking: the global
    # Zipf rank jittered by a lognormal factor, so a topic keeps the common words common but
    # favours its own mid-frequency words (the non-IID part a device's unigram shows).
    jitter = np.log(np.arange(1, vocab_size + 1)) + _TOPIC_RANK_SIGMA * g.standard_normal(
        (topics, vocab_size)
    )
    ranking = np.argsort(jitter, axis=1)  # topic's rank -> word index
    topical = np.stack(
        [ranking[t][_distinct_zipf(g, vt, vocab_size, branching, zipf_a)] for t in range(topics)]
    )
    table = np.concatenate([shared, topical + NUM_SPECIAL]).astype(np.int32)
    rank_w = np.arange(1, branching + 1, dtype=np.float64) ** -successor_a
    rank_cdf = np.cumsum(rank_w / rank_w.sum())
    variant_of = [g.integers(0, variants, size=vt) for _ in range(order - 2)]
    return table.ravel(), rank_cdf, variant_of


def _distinct_zipf(g: np.random.Generator, rows: int, n: int, k: int, a: float) -> np.ndarray:
    """(rows, k) distinct indices in [0, n) per row, drawn without replacement ~ Zipf(a).

    Draws with replacement and keeps each row's first k distinct values, which is exactly
    successive sampling without replacement, in O(rows * k) rather than the O(rows * n) of
    Gumbel top-k (V=10,000 would take seconds in every shard). Rows that drew fewer than k
    distinct values are drawn again with twice as many tries.
    """
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    out = np.empty((rows, k), dtype=np.int32)
    todo = np.arange(rows)
    tries = 4 * k
    while todo.size:
        draws = np.minimum(np.searchsorted(cdf, g.random((todo.size, tries)), side="right"), n - 1)
        by_value = np.argsort(draws, axis=1, kind="stable")  # equal values keep draw order
        sorted_vals = np.take_along_axis(draws, by_value, axis=1)
        first = np.ones_like(draws, dtype=bool)
        first[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
        when = np.where(first, by_value, tries)  # draw index of each value's first occurrence
        when.sort(axis=1)
        done = when[:, k - 1] < tries
        out[todo[done]] = np.take_along_axis(draws[done], when[done, :k], axis=1)
        todo = todo[~done]
        tries *= 2
    return out
