"""`python -m fleet.bench soak`: a long DP run under faults, then every metrics line checked.

The run: 30% of jobs fail at random (on top of each device's own failure rate), the available
population shrinks as the simulated clock moves from the local night into the morning, and two
shards are killed with `ray.kill` at chosen rounds. It must complete, and its metrics must be
consistent: each funnel sums (selected = reported + dropped), epsilon never decreases, the
accountant's released rounds equal the released lines, and crash rounds release nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

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


def check_lines(lines: list[dict], summary: dict) -> list[str]:
    """Every consistency rule the soak asserts; returns the violations (empty: all hold)."""
    problems = []
    eps_prev = 0.0
    for x in lines:
        r = x["round"]
        if x["selected"] != x["reported"] + sum(x["dropped"].values()):
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
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--kills", default="15,35", help="rounds after which a shard is killed")
    ap.add_argument("--task", default="mean", help="mean (fast) or nwp")
    args = ap.parse_args(argv)
    import ray

    from fleet.run import train

    kills = {int(k) for k in args.kills.split(",") if k}
    killed: list[int] = []

    def kill(line: dict, shards: list, coordinator: object) -> None:
        if line["round"] in kills:
            victim = len(killed) % len(shards)
            ray.kill(shards[victim], no_restart=False)
            killed.append(line["round"])

    cfg = soak_config(args.population, args.rounds, args.task)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "soak"
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, on_round=kill)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    problems = check_lines(lines, summary)
    avail = [x["available"] for x in lines if x["available"]]
    print(f"rounds {len(lines)} in {wall:.1f} s; shard kills after rounds {killed}")
    print(
        f"released {summary['released_rounds']}, abandoned {summary['abandoned_rounds']}, "
        f"crash incidents {summary['incidents']['shard_crash']}, "
        f"final epsilon {summary['privacy']['epsilon']:.4g}"
    )
    print(f"available population: first {avail[0]:,}, last {avail[-1]:,} (x{avail[-1] / avail[0]:.2f})")
    dropped = {k: sum(x["dropped"][k] for x in lines) for k in lines[0]["dropped"]}
    print("dropped by reason:", ", ".join(f"{k} {v}" for k, v in dropped.items() if v))
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems))
        raise SystemExit(1)
    crash_ok = summary["incidents"]["shard_crash"] >= len(killed)
    print(f"consistency: PASS (every line); crashes recovered: {'PASS' if crash_ok else 'FAIL'}")
    if not crash_ok:
        raise SystemExit(1)
