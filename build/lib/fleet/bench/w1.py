"""`python -m fleet.bench w1`: workload W1's local training in fp32 and in bf16, side by side.

The workload itself (model, data, fleet) is `fleet.bench._workload`; the benches that measure it
against plain PyTorch are `fleet.bench.train` and `fleet.bench.baselines`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from fleet.bench._workload import update_gflop
from fleet.bench.baselines import engine_alone, matmul_gflops
from fleet.bench.train import Fleet
from fleet.learning.engines import bf16_supported, native

# The matmuls a W1 step spends its GEMM time on, as (m, k, n) at batch 16 x 20 steps = 320 rows:
# the output layer (logits) and the input-to-gates of all steps.
STEP_SHAPES = {
    "2048^3": (2048, 2048, 2048),
    "output layer": (320, 96, 10_000),
    "input gates": (320, 96, 2680),
}
BF16_TARGET = 1.8


def main(argv: list[str]) -> None:
    """`python -m fleet.bench w1`: W1's local training in fp32 and in bf16, side by side in one run.

    Measured on the same machine load, interleaved: the engine alone on one thread (what one
    shard does with a core to itself), its rate against the same run's fp32 and bf16 matmul rates
    on one thread; then the real round (one shard per core) in each precision. Target: bf16 at
    least 1.8x fp32. The quality side (recall within 2%) is measured by the runs the README lists.
    """
    ap = argparse.ArgumentParser(prog="python -m fleet.bench w1", description=main.__doc__)
    ap.add_argument("--devices", type=int, default=8, help="devices per timed pass of the engine alone")
    ap.add_argument("--passes", type=int, default=5, help="timed passes per precision, interleaved")
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed rounds of the real round per precision; 0 skips"
    )
    args = ap.parse_args(argv)
    gflop = update_gflop()
    cores = len(os.sched_getaffinity(0))
    print(
        f"W1 ({gflop:.2f} GFLOP per update); {cores} cores; native bf16: {bf16_supported('cpu')}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rates = {
        (p, name): matmul_gflops(1, 1.5, p, shape)
        for p in ("fp32", "bf16")
        for name, shape in STEP_SHAPES.items()
    }
    for name in STEP_SHAPES:
        f, b = rates[("fp32", name)], rates[("bf16", name)]
        print(f"matmul {name}, 1 thread: fp32 {f:.0f}, bf16 {b:.0f} GFLOP/s ({b / f:.2f}x)")
    # (precision, kernels) per mode; "bf16" is what model.precision=bf16 gives on this machine.
    modes = {"fp32": ("fp32", "auto"), "bf16, PyTorch ops": ("bf16", "torch"), "bf16": ("bf16", "auto")}
    alone: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.passes):
        for m, (p, k) in modes.items():
            alone[m].append(engine_alone(args.devices, "fused", 0.0, p, k))
    ref = {p: rates[(p, "2048^3")] for p in ("fp32", "bf16")}
    for m, ups in alone.items():
        best, mean = max(ups), len(ups) / sum(1 / u for u in ups)
        print(
            f"engine fused {m} alone, 1 thread: {mean:.2f} updates/s mean, {best:.2f} best pass = "
            f"{best * gflop:.0f} GFLOP/s, {100 * best * gflop / ref['fp32']:.0f}% of the fp32 and "
            f"{100 * best * gflop / ref['bf16']:.0f}% of the bf16 2048^3 matmul rate"
        )
    why = native.why_not()
    print(f"bf16 kernels: {f'PyTorch ops ({why})' if why else 'native (fleet/learning/engines/kernels.c)'}")
    for m in ("bf16, PyTorch ops", "bf16"):
        ratio = max(alone[m]) / max(alone["fp32"])
        paired = [b / f for b, f in zip(alone[m], alone["fp32"], strict=True)]
        verdict = f"; target >= {BF16_TARGET}x: {'PASS' if ratio >= BF16_TARGET else 'FAIL'}"
        print(
            f"{m} / fp32, engine alone: {ratio:.2f}x best passes, "
            f"{np.median(paired):.2f}x median of paired passes{verdict if m == 'bf16' else ''}"
        )
    if args.rounds:
        _rounds_in_each_precision(args.rounds, cores, gflop)


def _rounds_in_each_precision(rounds: int, cores: int, gflop: float) -> None:
    """The real round (Coordinator + one shard per core) in fp32, then bf16, one warm-up each."""
    ups = {}
    for p in ("fp32", "bf16"):
        fleet = Fleet(0, "auto", rounds + 1, 0.0, "dp_fedavg", p)
        try:
            lines = [fleet.round() for _ in range(rounds + 1)][1:]
        finally:
            fleet.close()
        ups[p] = sum(x["reported"] for x in lines) / sum(x["s"] for x in lines)
        print(f"fleet ({cores} shards x 1 thread) {p}: {ups[p]:.2f} updates/s = {ups[p] * gflop:.0f} GFLOP/s")
    print(f"bf16 / fp32 through the round: {ups['bf16'] / ups['fp32']:.2f}x")
