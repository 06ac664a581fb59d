"""DP invariants: sensitivity (1), calibration (2), honest accounting (5); adaptive clipping."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from conftest import in_process_fleet, tiny_mean
from dp_accounting import rdp
from scipy import stats

from fleet.privacy.accountant import Mechanism, epsilon, noise_for_epsilon
from fleet.privacy.clipping import clip


def test_clip_bounds_norm_even_for_huge_float32():
    for scale in (1e-3, 1.0, 1e6, 3e38):
        d = np.full(1000, scale, dtype=np.float32)
        c, _ = clip(d, 0.7)
        assert np.linalg.norm(c.astype(np.float64)) <= 0.7


def test_sensitivity_huge_update_moves_sum_by_at_most_s():
    cfg = tiny_mean("task.name=tests.doubles:HugeTask", "privacy.clip_norm=0.5", "fleet.failure_prob_mean=0")
    shards, _ = in_process_fleet(cfg, 1)
    shard = shards[0]
    n = shard.check_in(0, 0.0)
    shard.plan(0, 0.0, 600.0, np.arange(min(n, 7)))
    params = np.zeros(cfg.task.mean_dim, dtype=np.float32)
    accepted = np.ones(len(shard._selected), dtype=bool)
    full = shard.train(0, 0.0, params, accepted, 0.5)["sum"]
    for leave_out in range(len(accepted)):
        shard.check_in(0, 0.0)
        shard.plan(0, 0.0, 600.0, np.arange(min(n, 7)))
        acc = accepted.copy()
        acc[leave_out] = False
        partial = shard.train(0, 0.0, params, acc, 0.5)["sum"]
        assert np.linalg.norm(full - partial) <= 0.5 + 1e-9


def test_noise_std_is_z_times_s_and_present_whatever_the_dropout():
    z, s, goal = 1.3, 0.25, 20
    cfg = tiny_mean(
        "task.name=tests.doubles:ZeroTask",
        "task.mean_dim=2000",
        f"privacy.noise_multiplier={z}",
        f"privacy.clip_norm={s}",
        f"fleet.goal={goal}",
        "fleet.failure_prob_mean=0.5",  # heavy dropout: rounds close below the goal
        "fleet.min_reports=1",
        "train.server_optimizer=sgd",
        "train.server_lr=1.0",
    )
    _, coord = in_process_fleet(cfg)
    samples, below_goal = [], 0
    for _ in range(10):
        before = coord.get_params().copy()
        line = coord.run_round()
        assert line["released"]
        below_goal += line["reported"] < goal
        # server SGD lr 1: params move by exactly (sum + noise) / goal, and the sum is zero
        samples.append((coord.get_params() - before) * goal)
    assert below_goal > 0
    x = np.concatenate(samples).astype(np.float64)
    std = x.std()
    # 20,000 draws: the sample std is within ~1.5% of the truth with overwhelming probability.
    assert abs(std - z * s) / (z * s) < 0.03, std
    assert stats.normaltest(x).pvalue > 1e-4
    assert abs(x.mean()) < 5 * z * s / np.sqrt(len(x))


def test_no_noise_without_dp():
    cfg = tiny_mean("task.name=tests.doubles:ZeroTask", "privacy=none", "train.server_optimizer=sgd")
    _, coord = in_process_fleet(cfg)
    before = coord.get_params().copy()
    coord.run_round()
    np.testing.assert_array_equal(coord.get_params(), before)


@pytest.mark.parametrize("sampling", ["poisson", "fixed_size"])
def test_epsilon_matches_independent_dp_accounting(sampling):
    cfg = tiny_mean(f"privacy.sampling={sampling}", "privacy.noise_multiplier=0.9", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg)
    for _ in range(4):
        line = coord.run_round()
    pop, goal, delta = cfg.fleet.population, cfg.fleet.goal, coord.delta
    gauss = dp_accounting.GaussianDpEvent(0.9)
    if sampling == "poisson":
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(goal / pop, gauss), 4)
    else:
        acc = rdp.RdpAccountant(neighboring_relation=rdp.rdp_privacy_accountant.NeighborRel.REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(pop, goal, gauss), 4)
    assert line["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-3)


def test_target_epsilon_stops_before_it_is_passed():
    mech = Mechanism("poisson", 2000, 20, 1.0)
    target = epsilon(mech, 5, 2000**-1.1) * 1.001
    cfg = tiny_mean(f"privacy.target_epsilon={target}", "fleet.min_reports=1")
    _, coord = in_process_fleet(cfg)
    rounds = 0
    while not coord.budget_exhausted():
        coord.run_round()
        rounds += 1
        assert rounds < 50
    assert coord.accountant.released == 5 and coord.accountant.epsilon() <= target


def test_noise_for_epsilon_meets_target():
    z = noise_for_epsilon("poisson", 100_000, 100, 1000, 1e-6, 2.0)
    assert epsilon(Mechanism("poisson", 100_000, 100, z), 1000, 1e-6) <= 2.0
    assert epsilon(Mechanism("poisson", 100_000, 100, z * 0.98), 1000, 1e-6) > 2.0


def test_adaptive_clipping_tracks_the_median_norm():
    cfg = tiny_mean(
        "privacy=dp_fedavg_adaptive",
        "privacy.noise_multiplier=0.5",
        "privacy.initial_clip=10.0",
        "fleet.goal=100",
        "fleet.population=4000",
        "fleet.min_reports=1",
        "train.client_lr=0.01",
    )
    _, coord = in_process_fleet(cfg)
    z, sb = 0.5, 100 / 20
    assert coord.update_noise == pytest.approx((z**-2 - (2 * sb) ** -2) ** -0.5)
    lines = [coord.run_round() for _ in range(40)]
    med = np.median([x["update_norm_median"] for x in lines[-10:]])
    clip_end = lines[-1]["clip_norm"]
    assert clip_end < 10.0 / 5  # moved down toward the norms
    assert 0.25 * med < clip_end < 4 * med


def test_fleet_privacy_command(capsys):
    from fleet.privacy.cli import main

    main(["--population", "100000", "--goal", "100", "--rounds", "50", "--noise", "1.0", "--delta", "1e-6"])
    out = capsys.readouterr().out
    want = epsilon(Mechanism("poisson", 100_000, 100, 1.0), 50, 1e-6)
    assert f"epsilon = {want:.4g}" in out
    main(["--population", "100000", "--goal", "100", "--rounds", "50", "--target-epsilon", "1.0"])
    z = float(capsys.readouterr().out.split("z = ")[1].split()[0])
    assert epsilon(Mechanism("poisson", 100_000, 100, z * 1.001), 50, 100_000**-1.1) <= 1.0
