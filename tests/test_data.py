"""The synthetic corpus: determinism, held-out disjointness, non-IID devices, learnable signal."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.config import Config, ConfigError, DataConfig, FleetConfig, ModelConfig, PrivacyConfig
from fleet.learning.data import BOS, EOS, NUM_SPECIAL, OOV, PAD, make_corpus, unigram_baseline_recall
from fleet.learning.data.synthetic import SyntheticCorpus

V, L = 500, 20


def cfg(seed: int = 0, vocab: int = V, **data) -> Config:
    return Config(
        fleet=FleetConfig(),
        model=ModelConfig(vocab_size=vocab, seq_len=L),
        privacy=PrivacyConfig(),
        data=DataConfig(**data),
        seed=seed,
    )


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return make_corpus(cfg())


def check_examples(x: np.ndarray, n: int) -> None:
    """Shape, dtype, id range, and the [bos, words.., eos, pad..] layout of every row."""
    assert x.shape == (n, L + 1) and x.dtype == np.int32
    assert np.all(x[:, 0] == BOS)
    body = x[:, 1:]
    assert body.min() >= 0 and body.max() < V + NUM_SPECIAL
    assert not np.any((body == BOS) | (body == OOV))
    is_word = body >= NUM_SPECIAL
    assert np.all(is_word[:, 0]), "every sentence has at least one word"
    for row in body:
        ends = np.flatnonzero(row == EOS)
        stop = ends[0] if len(ends) else L
        assert len(ends) <= 1
        assert np.all(row[:stop] >= NUM_SPECIAL) and np.all(row[stop + 1 :] == PAD)


def test_examples_layout_and_both_orders(corpus: SyntheticCorpus) -> None:
    check_examples(corpus.examples(3, 64), 64)
    tri = make_corpus(cfg(ngram_order=3))
    check_examples(tri.examples(3, 64), 64)
    assert not np.array_equal(tri.examples(3, 64), corpus.examples(3, 64))
    assert len(corpus.examples(5)) == DataConfig().max_examples_per_device
    lengths = (corpus.examples(8, 256)[:, 1:] >= NUM_SPECIAL).sum(axis=1)
    assert 0.05 < np.mean(lengths == L) < 0.5, "some examples fill seq_len, most end with eos"


def test_synthetic_devices_are_deterministic(corpus: SyntheticCorpus) -> None:
    again = make_corpus(cfg())
    for d in (0, 1, 12345, 2**62 + 7):
        assert np.array_equal(corpus.examples(d, 40), again.examples(d, 40))
    # prefix-stable: a device's first k examples do not depend on how many are asked for
    assert np.array_equal(corpus.examples(9, 10), corpus.examples(9, 200)[:10])
    assert not np.array_equal(corpus.examples(0, 40), corpus.examples(1, 40))
    assert not np.array_equal(corpus.examples(0, 40), make_corpus(cfg(seed=1)).examples(0, 40))
    assert np.array_equal(corpus.eval_examples(), again.eval_examples())
    assert np.array_equal(corpus.unigram(), again.unigram())


def test_eval_devices_are_not_training_devices(corpus: SyntheticCorpus) -> None:
    ev = corpus.eval_examples()
    d = DataConfig()
    assert ev.shape == (d.eval_examples, L + 1)
    per = d.eval_examples // d.eval_devices
    train = np.concatenate([corpus.examples(i, per) for i in range(d.eval_devices)])
    # Same ids, other stream: no held-out device equals the training device with its index,
    assert not np.any(
        np.all(ev.reshape(d.eval_devices, per, -1) == train.reshape(d.eval_devices, per, -1), axis=(1, 2))
    )

    # and long sentences (too specific to recur by chance) never appear on both sides.
    def long_rows(x: np.ndarray) -> set[bytes]:
        return {r.tobytes() for r in x if (r >= NUM_SPECIAL).sum() >= 8}

    assert not long_rows(ev) & long_rows(train)


def device_unigram(c: SyntheticCorpus, device: int, rows: slice = slice(None)) -> np.ndarray:
    t = c.examples(device, 256)[rows, 1:].ravel()
    counts = np.bincount(t[t != PAD], minlength=V + NUM_SPECIAL).astype(np.float64)
    return counts / counts.sum()


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def test_devices_are_non_iid(corpus: SyntheticCorpus) -> None:
    # Two devices' word distributions differ more than two halves of one device's data do
    # (same sample sizes, so the sampling noise is the same on both sides).
    half, rest = slice(0, 128), slice(128, 256)
    within = [tv(device_unigram(corpus, d, half), device_unigram(corpus, d, rest)) for d in range(6)]
    across = [
        tv(device_unigram(corpus, d, half), device_unigram(corpus, d + 1, half)) for d in range(0, 12, 2)
    ]
    assert np.mean(across) > 1.2 * np.mean(within)
    # Without topics the devices are IID: the difference falls to the sampling noise.
    iid = make_corpus(cfg(device_topics=1))
    across_iid = [tv(device_unigram(iid, d, half), device_unigram(iid, d + 1, half)) for d in range(0, 12, 2)]
    assert np.mean(across_iid) < 1.1 * np.mean(within)


def test_unigram_and_vocab(corpus: SyntheticCorpus) -> None:
    u = corpus.unigram()
    assert u.shape == (V + NUM_SPECIAL,) and u.dtype == np.float64
    assert u[PAD] == 0 and u[BOS] == 0 and u[OOV] == 0 and u[EOS] > 0
    assert abs(u.sum() - 1.0) < 1e-12
    # Zipfian: the most frequent words are among the low ids, and the tail is long.
    words = u[NUM_SPECIAL:]
    assert np.argmax(words) < 20 and (words > 0).sum() > V // 2
    vocab = corpus.vocab()
    assert vocab[:4] == ["<pad>", "<bos>", "<eos>", "<oov>"] and vocab[4] == "w0" and len(vocab) == V + 4


def test_language_is_learnable(corpus: SyntheticCorpus) -> None:
    """A bigram count model fitted on training devices beats the unigram on held-out devices.

    The cheap stand-in for "a small LSTM can learn it": held-out cross-entropy of the bigram
    model is bits below the unigram's, and its top-1 recall clearly beats the baseline's.
    """
    vt = V + NUM_SPECIAL
    train = np.concatenate([corpus.examples(d, 256) for d in range(300)])
    prev, nxt = train[:, :-1].ravel(), train[:, 1:].ravel()
    keep = nxt != PAD
    bigram = np.zeros((vt, vt))
    np.add.at(bigram, (prev[keep], nxt[keep]), 1.0)
    unigram = bigram.sum(axis=0)
    bigram = (bigram + 0.01) / (bigram + 0.01).sum(axis=1, keepdims=True)
    unigram = (unigram + 0.01) / (unigram + 0.01).sum()

    ev = corpus.eval_examples()
    p, t = ev[:, :-1].ravel(), ev[:, 1:].ravel()
    m = t != PAD
    h_uni = -np.mean(np.log2(unigram[t[m]]))
    h_bi = -np.mean(np.log2(bigram[p[m], t[m]]))
    assert h_bi < h_uni - 1.5, (h_uni, h_bi)

    recall_bigram = float(np.mean(bigram[p[m]].argmax(axis=1) == t[m]))
    base = unigram_baseline_recall(corpus)
    assert recall_bigram > base["recall@1"] + 0.05, (recall_bigram, base)


def test_unigram_baseline_recall_counts_what_it_should() -> None:
    class Tiny:
        vocab_size, seq_len, num_devices = 3, 4, None

        def eval_examples(self) -> np.ndarray:
            return np.array([[BOS, 4, 4, 5, EOS], [BOS, 4, OOV, EOS, PAD]], dtype=np.int32)

        def unigram(self) -> np.ndarray:
            return np.array([0, 0, 0.1, 0.5, 0.3, 0.1, 0.0])

    r = unigram_baseline_recall(Tiny())
    # 7 non-pad targets: 4 4 5 eos 4 oov eos. Top-1 is oov (1 hit); top-3 is oov, 4, eos/5.
    assert r["recall@1"] == pytest.approx(1 / 7)
    assert r["recall@3"] == pytest.approx(6 / 7)  # oov, 4 x3, and eos x2 (eos beats 5 on ties)
    # Without oov: 6 targets, predictions 4 then eos, 5.
    assert r["recall@1_no_oov"] == pytest.approx(3 / 6)
    assert r["recall@3_no_oov"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"name": "bogus"}, "data.name"),
        ({"ngram_order": 1}, "data.ngram_order"),
        ({"branching": 0}, "data.branching"),
        ({"topic_strength": 1.5}, "data.topic_strength"),
        ({"name": "arrow"}, "data.path"),
    ],
)
def test_bad_data_config_names_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        make_corpus(cfg(**override))
