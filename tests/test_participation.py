"""Participation audit: who trained, and per-device epsilon under the real availability schedule."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import in_process_fleet, tiny_mean
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fleet.audits import cli as audit_cli
from fleet.audits import participation, participation_privacy
from fleet.learning.data.corpus import make_corpus
from fleet.learning.model import build_model
from fleet.learning.tasks.mean import MeanTask
from fleet.learning.tasks.nwp import evaluate_tokens
from fleet.phones import population
from fleet.phones.participation import epsilons
from fleet.privacy.accountant import ORDERS
from fleet.privacy.mechanisms import default_delta
from fleet.round import checkpoint
from fleet.round.shard import ShardCore

HOUR = 3600.0


def _run(cfg, rounds: int, shards: int = 2, state_dir=None):
    sh, coord = in_process_fleet(cfg, shards, state_dir)
    return sh, coord, [coord.run_round() for _ in range(rounds)]


def _hand_epsilon(lines: list[dict], available_at, z: float, delta: float) -> float:
    """The per-device epsilon built event by event with dp-accounting, no shortcut: each round's
    q is the line's (ceil(goal x overselect) / available)."""
    acc = RdpAccountant(list(ORDERS))
    for x in lines:
        if x["released"] and available_at(x["sim_time"]):
            acc.compose(PoissonSampledDpEvent(x["q"], GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


def test_vectorised_conversion_equals_compute_epsilon():
    rng = np.random.default_rng(0)
    rows = np.abs(rng.normal(0, 1, (40, len(ORDERS)))) * np.linspace(0.01, 30, len(ORDERS))
    rows[0] = 0.0  # never available
    rows[1, :5] = np.inf  # orders dp-accounting could not compute
    rows[2, 3] = -1e-9  # numerical noise below zero
    rows[3] = 1e-12  # tiny: epsilon 0 by the KL bound
    for delta in (1e-5, 1e-10):
        got = epsilons(rows, np.asarray(ORDERS), delta)
        want = [compute_epsilon(ORDERS, r, delta)[0] for r in rows]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_always_available_devices_have_the_nominal_epsilon(tmp_path):
    cfg = tiny_mean(
        "fleet.population=400",
        "fleet.overselect=1.0",
        "fleet.failure_prob_mean=0",
        "fleet.low_memory_share=0",
        "fleet.min_reports=1",
        "train.eval_every=1000",
    )
    _, coord, lines = _run(cfg, 6)
    audit = participation.run_audit(cfg, coord.shards, lines, tmp_path, figures=False)
    priv = audit["privacy"]
    nominal = priv["nominal"]["epsilon"]
    assert audit["released_rounds"] == 6 and priv["nominal"]["q"] == lines[0]["q"] == 20 / 400
    assert priv["run"]["epsilon"] == coord.mechanism.epsilon()  # the run's own (PLD) figure
    rs = priv["real_schedule"]
    assert rs["distinct_patterns"] == 1 and rs["devices"] == 400 and rs["distinct_q"] == 1
    for q in rs["quantiles"].values():
        assert q == pytest.approx(nominal, rel=1e-12)
    assert rs["share_above_nominal"] == 0.0


def test_part_time_devices_epsilon_matches_hand_built_dp_accounting(tmp_path):
    # Rows 0-399 available only in even simulated hours, rows 400-499 always, rows 500-799 never.
    part, always = np.arange(400), np.arange(400, 500)
    starts = np.arange(0, 40) * 2 * HOUR
    dev = np.concatenate([np.repeat(part, len(starts)), always])
    start = np.concatenate([np.tile(starts, len(part)), np.zeros(len(always))])
    end = np.concatenate([np.tile(starts + HOUR, len(part)), np.full(len(always), 1e9)])
    trace = tmp_path / "trace.parquet"
    pq.write_table(pa.table({"device_id": dev, "start": start, "end": end}), trace)
    cfg = tiny_mean(
        "fleet.availability.model=trace",
        f"fleet.availability.trace_path={trace}",
        "fleet.population=800",
        "fleet.overselect=1.0",
        "fleet.failure_prob_mean=0",
        "fleet.low_memory_share=0",
        "fleet.min_reports=1",
        "fleet.round_interval_s=1500",
        "train.eval_every=1000",
    )
    shards, coord, lines = _run(cfg, 12)
    audit = participation.run_audit(cfg, shards, lines, tmp_path, figures=False)
    priv = audit["privacy"]
    z, delta = cfg.privacy.noise_multiplier, default_delta(800)
    hours = {int(x["sim_time"] // HOUR) % 2 for x in lines if x["released"]}
    assert hours == {0, 1}  # both kinds of round were released
    eps_part = _hand_epsilon(lines, lambda t: int(t // HOUR) % 2 == 0, z, delta)
    eps_always = _hand_epsilon(lines, lambda t: True, z, delta)
    nominal = priv["nominal"]["epsilon"]
    assert nominal < eps_part < eps_always
    rs = priv["real_schedule"]
    assert rs["distinct_patterns"] == 3 and rs["share_never_available"] == pytest.approx(300 / 800)
    # Sorted: 300 never available (0), 400 part-time (the median), 100 always on (the worst).
    assert rs["quantiles"]["0"] == 0.0
    # the audit bounds each round's curve from grid points (fleet.privacy.accountant): from above
    assert eps_part <= rs["median"] <= eps_part * 1.005
    assert eps_always <= rs["max"] <= eps_always * 1.005
    assert rs["share_above_nominal"] == pytest.approx(500 / 800)
    (zone,) = rs["by_group"]["timezone"]  # one time zone: its group is the whole fleet, over 2 shards
    assert zone["max"] == rs["max"] and zone["mean"] == pytest.approx(rs["mean"], rel=1e-12)
    # The shards' own per-pattern answer, before any merging.
    res = [s.schedule_privacy(*_schedule_args(cfg, lines, nominal)) for s in shards]
    got = sorted((round(e, 9), int(c)) for r in res for e, c in zip(r["eps"], r["counts"], strict=True))
    merged: dict[float, int] = {}
    for e, c in got:
        merged[e] = merged.get(e, 0) + c
    assert list(merged.values()) == [300, 400, 100]


def test_device_blocks_do_not_change_the_audit():
    """The audit walks a shard's devices in blocks to bound memory; any block size gives the same
    patterns, counts, epsilons and histograms, also for a pattern that spans blocks."""
    from fleet.phones import participation as participation_shard
    from fleet.round.shard import ShardCore

    cfg = tiny_mean("fleet.population=500", "fleet.timezones=[0.0,5.0]")
    cols = ShardCore(cfg, 0, 0, 500).cols
    rounds = 70  # two 64-bit words per bitmap
    gen = np.random.default_rng(0)
    avail = gen.random((rounds, 500)) < np.linspace(0.05, 0.9, 500)
    avail[:, 100:200] = avail[:, [100]]  # 100 devices with one pattern, over several blocks
    avail[:, 450:] = False  # and 50 never available
    curves, _ = participation_privacy.rounds_rdp("poisson", np.full(rounds, 20 / 400), 1.0)

    def audit(block: int) -> dict:
        steps = iter(avail)
        return participation_shard.schedule_privacy(
            lambda t: next(steps), cols, cfg.fleet, np.arange(rounds) * 600.0, curves,
            np.asarray(ORDERS), 1e-5, 0.5, block=block,
        )  # fmt: skip

    one, many = audit(1 << 18), audit(37)
    for key in ("patterns", "rounds", "counts"):
        np.testing.assert_array_equal(many[key], one[key])
    np.testing.assert_allclose(many["eps"], one["eps"], rtol=1e-12)  # BLAS sums depend on block size
    assert one["counts"].sum() == 500 and 100 in one["counts"] and 50 in one["counts"]
    assert (one["rounds"] * one["counts"]).sum() == avail.sum()
    assert one["eps"][one["rounds"] == 0].tolist() == [0.0] and one["eps"].max() > 0.5
    # An empty shard (a cluster with more shards than devices in a range) answers empty aggregates.
    empty = {k: v[:0] for k, v in cols.items()}
    none = participation_shard.schedule_privacy(
        lambda t: np.zeros(0, dtype=bool), empty, cfg.fleet, np.arange(rounds) * 600.0, curves,
        np.asarray(ORDERS), 1e-5, 0.5,
    )  # fmt: skip
    assert none["patterns"].shape == (0, 2) and none["counts"].sum() == 0
    assert all(none[name]["ratio_hist"].sum() == 0 for name in participation_shard.ATTRIBUTES)
    nobody = participation_shard.participation(
        empty, np.zeros(0, bool), np.zeros(0, np.uint16), np.zeros(0), cfg.fleet
    )
    assert nobody["devices"] == 0 and nobody["count_hist"].tolist() == [0]
    # The participation histograms, walked in blocks, against a one-block walk.
    counts = gen.poisson(0.7, 500).astype(np.uint16)
    last = np.where(counts > 0, gen.uniform(0, 3 * 86400, 500), 0.0)
    eligible = gen.random(500) < 0.9
    whole = participation_shard.participation(cols, eligible, counts, last, cfg.fleet)
    parts = participation_shard.participation(cols, eligible, counts, last, cfg.fleet, block=37)
    assert whole["count_hist"].tolist() == np.bincount(counts).tolist()
    assert whole["last_hour_utc"].sum() == (counts > 0).sum()
    for key in ("count_hist", "count_hist_eligible", "last_hour_utc", "last_hour_local"):
        np.testing.assert_array_equal(parts[key], whole[key])
    for name in participation_shard.ATTRIBUTES:
        for key in ("devices", "eligible", "participants", "participations"):
            np.testing.assert_array_equal(parts[name][key], whole[name][key])
        assert whole[name]["participations"].sum() == counts.sum()
        np.testing.assert_array_equal(many[name]["ratio_hist"], one[name]["ratio_hist"])
        np.testing.assert_allclose(many[name]["eps_max"], one[name]["eps_max"], rtol=1e-12)
        np.testing.assert_allclose(many[name]["eps_sum"], one[name]["eps_sum"], rtol=1e-12)


def _schedule_args(cfg, lines, nominal):
    released = [x for x in lines if x["released"]]
    curves, _ = participation_privacy.rounds_rdp(
        "poisson", np.array([x["q"] for x in released]), cfg.privacy.noise_multiplier
    )
    times = np.array([x["sim_time"] for x in released])
    return times, curves, np.asarray(ORDERS), default_delta(800), nominal


def test_each_rounds_curve_bounds_the_exact_one_from_above():
    q = 60 / np.array([900, 1200, 1500, 2100, 2600, 3300, 4000])
    curves, info = participation_privacy.rounds_rdp("poisson", q, 1.0)
    assert info == {"distinct_q": 7}
    for v, curve in zip(q, curves, strict=True):
        acc = RdpAccountant(list(ORDERS))
        acc.compose(PoissonSampledDpEvent(v, GaussianDpEvent(1.0)))
        exact = np.asarray(acc.rdp)
        finite = np.isfinite(exact)
        assert np.all(curve[finite] >= exact[finite] * (1 - 1e-9))
    e_exact = compute_epsilon(ORDERS, sum(np.asarray(_curve_of(v)) for v in q), 1e-6)[0]
    e_ours = compute_epsilon(ORDERS, curves.sum(axis=0), 1e-6)[0]
    assert e_exact <= e_ours < e_exact * 1.005


def _curve_of(q: float) -> np.ndarray:
    acc = RdpAccountant(list(ORDERS))
    acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(1.0)))
    return np.asarray(acc.rdp)


def test_audit_uses_the_fleet_and_delta_that_ran_with_a_corpus(tmp_path):
    """With data=arrow the corpus's devices are the fleet: population, nominal q, delta and the
    uniform prediction all use them, not fleet.population."""
    from conftest import SMALL_NWP, make_cfg, write_users_jsonl

    from fleet.learning.data.ingest import main as ingest

    src = write_users_jsonl(tmp_path / "raw.jsonl", (20, 40), users=150)
    assert (
        ingest(
            [
                str(src),
                str(tmp_path / "corpus"),
                "--no-progress",
                "--user-column",
                "user",
                "--vocab-size",
                "40",
                "--eval-fraction",
                "0.1",
            ]
        )
        == 0
    )
    cfg = make_cfg(
        *SMALL_NWP,
        "data=arrow",
        f"data.path={tmp_path / 'corpus'}",
        "model.vocab_size=40",
        "fleet.goal=10",
        "fleet.min_reports=1",
        "train.eval_every=1000",
        "train.participation_audit=false",
    )
    shards, coord = in_process_fleet(cfg, 2)
    devices = sum(s.n for s in shards)
    assert devices < 150 and devices != cfg.fleet.population
    lines = [coord.run_round() for _ in range(3)]
    audit = participation.run_audit(cfg, shards, lines, tmp_path, figures=False)
    priv, part = audit["privacy"], audit["participation"]
    assert audit["population"] == devices
    assert priv["delta"] == coord.mechanism.delta == default_delta(devices)
    assert priv["nominal"]["q"] == part["nominal_q"] == 10 / devices
    assert part["never_trained"]["uniform_expected"] == pytest.approx((1 - 10 / devices) ** 3)
    assert priv["run"]["epsilon"] == lines[-1]["epsilon"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["fleet.availability.model=diurnal"],
        ["fleet.availability.model=markov"],
        [  # an outage takes one of two time zones offline for some of the rounds
            "fleet.availability.model=diurnal",
            "fleet.timezones=[1.0,0.0]",
            "dropout.outage_timezones=[0.0]",
            "dropout.outage_start_hour=0.05",
            "dropout.outage_hours=0.1",
        ],
    ],
    ids=["diurnal", "markov", "outage"],
)
def test_schedule_is_recomputed_as_the_run_saw_it(tmp_path, overrides):
    # Without a participation limit, devices' available rounds add up to the rounds' check-ins:
    # the recomputation (a fresh model replayed from the run's start) saw what the run saw.
    cfg = tiny_mean(*overrides, "fleet.population=3000", "fleet.min_reports=1", "train.eval_every=1000")
    _, coord, lines = _run(cfg, 6)
    audit = participation.run_audit(cfg, coord.shards, lines, tmp_path, figures=False)
    exposure = np.asarray(audit["privacy"]["real_schedule"]["available_rounds"])
    assert (np.arange(len(exposure)) * exposure).sum() == sum(x["available"] for x in lines if x["released"])


def test_participation_counts_and_the_limit_only_bound(tmp_path):
    cfg = tiny_mean(
        "fleet.population=300",
        "fleet.min_separation_hours=1",
        "fleet.round_interval_s=900",
        "fleet.min_reports=1",
        "train.eval_every=1000",
    )
    _, coord, lines = _run(cfg, 10)
    audit = participation.run_audit(cfg, coord.shards, lines, tmp_path, figures=False)
    part = audit["participation"]
    released = [x for x in lines if x["released"]]
    counts = np.asarray(part["counts"]["observed"])
    assert counts.sum() == 300
    assert (np.arange(len(counts)) * counts).sum() == sum(x["reported"] for x in released)
    assert part["never_trained"]["share"] == counts[0] / 300
    assert sum(r["participations"] for r in part["by_group"]["timezone"]) == sum(
        x["reported"] for x in released
    )
    assert sum(part["by_hour"]["last_participation_local"]) == 300 - counts[0]
    limit = audit["privacy"]["participation_limit"]
    span = released[-1]["sim_time"] - released[0]["sim_time"]
    assert limit["max_participations"] == math.floor(span / HOUR) + 1 >= limit["max_observed"] > 1
    acc = RdpAccountant(list(ORDERS))
    acc.compose(GaussianDpEvent(cfg.privacy.noise_multiplier), limit["max_participations"])
    assert limit["epsilon"] == pytest.approx(acc.get_epsilon(default_delta(300)), rel=1e-12)
    # Per device, the better of the two bounds (every device here has the same schedule).
    schedule = audit["privacy"]["real_schedule"]["max"]
    assert limit["per_device"]["max"] == pytest.approx(min(schedule, limit["epsilon"]), rel=1e-12)
    # Shares of each attribute's groups add up to one.
    for a, b in audit["bias"].items():
        assert sum(b["population_share"]) == pytest.approx(1.0), a


def test_audit_outputs_hold_no_device_id(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = tiny_mean(
        "fleet.id_mode=random",
        "fleet.availability.model=diurnal",
        "fleet.population=3000",
        "fleet.failure_prob_mean=0.2",
        "fleet.min_reports=1",
        "fleet.timezones=[1.0,0.0]",
        "train.eval_every=1000",
        "seed=11",
    )
    shards, coord, lines = _run(cfg, 6)
    task = MeanTask(cfg, "server")
    params = coord.get_params()
    seen_ids: list[np.ndarray] = []

    def evaluate_devices(ids: np.ndarray, n: np.ndarray) -> dict:
        seen_ids.append(ids)
        losses = [
            0.5 * np.mean(np.sum((task.device_data(d, k) - params) ** 2, axis=1))
            for d, k in zip(ids, n, strict=True)
        ]
        return {"eval_loss": float(np.mean(losses)), "note": "not a number", "devices": len(ids)}

    audit = participation.run_audit(cfg, shards, lines, tmp_path, evaluate_devices=evaluate_devices)
    metrics = audit["bias"]["metrics_by_group"]
    assert set(metrics) == {"timezone", "speed", "memory", "examples"}
    assert set(metrics["timezone"]) == {"UTC+0", "UTC+1"}
    assert all(set(m) == {"eval_loss", "devices"} for by in metrics.values() for m in by.values())
    out = tmp_path / participation.OUT_DIR
    assert {p.name for p in out.iterdir()} >= {"participation.json", "participation_counts.png", "bias.png"}
    from fleet.audits.participation_figures import participation_figures

    figs = participation_figures(json.loads((out / "participation.json").read_text()))
    assert "epsilon_per_device" in figs and "metrics_by_group" in figs

    ids = set(int(x) for x in population.generate(cfg.fleet, cfg.seed, 0, 3000)["device_id"])
    ids |= set(int(x) for a in seen_ids for x in a)  # held-out devices' ids stay out too
    assert min(ids) > 10**12
    texts = [p.read_bytes().decode("utf-8", "replace") for p in out.iterdir()] + [caplog.text]
    numbers = set()
    for text in texts:
        numbers.update(int(m) for m in re.findall(r"\d{9,}", text))
        numbers.update(int(m, 16) for m in re.findall(r"[0-9a-fA-F]{12,}", text))
    assert not numbers & ids


def test_fleet_audit_after_the_fact_matches_the_live_audit(tmp_path, capsys):
    cfg = tiny_mean(
        "fleet.availability.model=diurnal",
        "fleet.population=2000",
        "fleet.min_reports=1",
        "fleet.min_separation_hours=2",
        "train.eval_every=1000",
    )
    run_dir = tmp_path / "run"
    state = run_dir / checkpoint.STATE_DIR
    state.mkdir(parents=True)
    checkpoint.save_config(run_dir, asdict(cfg))
    shards, coord, lines = _run(cfg, 6, state_dir=state)
    coord.checkpoint()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    live = participation.run_audit(cfg, shards, lines, run_dir, figures=False)

    audit_cli.main([str(run_dir), "--participation", "--no-figures"])
    assert "participation audit: 2000 devices" in capsys.readouterr().out
    after = json.loads((run_dir / participation.OUT_DIR / "participation.json").read_text())
    for section in ("participation", "bias"):
        assert after[section] == json.loads(json.dumps(live[section]))
    for key in ("median", "p99", "max", "distinct_patterns", "available_rounds"):
        assert after["privacy"]["real_schedule"][key] == pytest.approx(live["privacy"]["real_schedule"][key])


def test_metrics_by_group_with_the_nwp_task(tmp_path):
    # Held-out devices of each group through the NWP model's own evaluation; whatever it returns
    # (recall, perplexity, ...) is reported by group. A fresh fleet: no round needed for this part.
    cfg = tiny_mean("fleet.timezones=[1.0,0.0]", "fleet.population=1000")
    corpus = make_corpus(cfg)
    model = build_model(cfg.model)
    model.eval()

    calls: list[tuple[np.ndarray, dict]] = []

    def evaluate_devices(ids: np.ndarray, n: np.ndarray) -> dict:
        tokens = [corpus.examples(int(d), min(int(k), 4)) for d, k in zip(ids, n, strict=True)]
        res = evaluate_tokens(model, np.concatenate(tokens))
        calls.append((np.asarray(ids), res))
        return res

    audit = participation.run_audit(
        cfg,
        [ShardCore(cfg, 0, 0, 1000)],
        [],
        tmp_path,
        evaluate_devices=evaluate_devices,
        holdout_per_group=3,
        figures=False,
    )
    metrics = audit["bias"]["metrics_by_group"]
    assert set(metrics["timezone"]) == {"UTC+0", "UTC+1"}
    assert len(metrics["speed"]) == 5
    # Each group was evaluated on held-out devices of that group, and reports what came back.
    held = population.generate(cfg.fleet, cfg.seed, 1000, 3000)  # the rows past the fleet
    tz = dict(zip(held["device_id"].tolist(), held["tz_offset_hours"].tolist(), strict=True))
    tz_calls = calls[: len(metrics["timezone"])]  # the attributes are evaluated in order, time zones first
    by_tz = {}
    for ids, res in tz_calls:
        (zone,) = {tz[int(i)] for i in ids}  # every device of the group in one time zone
        by_tz[f"UTC{zone:+g}"] = res
    assert set(by_tz) == {"UTC+0", "UTC+1"}
    for label, res in by_tz.items():
        assert metrics["timezone"][label] == {k: float(v) for k, v in res.items()}
    assert all(1 <= len(ids) <= 3 for ids, _ in calls)  # up to holdout_per_group devices each


@pytest.mark.slow
def test_participation_matches_the_binomial_exactly_when_sampling_is_uniform(tmp_path):
    """Every device always available and eligible, exactly goal of them a round: the counts are
    Binomial(rounds, goal / population), and the audit says so; a diurnal fleet is far from it."""
    uniform = tiny_mean(
        "fleet.population=2000", "fleet.overselect=1.0", "fleet.failure_prob_mean=0",
        "fleet.low_memory_share=0", "fleet.min_reports=1", "privacy.sampling=fixed_size",
        "privacy.accountant=rdp", "fleet.goal=100", "train.eval_every=1000",
    )  # fmt: skip
    _, coord, lines = _run(uniform, 40)
    part = participation.run_audit(uniform, coord.shards, lines, tmp_path, figures=False)["participation"]
    assert part["nominal_q"] == 0.05
    assert part["tv_distance_binomial"] < 0.05
    assert part["dispersion"] == pytest.approx(1 - 0.05, abs=0.08)  # a binomial's variance / mean
    assert part["never_trained"]["share"] == pytest.approx(0.95**40, abs=0.03)
    skewed = tiny_mean(
        "fleet.population=2000", "fleet.availability.model=diurnal", "fleet.round_interval_s=1800",
        "fleet.min_reports=1", "fleet.goal=100", "train.eval_every=1000",
    )  # fmt: skip
    _, coord, lines = _run(skewed, 40)
    skew = participation.run_audit(skewed, coord.shards, lines, tmp_path / "b", figures=False)[
        "participation"
    ]
    assert skew["tv_distance_binomial"] > 3 * part["tv_distance_binomial"]
