"""The release boundary: what leaves a run under `privacy.telemetry`, and what every epsilon says
it covers. A leak is tested by attacking it: one device changed, everyone else silent."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import in_process_fleet, tiny_mean

from fleet.round.coordinator import PRIVATE_KEYS
from fleet.runtime.cli import _summary_text
from tests.doubles import OneDevice

ATTACK = (
    "task.name=tests.doubles:OneDevice",
    "fleet.population=120",
    "fleet.goal=10",
    "fleet.min_reports=1",
    "fleet.failure_prob_mean=0",
    "task.mean_dim=50",
    "train.eval_every=1000",  # evaluations of the noised model are the release itself
)


def one_device_lines(telemetry: str, rounds: int = 25) -> tuple[dict[str, list[dict]], int]:
    """The same rounds with the target's contribution present ("push") and absent ("nan")."""
    cfg = tiny_mean(*ATTACK, f"privacy.telemetry={telemetry}")
    shards, probe = in_process_fleet(cfg, 1)
    probe.run_round()
    OneDevice.TARGET = int(shards[0].cols["device_id"][shards[0]._selected[0]])
    out = {}
    counted = 0
    for update in ("push", "nan"):
        OneDevice.UPDATE = update
        shards, coord = in_process_fleet(cfg, 1)
        out[update] = []
        for _ in range(rounds):
            out[update].append({k: v for k, v in coord.run_round().items() if k not in ("wall_s", "timing")})
        if update == "push":  # an invalid update ("nan") is never counted
            ids = np.asarray(shards[0].cols["device_id"])
            counted = int(shards[0].participations[ids == OneDevice.TARGET].sum())
    return out, counted


def test_full_telemetry_shows_the_rounds_one_device_was_counted_in():
    """The control: with research telemetry, the attack works (so the next test can fail)."""
    lines, counted = one_device_lines("full")
    assert counted >= 2
    differ = [a != b for a, b in zip(lines["push"], lines["nan"], strict=True)]
    assert sum(differ) == counted  # exactly the rounds in which the device was counted
    pairs = zip(lines["push"], lines["nan"], strict=True)
    assert any(a["clipped_sum_norm"] != b["clipped_sum_norm"] for a, b in pairs)


def test_private_telemetry_releases_nothing_that_tells_who_took_part():
    """The same attack under privacy.telemetry=private: apart from the noised model (not in the
    lines), nothing in any line differs between rounds with and without the device."""
    lines, counted = one_device_lines("private")
    assert counted >= 2
    assert lines["push"] == lines["nan"]
    for line in lines["push"]:
        assert set(line) <= PRIVATE_KEYS
        assert {"round", "released"} <= set(line) and "epsilon" not in line  # once, in the summary


def test_private_lines_keep_evaluations_of_the_released_model():
    cfg = tiny_mean("privacy.telemetry=private", "train.eval_every=2", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg)
    lines = [coord.run_round() for _ in range(2)]
    assert "eval_distance" in lines[1] and set(lines[0]) <= PRIVATE_KEYS


@pytest.mark.parametrize("rng, telemetry", [("reproducible", "full"), ("secure", "private")])
def test_every_epsilon_says_what_it_covers(rng, telemetry):
    cfg = tiny_mean(f"rng={rng}", f"privacy.telemetry={telemetry}", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg)
    coord.run_round()
    priv = coord.privacy_summary()
    if telemetry == "full":
        assert priv["covers"].startswith("the model only; telemetry not covered")
    else:
        assert priv["covers"].startswith("the model (and the noised clip norm) only")
    if rng == "reproducible":
        assert priv["guarantee"].startswith("not a guarantee: reproducible randomness")
    else:
        assert priv["guarantee"].startswith("secure randomness")
    summary = {
        "rounds": 1,
        "released_rounds": 1,
        "abandoned_rounds": 0,
        "stop_reason": "rounds",
        "privacy": priv,
        "final": {},
    }
    text = _summary_text(summary, "RUN")
    assert f"covers: {priv['covers']}" in text and priv["guarantee"] in text
    assert "textbook figure, q = ceil(goal x overselect) / population" in text


def test_reproducible_randomness_is_not_private():
    """Why reproducible mode's epsilon is no guarantee: knowing the seed, the noise is known, and
    the clipped sum comes back out of the released model."""
    cfg = tiny_mean(
        "task.name=tests.doubles:UnitPush", "train.server_optimizer=sgd", "fleet.min_reports=1", "seed=5"
    )
    _, coord = in_process_fleet(cfg)
    before = coord.get_params().astype(np.float64)
    line = coord.run_round()
    released = (coord.get_params().astype(np.float64) - before) * cfg.fleet.goal
    from fleet.privacy.noise import NoiseSource

    noise = NoiseSource("reproducible", 5).normal(0, "update_noise", len(released))
    noise *= coord.mechanism.plan.update
    recovered = released - noise * cfg.privacy.clip_norm
    assert np.linalg.norm(recovered) == pytest.approx(line["clipped_sum_norm"], rel=1e-4)


def test_private_evaluations_leave_out_the_baseline_computed_from_training_data():
    """The unigram baseline is computed from the training devices' word counts (for a real corpus,
    their data, un-noised): under private telemetry only evaluations of the released model leave."""
    from conftest import SMALL_NWP, make_cfg

    full = in_process_fleet(make_cfg(*SMALL_NWP, "fleet.min_reports=1"))[1].evaluate()
    private = in_process_fleet(make_cfg(*SMALL_NWP, "fleet.min_reports=1", "privacy.telemetry=private"))[1]
    assert "unigram_recall@1" in full and "recall@1" in full
    assert set(private.evaluate()) == {k for k in full if not k.startswith("unigram_")}
