"""`python -m fleet.bench train`: workload W1, local training throughput through the real round.

W1: a tied-embedding LSTM with all four gates, vocabulary 10,000 (every id a word: no pad, no
special tokens), embedding 96, 670 units, projection 96 (about 1.54M parameters), embedding
initialised U(-0.1, 0.1). Device i holds `default_rng(i).zipf(1.2, (64, 21)) - 1` clipped to
9,999: input the first 20 columns, target the last 20. One local epoch, batch 16, client SGD
lr 0.5. Cohort 50 of 10,000 always-available devices, no dropout, DP clip 1.0, z = 1.0, server
SGD lr 1.0 with (Nesterov) momentum 0.9. One warm-up round, then timed rounds.

Four measurements, side by side in one run because the machine is shared and noisy:
1. the fp32 rate of a 2048 x 2048 matmul on all cores: its best call, before and after, and the
   higher of the two is the reference (a high reference is the conservative choice);
2. the engine alone, one thread in this process (what one shard would do with the machine to
   itself: it separates engine speed from round overhead and the shards' load imbalance);
3. the baseline: a plain PyTorch loop (`nn.LSTM` with `proj_size`, autograd, `torch.optim.SGD`)
   training the same kind of devices one after another in one process on all cores, with the same
   clip / noise / server step per round; it runs in a child process so its memory is its own;
4. the fleet: the real round (Coordinator + FleetShard Ray actors, one per core, one thread
   each) with `W1Task`, whose devices train on the fused engine.

The baseline and the fleet alternate round by round, so both see the same load from other users,
and each is reported as its mean over the timed rounds and as its best round (what the code does
when the machine is left alone). Targets: fleet >= 1.3x the baseline's client updates per second,
and >= 50% of the matmul rate (11.82 GFLOP per update). Memory is the sum of each process's
peak resident set (VmHWM): an upper bound on the simultaneous peak, since processes do not all
peak at once and shared pages count in each.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Any

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
    validate,
)
from fleet.learning.engines import make_engine
from fleet.learning.model import SPECIAL_TOKENS, ModelShape, build_model, get_flat, job_flops, model_bytes
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
    """The W1 workload as a fleet task (`task.name = "fleet.bench.train:W1Task"`)."""

    def __init__(self, cfg: Any, role: str):
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
        return self.engine.train_devices(params, jobs, t.client_epochs, t.batch_size, t.client_lr)

    def evaluate(self, params: np.ndarray) -> dict[str, float]:
        """W1 measures speed only: no held-out set."""
        return {}


def w1_config(
    shards: int, rounds: int, engine: str, gpus_per_shard: float = 0.0, mechanism: str = "dp_fedavg"
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
        model=replace(w1_model(), engine=engine),
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
        task=TaskConfig(name="fleet.bench.train:W1Task"),
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


# ---- measurements ----------------------------------------------------------------------------
def matmul_gflops(threads: int, seconds: float = 3.0) -> float:
    """fp32 GFLOP/s of a 2048 x 2048 matmul on `threads` threads: the best of the calls made in
    `seconds`, that is the rate when other users leave the machine alone (a high reference)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


