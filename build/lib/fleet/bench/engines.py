"""`python -m fleet.bench engines`: which local-training engine pays, at which model size, on which device.

docs/ARCHITECTURE.md, step 4 says: train devices one after another on CPU, and batch them in
lockstep only where a benchmark shows it pays (tiny models, GPUs). This is that benchmark. For each
model (the demo's `cifg_small`, a mid-size CIFG and W1's Gboard-size LSTM) it trains the same
devices, with the same data and batch orders, on every engine in turn, outside the round, on one
thread (what one shard has), and prints updates per second and each engine's ratio to the fused
engine measured in the same run. Engines alternate in repeated passes so that all see the same load
from other users; each figure is the best pass. With a CUDA device (or `--device cuda`), the batched
engine also runs there, and its ratio is against the fused engine on one CPU thread."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from fleet.learning.engines import BatchedEngine, Engine, FusedEngine, LocalSGD, ReferenceEngine
from fleet.learning.model import SPECIAL_TOKENS, ModelShape, NWPModel, get_flat

MODELS = {
    # name: (cell, vocab incl. specials, embed = proj, hidden)
    "cifg_small": ("cifg", 1000 + SPECIAL_TOKENS, 32, 64),
    "cifg_mid": ("cifg", 4000 + SPECIAL_TOKENS, 64, 256),
    "w1_lstm": ("lstm", 10_000, 96, 670),
}
SEQ_LEN = 20
BATCH = 16


def _devices(shape: ModelShape, count: int, examples: int) -> list[np.ndarray]:
    """Zipfian token ids as W1 draws them, `examples` sequences per device, bos first."""
    out = []
    for i in range(count):
        tok = np.minimum(
            np.random.default_rng(i).zipf(1.2, (examples, SEQ_LEN + 1)) - 1, shape.vocab_total - 1
        )
        tok[:, 0] = 1
        out.append(tok)
    return out


def _rate(engine: Engine, params: np.ndarray, devices: list[np.ndarray]) -> float:
    """Updates/s over one pass of all devices (one epoch, batch 16, lr 0.5)."""
    jobs = ((t, np.random.default_rng(j)) for j, t in enumerate(devices))
    t0 = time.perf_counter()
    for _ in engine.train_devices(params, jobs, LocalSGD(1, BATCH, 0.5)):
        pass
    return len(devices) / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench engines", description=__doc__)
    ap.add_argument("--devices", type=int, default=32, help="devices per pass (one batched group)")
    ap.add_argument("--examples", type=int, default=64, help="sequences per device")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {', '.join(MODELS)}")
    ap.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda[:N]")
    ap.add_argument("--reference", action="store_true", help="also time the (slow) reference engine")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    gpu_name = (args.device if args.device != "auto" else "cuda") if gpu else None
    print(
        f"engines alone, 1 CPU thread, {args.devices} devices x {args.examples} sequences of {SEQ_LEN}, "
        f"batch {BATCH}, best of {args.passes} passes; load average {os.getloadavg()[0]:.2f}"
        + (f"; GPU: {torch.cuda.get_device_name(gpu_name)}" if gpu else "")
    )
    for name in args.models.split(","):
        cell, vocab, emb, hid = MODELS[name]
        shape = ModelShape(vocab, emb, hid, emb, cell)
        torch.manual_seed(0)
        params = get_flat(NWPModel(vocab, emb, hid, emb, cell))
        devices = _devices(shape, args.devices, args.examples)
        engines: dict[str, Engine] = {
            "fused": FusedEngine(shape, None),
            "batched cpu": BatchedEngine(shape, None, "cpu", args.devices),
        }
        if gpu_name:
            engines[f"batched {gpu_name}"] = BatchedEngine(shape, None, gpu_name, args.devices)
        if args.reference:
            engines["reference"] = ReferenceEngine(shape, None)
        for e in engines.values():  # warm-up: buffers, kernels
            _rate(e, params, devices[:2])
        best = dict.fromkeys(engines, 0.0)
        for _ in range(args.passes):
            for label, e in engines.items():
                best[label] = max(best[label], _rate(e, params, devices))
        text = ", ".join(f"{k} {v:.2f}/s ({v / best['fused']:.2f}x)" for k, v in best.items())
        print(f"{name} ({shape.num_params():,} params): {text}")
