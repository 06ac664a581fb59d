"""Secret-sharer canaries as data: the plan of what is planted where, and the corpus that plants it.

The plan names devices, so it lives in its own file (RUN_DIR/canaries/plan.npz): never in the
coordinator, the metrics, the summary or W&B. The shards read it through `CanaryCorpus`, which
substitutes canary sequences into the planted devices' examples as they are read; nothing on
disk is rewritten. `fleet.audits.memorization` draws the plan and audits what the model learnt.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleet import rng
from fleet.atomic import atomic_write_bytes
from fleet.config import Config, ConfigError
from fleet.learning.data.vocab import BOS, EOS, PAD

SUBSTITUTION_STREAM = "canary_substitution"  # which of a planted device's examples carry the canary


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
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> CanaryPlan:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"memorization: no canary plan at {str(path)!r} (a run without canaries?)")
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(seed=int(arrays.pop("seed")), seq_len=int(arrays.pop("seq_len")), **arrays)


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
    def from_config(cls, cfg: Config, base: Any) -> CanaryCorpus:
        """The base corpus with the canaries of the plan that `prepare` wrote for this run."""
        return cls(base, cfg.memorization.plan_path)

    @property
    def plan(self) -> CanaryPlan:
        """The plan, loaded (and checked against the corpus) on first use."""
        if self._plan is None:
            source = self._plan_source
            if not source:
                raise ConfigError(
                    "memorization.plan_path: no canary plan; fleet.runtime.driver.train writes it "
                    "(cfg = fleet.audits.memorization.prepare(cfg, run_dir) when building shards by hand)"
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