class PlainLoop:
    """The baseline: nn.LSTM + autograd + optim.SGD, one device at a time, all cores, one process.

    Each round trains `cohort` distinct devices from the global weights, clips each delta to 1.0,
    adds N(0, 1.0^2) to the sum, divides by the cohort and takes a Nesterov-momentum server step.
    """

    def __init__(self, cohort: int, population: int, seed: int, threads: int):
        import torch
        from torch import nn

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.cohort, self.population, self.seed = cohort, population, seed
        self.emb = nn.Embedding(VOCAB, 96)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        self.lstm = nn.LSTM(96, 670, proj_size=96, batch_first=True)
        self.params = [*self.emb.parameters(), *self.lstm.parameters()]
        self.opt = torch.optim.SGD(self.params, lr=0.5)
        self.weights = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.params]))
        self.server = torch.optim.SGD([self.weights], lr=1.0, momentum=0.9, nesterov=True)

    def update(self, dev: int, round_idx: int) -> Any:
        import torch
        from torch.nn import functional

        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(self.weights[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        tok = torch.from_numpy(w1_tokens(dev))
        order = rng.device_generator(self.seed, "w1_order", round_idx, dev).permutation(EXAMPLES)
        for s in range(0, EXAMPLES, 16):
            batch = tok[torch.from_numpy(order[s : s + 16])]
            out, _ = self.lstm(self.emb(batch[:, :-1]))
            logits = out @ self.emb.weight.t()
            loss = functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return torch.cat([p.detach().reshape(-1) for p in self.params]) - self.weights.detach()

    def cohort_of(self, r: int) -> np.ndarray:
        return np.random.default_rng([self.seed, r]).choice(self.population, self.cohort, replace=False)

    def clipped_sum(self, r: int, part: int = 0, parts: int = 1) -> Any:
        """The clipped deltas of this process's share of round r's cohort, summed."""
        import torch

        total = torch.zeros_like(self.weights)
        for dev in self.cohort_of(r)[part::parts]:
            delta = self.update(int(dev), r)
            total += delta * min(1.0, 1.0 / max(float(delta.norm()), 1e-12))
        return total

    def apply(self, total: Any, noise: Any) -> None:
        self.weights.grad = -(total + noise) / self.cohort
        self.server.step()

    def round(self, r: int) -> float:
        """Run round r; returns its wall seconds."""
        import torch

        t0 = time.perf_counter()
        total = self.clipped_sum(r)
        self.apply(total, torch.randn(total.shape))
        return time.perf_counter() - t0


class PerCorePlain:
    """The same plain loop laid out as the fleet is: one process per core, one thread each, each
    training its share of the cohort; the sums meet in this process, which sends back the noised
    total for every process to take the same server step. Separates the engine's gain from the
    layout's (the all-threads baseline mixes the two)."""

    def __init__(self, cohort: int, population: int, seed: int, processes: int):
        ctx = get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_per_core_worker, args=(there, cohort, population, seed), daemon=True)
            proc.start()
            self.conns.append(here)
            self.procs.append(proc)
        for c in self.conns:
            c.recv()  # built
        self.cohort = cohort

    def round(self, r: int) -> float:
        import torch

        t0 = time.perf_counter()
        for i, c in enumerate(self.conns):
            c.send(("sum", r, i, len(self.conns)))
        total = sum(torch.from_numpy(c.recv()) for c in self.conns)
        noise = torch.from_numpy(
            np.random.default_rng([1, r]).standard_normal(total.shape[0]).astype(np.float32)
        )
        for c in self.conns:
            c.send(("apply", total.numpy(), noise.numpy()))
        for c in self.conns:
            c.recv()
        return time.perf_counter() - t0

    def peak_bytes(self) -> int:
        return sum(_peak_rss(p.pid) for p in self.procs)

    def close(self) -> None:
        for c in self.conns:
            c.send(("stop",))
        for p in self.procs:
            p.join(timeout=10)


def _per_core_worker(conn: Any, cohort: int, population: int, seed: int) -> None:
    import torch

    plain = PlainLoop(cohort, population, seed, 1)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "sum":
            conn.send(plain.clipped_sum(msg[1], msg[2], msg[3]).numpy())
        elif msg[0] == "apply":
            plain.apply(torch.from_numpy(msg[1]), torch.from_numpy(msg[2]))
            conn.send("done")
        else:
            return


# The baseline lives in a child process (its memory and threads are its own), driven one round at
# a time so that its rounds interleave with the fleet's and both see the same machine load.
_plain: PlainLoop | None = None


def _plain_init(cohort: int, population: int, seed: int, threads: int) -> None:
    global _plain
    _plain = PlainLoop(cohort, population, seed, threads)


def _plain_round(r: int) -> tuple[float, int, int]:
    """(seconds, peak bytes of the child so far, parameter count)."""
    seconds = _plain.round(r)
    params = sum(p.numel() for p in _plain.params)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, params


def engine_alone(devices: int, engine: str, gpus: float) -> float:
    """Updates/s of the engine in this process on one thread, outside the round: what one shard
    could do with the machine to itself, to tell engine speed from round overhead and imbalance.
    A warm-up pass (buffers, kernels) comes first; then `devices` devices are timed."""
    import torch

    torch.set_num_threads(1)
    task = W1Task(w1_config(1, 1, engine, gpus), "client")
    params = task.init_params()
    warm = getattr(task.engine, "group", 1)
    for _ in task.client_updates(params, np.arange(warm), np.full(warm, EXAMPLES), 0):
        pass
    ids = np.arange(warm, warm + devices)
    t0 = time.perf_counter()
    for _ in task.client_updates(params, ids, np.full(len(ids), EXAMPLES), 0):
        pass
    return devices / (time.perf_counter() - t0)


def _peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM), in bytes; 0 if it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Fleet:
    """W1 through the real round on a local Ray: Coordinator + one FleetShard per core."""

    def __init__(self, shards: int, engine: str, rounds: int, gpus_per_shard: float, mechanism: str):
        import ray

        from fleet.runtime.placement import init_ray, start_actors

        cfg = w1_config(shards, rounds, engine, gpus_per_shard, mechanism)
        validate(cfg)
        # Ray runs its workers at niceness 15 by default; on a shared machine that would hand the
        # fleet's cores to anyone else's work while the baseline runs at 0. Same priority for both.
        os.environ.setdefault("RAY_worker_niceness", "0")
        self.started = init_ray(cfg)
        self.shards, self.coordinator = start_actors(cfg, cfg.fleet.population)
        self.pids = {i["pid"] for i in ray.get([s.info.remote() for s in self.shards])}
        ray.get(self.coordinator.get_params.remote())

    def round(self) -> dict:
        """Run one round; its wall seconds, reported updates and training seconds."""
        import ray

        t0 = time.perf_counter()
        line = ray.get(self.coordinator.run_round.remote())
        return {
            "s": time.perf_counter() - t0,
            "reported": line["reported"],
            "train_s": line["timing"]["training_s"],
            "aggregation_s": line["timing"]["aggregation_s"],
        }

    def memory(self, exclude: set[int]) -> dict:
        """Peak RSS of the shards, summed over the Ray session's processes (this driver's
        descendants: Ray's GCS, raylet and workers, the coordinator, the shards; not the baselines'
        processes in `exclude`), and this driver's own apart."""
        import psutil

        me = psutil.Process()
        pids = ({p.pid for p in me.children(recursive=True)} | self.pids) - exclude
        return {
            "shards": [_peak_rss(p) for p in sorted(self.pids)],
            "total": sum(_peak_rss(p) for p in pids),
            "processes": len(pids),
            "driver": _peak_rss(me.pid),
        }

    def close(self) -> None:
        import ray

        for a in [*self.shards, self.coordinator]:
            ray.kill(a)
        if self.started:
            ray.shutdown()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench train", description=__doc__)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--shards", type=int, default=0, help="0: as many as the cores (and GPUs) hold")
    ap.add_argument("--engine", default="auto", choices=["auto", "fused", "reference", "batched"])
    ap.add_argument(
        "--gpus-per-shard", type=float, default=0.0, help="> 0: shards train on CUDA (batched engine)"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain nn.LSTM loop")
    ap.add_argument(
        "--mechanism", default="dp_fedavg", choices=["dp_fedavg", "dp_ftrl"], help="dp_ftrl: the tree"
    )
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    gflop = update_gflop()
    gboard = ModelShape(10_000 + SPECIAL_TOKENS, 96, 670, 96, "cifg").num_params()
    print(
        f"W1: LSTM V={VOCAB} E=96 H=670 P=96, {ModelShape(VOCAB, 96, 670, 96, 'lstm').num_params():,} "
        f"params ({gflop:.2f} GFLOP per update); cifg_gboard: {gboard:,} params; {cores} cores; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    mm = [matmul_gflops(cores)]
    print(f"matmul 2048^2 fp32, {cores} threads, best call: {mm[0]:.1f} GFLOP/s")
    alone = engine_alone(
        50 if args.engine == "batched" or args.gpus_per_shard else 12, args.engine, args.gpus_per_shard
    )
    print(f"engine {args.engine} alone, 1 thread: {alone:.2f} updates/s, {alone * gflop:.1f} GFLOP/s")

    pool = per_core = None
    baseline_pids: set[int] = set()
    if not args.no_baseline:
        pool = ProcessPoolExecutor(
            1, mp_context=get_context("spawn"), initializer=_plain_init, initargs=(50, 10_000, 0, cores)
        )
        per_core = PerCorePlain(50, 10_000, 0, cores)
        baseline_pids = {p.pid for p in per_core.procs}
    fleet = Fleet(args.shards, args.engine, args.warmup + args.rounds, args.gpus_per_shard, args.mechanism)
    plain: list[tuple[float, int, int]] = []  # (seconds, peak bytes, params) per timed round
    spread: list[float] = []  # the per-core baseline's round seconds
    rounds: list[dict] = []
    try:
        for r in range(args.warmup + args.rounds):
            p = pool.submit(_plain_round, r).result() if pool is not None else None
            q = per_core.round(r) if per_core is not None else None
            f = fleet.round()
            if r >= args.warmup:
                rounds.append(f)
                if p is not None:
                    plain.append(p)
                    spread.append(q)
        if pool is not None:
            baseline_pids.add(pool.submit(os.getpid).result())
        mem = fleet.memory(exclude=baseline_pids)
        per_core_bytes = per_core.peak_bytes() if per_core is not None else 0
    finally:
        fleet.close()
        if pool is not None:
            pool.shutdown()
        if per_core is not None:
            per_core.close()
    mm.append(matmul_gflops(cores))
    ref = max(mm)
    print(f"matmul again: {mm[1]:.1f} GFLOP/s; reference {ref:.1f}; load average {os.getloadavg()[0]:.2f}")

    # Two figures per side: the mean over the timed rounds, and the best round, which is what the
    # code can do when the shared machine leaves it alone (other users' load only slows rounds).
    fleet_ups = (
        sum(x["reported"] for x in rounds) / sum(x["s"] for x in rounds),
        max(x["reported"] / x["s"] for x in rounds),
    )
    n_shards = len(mem["shards"])
    shard_mib = ", ".join(f"{b / MIB:.0f}" for b in mem["shards"])
    print(
        f"fleet ({n_shards} shards x 1 thread, engine {args.engine}): {_rates(fleet_ups, gflop)}; "
        f"{100 * fleet_ups[0] / (n_shards * alone):.0f}% of {n_shards} x engine alone; "
        f"reported {[x['reported'] for x in rounds]}; training "
        f"{100 * sum(x['train_s'] for x in rounds) / sum(x['s'] for x in rounds):.0f}% of round time; "
        f"peak memory of the Ray session (shards, coordinator, Ray's own processes) "
        f"{mem['total'] / MIB:.0f} MiB summed over {mem['processes']} processes (shards {shard_mib} MiB); "
        f"this driver, which also ran the matmul and the engine-alone runs: {mem['driver'] / MIB:.0f} MiB"
    )
    agg = [x["aggregation_s"] * 1e3 for x in rounds]
    steps = args.warmup + args.rounds
    tree = (
        f"; the tree holds {bin(steps).count('1')} node vector(s) of the model's size after {steps} rounds "
        f"(at most log2(T) + 1; nothing per device)"
        if args.mechanism == "dp_ftrl"
        else ""
    )
    print(
        f"{args.mechanism} aggregation (noise, server step, ledger): {np.mean(agg):.1f} ms mean a round{tree}"
    )
    pct = tuple(100 * u * gflop / ref for u in fleet_ups)
    verdict = [f"fleet at {pct[0]:.0f}% | {pct[1]:.0f}% of matmul rate >= 50%: {_pass(pct, 50)}"]
    if plain:
        plain_ups = (50 * len(plain) / sum(x[0] for x in plain), 50 / min(x[0] for x in plain))
        print(
            f"plain loop (nn.LSTM, {plain[-1][2]:,} params, {cores} threads, 1 process): "
            f"{_rates(plain_ups, gflop)}; at {100 * plain_ups[0] * gflop / ref:.0f}% | "
            f"{100 * plain_ups[1] * gflop / ref:.0f}% of matmul rate; peak {plain[-1][1] / MIB:.0f} MiB"
        )
        ratio = (fleet_ups[0] / plain_ups[0], fleet_ups[1] / plain_ups[1])
        verdict.append(f"{ratio[0]:.2f}x | {ratio[1]:.2f}x plain loop >= 1.3x: {_pass(ratio, 1.3)}")
        core_ups = (50 * len(spread) / sum(spread), 50 / min(spread))
        print(
            f"plain loop per core ({cores} processes x 1 thread, the fleet's layout): "
            f"{_rates(core_ups, gflop)}; peak {per_core_bytes / MIB:.0f} MiB summed"
        )
        core_ratio = (fleet_ups[0] / core_ups[0], fleet_ups[1] / core_ups[1])
        print(
            f"fleet / plain loop: {ratio[0]:.2f}x against one process on all threads (engine and layout), "
            f"{core_ratio[0]:.2f}x against one process per core (the engine alone); best rounds "
            f"{ratio[1]:.2f}x and {core_ratio[1]:.2f}x"
        )
    print("targets (mean | best round): " + "; ".join(verdict))


def _rates(ups: tuple[float, float], gflop: float) -> str:
    return (
        f"{ups[0]:.2f} updates/s = {ups[0] * gflop:.1f} GFLOP/s mean, "
        f"{ups[1]:.2f} updates/s = {ups[1] * gflop:.1f} GFLOP/s best round"
    )


def _pass(values: tuple[float, float], target: float) -> str:
    return "/".join("PASS" if v >= target else "FAIL" for v in values)
