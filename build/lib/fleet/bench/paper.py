"""`python -m fleet.bench paper`: paper scale, projected honestly.

Why: the Spanish Gboard model (`experiment=gboard_es`) trained 2,000 rounds of 6,500 reports of a
1.4M-parameter CIFG-LSTM. This bench answers what such a run costs: it runs real rounds at that
scale on this machine, and projects the 2,000-round run from them, saying what is measured and
what is assumed.

What: the experiment's configuration, composed as `fleet-train` composes it (10 million phones of
`fleet=gboard_es` by default, model cifg_gboard, DP-FedAvg with z = 7.0 and delta = 1e-10, at most
one participation per 24 hours, goal 6,500), one shard per core, no tracking, no evaluation in
the timed rounds. For each precision (fp32, bf16 where the CPU has it natively) it builds the
fleet, then times `--rounds` round(s) with no warm-up round (the first round allocates the
engine's buffers, as a real run's first round does) and prints the round's wall time, its phase
split, the devices trained and reported, updates/s and core-seconds per report. FLOPs are the
task's own `job_flops` of every device trained (the rule the simulated phones' timing uses),
read back from the shards as a sum.

The projection of `--project-rounds` rounds: core-hours, core-days and wall time on this machine
(rounds x wall x cores); and, for a GPU this machine does not have, a FLOP projection: the share
of this CPU's matmul rate (same precision, same run, all cores busy) that the round achieved,
applied to the named GPU's dense peak. It is labelled a projection, never a measurement.
`--quick`: 1e5 phones, goal 200, one round, for a fast look.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from fleet.bench.baselines import matmul_gflops
from fleet.config import Config
from fleet.learning.engines import bf16_supported
from fleet.round.coordinator import PHASES
from fleet.runtime.cli import load_config

HEARTBEAT_S = 60.0  # a line while a round runs, so a 15-minute round is seen to be alive
# NVIDIA H100 SXM5, dense (no 2:4 sparsity) peaks: NVIDIA H100 Tensor Core GPU Architecture
# whitepaper (2022) and the H100 datasheet, whose tensor figures are quoted with sparsity (2x).
GPU = "NVIDIA H100 SXM"
GPU_PEAK_FLOPS = {
    "bf16": ("bf16 tensor-core dense peak", 989e12),
    # fp32: the CUDA cores' peak. The engines do not enable TF32 (torch's default for matmuls is
    # off); with it on, fp32 matmuls would run on the TF32 tensor peak, TF32_PEAK_FLOPS.
    "fp32": ("fp32 non-tensor peak (TF32 off)", 66.9e12),
}
TF32_PEAK_FLOPS = 494.5e12


def paper_config(population: int, goal: int, cores: int, precision: str) -> Config:
    """`experiment=gboard_es`, composed as `fleet-train` composes it (fleet gboard_es, model
    cifg_gboard, DP-FedAvg with z = 7.0 and delta = 1e-10, 24 hours between participations), at
    `population` and `goal`; here with one shard per core, tracking and progress off, and no
    evaluation inside the timed rounds (the held-out set the server's task builds is kept small)."""
    return load_config(
        [
            "experiment=gboard_es",
            f"fleet.population={population}",
            f"fleet.goal={goal}",
            f"model.precision={precision}",
            f"ray.num_cpus={cores}",
            f"ray.shards={cores}",
            "ray.cpus_per_shard=1.0",
            "tracking=disabled",
            "progress=false",
            f"train.eval_every={10**9}",
            "data.eval_examples=200",
        ]
    )


def _trained_flops(core: Any) -> float:
    """Run inside a shard: FLOPs of every local job it has run so far, the task's own job_flops
    of each device's examples times its participations. One sum leaves the shard, no row."""
    rows = np.flatnonzero(core.participations)
    per_job = core.task.job_flops(core.cols["num_examples"][rows])
    return float(per_job @ core.participations[rows].astype(np.float64))


def _await_round(coordinator: Any, label: str) -> dict:
    """One round, with a heartbeat line every HEARTBEAT_S seconds while it runs."""
    import ray

    ref = coordinator.run_round.remote()
    t0 = time.perf_counter()
    while not ray.wait([ref], timeout=HEARTBEAT_S)[0]:
        print(f"    {label}: still running, {time.perf_counter() - t0:.0f} s", flush=True)
    return ray.get(ref)


def measure(cfg: Config, rounds: int, cores: int) -> dict:
    """Build the fleet, run `rounds` timed rounds (no warm-up round); the rounds' means."""
    import ray

    from fleet.runtime.placement import fleet_actors

    p = cfg.model.precision
    print(f"[{p}] building {cfg.fleet.population:,} phones in {cores} shard(s)...", flush=True)
    t0 = time.perf_counter()
    with fleet_actors(cfg, cfg.fleet.population) as (shards, coordinator):
        ray.get([s.info.remote() for s in shards])
        ray.get(coordinator.get_params.remote())
        build_s = time.perf_counter() - t0
        print(f"[{p}] built in {build_s:.1f} s", flush=True)
        flops0 = sum(ray.get([s.__ray_call__.remote(_trained_flops) for s in shards]))
        lines = []
        for r in range(rounds):
            print(f"[{p}] round {r + 1}/{rounds} started (goal {cfg.fleet.goal:,})", flush=True)
            lines.append(_await_round(coordinator, f"[{p}] round {r + 1}"))
            print(f"[{p}] round {r + 1}/{rounds} done in {lines[-1]['wall_s']:.1f} s", flush=True)
        flops = sum(ray.get([s.__ray_call__.remote(_trained_flops) for s in shards])) - flops0
    wall = float(np.mean([x["wall_s"] for x in lines]))
    reported = float(np.mean([x["reported"] or 0 for x in lines]))
    invalid = float(np.mean([x.get("dropped", {}).get("invalid", 0) for x in lines]))
    return {
        "precision": p,
        "build_s": build_s,
        "rounds": rounds,
        "wall_s": wall,
        "phases": {k: float(np.mean([x["timing"][k] for x in lines])) for k in PHASES},
        "selected": float(np.mean([x["selected"] or 0 for x in lines])),
        "reported": reported,
        "trained": reported + invalid,
        "abandoned": sum(bool(x.get("abandoned")) for x in lines),
        "updates_per_s": reported / wall,
        "core_s_per_report": wall * cores / max(reported, 1.0),
        "flops_per_round": flops / rounds,
    }


def project(m: dict, cores: int, matmul_per_core: float, project_rounds: int) -> dict:
    """The run of `project_rounds` rounds from one precision's measured round: on this machine's
    cores (measured round x rounds), and on a GPU from FLOPs (a projection, not a measurement)."""
    wall, flops = m["wall_s"], m["flops_per_round"]
    achieved = flops / (wall * cores)  # FLOP/s per core, over the whole round
    share = achieved / matmul_per_core
    peak_name, peak = GPU_PEAK_FLOPS[m["precision"]]
    gpu_compute_s = flops / (share * peak) if share > 0 else float("inf")
    other_s = wall - m["phases"]["training_s"]  # the round's CPU phases, kept as measured here
    return {
        "rounds": project_rounds,
        "core_hours": project_rounds * wall * cores / 3600.0,
        "core_days": project_rounds * wall * cores / 86400.0,
        "wall_hours": project_rounds * wall / 3600.0,
        "achieved_gflops_per_core": achieved / 1e9,
        "matmul_gflops_per_core": matmul_per_core / 1e9,
        "share_of_matmul": share,
        "gpu": GPU,
        "gpu_peak": peak_name,
        "gpu_peak_tflops": peak / 1e12,
        "gpu_compute_s_per_round": gpu_compute_s,
        "gpu_other_s": other_s,
        "gpu_round_s": gpu_compute_s + other_s,
        "gpu_hours": project_rounds * (gpu_compute_s + other_s) / 3600.0,
    }


def run(population: int, goal: int, precisions: list[str], rounds: int, project_rounds: int) -> dict:
    """Everything the bench prints, as a dict: the machine, each precision's measured round and
    its projection, and the assumptions the projection rests on."""
    import ray

    from fleet.runtime.placement import init_ray

    cores = len(os.sched_getaffinity(0))
    if "bf16" in precisions and not bf16_supported("cpu"):
        print("bf16: skipped, this CPU has no native bf16 (PyTorch would emulate it, slower than fp32)")
        precisions = [p for p in precisions if p != "bf16"]
    cfgs = {p: paper_config(population, goal, cores, p) for p in precisions}
    print(
        f"paper: {population:,} phones (gboard_es), cifg_gboard, DP-FedAvg z=7.0 delta=1e-10, goal {goal:,}, "
        f"{cores} cores = {cores} shards x 1 thread; native bf16 {bf16_supported('cpu')}; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(f"measuring the {'/'.join(precisions)} matmul rate, {cores} threads...", flush=True)
    before = {p: matmul_gflops(cores, 2.0, p) * 1e9 / cores for p in precisions}
    # Ray runs workers at niceness 15 by default: the shards would yield the cores that the
    # driver's matmul (niceness 0) had, and the share of the matmul rate would read low.
    os.environ.setdefault("RAY_worker_niceness", "0")
    started = init_ray(cfgs[precisions[0]])
    try:
        measured = {p: measure(cfgs[p], rounds, cores) for p in precisions}
    finally:
        if started:
            ray.shutdown()
    print("measuring the matmul rate again...", flush=True)
    after = {p: matmul_gflops(cores, 2.0, p) * 1e9 / cores for p in precisions}
    # The higher of the two: a high reference makes the achieved share, and the GPU, look no better.
    matmul = {p: max(before[p], after[p]) for p in precisions}
    return {
        "cores": cores,
        "population": population,
        "goal": goal,
        "load": os.getloadavg()[0],
        "matmul_gflops_per_core": {p: (before[p] / 1e9, after[p] / 1e9) for p in precisions},
        "measured": measured,
        "projection": {p: project(measured[p], cores, matmul[p], project_rounds) for p in precisions},
        "assumptions": assumptions(cores, project_rounds),
    }


def assumptions(cores: int, project_rounds: int) -> list[str]:
    return [
        f"every one of the {project_rounds:,} rounds costs what the timed round(s) cost: same cohort, "
        "model and fleet; the experiment's evaluation every 50 rounds, checkpoints and start-up are "
        "not counted",
        "the timed round(s) had no warm-up round: the first round's engine set-up is in them, once "
        "(a run pays it once, so the projection is slightly high)",
        f"core-hours = rounds x round wall s x {cores} cores / 3600; wall hours are on this machine's "
        f"{cores} cores",
        "FLOPs per round: the task's job_flops of each device trained (6 x seq_len x matmul MACs "
        "per token, per example, per epoch): the model's matmuls only",
        "achieved share = FLOPs / (round wall s x cores) / this CPU's best matmul rate per core "
        "in the same precision (all cores busy, the higher of before and after the rounds)",
        f"GPU (a projection, not a measurement: no GPU here): one {GPU} trains at the same share "
        "of its dense peak as this CPU reached of its matmul rate; the batch-16, one-timestep "
        "GEMMs of local training often reach less of a GPU, so read it as a lower bound on time",
        f"GPU peaks: bf16 on the {GPU_PEAK_FLOPS['bf16'][1] / 1e12:g} TFLOP/s tensor-core dense "
        f"peak; fp32 on the {GPU_PEAK_FLOPS['fp32'][1] / 1e12:g} TFLOP/s non-tensor peak, since "
        f"the engines do not enable TF32 (with TF32: {TF32_PEAK_FLOPS / 1e12:g} TFLOP/s)",
        "GPU round = GPU compute + the round's other phases (check-in, sampling, plan, "
        "aggregation, as measured here on CPU); data generation and clipping are not in the FLOPs",
    ]


def report(out: dict) -> None:
    """Print the measured rounds, the projection table and every assumption, one a line."""
    cores = out["cores"]
    print(f"load average after the rounds {out['load']:.2f} on {cores} cores (others' load slows the rounds)")
    for p, (b, a) in out["matmul_gflops_per_core"].items():
        print(f"matmul 2048^3 {p}, {cores} threads: {b:.1f} GFLOP/s per core before, {a:.1f} after")
    for p, m in out["measured"].items():
        ph = m["phases"]
        split = ", ".join(f"{k[:-2]} {ph[k]:.2f} s" for k in PHASES)
        print(
            f"{p}: round {m['wall_s']:.1f} s (mean of {m['rounds']}, no warm-up round; build "
            f"{m['build_s']:.1f} s not in it): {split}"
        )
        print(
            f"{p}: trained {m['trained']:.0f}, reported {m['reported']:.0f} of {m['selected']:.0f} "
            f"selected; {m['updates_per_s']:.2f} updates/s; {m['core_s_per_report']:.2f} core-s per "
            f"report; {m['flops_per_round'] / 1e12:.2f} TFLOP per round"
            + (f"; {m['abandoned']} round(s) ABANDONED" if m["abandoned"] else "")
        )
    rounds = next(iter(out["projection"].values()))["rounds"]
    print(f"\nprojection, {rounds:,} rounds (measured round x {rounds:,}; not run), this machine:")
    print(f"{'precision':>9} {'round s':>8} {'core-h':>10} {'core-days':>9} {f'wall h ({cores} cores)':>16}")
    for p, j in out["projection"].items():
        print(
            f"{p:>9} {out['measured'][p]['wall_s']:>8.1f} {j['core_hours']:>10.2f} "
            f"{j['core_days']:>9.3f} {j['wall_hours']:>16.2f}"
        )
    print(f"GPU, a PROJECTION from FLOPs, not a measurement: one {GPU}:")
    for p, j in out["projection"].items():
        print(
            f"{p:>9}: achieved {j['achieved_gflops_per_core']:.1f} GFLOP/s per core = "
            f"{j['share_of_matmul']:.1%} of {j['matmul_gflops_per_core']:.1f} (matmul); at "
            f"{j['share_of_matmul']:.1%} of the {j['gpu_peak']} {j['gpu_peak_tflops']:g} TFLOP/s: "
            f"{j['gpu_compute_s_per_round']:.3f} s compute + {j['gpu_other_s']:.2f} s other phases"
            f" = {j['gpu_round_s']:.2f} s a round, {j['gpu_hours']:.2f} GPU-hours "
            f"for {rounds:,} rounds (projected)"
        )
    for line in out["assumptions"]:
        print(f"assumption: {line}")


def main(argv: list[str]) -> dict:
    """`python -m fleet.bench paper`: one Gboard-scale round (6,500 reports, cifg_gboard, 10M
    phones) per precision on this machine, timed, and the 2,000-round run projected from it per
    core and on a GPU (a FLOP projection). A default run trains about 8,500 devices per precision
    (Poisson sampling at 1.3x the goal), 25-45 minutes on 2 cores at 6-12 updates/s."""
    ap = argparse.ArgumentParser(prog="python -m fleet.bench paper", description=__doc__)
    ap.add_argument("--population", type=float, default=1e7, help="phones in the gboard_es fleet")
    ap.add_argument("--goal", type=int, default=6500, help="reports a round (the cohort's goal)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per precision")
    ap.add_argument("--project-rounds", type=int, default=2000, help="rounds of the projected run")
    ap.add_argument("--quick", action="store_true", help="1e5 phones, goal 200, one round")
    args = ap.parse_args(argv)
    if args.quick:
        args.population, args.goal, args.rounds = 1e5, 200, 1
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = sorted(set(precisions) - set(GPU_PEAK_FLOPS))
    if bad or not precisions or args.rounds < 1:
        ap.error(f"--precisions takes fp32 and/or bf16 (got {args.precisions!r}); --rounds >= 1")
    t0 = time.perf_counter()
    out = run(int(args.population), args.goal, precisions, args.rounds, args.project_rounds)
    report(out)
    print(f"bench wall time {time.perf_counter() - t0:.0f} s", flush=True)
    return out
