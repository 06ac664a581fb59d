"""BLT-DP-FTRL (privacy=dp_blt): the strategy, its sensitivity, its stream, its state and its figure.

The sensitivity is jax-privacy's; it is checked here against a brute force over every participation
pattern, and the stream (numpy, fed by the mechanism's noise source) against jax-privacy's own
dense C and C^-1. The neighbouring-run harness (tests/test_neighbours.py) covers the mechanism on
every path, its accounting against the sensitivity read off the released models.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import in_process_fleet, tiny_mean

from fleet.config import ConfigError
from fleet.privacy import blt
from fleet.privacy.mechanisms import check_population, validate
from fleet.privacy.mechanisms.blt import BLTAccountant, BLTRelease
from fleet.privacy.noise import NoiseSource
from fleet.privacy.segments import gaussian_epsilon

BLT = ("privacy=dp_blt", "fleet.min_reports=1", "fleet.failure_prob_mean=0", "train.rounds=24")


def brute_force(c: np.ndarray, separation: int) -> float:
    """max |C u|^2 over every 0/1 vector u whose 1s are at least `separation` apart."""
    n = len(c)
    best = 0.0
    for k in range(1, n + 1):
        for idx in itertools.combinations(range(n), k):
            if any(j - i < separation for i, j in itertools.pairwise(idx)):
                continue
            best = max(best, float(np.sum(c[:, list(idx)].sum(axis=1) ** 2)))
    return best


@pytest.mark.parametrize("n, b", [(12, 1), (14, 2), (15, 3), (16, 5)])
def test_the_sensitivity_is_the_brute_force_over_every_participation_pattern(n, b):
    s = blt.strategy(n, b)
    c = s.dense(n)
    want = brute_force(c, b)
    assert blt.sensitivity_squared(s, n, b) == pytest.approx(want, rel=1e-12)
    # For fewer steps (a run stopped early) and a longer run than planned, too.
    for steps in (n // 2, n + 3):
        assert blt.sensitivity_squared(s, steps, b) == pytest.approx(
            brute_force(s.dense(steps), b), rel=1e-12
        )
    assert want > 1.0  # more than one participation counts: the limit allows several


@pytest.mark.parametrize("n, b", [(14, 2), (24, 4), (200, 10)])
def test_the_per_step_sensitivity_is_jax_privacys_for_every_length(n, b):
    """The accountant's numpy transcription against jax-privacy's `minsep_sensitivity_squared`,
    for every length up to the planned one and beyond it, and other separations."""
    s = blt.strategy(n, b)
    for steps in sorted({1, 2, b - 1, b, b + 1, n // 3, n - 1, n, n + 7, 2 * n}):
        for sep in {1, b, 2 * b + 1}:
            if steps >= 1:
                want = blt.jax_sensitivity_squared(s, steps, sep)
                assert blt.sensitivity_squared(s, steps, sep) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_the_coefficients_are_jax_privacys_own():
    from jax_privacy.matrix_factorization import buffered_toeplitz

    blt._jax()
    s = blt.strategy(14, 2)
    theirs = buffered_toeplitz.BufferedToeplitz.build(s.buf_decay, s.output_scale)
    np.testing.assert_allclose(s.dense(30), np.asarray(theirs.materialize(30)), rtol=0, atol=1e-13)


def test_the_stream_releases_the_dense_c_inverse_z_and_cancels_in_the_prefix_sums():
    """y_t = (C G)_t + z_t and g_hat = C^-1 Y by the buffers: g_hat - G equals the dense C^-1 Z."""
    n, dim = 40, 7
    s = blt.strategy(14, 2)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(n, dim))
    z = rng.normal(size=(n, dim))
    stream = blt.Stream(s, dim)
    y, g_hat = [], []
    for t in range(n):
        y.append(stream.correlated(g[t]) + z[t])
        g_hat.append(stream.advance(g[t], y[-1]))
    c = s.dense(n)
    np.testing.assert_allclose(np.array(y), c @ g + z, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.array(g_hat) - g, np.linalg.solve(c, z), rtol=0, atol=1e-12)
    # The noise in the prefix sums (what an SGD model carries) is smaller than independent noise's.
    prefix = np.cumsum(np.linalg.inv(c), axis=0)
    assert np.sqrt((prefix**2).sum(axis=1)).max() == pytest.approx(blt.max_error(s, n))
    assert blt.max_error(s, n) < np.sqrt(n)


def test_the_strategy_is_optimized_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    from jax_privacy.matrix_factorization import buffered_toeplitz

    monkeypatch.setenv("FLEET_CACHE", str(tmp_path))
    first = blt.strategy(10, 3, max_buffers=3)
    files = list((tmp_path / "blt").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["rounds"] == 10

    def refuse(**kw):
        raise AssertionError("optimized again")

    monkeypatch.setattr(buffered_toeplitz, "optimize", refuse)
    assert blt.strategy(10, 3, max_buffers=3) == first
    files[0].write_text("{ damaged")  # a damaged entry is optimized again
    with pytest.raises(AssertionError, match="optimized again"):
        blt.strategy(10, 3, max_buffers=3)


def _run(cfg, rounds, state_dir=None):
    shards, coord = in_process_fleet(cfg, 2, state_dir)
    lines = [coord.run_round() for _ in range(rounds)]
    return coord, lines


def test_a_run_releases_what_the_accountant_counts_and_the_epsilon_is_dp_accountings():
    cfg = tiny_mean(*BLT, "fleet.min_separation_rounds=3", "privacy.noise_multiplier=2")
    coord, lines = _run(cfg, 6)
    mech = coord.mechanism
    released = [x for x in lines if x["released"]]
    assert len(released) == 6 and len(mech.ledger.releases) == 6
    s = mech.stream.s
    sens = blt.sensitivity_squared(s, 6, 3)
    want = gaussian_epsilon(2.0 / np.sqrt(sens), "pld", mech.delta, mech.accountant.interval)
    assert mech.epsilon() == pytest.approx(want, rel=1e-9)
    assert sens == pytest.approx(brute_force(s.dense(6), 3), rel=1e-12)
    # the ledger alone recomputes it
    entries = [
        BLTRelease(**{**e, "buf_decay": tuple(e["buf_decay"]), "output_scale": tuple(e["output_scale"])})
        for e in (r.to_json() for r in mech.ledger.releases)
    ]
    assert BLTAccountant("pld", mech.delta, mech.accountant.interval, entries).epsilon() == mech.epsilon()
    assert all(x["prefix_noise_norm"] > 0 for x in released)


def test_noise_is_z_times_s_on_the_correlated_release():
    """The release y_t = (C G)_t + z_t carries N(0, (zS)^2): read back through the buffers."""
    cfg = tiny_mean(*BLT, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5")
    coord, _ = _run(cfg, 3)
    mech = coord.mechanism
    noise = NoiseSource(cfg.rng, cfg.seed)
    dim = mech.dim
    z = np.stack([noise.normal(t, "blt_0", dim) * 0.4 for t in (1, 2, 3)])
    # g_hat - g over the three rounds is C^-1 Z; its prefix sum's norm is the line's figure
    w = np.linalg.solve(mech.stream.s.dense(3), z)
    np.testing.assert_allclose(mech.noise_sum, w.sum(axis=0), rtol=1e-9, atol=1e-12)


def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_mean(*BLT, "fleet.min_separation_rounds=2", "privacy.noise_multiplier=0.7")
    full, _ = _run(cfg, 7)
    _, coord = in_process_fleet(cfg, 2, tmp_path)
    for _ in range(3):
        coord.run_round()
    coord.checkpoint()
    coord.run_round()  # lost to the crash
    _, again = in_process_fleet(cfg, 2, tmp_path)
    assert again.resume() == 3
    for _ in range(4):
        again.run_round()
    np.testing.assert_array_equal(again.get_params(), full.get_params())
    assert again.mechanism.epsilon() == full.mechanism.epsilon()
    assert [r.to_json() for r in again.mechanism.ledger.releases] == [
        r.to_json() for r in full.mechanism.ledger.releases
    ]


def test_without_noise_blt_is_the_server_optimizer_on_the_clipped_sums():
    common = ("fleet.min_separation_rounds=2", "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true")
    a, _ = _run(tiny_mean(*BLT, *common), 5)
    b, _ = _run(
        tiny_mean(
            *BLT, *common, "privacy=dp_fedavg", "privacy.sampling=fixed_size", "privacy.accountant=rdp"
        ),
        5,
    )
    np.testing.assert_allclose(a.get_params(), b.get_params(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.blt_max_buffers=0", "privacy.blt_max_buffers: must be in 1..10"),
        ("privacy.blt_max_buffers=16", "privacy.blt_max_buffers: must be in 1..10"),
        ("privacy.adaptive=true", "privacy.adaptive: adaptive clipping is not available with dp_blt"),
    ],
)
def test_bad_blt_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_mean("privacy=dp_blt", override))


def test_an_unreachable_target_is_refused_before_start_up():
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon: 0.01 is unreachable: the first release"):
        check_population(tiny_mean("privacy=dp_blt", "privacy.target_epsilon=0.01"), 2000)


def test_fleet_privacy_gives_the_blt_figure_beside_the_trees(capsys):
    from fleet.runtime.privacy_cli import main

    main(
        [
            "--mechanism",
            "dp_blt",
            "--rounds",
            "24",
            "--noise",
            "3",
            "--separation",
            "4",
            "--delta",
            "1e-6",
            "--accountant",
            "both",
        ]
    )
    out = capsys.readouterr().out
    s = blt.strategy(24, 4)
    sens = blt.sensitivity_squared(s, 24, 4)
    assert f"squared sensitivity {sens:.4g}" in out and "one tree of 24 rounds" in out
    assert f"epsilon = {gaussian_epsilon(3 / np.sqrt(sens), 'pld', 1e-6):.4g}" in out and "(RDP;" in out


def test_the_matched_arms_of_the_tree_and_blt_have_the_same_epsilon():
    """experiment=blt_vs_tree_vs_fedavg compares the mechanisms at epsilon 8: the noise in
    conf/matched/ gives it, for the experiment's 200 rounds and limit, to 0.1%."""
    from fleet.privacy.mechanisms.ftrl import TreeFTRL
    from fleet.privacy.segments import Segment
    from fleet.privacy.tree_accountant import TreeAccountant, planned_trees

    eps = {}
    for arm in ("dp_ftrl", "dp_blt"):
        cfg = tiny_mean("experiment=blt_vs_tree_vs_fedavg", f"matched={arm}", "fleet=small")
        n, b, z = cfg.train.rounds, TreeFTRL.limit_rounds(cfg), cfg.privacy.noise_multiplier
        delta = 100_000**-1.1
        if arm == "dp_ftrl":
            eps[arm] = TreeAccountant.epsilon_of(planned_trees(n, 0, b), z, "pld", delta, 1e-4)
        else:
            s = blt.strategy(n, b)
            first = BLTRelease(0, 0, 1, b, z, 0.0, s.buf_decay, s.output_scale)
            eps[arm] = BLTAccountant.epsilon_of([Segment(0, n, b, first)], z, "pld", delta, 1e-4)
    assert eps["dp_ftrl"] == pytest.approx(8.0, rel=1e-3) and eps["dp_blt"] == pytest.approx(8.0, rel=1e-3)
    assert eps["dp_ftrl"] <= 8.0 and eps["dp_blt"] <= 8.0


