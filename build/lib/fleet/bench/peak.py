"""`python -m fleet.bench peak`: the peak memory of a real `fleet-train` run, sampled as it runs.

`fleet.bench scale` measures the fleet's own cost (rows, check-in, rounds) in a snapshot after
the rounds. This runs the real command, with everything it does by default (the model,
evaluation, checkpoints, W&B offline, the participation audit at the end), as a subprocess, and
samples every `--every` seconds the proportional set size (PSS: shared pages split between the
processes that share them, so the sum is what the run really holds) of the command and all its
descendants: the driver, Ray's processes, the shards and the coordinator. It prints the peak,
when it happened, and the peak of each kind of process.

    python -m fleet.bench peak                                  # fleet=gboard_es, 10 rounds
    python -m fleet.bench peak -- fleet=small train.rounds=20   # any fleet-train overrides
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

GIB = 2**30
TARGET_GIB = 2.0  # the default (10 million phones, everything on) on one machine
DEFAULT = ["fleet=gboard_es", "train.rounds=10", "train.eval_every=5", "train.checkpoint_every=5"]


def _kind(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for key in (
        "ShardCore",
        "Coordinator",
        "raylet",
        "gcs_server",
        "dashboard",
        "log_monitor",
        "runtime_env",
    ):
        if key in text:
            return key
    if "fleet" in text and "-m" in cmdline:
        return "driver"
    return "ray worker" if "ray::" in text or "default_worker" in text else "other"


def sample(root: int) -> tuple[int, dict[str, int]]:
    """PSS of a process tree, in total and by kind of process."""
    import psutil

    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, {}
    by_kind: dict[str, int] = defaultdict(int)
    for p in procs:
        try:
            by_kind[_kind(p.cmdline())] += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sum(by_kind.values()), dict(by_kind)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench peak", description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("overrides", nargs="*", help="fleet-train overrides (default: " + " ".join(DEFAULT) + ")")
    args = ap.parse_args(argv)
    overrides = args.overrides or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fleet", *overrides, f"hydra.run.dir={tmp}/run", "progress=false"]
        print("running:", "fleet-train", " ".join(overrides))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak, peak_at, kinds_at_peak = 0, 0.0, {}
        peak_by_kind: dict[str, int] = defaultdict(int)
        while proc.poll() is None:
            total, kinds = sample(proc.pid)
            if total > peak:
                peak, peak_at, kinds_at_peak = total, time.perf_counter() - t0, kinds
            for k, v in kinds.items():
                peak_by_kind[k] = max(peak_by_kind[k], v)
            time.sleep(args.every)
        out = proc.stdout.read()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(out[-3000:])
        raise SystemExit(f"fleet-train exited with {proc.returncode}")
    print(f"finished in {wall:.0f} s (load average {os.getloadavg()[0]:.2f})")
    verdict = ""
    if not args.overrides:
        verdict = f" < {TARGET_GIB:g} GiB: {'PASS' if peak < TARGET_GIB * GIB else 'FAIL'}"
    print(f"peak PSS of the whole run: {peak / GIB:.2f} GiB, {peak_at:.0f} s in{verdict}")
    print("  at the peak: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(kinds_at_peak.items())))
    print(
        "  each kind's own peak: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(peak_by_kind.items()))
    )


if __name__ == "__main__":
    main(sys.argv[1:])
