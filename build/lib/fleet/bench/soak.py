"""`python -m fleet.bench soak`: a long DP run under faults, then every metrics line checked.

The run (defaults: 30 rounds of 200,000 phones): 30% of jobs fail at random (on top of each
device's own failure rate), the available population shrinks as the simulated clock moves from the
local night into the morning, and shards are killed with `ray.kill`: one between rounds (after
round 10: Ray restarts it before the next call, which must find its participation record
restored) and one in the middle of a round (during round 21: that round is abandoned). It must
complete, and its metrics must be consistent: each funnel sums (selected = reported + dropped),
epsilon never decreases, the accountant's released rounds equal the released lines, crash rounds
release nothing. After the run, the shards' participation state must hold every counted device
once and nobody twice within the 24-hour limit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fleet.config import (
    Config,
    DataConfig,
    DropoutConfig,
    FleetConfig,
    ModelConfig,
    PrivacyConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from fleet.round import checkpoint


def soak_config(population: int, rounds: int, task: str) -> Config:
    cfg = Config(
        fleet=FleetConfig(
            population=population,
            goal=100,
            overselect=1.5,
            min_reports=60,
            start_hour=1.0,  # 02:00 local in UTC+1: the available population shrinks from here
            round_interval_s=600.0,
            min_separation_hours=24.0,
        ),
        model=ModelConfig(),
        privacy=PrivacyConfig(noise_multiplier=1.0, clip_norm=0.5),
        data=DataConfig(),
        task=TaskConfig(name=task),
        train=TrainConfig(rounds=rounds, eval_every=max(1, rounds // 5), checkpoint_every=10),
        dropout=DropoutConfig(name="soak", extra_failure=0.3),
        tracking=TrackingConfig(mode="disabled"),
    )
    cfg.progress = False
    cfg.ray.shards = 2
    return cfg


class SlowMean:
    """The mean task with a few milliseconds a device, so a kill can land inside a round."""

    def __new__(cls, cfg, role):
        from fleet.learning.tasks.mean import MeanTask

        class _Slow(MeanTask):
            def client_updates(self, params, device_ids, num_examples, round_idx):
                for out in super().client_updates(params, device_ids, num_examples, round_idx):
                    time.sleep(0.004)
                    yield out

        return _Slow(cfg, role)


def check_participation(run_dir: Path, lines: list[dict]) -> list[str]:
    """After the restarts: every counted device recorded once, nobody twice within the limit."""
    state = run_dir / checkpoint.STATE_DIR
    committed = checkpoint.load_coordinator(state)["round"]
    ranges = sorted({tuple(map(int, p.stem.split("_")[1:3])) for p in state.glob("shard_*_r*.npz")})
    counts = np.concatenate(
        [checkpoint.load_shard(state, a, b, committed)["participations"] for a, b in ranges]
    )
    problems = []
    if counts.max() > 1:
        problems.append(f"{int((counts > 1).sum())} device(s) counted twice within the 24-hour limit")
    reported = sum(x["reported"] for x in lines if x["released"] and x["round"] < committed)
    if counts.sum() != reported:
        problems.append(
            f"participation state holds {int(counts.sum())} counts, the released rounds {reported}"
        )
    return problems


def check_lines(lines: list[dict], summary: dict) -> list[str]:
    """Every consistency rule the soak asserts; returns the violations (empty: all hold)."""
    problems = []
    eps_prev = 0.0
    for x in lines:
        r = x["round"]
        if not x.get("incident") and x["selected"] != x["reported"] + sum(x["dropped"].values()):
            problems.append(f"round {r}: funnel does not sum")
        if x["released"] == x["abandoned"]:
            problems.append(f"round {r}: released and abandoned must differ")
        if x.get("incident") and x["released"]:
            problems.append(f"round {r}: a crashed round was released")
        eps = x["epsilon"]
        if eps is None or eps < eps_prev - 1e-12:
            problems.append(f"round {r}: epsilon decreased or missing")
        eps_prev = eps if eps is not None else eps_prev
    if [x["round"] for x in lines] != list(range(len(lines))):
        problems.append("rounds are not 0..n-1 exactly once")
    released = sum(x["released"] for x in lines)
    if summary["privacy"]["released_rounds"] != released:
        problems.append(
            f"accountant events {summary['privacy']['released_rounds']} != released lines {released}"
        )
    return problems


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m fleet.bench soak", description=__doc__)
    ap.add_argument("--population", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--kill-between", type=int, default=10, help="kill a shard after this round")
    ap.add_argument("--kill-during", type=int, default=21, help="kill a shard while this round runs")
    ap.add_argument("--task", default="fleet.bench.soak:SlowMean", help="mean, nwp or module:Class")
    args = ap.parse_args(argv)
    import ray

    from fleet.runtime.driver import train

    killed: list[str] = []

    def kill(line: dict, shards: list, coordinator: object) -> None:
        if line["round"] == args.kill_between:
            ray.kill(shards[0], no_restart=False)
            killed.append(f"between rounds {line['round']} and {line['round'] + 1}")
        if line["round"] == args.kill_during - 1:

            def later() -> None:
                time.sleep(0.3)  # the next round has started training
                ray.kill(shards[-1], no_restart=False)
                killed.append(f"during round {args.kill_during}")

            threading.Thread(target=later, daemon=True).start()

    cfg = soak_config(args.population, args.rounds, args.task)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "soak"
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, on_round=kill)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        problems = check_lines(lines, summary) + check_participation(run_dir, lines)
    avail = [x["available"] for x in lines if x["available"]]
    print(f"rounds {len(lines)} in {wall:.1f} s; shard kills: {', '.join(killed)}")
    inc = summary["incidents"]
    print(
        f"released {summary['released_rounds']}, abandoned {summary['abandoned_rounds']}, "
        f"incidents: {inc['shard_crash']} crash(es) mid-call, {inc['shard_restart']} restart(s) seen between "
        f"calls; final epsilon {summary['privacy']['epsilon']:.4g}"
    )
    print(f"available population: first {avail[0]:,}, last {avail[-1]:,} (x{avail[-1] / avail[0]:.2f})")
    dropped = {k: sum(x["dropped"][k] for x in lines) for k in lines[0]["dropped"]}
    print("dropped by reason:", ", ".join(f"{k} {v}" for k, v in dropped.items() if v))
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems))
        raise SystemExit(1)
    crash_ok = inc["shard_crash"] + inc["shard_restart"] >= len(killed) == 2
    print(
        "consistency: PASS (every line; participation state: every count once, none twice within "
        f"the limit); kills recovered: {'PASS' if crash_ok else 'FAIL'}"
    )
    if not crash_ok:
        raise SystemExit(1)
