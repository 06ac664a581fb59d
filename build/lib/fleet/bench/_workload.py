"""Workload W1: the model, the devices' data and the fleet configuration the training benchmark
uses (its definition is in `fleet.bench.train`'s docstring)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from fleet import rng
from fleet.config import (
    AvailabilityConfig,
    Config,
    DataConfig,
    FleetConfig,
    ModelConfig,
    PrivacyConfig,
    RayConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from fleet.learning.engines import LocalSGD, make_engine
from fleet.learning.model import SPECIAL_TOKENS, build_model, get_flat, job_flops, model_bytes
from fleet.phones.timing import JobCost

VOCAB = 10_000  # W1 counts every token id; our model adds SPECIAL_TOKENS, so we ask for fewer words


EXAMPLES = 64


SEQ_LEN = 20


ZIPF_A = 1.2


MIB = 1024**2


def w1_model() -> ModelConfig:
    return ModelConfig(
        name="w1_lstm",
        cell="lstm",
        vocab_size=VOCAB - SPECIAL_TOKENS,
        embed_dim=96,
        hidden_dim=670,
        proj_dim=96,
        seq_len=SEQ_LEN,
        engine="auto",
        init_scale=0.1,
    )


def update_gflop() -> float:
    """FLOPs of one client update (64 sequences, one epoch): the 11.82 GFLOP of W1."""
    return float(job_flops(w1_model(), np.array([EXAMPLES]), 1)[0]) / 1e9


def w1_tokens(device_id: int) -> np.ndarray:
    """Device i's 64 sequences of 21 token ids, exactly as W1 defines them."""
    return np.minimum(
        np.random.default_rng(int(device_id)).zipf(ZIPF_A, (EXAMPLES, SEQ_LEN + 1)) - 1, VOCAB - 1
    )


class W1Task:
    """The W1 workload as a fleet task (`task.name = "fleet.bench._workload:W1Task"`)."""

    def __init__(self, cfg: Config, role: str):
        self.cfg = cfg
        nbytes = float(model_bytes(cfg.model))
        self.cost = JobCost(download_bytes=nbytes, upload_bytes=nbytes)
        # Every W1 token is a word, so no target is a pad: pad_id=None.
        self.engine = (
            make_engine(
                cfg.model, cfg.model.engine, pad_id=None, gpus=cfg.ray.gpus_per_shard, deterministic=False
            )
            if role == "client"
            else None
        )

    def init_params(self) -> np.ndarray:
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            return get_flat(build_model(self.cfg.model))

    def job_flops(self, num_examples: np.ndarray) -> np.ndarray:
        # Every W1 device holds 64 examples, whatever the population table says.
        return job_flops(self.cfg.model, np.full(len(num_examples), EXAMPLES), self.cfg.train.client_epochs)

    def client_updates(
        self, params: np.ndarray, device_ids: np.ndarray, num_examples: np.ndarray, round_idx: int
    ) -> Iterator[tuple[np.ndarray, float]]:
        t = self.cfg.train
        jobs = (
            (w1_tokens(dev), rng.device_generator(self.cfg.seed, "w1_order", round_idx, int(dev)))
            for dev in device_ids
        )
        return self.engine.train_devices(params, jobs, LocalSGD(t.client_epochs, t.batch_size, t.client_lr))

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """W1 measures speed only: no held-out set."""
        return {}


def w1_config(
    shards: int,
    rounds: int,
    engine: str,
    gpus_per_shard: float = 0.0,
    mechanism: str = "dp_fedavg",
    precision: str = "fp32",
    kernels: str = "auto",
) -> Config:
    return Config(
        fleet=FleetConfig(
            name="w1",
            population=10_000,
            id_mode="index",
            availability=AvailabilityConfig(model="always"),
            low_memory_share=0.0,
            failure_prob_mean=0.0,
            goal=50,
            overselect=1.0,
            deadline_s=1e12,
            min_separation_hours=0.0,
        ),
        model=replace(w1_model(), engine=engine, precision=precision, kernels=kernels),
        # A cohort of exactly 50 (fixed-size sampling, accounted by RDP), or DP-FTRL's tree.
        privacy=PrivacyConfig(
            enabled=True,
            clip_norm=1.0,
            noise_multiplier=1.0,
            sampling="fixed_size",
            accountant="rdp",
            mechanism=mechanism,
        ),
        data=DataConfig(),
        task=TaskConfig(name="fleet.bench._workload:W1Task"),
        train=TrainConfig(
            rounds=rounds,
            client_epochs=1,
            batch_size=16,
            client_lr=0.5,
            server_optimizer="sgdm",
            server_lr=1.0,
            server_momentum=0.9,
            eval_every=10**9,
        ),
        ray=RayConfig(
            num_cpus=len(os.sched_getaffinity(0)),
            shards=shards,
            cpus_per_shard=1.0,
            gpus_per_shard=gpus_per_shard,
        ),
        tracking=TrackingConfig(mode="disabled"),
        progress=False,
    )


def peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM), in bytes; 0 if it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
