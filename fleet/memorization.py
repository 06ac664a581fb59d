"""Memorization audit: secret-sharer canaries planted in the fleet, exposure and extraction.

Ramaswamy et al. (2020) measured what a production model memorizes by planting canaries in users'
data and auditing the trained model (Carlini et al. 2019, "The Secret Sharer"; Thakkar et al.
2021). This module does the same to the emulated fleet, in three parts:

- **The plan** (`make_plan`, written by `prepare` to RUN_DIR/canaries/plan.npz before the actors
  start). Each canary is a prefix and `secret_words` random secret words; each group's canaries
  go to `devices` devices of their own, chosen uniformly (seeded, by population row) among the
  fleet's eligible devices that hold enough examples to carry `repeats` copies. The plan names
  devices, so it lives in its own file: never in the coordinator, the metrics, the summary or
  W&B. Shards read it; the server never does.
- **Planting** (`CanaryCorpus`): a FederatedCorpus wrapping the real one (synthetic or Arrow),
  substituting canary sequences into the planted devices' examples as they are read, so nothing
  on disk is rewritten and an unplanted device reads exactly what it read before.
- **The audit** (`run_audit`, run when training ends and by `fleet-audit RUN_DIR`): for each canary,
  its log-perplexity (bits over the secret given the prefix), its exposure by rank among R fresh
  candidates, its exposure extrapolated from a skew-normal fitted to sampled candidates, and
  whether beam search from the prefix extracts the secret. Candidates are scored by batched
  forward passes that start from the prefix's state (computed once per prefix), and log-probs
  are gathered, never looped over in Python. Written to RUN_DIR/memorization.json, a CSV by
  group and a plot; `compare` (and `fleet-audit RUN_DIR --compare OTHER...`, and the
  `CompareSweep` Hydra callback of the `memorization` experiment) sets runs side by side.

Exposure by rank: the canary is ranked among itself and R fresh candidates of the same format
(same prefix, secrets drawn as the canary's was), so |R| = R + 1 and exposure = log2|R| - log2
rank, rank = 1 + the number of candidates with lower log-perplexity: 0 for a canary the model
finds least likely, log2(R + 1) for one it prefers to every candidate.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback

from fleet import checkpoint, population, rng
from fleet.config import ConfigError
from fleet.data.vocab import BOS, EOS, NUM_SPECIAL, PAD

PLAN_DIR = "canaries"
PLAN_FILE = "plan.npz"
RESULT_FILE = "memorization.json"
GROUPS_FILE = "memorization.csv"
PLOT_FILE = "memorization.png"
COMPARE_STEM = "memorization_compare"
PLAN_STREAM = "canary_plan"
AUDIT_STREAM = "canary_audit"
SUBSTITUTION_STREAM = "canary_substitution"
# Logit floats per forward pass when scoring candidates (128 MB, twice with the log-softmax):
# 4,096 five-word candidates of the Gboard-size vocabulary, 25,000 of the demo's.
SCORE_FLOATS = 1 << 25
# Population rows built at once when choosing planted devices. Planted rows are scattered, so
# each usually falls in its own chunk; building a row costs a few ms of per-call overhead
# whatever the chunk, so small chunks keep a 10-million-device plan to seconds.
_ROW_CHUNK = 1 << 10
_LN2 = math.log(2.0)


def planted(cfg: Any) -> bool:
    """Whether the config plants canaries (any memorization option but `none`)."""
    return bool(cfg.memorization.groups)


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class CanaryPlan:
    """Which canaries exist and which devices carry them; arrays, saved as one .npz.

    Per canary (k of them): `prefixes` (k, m) and `secrets` (k, n) word ids, `group`, `repeats`
    (0 when the group uses `prob`), `prob` (0 when it uses repeats). Per planted device (P of
    them): `device_ids`, `device_rows` (population row), `device_canary`, `device_insertions`
    (examples the canary replaces there each time the device trains).
    """

    seed: int
    seq_len: int
    prefixes: np.ndarray
    secrets: np.ndarray
    group: np.ndarray
    repeats: np.ndarray
    prob: np.ndarray
    device_ids: np.ndarray
    device_rows: np.ndarray
    device_canary: np.ndarray
    device_insertions: np.ndarray

    @property
    def num_canaries(self) -> int:
        return len(self.secrets)

    def insertions(self) -> np.ndarray:
        """Examples carrying each canary, over all its devices (one training pass of each)."""
        return np.bincount(self.device_canary, self.device_insertions, self.num_canaries).astype(np.int64)

    def devices(self) -> np.ndarray:
        """Devices carrying each canary."""
        return np.bincount(self.device_canary, minlength=self.num_canaries)

    def sequences(self) -> np.ndarray:
        """Each canary as an example: [bos, prefix, secret, eos, pad...], int32 (k, seq_len+1)."""
        out = np.full((self.num_canaries, self.seq_len + 1), PAD, dtype=np.int32)
        m, n = self.prefixes.shape[1], self.secrets.shape[1]
        out[:, 0] = BOS
        out[:, 1 : 1 + m] = self.prefixes
        out[:, 1 + m : 1 + m + n] = self.secrets
        out[:, 1 + m + n] = EOS
        return out

    def positions(self, canary: int, device_id: int, n: int) -> np.ndarray:
        """Which of a planted device's n examples the canary replaces (bool, prefix-stable).

        Repeats: the first r, which is as good as any r since local training visits examples in
        a fresh random order each round. Probability: each example independently, keyed by
        (seed, device id, example index), so the device's examples are the same at every read.
        """
        if self.repeats[canary] > 0:
            return np.arange(n) < self.repeats[canary]
        u = rng.uniform(self.seed, SUBSTITUTION_STREAM, device_id, np.arange(n, dtype=np.int64))
        return u < self.prob[canary]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in vars(self).items()})
        checkpoint.atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> CanaryPlan:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"memorization: no canary plan at {str(path)!r} (a run without canaries?)")
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(seed=int(arrays.pop("seed")), seq_len=int(arrays.pop("seq_len")), **arrays)


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


def make_plan(cfg: Any, corpus: Any) -> CanaryPlan:
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
    cfg: Any, corpus: Any, g: np.random.Generator, demands: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct devices for each demand (count, minimum examples), in demand order.

    Rows are visited in one seeded random order, looked up a block at a time; each demand takes
    the first unused eligible rows with enough examples. So each canary's devices are uniform
    among the qualifying devices, and only the rows looked at are ever built (a 10-million
    device fleet costs a permutation and a block, not the whole table).
    Returns (rows, device ids, example counts), concatenated in demand order.
    """
    from fleet.shard import fleet_size

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


