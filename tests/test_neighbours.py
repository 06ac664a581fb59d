"""Privacy proven by attacking it: neighbouring runs through every mechanism and every path.

Two runs of the same fleet, seed and (replayed) secret randomness differ only in one device's data
(its update zeroed, or made invalid). For every mechanism and path (tests/neighbours.py):

- under `privacy.telemetry=private`, nothing that leaves the coordinator differs but the released
  model: not a line, not the summary (and the model does differ: the control);
- whatever the telemetry, the accounting does not depend on the device's data: the ledger and
  every epsilon are the same in both runs (a device whose update is invalid still used its turn);
- the epsilon accounted is at least what the mechanism that ran gives up: dp-accounting on every
  released round for DP-FedAvg; for DP-FTRL a brute force over every participation pattern of the
  sensitivity of all its releases, read off the released models themselves.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from neighbours import MECHANISMS, PATHS, config, patch, round_multipliers, run, target_for, true_sensitivity

from fleet.privacy.accountant import ORDERS

RELEASED_KEYS = {"clip_norm"}  # released like the model when the clip adapts (a noised count)


def _public(lines: list[dict], mechanism: str) -> list[dict]:
    if mechanism != "fedavg_adaptive":
        return lines
    return [{k: v for k, v in x.items() if k not in RELEASED_KEYS} for x in lines]


@pytest.mark.parametrize("other", ["zero", "nan"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mechanism", [*MECHANISMS, "fedavg_goal_1"])
def test_under_private_telemetry_only_the_model_differs(mechanism, path, other, tmp_path, monkeypatch):
    patch(monkeypatch)
    extra = ()
    if mechanism == "fedavg_goal_1":  # the target alone in its rounds: an invalid update is pure noise
        mechanism = "fedavg_fixed"
        extra = ("fleet.goal=1", "fleet.overselect=1", "fleet.min_separation_rounds=0")
    cfg = config(mechanism, path, "private", *extra)
    target = target_for(cfg, tmp_path / "probe")
    a = run(cfg, path, "push", target, tmp_path / "a")
    b = run(cfg, path, other, target, tmp_path / "b")
    assert a.target_counted >= 2 and b.target_counted == a.target_counted
    if extra and other == "nan":
        assert any(x.get("pure_noise") for x in b.full)  # the case this variant is for
    assert _public(a.lines, mechanism) == _public(b.lines, mechanism)
    assert a.summary == b.summary and "pure_noise_rounds" not in a.summary
    assert all("epsilon" not in x and "available" not in x for x in a.lines)
    assert not np.array_equal(a.models[-1], b.models[-1])  # the release itself does differ


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_accounting_is_blind_to_the_data_and_covers_what_ran(mechanism, path, tmp_path, monkeypatch):
    patch(monkeypatch)
    cfg = config(mechanism, path, "full")
    target = target_for(cfg, tmp_path / "probe")
    a = run(cfg, path, "push", target, tmp_path / "a")
    b = run(cfg, path, "nan", target, tmp_path / "b")
    assert a.target_counted >= 2 and any(x.get("waiting_for_limit") for x in a.full)
    # An invalid update still used the device's turn: who could be sampled next, hence every q_r
    # and every epsilon, is the same with and without its data.
    assert a.ledger == b.ledger and a.summary["epsilon"] == b.summary["epsilon"]
    assert [x.get("available") for x in a.lines] == [x.get("available") for x in b.lines]
    assert [x.get("epsilon") for x in a.lines] == [x.get("epsilon") for x in b.lines]
    if path == "resume":  # reproducible: the lost rounds were re-run and released the same again
        again = [a.lines[i + len(a.lost)] for i in a.lost]
        assert [a.lines[i] for i in a.lost] == again and len(a.ledger) == len(a.lines) - len(a.lost)
    kept = [x for i, x in enumerate(a.full) if path != "resume" or i not in a.lost]
    released = [x for x in kept if x.get("released")]
    assert len(a.ledger) == len(released)  # every release accounted once, lost ones too in secure mode
    if mechanism in ("ftrl", "blt"):
        z = cfg.privacy.noise_multiplier
        assert a.accounted >= true_sensitivity(a, z) * (1 - 1e-6)
    else:
        want = dp_accounting_epsilon(cfg, released, a.summary["delta"])
        assert want * (1 - 1e-6) <= a.summary["epsilon"] <= want * 1.02
        if mechanism != "fedavg_adaptive":  # (its clip, and so its noise's scale, moves every round)
            # The noise that ran, read off the released models: each round's release carries the
            # z it is accounted with (z / 2 under replace-one is the same noise, twice the shift).
            z = cfg.privacy.noise_multiplier
            np.testing.assert_allclose(round_multipliers(a, z), z, rtol=1e-3)


def dp_accounting_epsilon(cfg, released: list[dict], delta: float) -> float:
    """dp-accounting alone, from each released round's available count and the config: q_r =
    min(1, K / available_r), z under the sampling's relation (z / 2 under replace-one)."""
    p, f = cfg.privacy, cfg.fleet
    k = math.ceil(f.goal * f.overselect)
    z = p.noise_multiplier
    if p.sampling == "poisson":
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        for x in released:
            q = min(1.0, k / x["available"])
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    else:
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS), relation)
        for x in released:
            n, m = x["available"], min(k, x["available"])
            gauss = dp_accounting.GaussianDpEvent(z / 2)
            acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, gauss))
    return float(acc.get_epsilon(delta))