@pytest.mark.parametrize("privacy", ["dp_fedavg", "dp_blt"])
def test_the_noise_a_ledger_gives_for_a_target_meets_it_in_a_run(privacy, tmp_path, capsys):
    """`fleet-privacy --run RUN --target-epsilon E`: the cohorts do not depend on the noise, so the
    z it finds from one run's ledger, used in the same run, gives epsilon E (just under)."""
    from dataclasses import asdict

    from fleet.round import checkpoint
    from fleet.runtime.privacy_cli import main

    def run(z: str):
        cfg = tiny_mean(
            *BLT, f"privacy={privacy}", "fleet.min_separation_rounds=3", f"privacy.noise_multiplier={z}"
        )
        run_dir = tmp_path / z
        (run_dir / "state").mkdir(parents=True)
        checkpoint.save_config(run_dir, asdict(cfg))
        coord, _ = _run(cfg, 8, run_dir / "state")
        return run_dir, coord.mechanism.epsilon()

    run_dir, eps = run("1.0")
    target = eps / 2  # twice the privacy: more noise
    with pytest.raises(SystemExit) as done:
        main(["--run", str(run_dir), "--target-epsilon", f"{target}"])
    assert done.value.code == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("z = ")]
    z = float(line[0].split()[2])
    assert z > 1.0
    _, again = run(f"{z}")
    assert target * 0.99 <= again <= target  # (PLD grids differ between the runs by a fraction)
