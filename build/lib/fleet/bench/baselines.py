"""The W1 benchmark's baselines: the matmul rate, the engine alone, and the plain PyTorch loop
(one process on all threads, and a pool of one-thread processes, one per core) that the fleet is
measured against beside it (`fleet.bench.train`).
"""

from __future__ import annotations

import math
import resource
import time
from multiprocessing import get_context
from typing import Any

import numpy as np

from fleet import rng
from fleet.bench._workload import EXAMPLES, VOCAB, W1Task, peak_rss, w1_config, w1_tokens


# ---- measurements ----------------------------------------------------------------------------
def matmul_gflops(
    threads: int, seconds: float = 3.0, dtype: str = "fp32", shape: tuple[int, int, int] = (2048, 2048, 2048)
) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul in `dtype` (fp32 or bf16) on `threads` threads, 2048^3
    by default: the best of the calls made in `seconds`, that is the rate when other users leave
    the machine alone (a high reference)."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(m, k).to(kind), torch.randn(k, n).to(kind)
    c = torch.empty(m, n, dtype=kind)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


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
        return sum(peak_rss(p.pid) for p in self.procs)

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


def _plain_init(cohort: int, population: int, seed: int, threads: int) -> None:
    global _plain
    _plain = PlainLoop(cohort, population, seed, threads)


def _plain_round(r: int) -> tuple[float, int, int]:
    """(seconds, peak bytes of the child so far, parameter count)."""
    seconds = _plain.round(r)
    params = sum(p.numel() for p in _plain.params)
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, params


def engine_alone(
    devices: int, engine: str, gpus: float, precision: str = "fp32", kernels: str = "auto"
) -> float:
    """Updates/s of the engine in this process on one thread, outside the round: what one shard
    could do with the machine to itself, to tell engine speed from round overhead and imbalance.
    A warm-up pass (buffers, kernels) comes first; then `devices` devices are timed."""
    import torch

    torch.set_num_threads(1)
    task = W1Task(w1_config(1, 1, engine, gpus, precision=precision, kernels=kernels), "client")
    params = task.init_params()
    warm = getattr(task.engine, "group", 1)
    for _ in task.client_updates(params, np.arange(warm), np.full(warm, EXAMPLES), 0):
        pass
    ids = np.arange(warm, warm + devices)
    t0 = time.perf_counter()
    for _ in task.client_updates(params, ids, np.full(len(ids), EXAMPLES), 0):
        pass
    return devices / (time.perf_counter() - t0)