def test_a_secure_resume_of_dp_ftrl_after_lost_rounds_accounts_what_ran(tmp_path, monkeypatch):
    """The production shape shrunk: one tree, each device at most once in the tree's length,
    a checkpoint after its first round and the next six rounds lost. The lost rounds' nodes were
    released; re-entering the checkpoint's tree would put its first leaf into a second set of
    nodes. Brute force over every participation pattern of the sensitivity of all 14 releases
    (read off the released models) against what is accounted."""
    patch(monkeypatch)
    cfg = config(
        "ftrl",
        "resume_secure",
        "full",
        "privacy.restart_every=0",
        "fleet.min_separation_rounds=8",
        "fleet.population=48",
    )
    target = target_for(cfg, tmp_path / "probe")
    a = run(cfg, "resume_secure", "push", target, tmp_path / "a", rounds=8, checkpoint=1, lost=6)
    exact = true_sensitivity(a, cfg.privacy.noise_multiplier)
    assert exact > 3  # more than one tree of 7 steps gives (its 3 levels)
    assert a.accounted >= exact * (1 - 1e-6)  # continuing the checkpoint's tree: 7 for 13
    assert len(a.ledger) == 14 and [e["tree"] for e in a.ledger] == [0] * 7 + [1] * 7  # a fresh tree


@pytest.mark.parametrize("mechanism", ["fedavg_poisson", "ftrl", "blt"])
def test_neighbouring_runs_on_ray_write_nothing_different_but_the_model(
    mechanism, ray_session, tmp_path, caplog
):
    """The whole run as a user gets it, on Ray, under private telemetry: metrics.jsonl, summary.json,
    the W&B run (history, summary, config, the logged figures), the report and the console are the
    same whether one device's update is there or invalid; the checkpointed model is not. Wall-clock
    times and the run's own directory are the only things set aside."""
    import json
    import logging
    import re

    from test_tracking import wandb_records

    from fleet.privacy.mechanisms import prepare
    from fleet.round import checkpoint
    from fleet.runtime.cli import _summary_text
    from fleet.runtime.driver import train
    from fleet.runtime.report import load_run, write_report
    from tests.doubles import NEIGHBOUR_FILE

    extra = (
        "task.name=tests.doubles:NeighbourOnRay",
        "tracking.mode=offline",
        "ray.shards=2",
        "train.rounds=10",
    )
    cfg = config(mechanism, "plain", "private", *extra)
    target = target_for(config(mechanism, "plain", "private"), tmp_path / "probe")
    prepare(cfg)  # BLT's strategy optimized (and logged) once, before either run: cached for both
    outputs = {}
    for update in ("push", "nan"):
        NEIGHBOUR_FILE.write_text(json.dumps({"target": target, "update": update}))
        run_dir = tmp_path / update / "run"  # the same name: the report labels a run by it
        caplog.clear()
        with caplog.at_level(logging.INFO):
            summary = train(cfg, run_dir)
        fleet_lines = [r.getMessage() for r in caplog.records if r.name.startswith("fleet")]
        console = "\n".join([*fleet_lines, _summary_text(summary, str(run_dir))])
        write_report([load_run(run_dir)], run_dir / "report")

        def same(text: str, run_dir=run_dir) -> str:
            text = re.sub(r"run-\d{8}_\d{6}-\w+", "run-ID", text.replace(str(run_dir), "RUN"))
            return re.sub(r"(ready in|build_s\"?:?) ?[0-9.]+", r"\1 X", text)

        records = wandb_records(run_dir)
        history = [
            {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in records
            if r["type"] == "history"
        ]
        wandb_summary: dict = {}
        for r in records:
            if r["type"] == "summary":
                wandb_summary.update(r["summary"].get("update", {}))
        wandb_config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
        media = sorted((run_dir / "wandb").rglob("media/images/**/*.png"))
        outputs[update] = {
            "metrics": (run_dir / "metrics.jsonl").read_text(),
            "summary": same(json.dumps({k: v for k, v in summary.items() if k != "build_s"}, sort_keys=True)),
            "console": same(console),
            "report": same((run_dir / "report" / "report.html").read_text()),
            "wandb_history": history,
            "wandb_summary": {
                k: v
                for k, v in wandb_summary.items()
                if not k.startswith("_") and k not in ("run_dir", "build_s")
            },
            "wandb_config": {k: v for k, v in wandb_config.items() if k != "_wandb"},
            "wandb_media": [p.read_bytes() for p in media],
            "model": checkpoint.released_model(checkpoint.load_coordinator(run_dir / "state")),
        }
    NEIGHBOUR_FILE.unlink()
    a, b = outputs["push"], outputs["nan"]
    assert a["wandb_history"] and a["wandb_summary"] and "epsilon" in a["summary"]
    assert "epsilon: " in a["console"] and "public: " in a["console"]
    for key in a:
        if key != "model":
            assert a[key] == b[key], key
    assert not np.array_equal(a["model"], b["model"])