def _row_info(cfg: Any, corpus: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(device id, examples, eligible) of population rows, as the shards build them.

    Mirrors `ShardCore.__init__`: a Parquet population or the generated one, with an Arrow
    corpus's own ids and counts when the corpus defines the fleet.
    """
    from fleet.shard import corpus_defines_devices

    f = cfg.fleet
    ids = np.zeros(len(rows), dtype=np.int64)
    counts = np.zeros(len(rows), dtype=np.int64)
    eligible = np.zeros(len(rows), dtype=bool)
    chunk = rows // _ROW_CHUNK
    for c in np.unique(chunk):
        sel = np.flatnonzero(chunk == c)
        lo, hi = int(rows[sel].min()), int(rows[sel].max()) + 1
        if f.path:
            cols = population.load(f.path, lo, hi, f.availability.model)
        else:
            cols = population.generate(f, cfg.seed, lo, hi)
        c_ids, c_counts = cols["device_id"], cols["num_examples"]
        if corpus_defines_devices(cfg):
            c_ids, c_counts = corpus.device_table(lo, hi)
        at = rows[sel] - lo
        ids[sel], counts[sel] = c_ids[at], c_counts[at]
        eligible[sel] = cols["memory_bytes"][at] >= f.min_memory_gb * population.GB
    return ids, counts, eligible


def plan_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / PLAN_DIR / PLAN_FILE


def prepare(cfg: Any, run_dir: str | Path) -> Path | None:
    """Before the actors start: write the run's canary plan (once; a resumed run keeps its plan)
    and point the shards at it through `memorization.plan_path`. None without canaries."""
    if not planted(cfg):
        return None
    path = plan_file(run_dir)
    if not path.exists():
        from fleet.data.corpus import make_corpus

        make_plan(cfg, make_corpus(cfg)).save(path)
    cfg.memorization.plan_path = str(path)
    return path


# ---- planting --------------------------------------------------------------------------------
class CanaryCorpus:
    """A FederatedCorpus that reads `base` and substitutes canaries into planted devices' examples.

    Only training examples change: held-out examples, the unigram and the vocabulary are the base
    corpus's, so evaluation and baselines are what they would be without canaries.
    """

    def __init__(self, base: Any, plan: CanaryPlan | str | Path | None):
        """`plan`, or the path of its file, read when the first training example is: a shard
        rebuilt only for its state (the participation audit) then never needs it."""
        self.base = base
        self.vocab_size = base.vocab_size
        self.seq_len = base.seq_len
        self.num_devices = base.num_devices
        self._plan_source = plan
        self._plan: CanaryPlan | None = None
        self._sequences = np.zeros((0, self.seq_len + 1), dtype=np.int32)
        self._canary_of: dict[int, int] = {}

    @classmethod
    def from_config(cls, cfg: Any, base: Any) -> CanaryCorpus:
        """The base corpus with the canaries of the plan that `prepare` wrote for this run."""
        return cls(base, cfg.memorization.plan_path)

    @property
    def plan(self) -> CanaryPlan:
        """The plan, loaded (and checked against the corpus) on first use."""
        if self._plan is None:
            source = self._plan_source
            if not source:
                raise ConfigError(
                    "memorization.plan_path: no canary plan; fleet.run.train writes it "
                    "(fleet.memorization.prepare(cfg, run_dir) when building shards by hand)"
                )
            plan = source if isinstance(source, CanaryPlan) else CanaryPlan.load(source)
            if plan.seq_len != self.seq_len:
                raise ConfigError(f"memorization: the plan is for seq_len {plan.seq_len}, not {self.seq_len}")
            self._sequences = plan.sequences()
            pairs = zip(plan.device_ids, plan.device_canary, strict=True)
            self._canary_of = {int(d): int(c) for d, c in pairs}
            self._plan = plan
        return self._plan

    def examples(self, device_id: int, n: int | None = None) -> np.ndarray:
        """The base corpus's examples, with the canary in its positions on a planted device."""
        out = self.base.examples(device_id, n)
        plan = self.plan
        canary = self._canary_of.get(int(device_id))
        if canary is None:
            return out
        out = out.copy()  # the base may hand out a cached or read-only buffer
        out[plan.positions(canary, int(device_id), len(out))] = self._sequences[canary]
        return out

    def num_examples(self, device_ids: np.ndarray) -> np.ndarray | None:
        return self.base.num_examples(device_ids)

    def eval_examples(self) -> np.ndarray:
        return self.base.eval_examples()

    def unigram(self) -> np.ndarray:
        return self.base.unigram()

    def vocab(self) -> list[str]:
        return self.base.vocab()

    def device_table(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The Arrow corpus's device index (the shards build an Arrow-defined fleet from it)."""
        return self.base.device_table(start, stop)


# ---- scoring ---------------------------------------------------------------------------------
def _run(model: Any, tokens: Any, r: Any, c: Any) -> tuple[Any, Any, Any]:
    """Feed tokens (b, t) through the cell from state (r, c); outputs (b, t, proj) and the state."""
    import torch

    gx = torch.nn.functional.embedding(tokens, model.embedding) @ model.w_x + model.bias
    outs = []
    for step in range(tokens.shape[1]):
        r, c, _ = model.cell(gx[:, step], r, c)
        outs.append(r)
    return (torch.stack(outs, dim=1) if outs else gx.new_zeros(len(tokens), 0, r.shape[1])), r, c


def _context_state(model: Any, prefixes: np.ndarray) -> tuple[Any, Any]:
    """The state after [bos, prefix] for each row of prefixes (k, m): what predicts the secret."""
    import torch

    tokens = torch.from_numpy(np.concatenate([np.full((len(prefixes), 1), BOS), prefixes], axis=1))
    shape = model.shape
    r = torch.zeros(len(prefixes), shape.proj_dim)
    c = torch.zeros(len(prefixes), shape.hidden_dim)
    _, r, c = _run(model, tokens.long(), r, c)
    return r, c


def log_perplexity(
    model: Any, prefix: np.ndarray, secrets: np.ndarray, batch: int | None = None
) -> np.ndarray:
    """Bits: sum over each secret's words of -log2 P(word | bos, prefix, earlier words).

    `model` is an NWPModel; secrets (N, n) share one prefix (m,). The prefix is run once; each
    batch of secrets (default: `SCORE_FLOATS` logits) is one pass of n-1 cell steps from its
    state, one logits matmul over all positions and one gather: no Python per candidate.
    """
    import torch

    secrets = np.asarray(secrets)
    batch = batch or max(1, SCORE_FLOATS // (secrets.shape[1] * model.embedding.shape[0]))
    out = np.empty(len(secrets), dtype=np.float64)
    with torch.no_grad():
        r0, c0 = _context_state(model, np.asarray(prefix, dtype=np.int64)[None, :])
        for s in range(0, len(secrets), batch):
            sec = torch.from_numpy(np.ascontiguousarray(secrets[s : s + batch], dtype=np.int64))
            b = len(sec)
            r, c = r0.expand(b, -1), c0.expand(b, -1)
            outs, _, _ = _run(model, sec[:, :-1], r, c)
            states = torch.cat([r[:, None, :], outs], dim=1)  # predicts word j from words < j
            logp = torch.log_softmax(states @ model.embedding.t(), dim=-1)
            out[s : s + b] = -logp.gather(-1, sec[..., None])[..., 0].sum(1).double().numpy() / _LN2
    return out


def exposure_by_rank(canary: float, references: np.ndarray) -> tuple[int, float]:
    """(rank, exposure) of a canary's log-perplexity among R candidates' (|R| = R + 1)."""
    rank = 1 + int(np.count_nonzero(np.asarray(references) < canary))
    return rank, math.log2(len(references) + 1) - math.log2(rank)


def fit_skewnorm(samples: np.ndarray) -> tuple[float, float, float, float, float]:
    """Skew-normal fitted to candidates' log-perplexities: (shape, loc, scale) on standardised
    values and the (mean, std) used to standardise them (the fit is better conditioned there)."""
    from scipy import stats

    mu, sd = float(np.mean(samples)), float(np.std(samples)) or 1.0
    a, loc, scale = stats.skewnorm.fit((samples - mu) / sd)
    return float(a), float(loc), float(scale), mu, sd


def exposure_extrapolated(canary: float, fit: tuple[float, float, float, float, float]) -> float:
    """-log2 CDF of the fitted skew-normal at the canary's log-perplexity (log CDF: no underflow)."""
    from scipy import stats

    a, loc, scale, mu, sd = fit
    return float(-stats.skewnorm.logcdf((canary - mu) / sd, a, loc, scale) / _LN2)


def beam_search(model: Any, prefixes: np.ndarray, length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The `width` most likely word sequences of `length` after each prefix, all prefixes at once.

    Only words are generated (a secret is words). Returns tokens (k, width, length), best
    first, and their log-probabilities (k, width) in bits.
    """
    import torch

    k = len(prefixes)
    emb = model.embedding
    words = emb.shape[0] - NUM_SPECIAL
    width = min(width, words)
    with torch.no_grad():
        r, c = _context_state(model, np.asarray(prefixes, dtype=np.int64))
        seqs = torch.zeros(k, width, 0, dtype=torch.long)
        score = torch.zeros(k, 1)
        for step in range(length):
            if step:
                gx = emb[seqs[:, :, -1].reshape(-1)] @ model.w_x + model.bias
                r, c, _ = model.cell(gx, r, c)
            logp = torch.log_softmax(r @ emb.t(), dim=-1)[:, NUM_SPECIAL:].reshape(k, -1, words)
            total = (score[:, :, None] + logp).reshape(k, -1)
            score, best = total.topk(width, dim=1)
            beam, word = best // words, best % words + NUM_SPECIAL
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, step)), word[..., None]], dim=2)
            pick = (torch.arange(k)[:, None] * (r.shape[0] // k) + beam).reshape(-1)
            r, c = r[pick], c[pick]
    return seqs.numpy().astype(np.int32), score.double().numpy() / _LN2


# ---- the audit -------------------------------------------------------------------------------
def load_weights(run_dir: Path) -> tuple[np.ndarray, int]:
    """The final server weights of a run (its last checkpoint) and that checkpoint's round."""
    saved = checkpoint.load_coordinator(run_dir / checkpoint.STATE_DIR)
    if saved is None:
        raise ConfigError(f"RUN_DIR: no checkpoint in {str(run_dir)!r} (state/{checkpoint.COORDINATOR_FILE})")
    return np.asarray(saved["server"]["weights"], dtype=np.float32), int(saved["round"])


def times_trained(run_dir: Path, rows: np.ndarray, committed: int) -> np.ndarray | None:
    """How many rounds each planted row trained in, from the shards' checkpoint (None if absent).

    The same row-aligned state the participation audit reads; only counts per canary leave it.
    """
    state_dir = run_dir / checkpoint.STATE_DIR
    name = re.compile(rf"shard_(\d+)_(\d+)_r{committed}\.npz")
    out = np.full(len(rows), -1, dtype=np.int64)
    for p in state_dir.glob(f"shard_*_r{committed}.npz"):
        m = name.fullmatch(p.name)
        if m is None:
            continue
        start, stop = int(m.group(1)), int(m.group(2))
        state = checkpoint.load_shard(state_dir, start, stop, committed)
        inside = (rows >= start) & (rows < stop)
        out[inside] = state["participations"][rows[inside] - start]
    return None if np.any(out < 0) else out


def _one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` with PyTorch on one thread, restoring the caller's setting afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_one_thread
def measure(
    model: Any,
    prefixes: np.ndarray,
    secrets: np.ndarray,
    word_p: np.ndarray,
    references: int,
    samples: int,
    beam_width: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Exposure and extraction of canaries (prefixes (k, m), secrets (k, n)) under a model.

    Candidates are fresh secrets drawn from `word_p` (as the canaries' were), one set shared by
    every prefix and scored once per distinct prefix: the first `references` rank each canary,
    the first `samples` fit the skew-normal. Returns per-canary arrays: log_perplexity (bits),
    rank, exposure, exposure_extrapolated, extracted (top beam is the secret), extracted_top_b
    (the secret is among the `beam_width` beams) and top_beam (its words).

    Runs on one thread: the batches are narrow matmuls and elementwise gate math, where a second
    thread gains little and, on a busy 2-core machine, was measured to make scoring 65,536
    candidates 15x slower (23 s against 1.6 s).
    """
    g = np.random.default_rng(seed)
    candidates = draw_words(g, word_p, (max(references, samples), secrets.shape[1]))
    k = len(secrets)
    out = {
        "log_perplexity": np.zeros(k),
        "rank": np.zeros(k, dtype=np.int64),
        "exposure": np.zeros(k),
        "exposure_extrapolated": np.zeros(k),
    }
    unique, which = np.unique(prefixes, axis=0, return_inverse=True)
    which = np.asarray(which).reshape(-1)
    for u, prefix in enumerate(unique):
        mine = np.flatnonzero(which == u)
        cand = log_perplexity(model, prefix, candidates)
        fit = fit_skewnorm(cand[:samples])
        out["log_perplexity"][mine] = log_perplexity(model, prefix, secrets[mine])
        for c in mine:
            lp = out["log_perplexity"][c]
            out["rank"][c], out["exposure"][c] = exposure_by_rank(lp, cand[:references])
            out["exposure_extrapolated"][c] = exposure_extrapolated(lp, fit)
    beams, _ = beam_search(model, prefixes, secrets.shape[1], beam_width)
    out["extracted"] = np.all(beams[:, 0] == secrets, axis=1)
    out["extracted_top_b"] = np.any(np.all(beams == secrets[:, None, :], axis=2), axis=1)
    out["top_beam"] = beams[:, 0]
    return out


def run_audit(run_dir: str | Path, cfg: Any, figures: bool = True) -> dict:
    """Audit the final model of a run with canaries; writes memorization.json/.csv/.png there.

    R, the samples and the beam width are cfg.memorization's (change them on a copy of the
    run's config to audit again differently). When a W&B run is active (the end of
    `fleet.run.train`), the figures and a few aggregates are logged to it. Returns the result.
    """
    from fleet.data.corpus import make_corpus
    from fleet.model import build_model, set_flat
    from fleet.tracking import write_json

    run_dir = Path(run_dir)
    m = cfg.memorization
    references, samples, beam_width = m.references, m.samples, m.beam_width
    plan = CanaryPlan.load(plan_file(run_dir))
    weights, committed = load_weights(run_dir)
    model = build_model(cfg.model)
    set_flat(model, weights)
    model.eval()
    corpus = make_corpus(cfg)
    vocab = corpus.vocab()

    seed = int(np.random.SeedSequence([cfg.seed, rng.stream_id(AUDIT_STREAM)]).generate_state(1)[0])
    word_p = word_distribution(corpus, m.secret_dist)
    got = measure(model, plan.prefixes, plan.secrets, word_p, references, samples, beam_width, seed)
    trained = times_trained(run_dir, plan.device_rows, committed)
    devices, insertions = plan.devices(), plan.insertions()

    def words(ids: np.ndarray) -> str:
        return " ".join(vocab[int(i)] for i in ids)

    canaries = []
    for c in range(plan.num_canaries):
        row = {
            "canary": c,
            "group": int(plan.group[c]),
            "devices": int(devices[c]),
            "repeats": int(plan.repeats[c]) if plan.repeats[c] else None,
            "prob": float(plan.prob[c]) if not plan.repeats[c] else None,
            "insertions": int(insertions[c]),
            "log_perplexity": float(got["log_perplexity"][c]),
            "rank": int(got["rank"][c]),
            "exposure": float(got["exposure"][c]),
            "exposure_extrapolated": float(got["exposure_extrapolated"][c]),
            "extracted": bool(got["extracted"][c]),
            "extracted_top_b": bool(got["extracted_top_b"][c]),
            "prefix": words(plan.prefixes[c]),
            "secret": words(plan.secrets[c]),
            "top_beam": words(got["top_beam"][c]),
        }
        if trained is not None:
            mine = plan.device_canary == c
            row["devices_trained"] = int(np.count_nonzero(trained[mine]))
            row["times_trained"] = int((trained[mine] * plan.device_insertions[mine]).sum())
        canaries.append(row)
    result = {
        "run_dir": str(run_dir),
        "label": run_label(run_dir, cfg),
        "round": committed,
        "references": references,
        "max_exposure": math.log2(references + 1),
        "samples": samples,
        "beam_width": beam_width,
        "secret_words": int(plan.secrets.shape[1]),
        "secret_dist": m.secret_dist,
        "canaries": canaries,
        "groups": group_table(canaries),
    }
    write_json(run_dir / RESULT_FILE, result)
    write_csv(run_dir / GROUPS_FILE, result["groups"])
    if figures:
        figs = memorization_figures(result)
        figs["memorization/exposure"].savefig(run_dir / PLOT_FILE, dpi=100)
        log_to_wandb(result, figs)
    return result


GROUP_FIELDS = (
    "group",
    "devices",
    "repeats",
    "prob",
    "canaries",
    "insertions",
    "times_trained",
    "log_perplexity",
    "exposure",
    "exposure_min",
    "exposure_max",
    "exposure_extrapolated",
    "extracted",
    "extracted_top_b",
)


def group_table(canaries: list[dict]) -> list[dict]:
    """One row per group (`GROUP_FIELDS`): its setting, mean exposures, how many were extracted.

    times_trained (canary examples the fleet trained on, mean per canary) is None when the run's
    checkpoint lacks the shards' participation state.
    """
    out = []
    for g in sorted({c["group"] for c in canaries}):
        rows = [c for c in canaries if c["group"] == g]
        row = {
            "group": g,
            "devices": rows[0]["devices"],
            "repeats": rows[0]["repeats"],
            "prob": rows[0]["prob"],
            "canaries": len(rows),
            "insertions": float(np.mean([c["insertions"] for c in rows])),
            "log_perplexity": float(np.mean([c["log_perplexity"] for c in rows])),
            "exposure": float(np.mean([c["exposure"] for c in rows])),
            "exposure_min": float(np.min([c["exposure"] for c in rows])),
            "exposure_max": float(np.max([c["exposure"] for c in rows])),
            "exposure_extrapolated": float(np.mean([c["exposure_extrapolated"] for c in rows])),
            "extracted": sum(c["extracted"] for c in rows),
            "extracted_top_b": sum(c["extracted_top_b"] for c in rows),
            "times_trained": (
                float(np.mean([c["times_trained"] for c in rows])) if "times_trained" in rows[0] else None
            ),
        }
        out.append({k: row[k] for k in GROUP_FIELDS})
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    checkpoint.atomic_write_bytes(path, buf.getvalue().encode())


def run_label(run_dir: Path, cfg: Any) -> str:
    """`no DP`, or the privacy option, noise multiplier and the last epsilon in metrics.jsonl
    (the audit at the end of training runs before summary.json is written)."""
    if not cfg.privacy.enabled:
        return "no DP"
    eps = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for text in metrics.read_text().splitlines():
            try:
                eps = json.loads(text).get("epsilon") or eps
            except json.JSONDecodeError:
                break  # a torn last line from a crash
    return f"{cfg.privacy.name} z={cfg.privacy.noise_multiplier:g}" + (f" eps={eps:.3g}" if eps else "")


# ---- figures, W&B, comparison ----------------------------------------------------------------
def _exposure_axes(ax: Any, max_exposure: float, highest: float) -> None:
    """Log x, the log2|R| ceiling of exposure by rank dashed, room for extrapolated values above."""
    ax.axhline(max_exposure, color="0.5", ls="--", lw=1)
    ax.set(xscale="log", xlabel="devices x repeats (examples carrying the canary)", ylabel="exposure (bits)")
    ax.set_ylim(bottom=-0.5, top=max(max_exposure, highest) * 1.08 + 0.5)


def memorization_figures(result: dict) -> dict[str, Any]:
    """The audit's plot as a matplotlib Figure (no pyplot), by W&B media key.

    Exposure by rank (circles) and extrapolated (crosses) against devices x repeats; a filled
    circle is a canary that beam search extracted; the dashed line is log2|R|.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    cs = result["canaries"]
    x = np.array([max(c["insertions"], 1) for c in cs], dtype=float)
    jitter = np.exp(0.06 * (np.arange(len(cs)) % 5 - 2))  # canaries of a group side by side
    ex = np.array([c["extracted"] for c in cs], dtype=bool)
    y = np.array([c["exposure"] for c in cs])
    y_ext = np.array([c["exposure_extrapolated"] for c in cs])
    ax.scatter(x * jitter, y, facecolors=np.where(ex, "C0", "none"), edgecolors="C0", label="exposure (rank)")
    ax.scatter(x * jitter, y_ext, marker="x", color="C1", label="exposure (skew-normal)")
    _exposure_axes(ax, result["max_exposure"], float(np.max(y_ext, initial=0.0)))
    ax.set_title(f"{result['label']}: canary exposure (filled: extracted)")
    ax.legend(loc="upper left", fontsize=8)
    return {"memorization/exposure": fig}


def log_to_wandb(result: dict, figs: dict[str, Any]) -> bool:
    """Log the figures and aggregates to the active W&B run, if there is one (no import otherwise)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return False
    from PIL import Image

    from fleet.report import png_bytes

    media = {k: wandb.Image(Image.open(io.BytesIO(png_bytes(f)))) for k, f in figs.items()}
    wandb.run.log(media)
    cs = result["canaries"]
    wandb.run.summary["memorization/extracted"] = sum(c["extracted"] for c in cs)
    wandb.run.summary["memorization/max_exposure"] = max(c["exposure"] for c in cs)
    for g in result["groups"]:
        for key in ("devices", "exposure", "exposure_extrapolated", "extracted"):
            wandb.run.summary[f"memorization/group{g['group']}/{key}"] = g[key]
    return True


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> dict:
    """Set audited runs side by side: a table by (run, group) and one plot, written to out_dir
    (default: the runs' common parent, the sweep dir for a multirun) as memorization_compare.*."""
    results = []
    for d in run_dirs:
        path = Path(d) / RESULT_FILE
        if not path.exists():
            raise ConfigError(f"RUN_DIR: no {RESULT_FILE} in {str(d)!r}; run fleet-audit {d} first")
        results.append(json.loads(path.read_text()))
    out = Path(out_dir) if out_dir else _common_parent([Path(d) for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"run": r["label"], **{k: g.get(k) for k in GROUP_FIELDS}} for r in results for g in r["groups"]]
    write_csv(out / f"{COMPARE_STEM}.csv", rows)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(results):
        gs = r["groups"]
        x = [max(g["insertions"], 1) for g in gs]
        ax.plot(x, [g["exposure"] for g in gs], "o-", color=f"C{i}", label=f"{r['label']}: rank")
        y_ext = [g["exposure_extrapolated"] for g in gs]
        ax.plot(x, y_ext, "x:", color=f"C{i}", label=f"{r['label']}: skew-normal")
        for g in gs:
            if g["extracted"]:
                ax.annotate(
                    f"{g['extracted']}/{g['canaries']}",
                    (max(g["insertions"], 1), g["exposure"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=f"C{i}",
                )
    highest = max(g["exposure_extrapolated"] for r in results for g in r["groups"])
    _exposure_axes(ax, max(r["max_exposure"] for r in results), highest)
    ax.set_title("mean canary exposure by group (labels: canaries extracted)")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(out / f"{COMPARE_STEM}.png", dpi=100)
    return {"out_dir": str(out), "rows": rows, "text": compare_text(rows)}


def _common_parent(dirs: list[Path]) -> Path:
    import os

    common = Path(os.path.commonpath([d.resolve() for d in dirs]))
    return common.parent if len(dirs) == 1 else common


def compare_text(rows: list[dict]) -> str:
    """The comparison as a fixed-width table, one line per (run, group)."""
    cols = ("devices", "repeats", "inserted", "exposure", "extrap", "extracted")
    lines = [f"{'run':<28} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in cols)]
    for r in rows:
        rep = r["repeats"] if r["repeats"] is not None else f"p={r['prob']:g}"
        lines.append(
            f"{r['run'][:28]:<28} {r['devices']:>7} {rep!s:>7} {r['insertions']:>8.0f} {r['exposure']:>8.2f} "
            f"{r['exposure_extrapolated']:>7.2f} {r['extracted']:>4}/{r['canaries']:<4}"
        )
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """One run's audit by group, for the console."""
    rows = [{"run": result["label"], **g} for g in result["groups"]]
    return compare_text(rows) + f"\n(max exposure log2|R| = {result['max_exposure']:.2f} bits)"


def cli(run_dir: Path, args: Any) -> int:
    """`fleet-audit RUN_DIR [--compare RUN_DIR...]`: audit a run (again), or compare runs.

    Alone, RUN_DIR's final model is audited and the table printed. With --compare, runs that
    have no memorization.json yet are audited first, then all are set side by side in their
    common parent (the sweep dir of a multirun).
    """
    from fleet.run import config_from_dict

    others = [Path(d) for d in (getattr(args, "compare", None) or [])]
    figures = not getattr(args, "no_figures", False)
    for d in [run_dir, *others]:
        if others and (d / RESULT_FILE).exists():
            continue
        config_file = d / checkpoint.CONFIG_FILE
        if not config_file.exists():
            raise ConfigError(f"RUN_DIR: no {checkpoint.CONFIG_FILE} in {str(d)!r} (not a fleet run)")
        cfg = config_from_dict(json.loads(config_file.read_text()))
        if not planted(cfg):
            raise ConfigError(f"RUN_DIR: {str(d)!r} was trained without canaries (memorization=none)")
        result = run_audit(d, cfg, figures=figures)
        if not others:
            print(summary_text(result))
            print(f"written to {d / RESULT_FILE}, {GROUPS_FILE}" + (f", {PLOT_FILE}" if figures else ""))
    if others:
        out = compare([run_dir, *others])
        print(out["text"])
        print(f"written to {Path(out['out_dir']) / COMPARE_STEM}.csv and .png")
    return 0


class CompareSweep(Callback):
    """Hydra callback: when a multirun ends, compare the audited runs in its sweep dir.

    The `memorization` experiment registers it, so `fleet-train +experiment=memorization
    --multirun` leaves SWEEP_DIR/memorization_compare.{csv,png} and prints the table.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = sorted((p.parent for p in sweep.glob(f"*/{RESULT_FILE}")), key=lambda p: p.name)
        if runs:
            print(compare(runs, sweep)["text"])
            print(f"comparison written to {sweep / COMPARE_STEM}.csv and .png")
