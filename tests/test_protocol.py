"""The round's messages: what a shard answers is the protocol's type, field for field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import tiny_mean

from fleet.phones.timing import Reason
from fleet.round.protocol import JobPlan, TrainReport, merge_mix
from fleet.round.shard import NORM_BINS, ShardCore


def test_a_shard_answers_each_call_with_the_protocol_types():
    cfg = tiny_mean("fleet.min_reports=1")
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
    n = shard.check_in(0, 0.0)
    assert type(n) is int and 0 < n <= cfg.fleet.population
    ranks = np.arange(0, n, 50)
    plan = shard.plan(0, 0.0, 600.0, ranks)
    assert type(plan) is JobPlan
    for name, dtype in (("arrival", np.float64), ("flops", np.float64), ("done", np.float64)):
        assert getattr(plan, name).shape == ranks.shape and getattr(plan, name).dtype == dtype, name
    assert plan.reason.shape == ranks.shape and plan.reason.dtype == np.int8
    assert set(np.unique(plan.reason)) <= {int(r) for r in Reason}
    assert sum(plan.mix["tz"].values()) == len(ranks) == sum(plan.mix["speed"])
    accepted = plan.reason == Reason.REPORTED
    report = shard.train(0, 0.0, np.zeros(cfg.task.mean_dim, np.float32), accepted, 0.5)
    assert type(report) is TrainReport
    assert report.count + report.invalid == int(accepted.sum()) > 0
    assert report.sum.dtype == np.float64 and report.sum.shape == (cfg.task.mean_dim,)
    assert report.norm_hist.shape == (len(NORM_BINS) - 1,) and int(report.norm_hist.sum()) == report.count
    assert report.incarnation == plan.incarnation == shard.incarnation
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.count = 0  # a reply is a value: nobody downstream edits what a shard said


def test_merge_mix_adds_the_shards_counts():
    a = {"tz": {"+1": 2, "-5": 1}, "speed": [1, 2, 0]}
    b = {"tz": {"+1": 3}, "speed": [0, 1, 4]}
    assert merge_mix([a, b]) == {"tz": {"+1": 5, "-5": 1}, "speed": [1, 3, 4]}
    assert merge_mix([]) == {"tz": {}, "speed": []}


@pytest.mark.parametrize("where", ["fleet.round.shard:ShardCore", "fleet.bench._metered_shard:MeteredShard"])
def test_every_shard_class_takes_the_protocols_calls(where):
    """A shard class whose call differs from the protocol (a parameter the coordinator now sends,
    missing) fails here rather than mid-run, as the scale bench's metered shard once did."""
    import importlib
    import inspect

    import ray

    from fleet.round.protocol import Shard

    def signature(f) -> inspect.Signature:
        # Making a class a Ray actor adds Ray's own `_ray_trace_ctx` keyword to its methods, in
        # place, in every process that did so (an earlier test on the same worker).
        sig = inspect.signature(f)
        return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "_ray_trace_ctx"])

    module, _, name = where.partition(":")
    cls = getattr(importlib.import_module(module), name)
    ray.remote(cls)  # as the run does: the signatures must agree after Ray has wrapped them
    for call in ("check_in", "plan", "train"):
        assert signature(getattr(cls, call)) == signature(getattr(Shard, call)), call
