"""Nothing lost, nothing leaked: exact resume, shard crashes, invalid updates, adversaries."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import participations_of, tiny_mean

from fleet.config import ConfigError
from fleet.round import checkpoint
from fleet.round.coordinator import Coordinator
from fleet.round.shard import ShardCore
from fleet.runtime.driver import train

VOLATILE = {"wall_s", "timing"}


def _stable(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k not in VOLATILE} for x in lines]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> np.ndarray:
    return checkpoint.released_model(checkpoint.load_coordinator(run_dir / "state"))


def _cfg(*extra: str):
    return tiny_mean(
        "fleet.availability.model=markov",
        "fleet.population=3000",
        "fleet.min_separation_hours=1",
        "fleet.failure_prob_mean=0.1",
        "fleet.min_reports=1",
        "train.rounds=8",
        "train.checkpoint_every=3",
        "train.eval_every=2",
        "ray.shards=2",
        *extra,
    )


class Crash(RuntimeError):
    pass


def test_resume_equals_uninterrupted_run_across_a_kill(ray_session, tmp_path):
    full = tmp_path / "full"
    train(_cfg(), full)

    broken = tmp_path / "broken"

    def die_after_round_4(line, shards, coordinator):
        if line["round"] == 4:
            raise Crash("killed between rounds")

    with pytest.raises(Crash):
        train(_cfg(), broken, on_round=die_after_round_4)
    assert len(_metrics(broken)) == 5  # rounds 0-4 logged; the checkpoint is at round 3
    assert checkpoint.load_coordinator(broken / "state")["round"] == 3

    summary = train(_cfg(f"resume={broken}"), tmp_path / "ignored")
    assert summary["rounds"] == 8
    np.testing.assert_array_equal(_weights(broken), _weights(full))
    assert _stable(_metrics(broken)) == _stable(_metrics(full))


def test_shard_killed_mid_round_run_completes_and_accounts_only_released(ray_session, tmp_path):
    import ray

    killed = threading.Event()

    def kill_soon(line, shards, coordinator):
        if line["round"] == 1:

            def later():
                time.sleep(0.1)
                ray.kill(shards[0], no_restart=False)
                killed.set()

            threading.Thread(target=later, daemon=True).start()

    cfg = _cfg("task.name=tests.doubles:SlowMean", "train.rounds=5")
    summary = train(cfg, tmp_path / "run", on_round=kill_soon)
    assert killed.is_set()
    lines = _metrics(tmp_path / "run")
    assert summary["rounds"] == 5 and len(lines) == 5
    assert summary["incidents"]["shard_crash"] >= 1
    assert any(x.get("incident") == "shard_crash" and not x["released"] for x in lines)
    assert (
        summary["privacy"]["released_rounds"]
        == summary["released_rounds"]
        == sum(x["released"] for x in lines)
    )
    for x in lines:
        if x.get("incident"):  # a crashed round's counts are unknown: null, not zero
            assert x["selected"] is None and x["reported"] is None and not x["dropped"]
        else:
            assert x["selected"] == x["reported"] + sum(x["dropped"].values())


def test_restarted_shard_restores_participation_from_checkpoint_and_journal(tmp_path):
    cfg = _cfg()
    shards = [ShardCore(cfg, 0, 0, 3000, state_dir=str(tmp_path))]
    coord = Coordinator(cfg, shards, 3000, str(tmp_path))
    for r in range(5):
        coord.run_round()
        if r == 1:
            coord.checkpoint()  # state as of round 2; rounds 2-4 go to the journal
    reborn = ShardCore(cfg, 0, 0, 3000, state_dir=str(tmp_path))
    reborn.restore(5)
    np.testing.assert_array_equal(reborn.last_participation, shards[0].last_participation)
    np.testing.assert_array_equal(reborn.participations, shards[0].participations)
    assert shards[0].participations.sum() > 0


def test_nan_update_dropped_and_sum_unaffected():
    honest = tiny_mean("fleet.failure_prob_mean=0", "fleet.min_reports=1")
    bad = tiny_mean(
        "fleet.failure_prob_mean=0", "fleet.min_reports=1", "task.name=tests.doubles:NaNForOddDevices"
    )
    results = []
    for cfg in (honest, bad):
        shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
        n = shard.check_in(0, 0.0)
        shard.plan(0, 0.0, 600.0, np.arange(min(n, 40)))
        ids = shard.cols["device_id"][shard._selected]
        res = shard.train(0, 0.0, np.zeros(cfg.task.mean_dim, np.float32), np.ones(40, bool), 0.5)
        results.append((res, ids))
    (good, ids), (poisoned, _) = results
    odd = ids % 2 == 1
    assert poisoned.invalid == odd.sum() > 0
    assert poisoned.count == (~odd).sum()
    # The poisoned sum equals the honest sum over the even devices alone.
    even_only = tiny_mean("fleet.failure_prob_mean=0", "fleet.min_reports=1")
    shard = ShardCore(even_only, 0, 0, even_only.fleet.population)
    shard.check_in(0, 0.0)
    shard.plan(0, 0.0, 600.0, np.arange(40))
    ref = shard.train(0, 0.0, np.zeros(even_only.task.mean_dim, np.float32), ~odd, 0.5)
    np.testing.assert_allclose(poisoned.sum, ref.sum, rtol=1e-12)
    assert np.all(np.isfinite(poisoned.sum))
    # ... and the honest run is the even devices' sum plus the odd ones': the poison removed
    # exactly the odd devices' contributions, nothing else.
    shard.check_in(0, 0.0)
    shard.plan(0, 0.0, 600.0, np.arange(40))
    odd_only = shard.train(0, 0.0, np.zeros(even_only.task.mean_dim, np.float32), odd, 0.5)
    assert good.count == 40 and np.linalg.norm(odd_only.sum) > 0
    np.testing.assert_allclose(good.sum, ref.sum + odd_only.sum, rtol=1e-9)


def test_device_reporting_twice_counts_once():
    cfg = tiny_mean("task.name=tests.doubles:ReportsTwice", "privacy.clip_norm=1.0")
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population)
    shard.check_in(0, 0.0)
    shard.plan(0, 0.0, 600.0, np.arange(10))
    res = shard.train(0, 0.0, np.zeros(cfg.task.mean_dim, np.float32), np.ones(10, bool), 1.0)
    assert res.count == 10
    assert np.linalg.norm(res.sum) <= 10 * 1.0 + 1e-9


def _contains_any(obj, ids: set[int], seen: set[int] | None = None) -> bool:
    """Search an object graph (dicts, lists, arrays, attributes) for any of the ids."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, (int, np.integer)):
        return int(obj) in ids
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind in "iu" and bool(np.isin(obj.ravel(), list(ids)).any())
    if isinstance(obj, dict):
        return any(_contains_any(k, ids, seen) or _contains_any(v, ids, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(_contains_any(v, ids, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("fleet"):
        return any(_contains_any(v, ids, seen) for k, v in vars(obj).items() if k != "shards")
    return False


def test_cohort_cannot_be_read_from_coordinator_state_or_checkpoint(tmp_path):
    cfg = tiny_mean("fleet.id_mode=random", "fleet.min_reports=1")
    shard = ShardCore(cfg, 0, 0, cfg.fleet.population, state_dir=str(tmp_path))
    coord = Coordinator(cfg, [shard], cfg.fleet.population, str(tmp_path))
    for _ in range(3):
        coord.run_round()
    coord.checkpoint()
    cohort = set(int(x) for x in shard.cols["device_id"][shard._selected])
    assert cohort and not _contains_any(coord, cohort)
    assert not _contains_any(coord.state(), cohort)
    raw = (tmp_path / checkpoint.COORDINATOR_FILE).read_bytes()
    for dev in cohort:
        assert str(dev).encode() not in raw and int(dev).to_bytes(8, "little", signed=True) not in raw


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match=r"^resume: .*not a fleet run"):
        train(tiny_mean(f"resume={tmp_path}"), tmp_path)


def test_bad_input_leaves_earlier_checkpoints_intact(ray_session, tmp_path):
    run = tmp_path / "run"
    train(_cfg("train.rounds=3"), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    pq = tmp_path / "broken.parquet"
    pq.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ConfigError, match=r"^fleet.path: "):
        train(_cfg(f"fleet.path={pq}"), run)
    with pytest.raises(ConfigError, match=r"^fleet.goal: "):
        train(_cfg("fleet.goal=999999"), run)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after and any(p.name == "coordinator.pt" for p in after)


def _ledger(run_state: Path) -> list:
    from fleet.privacy.ledger import LEDGER_FILE, read
    from fleet.privacy.mechanisms.fedavg import GaussianFedAvg

    return read(run_state / LEDGER_FILE, GaussianFedAvg.parse)


@pytest.mark.parametrize("rng", ["secure", "reproducible"])
def test_rounds_released_after_the_checkpoint_are_accounted_across_a_crash(rng, tmp_path):
    """A crash after rounds 5 and 6 were released (and seen) but before the next checkpoint: on
    resume they run again. In secure mode the re-runs are new releases with fresh cohorts, so all
    nine stay in the ledger and the devices counted in the lost rounds stay counted (nobody takes
    part twice within the limit). In reproducible mode the re-runs release the same outputs: the
    ledger holds seven and the run equals an uninterrupted one."""
    from conftest import in_process_fleet

    from fleet.privacy.accountant import Accountant

    cfg = tiny_mean(f"rng={rng}", "fleet.min_separation_hours=24", "fleet.min_reports=1")
    state = tmp_path / "state"
    _, coord = in_process_fleet(cfg, 2, state)
    first = [coord.run_round() for _ in range(5)]
    coord.checkpoint()
    lost = [coord.run_round() for _ in range(2)]
    assert len(_ledger(state)) == 7
    shards, again = in_process_fleet(cfg, 2, state)  # new actors: the crash lost the old ones
    assert again.resume() == 5
    secure = rng == "secure"
    assert again.mechanism.epsilon() == pytest.approx((lost if secure else first)[-1]["epsilon"])
    reruns = [again.run_round() for _ in range(2)]
    ledger = _ledger(state)
    mech = again.mechanism
    acc = Accountant(cfg.privacy.accountant, mech.delta, mech.accountant.interval, ledger)
    assert reruns[-1]["epsilon"] == pytest.approx(acc.epsilon())
    participations = np.concatenate([s.participations for s in shards])
    assert participations.max() <= 1  # the limit held for every device
    if secure:
        assert len(ledger) == 9 and reruns[-1]["epsilon"] > lost[-1]["epsilon"]
        assert participations.sum() == sum(x["reported"] for x in first + lost + reruns)
    else:
        assert len(ledger) == 7 and _stable(reruns) == _stable(lost)
        assert participations.sum() == sum(x["reported"] for x in first + reruns)


def test_participation_times_are_exact_at_large_simulated_times():
    """float64: at t = 1.7e7 s float32 rounds by up to a second, so a device could return before
    its limit ended."""
    cfg = tiny_mean("fleet.min_separation_hours=1")
    shard = ShardCore(cfg, 0, 0, 2000)
    row = int(np.flatnonzero(shard.eligible)[0])
    t = 1.7e7 + 0.37
    shard.last_participation[row] = t
    assert shard.last_participation.dtype == np.float64
    shard.check_in(0, t + 3600 - 0.05)
    assert row not in shard._available
    shard.check_in(1, t + 3600)
    assert row in shard._available


def test_shard_restarted_between_rounds_keeps_the_participation_limit(ray_session, tmp_path):
    """Ray restarts a killed shard before the next call reaches it, so no call fails: the shard
    must restore its participation record by itself, and the run counts the restart."""
    import ray

    def kill_between_rounds(line, shards, coordinator):
        if line["round"] == 3:  # after the checkpoint at 3: rounds since go to the journal
            pid = ray.get(shards[0].info.remote())["pid"]
            ray.kill(shards[0], no_restart=False)
            for _ in range(300):
                try:
                    if ray.get(shards[0].info.remote())["pid"] != pid:
                        return
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    pass
                time.sleep(0.1)

    cfg = tiny_mean(
        "fleet.goal=150",
        "fleet.min_separation_hours=24",
        "fleet.min_reports=1",
        "train.rounds=7",
        "train.checkpoint_every=2",
        "ray.shards=2",
    )
    summary = train(cfg, tmp_path / "run", on_round=kill_between_rounds)
    lines = _metrics(tmp_path / "run")
    assert summary["incidents"]["shard_restart"] >= 1 and all(x["released"] for x in lines)
    participations = participations_of(tmp_path / "run")
    assert participations.max() <= 1  # a forgetful shard would have let ~100 devices in again
    assert participations.sum() == sum(x["reported"] for x in lines)


def test_the_same_run_on_one_two_or_three_shards_gives_the_same_model_and_metrics():
    """Reproducible mode: per-device randomness is keyed by (seed, round, device), never by shard."""
    from conftest import in_process_fleet

    results = []
    for n in (1, 2, 3):
        cfg = tiny_mean("fleet.availability.model=diurnal", "fleet.population=3000", "fleet.min_reports=1")
        _, coord = in_process_fleet(cfg, n)
        lines = _stable([coord.run_round() for _ in range(5)])
        results.append((coord.get_params(), [{k: v for k, v in x.items() if k != "mix"} for x in lines]))
    for params, lines in results[1:]:
        np.testing.assert_allclose(params, results[0][0], rtol=1e-6, atol=1e-7)  # float summation order
        assert [x["reported"] for x in lines] == [x["reported"] for x in results[0][1]]
        assert [x["epsilon"] for x in lines] == pytest.approx([x["epsilon"] for x in results[0][1]])


@pytest.mark.parametrize(
    "overrides",
    [
        ("task.name=nwp", "model.vocab_size=200", "model.embed_dim=8", "model.hidden_dim=16",
         "model.proj_dim=8", "fleet.examples_median=8", "fleet.examples_max=16", "data.eval_examples=200"),
        ("privacy=dp_fedavg_adaptive",),
    ],
    ids=["nwp", "adaptive clipping"],
)  # fmt: skip
def test_resume_of_the_nwp_task_and_of_adaptive_clipping_is_exact(overrides, tmp_path):
    from conftest import in_process_fleet

    cfg = tiny_mean(*overrides, "fleet.min_reports=1", "fleet.min_separation_hours=1")
    _, full = in_process_fleet(cfg, 2)
    whole = _stable([full.run_round() for _ in range(6)])
    _, coord = in_process_fleet(cfg, 2, tmp_path)
    for _ in range(3):
        coord.run_round()
    coord.checkpoint()
    coord.run_round()  # lost
    _, again = in_process_fleet(cfg, 2, tmp_path)
    assert again.resume() == 3
    rest = _stable([again.run_round() for _ in range(3)])
    np.testing.assert_array_equal(again.get_params(), full.get_params())
    assert rest == whole[3:] and again.mechanism.clip_norm == full.mechanism.clip_norm


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL of the whole `fleet-train` process (no exception, no Ctrl-C handler) after a
    checkpoint; `fleet-train resume=RUN_DIR` then ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    args = [
        "fleet=tiny", "task.name=tests.doubles:SlowMean", "train.rounds=9", "train.checkpoint_every=3",
        "fleet.min_reports=1", "tracking=disabled", "progress=false", "train.participation_audit=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def fleet_train(*extra: str, wait: bool = True) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", "fleet", *args, *extra], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        if wait:
            assert p.wait(timeout=600) == 0, p.stderr.read().decode()
        return p

    fleet_train("hydra.run.dir=full")
    p = fleet_train("hydra.run.dir=killed", wait=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and everything it started
    p.wait(timeout=60)
    assert checkpoint.load_coordinator(tmp_path / "killed" / "state")["round"] == 3
    fleet_train(f"resume={tmp_path / 'killed'}", "hydra.run.dir=resumed")
    np.testing.assert_array_equal(_weights(tmp_path / "killed"), _weights(tmp_path / "full"))
    assert _stable(_metrics(tmp_path / "killed")) == _stable(_metrics(tmp_path / "full"))


def test_a_secure_resume_after_a_torn_checkpoint_forgets_nobody(tmp_path):
    """The driver dies inside a checkpoint, after the shards saved round 5 and before the
    coordinator committed it: the resume goes back to round 2, the shards' newest files are of
    round 5, and the rounds re-run get round numbers below them. Two crashes later every device
    that took part in any released round is still recorded, and the limit still holds."""
    from conftest import in_process_fleet

    cfg = tiny_mean("privacy=dp_ftrl", "rng=secure", "fleet.min_reports=1", "fleet.min_separation_rounds=50")
    shards, coord = in_process_fleet(cfg, 2, tmp_path)
    for _ in range(2):
        coord.run_round()
    coord.checkpoint()
    for _ in range(3):
        coord.run_round()
    for s in shards:
        s.save_state(coord.round)  # ... and the coordinator's file is never written
    shards, coord = in_process_fleet(cfg, 2, tmp_path)
    assert coord.resume() == 2
    for _ in range(3):
        coord.run_round()
    before = np.concatenate([s.last_release for s in shards])
    counted = int(np.concatenate([s.participations for s in shards]).sum())
    assert coord.mechanism.releases == 8 and counted == 8 * cfg.fleet.goal
    for _ in range(2):  # crashes before the next checkpoint: everything comes back from the files
        shards, coord = in_process_fleet(cfg, 2, tmp_path)
        coord.resume()
        np.testing.assert_array_equal(np.concatenate([s.last_release for s in shards]), before)
        assert int(np.concatenate([s.participations for s in shards]).sum()) == counted
    n = sum(s.check_in(coord.round, coord.clock, coord.mechanism.releases) for s in shards)
    eligible = sum(int(s.eligible.sum()) for s in shards)
    assert n == eligible - counted  # nobody back before 50 released rounds


def test_a_resume_refuses_a_ledger_shorter_than_its_checkpoint(tmp_path):
    from conftest import in_process_fleet

    cfg = tiny_mean("fleet.min_reports=1")
    _, coord = in_process_fleet(cfg, 2, tmp_path)
    for _ in range(3):
        coord.run_round()
    coord.checkpoint()
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:2]))
    _, again = in_process_fleet(cfg, 2, tmp_path)
    with pytest.raises(ConfigError, match="resume: the ledger holds 2 releases, fewer than the 3"):
        again.resume()


def test_a_reproducible_resume_that_stops_early_still_accounts_what_was_released(tmp_path):
    """Rounds 5 and 6 were released, then lost to a crash; the resumed run re-runs round 5 (the
    same release: accounted once) and stops. Round 6's release left before the crash: it stays in
    the ledger and in the summary's epsilon."""
    from conftest import in_process_fleet

    from fleet.privacy.accountant import Accountant

    cfg = tiny_mean("fleet.min_reports=1")
    _, coord = in_process_fleet(cfg, 2, tmp_path)
    for _ in range(5):
        coord.run_round()
    coord.checkpoint()
    lost = [coord.run_round() for _ in range(2)]
    _, again = in_process_fleet(cfg, 2, tmp_path)
    assert again.resume() == 5 and again.mechanism.releases == 5
    rerun = again.run_round()
    assert _stable([rerun]) == _stable(lost[:1])  # the same release, the same line
    ledger = _ledger(tmp_path)
    mech = again.mechanism
    assert len(ledger) == 7 and mech.releases == 6
    everything = Accountant(cfg.privacy.accountant, mech.delta, mech.accountant.interval, ledger)
    assert again.privacy_summary()["epsilon"] == pytest.approx(everything.epsilon()) == lost[-1]["epsilon"]
