"""The canary plan: which canaries, and which devices carry them (drawn before the actors start)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fleet import rng
from fleet.config import Config, ConfigError
from fleet.learning.data.canaries import CanaryPlan
from fleet.learning.data.vocab import NUM_SPECIAL
from fleet.round.devices import device_columns, memory_eligible

PLAN_DIR = "canaries"
PLAN_FILE = "plan.npz"
RESULT_FILE = "memorization.json"
GROUPS_FILE = "memorization.csv"
PLOT_FILE = "memorization.png"
COMPARE_STEM = "memorization_compare"
PLAN_STREAM = "canary_plan"
AUDIT_STREAM = "canary_audit"

# Population rows built at once when choosing planted devices. Planted rows are scattered, so
# each usually falls in its own chunk; building a row costs a few ms of per-call overhead
# whatever the chunk, so small chunks keep a 10-million-device plan to seconds.
_ROW_CHUNK = 1 << 10


def planted(cfg: Config) -> bool:
    """Whether the config plants canaries (any memorization option but `none`)."""
    return bool(cfg.memorization.groups)


def word_distribution(corpus: Any, dist: str) -> np.ndarray:
    """Probabilities over the V words (index i is token id i + 4) that secrets are drawn from."""
    if dist == "uniform":
        return np.full(corpus.vocab_size, 1.0 / corpus.vocab_size)
    p = np.asarray(corpus.unigram(), dtype=np.float64)[NUM_SPECIAL:]
    if p.sum() <= 0:
        raise ConfigError("memorization.secret_dist: the corpus unigram has no words; use uniform")
    return p / p.sum()


def draw_words(g: np.random.Generator, p: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Word token ids (int32) of the given shape, i.i.d. from the word distribution p."""
    idx = np.searchsorted(np.cumsum(p), g.random(shape), side="right")
    return (np.minimum(idx, len(p) - 1) + NUM_SPECIAL).astype(np.int32)


def make_plan(cfg: Config, corpus: Any) -> CanaryPlan:
    """Draw the canaries and their devices, reproducibly from (seed, config)."""
    m = cfg.memorization
    g = np.random.default_rng([cfg.seed, rng.stream_id(PLAN_STREAM)])
    p = word_distribution(corpus, m.secret_dist)
    k = sum(grp.canaries for grp in m.groups)
    if m.prefix:
        prefixes = np.tile(_word_ids(corpus, m.prefix), (k, 1))
    else:
        prefixes = draw_words(g, p, (k, m.prefix_words))
    secrets = draw_words(g, p, (k, m.secret_words))
    group = np.repeat(np.arange(len(m.groups)), [grp.canaries for grp in m.groups]).astype(np.int32)
    repeats = np.array([0 if m.groups[i].prob is not None else m.groups[i].repeats for i in group])
    prob = np.array([m.groups[i].prob or 0.0 for i in group], dtype=np.float64)
    demands = [(m.groups[i].devices, max(int(repeats[c]), 1)) for c, i in enumerate(group)]
    rows, ids, counts = _choose_devices(cfg, corpus, g, demands)
    plan = CanaryPlan(
        seed=int(cfg.seed),
        seq_len=int(cfg.model.seq_len),
        prefixes=prefixes,
        secrets=secrets,
        group=group,
        repeats=repeats.astype(np.int32),
        prob=prob,
        device_ids=ids,
        device_rows=rows,
        device_canary=np.repeat(np.arange(k), [d for d, _ in demands]).astype(np.int32),
        device_insertions=np.zeros(len(rows), dtype=np.int64),
    )
    for j, (c, dev, n) in enumerate(zip(plan.device_canary, ids, counts, strict=True)):
        plan.device_insertions[j] = int(plan.positions(int(c), int(dev), int(n)).sum())
    return plan


def _word_ids(corpus: Any, words: Sequence[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(corpus.vocab())}
    ids = []
    for w in words:
        if index.get(w, -1) < NUM_SPECIAL:
            raise ConfigError(f"memorization.prefix: {w!r} is not a word of the corpus vocabulary")
        ids.append(index[w])
    return np.asarray(ids, dtype=np.int32)


def _choose_devices(
    cfg: Config, corpus: Any, g: np.random.Generator, demands: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct devices for each demand (count, minimum examples), in demand order.

    Rows are visited in one seeded random order, looked up a block at a time; each demand takes
    the first unused eligible rows with enough examples. So each canary's devices are uniform
    among the qualifying devices, and only the rows looked at are ever built (a 10-million
    device fleet costs a permutation and a block, not the whole table).
    Returns (rows, device ids, example counts), concatenated in demand order.
    """
    from fleet.round.devices import fleet_size

    pop = fleet_size(cfg)
    total = sum(d for d, _ in demands)
    if total > pop:
        raise ConfigError(f"memorization.groups: {total} planted devices needed, the fleet has {pop}")
    order = g.permutation(pop)
    block = total + total // 4 + 64  # most devices qualify: one block usually suffices
    seen = 0
    rows = np.zeros(0, dtype=np.int64)
    ids = np.zeros(0, dtype=np.int64)
    counts = np.zeros(0, dtype=np.int64)
    used = np.zeros(0, dtype=bool)
    picked: list[np.ndarray] = []
    for need, min_examples in demands:
        while True:
            free = np.flatnonzero(~used & (counts >= min_examples))
            if len(free) >= need:
                break
            if seen >= pop:
                raise ConfigError(
                    f"memorization.groups: not enough eligible devices with >= {min_examples} examples "
                    f"for the canaries (population {pop})"
                )
            more = order[seen : seen + block]
            seen += len(more)
            more_ids, more_counts, eligible = _row_info(cfg, corpus, more)
            rows = np.concatenate([rows, more[eligible]])
            ids = np.concatenate([ids, more_ids[eligible]])
            counts = np.concatenate([counts, more_counts[eligible]])
            used = np.concatenate([used, np.zeros(int(eligible.sum()), dtype=bool)])
        take = free[:need]
        used[take] = True
        picked.append(take)
    sel = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return rows[sel], ids[sel], counts[sel]


def _row_info(cfg: Config, corpus: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(device id, examples, eligible) of population rows, as the shards build them.

    Read as the shards read them (`device_columns`), a few rows at a time.
    """
    f = cfg.fleet
    ids = np.zeros(len(rows), dtype=np.int64)
    counts = np.zeros(len(rows), dtype=np.int64)
    eligible = np.zeros(len(rows), dtype=bool)
    chunk = rows // _ROW_CHUNK
    for c in np.unique(chunk):
        sel = np.flatnonzero(chunk == c)
        lo, hi = int(rows[sel].min()), int(rows[sel].max()) + 1
        cols = device_columns(cfg, lo, hi, corpus)
        at = rows[sel] - lo
        ids[sel], counts[sel] = cols["device_id"][at], cols["num_examples"][at]
        eligible[sel] = memory_eligible(f, cols)[at]
    return ids, counts, eligible


def plan_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / PLAN_DIR / PLAN_FILE


def prepare(cfg: Config, run_dir: str | Path) -> Config:
    """Before the actors start: write the run's canary plan (once; a resumed run keeps its plan).
    Returns the config the actors get: a copy whose `memorization.plan_path` points at the plan
    (the validated config itself is never written); `cfg` as it is without canaries."""
    if not planted(cfg):
        return cfg
    path = plan_file(run_dir)
    if not path.exists():
        from fleet.learning.data.corpus import make_corpus

        make_plan(cfg, make_corpus(cfg)).save(path)
    return replace(cfg, memorization=replace(cfg.memorization, plan_path=str(path)))
