"""`python -m fleet.bench paper`: the Gboard-scale round and the 2,000-round projection."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from conftest import make_cfg

from fleet.bench import paper


def test_the_bench_builds_the_gboard_es_experiment():
    """The dataclasses the bench builds are `experiment=gboard_es`, apart from what it changes on
    purpose: one shard per core, tracking and progress off, no evaluation, a small held-out set."""
    want = make_cfg("experiment=gboard_es")
    got = paper.paper_config(10_000_000, 6500, 2, "auto")
    assert got.fleet == want.fleet
    assert got.model == want.model
    assert got.privacy == want.privacy
    assert got.task == want.task
    assert got.train == replace(want.train, eval_every=got.train.eval_every)
    assert got.data == replace(want.data, eval_examples=got.data.eval_examples)
    assert (got.ray.shards, got.tracking.mode, got.progress) == (2, "disabled", False)
    assert paper.paper_config(10_000_000, 6500, 2, "bf16").model.precision == "bf16"


def test_the_projection_is_the_measured_round_times_the_rounds():
    m = {
        "precision": "bf16",
        "wall_s": 600.0,
        "flops_per_round": 6e13,
        "phases": {"training_s": 590.0},
    }
    j = paper.project(m, cores=2, matmul_per_core=500e9, project_rounds=2000)
    assert j["core_hours"] == pytest.approx(2000 * 600 * 2 / 3600)
    assert j["core_days"] == pytest.approx(j["core_hours"] / 24)
    assert j["wall_hours"] == pytest.approx(2000 * 600 / 3600)
    assert j["achieved_gflops_per_core"] == pytest.approx(6e13 / (600 * 2) / 1e9)
    assert j["share_of_matmul"] == pytest.approx(50e9 / 500e9)
    # The same share of the GPU's bf16 peak, plus the round's measured non-training phases.
    peak = paper.GPU_PEAK_FLOPS["bf16"][1]
    assert j["gpu_compute_s_per_round"] == pytest.approx(6e13 / (0.1 * peak))
    assert j["gpu_round_s"] == pytest.approx(j["gpu_compute_s_per_round"] + 10.0)
    assert j["gpu_hours"] == pytest.approx(2000 * j["gpu_round_s"] / 3600)


@pytest.mark.slow
def test_the_paper_bench_times_a_round_and_projects_it(ray_session, capsys):
    out = paper.main(["--population", "20000", "--goal", "20", "--precisions", "fp32", "--rounds", "1"])
    text = capsys.readouterr().out
    m, j, cores = out["measured"]["fp32"], out["projection"]["fp32"], out["cores"]
    assert m["reported"] > 0 and m["trained"] >= m["reported"] and not m["abandoned"]
    assert m["flops_per_round"] > 0 and m["wall_s"] > 0
    assert set(m["phases"]) == set(paper.PHASES)
    assert j["core_hours"] == pytest.approx(2000 * m["wall_s"] * cores / 3600)
    assert m["core_s_per_report"] == pytest.approx(m["wall_s"] * cores / m["reported"])
    # What the user reads: the round, the projection table and the labelled GPU projection.
    round_line = re.search(r"^fp32: round ([0-9.]+) s \(mean of 1, no warm-up round", text, re.M)
    assert round_line and float(round_line.group(1)) == pytest.approx(m["wall_s"], abs=0.05)
    assert "projection, 2,000 rounds" in text
    row = re.search(r"^\s+fp32\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", text, re.M)
    assert row, text
    wall, core_h = float(row.group(1)), float(row.group(2))
    assert core_h == pytest.approx(2000 * wall * cores / 3600, abs=0.01 + 2000 * 0.05 * cores / 3600)
    assert "a PROJECTION from FLOPs, not a measurement" in text
    assert len([x for x in text.splitlines() if x.startswith("assumption: ")]) == len(out["assumptions"])
