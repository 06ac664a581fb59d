"""Next-word prediction: the CIFG-LSTM of Hard et al. (2018) on federated text.

Glue between the round and the learning parts: the model (`fleet.learning.model`), the local-training
engine (`fleet.learning.engines`) and the corpus (`fleet.learning.data`). The shard asks for each accepted
device's update in turn; the server evaluates on held-out devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from fleet import rng
from fleet.config import Config
from fleet.learning.data.corpus import make_corpus, unigram_baseline_recall
from fleet.learning.data.vocab import OOV, PAD
from fleet.learning.model import build_model, get_flat, job_flops, model_bytes
from fleet.phones.timing import JobCost

EVAL_BATCH = 256


class NWPTask:
    def __init__(self, cfg: Config, role: str):
        self.cfg = cfg
        self.mcfg = cfg.model
        self.seed = cfg.seed
        self.corpus = make_corpus(cfg)
        if role == "client" and cfg.memorization.groups:
            from fleet.learning.data.canaries import CanaryCorpus

            # Canaries go into training devices' data only; the server never reads the plan.
            self.corpus = CanaryCorpus.from_config(cfg, self.corpus)
        size = model_bytes(self.mcfg)
        self.cost = JobCost(download_bytes=float(size), upload_bytes=float(size))
        self.engine = None
        if role == "client":
            from fleet.learning.engines import make_engine

            self.engine = make_engine(
                self.mcfg,
                self.mcfg.engine,
                gpus=cfg.ray.gpus_per_shard,
                deterministic=cfg.rng == "reproducible",
            )
        self._model = None
        self._baseline: dict[str, float] | None = None

    def init_params(self) -> np.ndarray:
        import torch

        torch.manual_seed(self.seed)
        return get_flat(build_model(self.mcfg))

    def job_flops(self, num_examples: np.ndarray) -> np.ndarray:
        return job_flops(self.mcfg, num_examples, self.cfg.train.client_epochs)

    def cohort_order(self, num_examples: np.ndarray) -> np.ndarray:
        """For a lockstep engine, the cohort by example count: a lockstep group runs as many steps
        as its largest device, so similar devices together waste fewer (measured 1.5-1.7x faster
        on the default fleet's sizes). Other engines keep the sampled order."""
        from fleet.learning.engines import BatchedEngine

        if isinstance(self.engine, BatchedEngine):
            return np.argsort(num_examples, kind="stable")
        return np.arange(len(num_examples))

    def client_updates(
        self, params: np.ndarray, device_ids: np.ndarray, num_examples: np.ndarray, round_idx: int
    ) -> Iterator[tuple[np.ndarray, float]]:
        from fleet.learning.engines import LocalSGD

        t = self.cfg.train
        jobs = (
            (
                self.corpus.examples(int(dev), int(n)),
                rng.device_generator(self.seed, "minibatch_order", round_idx, int(dev)),
            )
            for dev, n in zip(device_ids, num_examples, strict=True)
        )
        return self.engine.train_devices(params, jobs, LocalSGD(t.client_epochs, t.batch_size, t.client_lr))

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """Loss, perplexity and recall@1/@3 (pad excluded; with and without oov) on held-out devices."""
        return evaluate_tokens(self._model_with(params), self.corpus.eval_examples()) | self.baseline()

    def evaluate_devices(
        self, params: np.ndarray, device_ids: np.ndarray, num_examples: np.ndarray
    ) -> dict[str, float]:
        """Metrics on the examples of the given devices (held-out ones: never in the fleet)."""
        if self.corpus.num_devices is not None:
            return {}  # a stored corpus holds data only for its own devices
        tokens = np.concatenate(
            [self.corpus.examples(int(d), int(n)) for d, n in zip(device_ids, num_examples, strict=True)]
        )
        return evaluate_tokens(self._model_with(params), tokens)

    def baseline(self) -> dict[str, float]:
        """The unigram (most-frequent-word) recall the model must beat, once per run."""
        if self._baseline is None:
            self._baseline = {f"unigram_{k}": v for k, v in unigram_baseline_recall(self.corpus).items()}
        return self._baseline

    def _model_with(self, params: np.ndarray) -> Any:
        from fleet.learning.model import set_flat

        if self._model is None:
            self._model = build_model(self.mcfg)
            self._model.eval()
        set_flat(self._model, params)
        return self._model


def evaluate_tokens(model: Any, tokens: np.ndarray) -> dict[str, float]:
    """Next-token metrics of `model` on examples (n, seq_len+1), batched, without autograd."""
    import torch

    loss_sum, counted, hits1, hits3, kept, hits1_no, hits3_no = 0.0, 0, 0, 0, 0, 0, 0
    with torch.no_grad():
        for s in range(0, len(tokens), EVAL_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(tokens[s : s + EVAL_BATCH], dtype=np.int64))
            logits = model(batch[:, :-1])
            target = batch[:, 1:]
            mask = target != PAD
            lp = torch.log_softmax(logits, dim=-1)
            loss_sum += float(-lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].sum())
            counted += int(mask.sum())
            top3 = logits.topk(3, dim=-1).indices
            hit1 = top3[..., 0] == target
            hit3 = (top3 == target.unsqueeze(-1)).any(-1)
            hits1 += int(hit1[mask].sum())
            hits3 += int(hit3[mask].sum())
            # Without oov: oov targets left out, and an oov prediction never counts as a hit.
            no = mask & (target != OOV)
            logits[..., OOV] = -float("inf")
            top3n = logits.topk(3, dim=-1).indices
            kept += int(no.sum())
            hits1_no += int((top3n[..., 0] == target)[no].sum())
            hits3_no += int((top3n == target.unsqueeze(-1)).any(-1)[no].sum())
    loss = loss_sum / max(counted, 1)
    return {
        "eval_loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        "recall@1": hits1 / max(counted, 1),
        "recall@3": hits3 / max(counted, 1),
        "recall@1_no_oov": hits1_no / max(kept, 1),
        "recall@3_no_oov": hits3_no / max(kept, 1),
    }
