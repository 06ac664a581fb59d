"""The accountant's shortcuts are upper bounds, and close ones: each is held against dp-accounting
computing the exact mechanism."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant

from fleet.privacy.accountant import (
    FINE_RATIO,
    GRID_RATIO,
    ORDERS,
    Accountant,
    grid_below,
    pld_interval,
    rdp_epsilon,
    round_pld,
    round_rdp,
    round_up,
)
from fleet.privacy.ledger import Ledger, read
from fleet.privacy.mechanisms.fedavg import GaussianFedAvg
from fleet.privacy.sampled import SampledRelease as Release


def exact_rdp(sampling: str, q: float, z: float) -> np.ndarray:
    rel = dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed_size" else None
    acc = rdp_privacy_accountant.RdpAccountant(list(ORDERS), *([rel] if rel else []))
    gauss = dp_accounting.GaussianDpEvent(z)
    if sampling == "fixed_size":
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(1 << 40, math.ceil(q * (1 << 40)), gauss))
    else:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, gauss))
    return np.asarray(acc.rdp)


def test_grid_points_bracket_q():
    g = np.random.default_rng(0)
    for q in np.concatenate([10 ** g.uniform(-7, 0, 2000), [1.0, 0.5, GRID_RATIO**-3, 1e-9]]):
        lo, hi = grid_below(float(q))
        assert lo <= q <= hi <= 1.0 and hi / lo <= GRID_RATIO * (1 + 1e-12)
        up = round_up(float(q))
        assert q <= up <= min(1.0, q * FINE_RATIO * (1 + 1e-12))


@pytest.mark.parametrize("z", [0.6, 1.0, 4.0])
def test_rdp_between_grid_points_is_an_upper_bound_and_close(z):
    g = np.random.default_rng(1)
    for q in 10 ** g.uniform(-4, -0.2, 6):
        ours = round_rdp(Release(0, "poisson", float(q), 0, 0, z))
        exact = exact_rdp("poisson", float(q), z)
        finite = np.isfinite(exact)
        # dp-accounting's series at fractional orders carry ~1e-5 relative error of their own
        assert np.all(ours[finite] >= exact[finite] * (1 - 1e-4))
        e_ours, e_exact = (rdp_epsilon(200 * c, 1e-6) for c in (ours, exact))
        assert e_exact * (1 - 1e-4) <= e_ours <= e_exact * 1.005


def test_pld_between_grid_points_is_an_upper_bound_and_close():
    """The published-coin mixture of the two grid points' PLDs dominates the mechanism at q."""
    interval = 2e-4
    for q, z in [(0.0031, 1.0), (0.047, 0.8), (0.3, 2.0)]:
        ours = round_pld(Release(0, "poisson", q, 0, 0, z), interval, 1e-6).self_compose(50)
        exact = pld_lib.from_gaussian_mechanism(z, sampling_prob=q, value_discretization_interval=interval)
        exact = exact.self_compose(50)
        for delta in (1e-4, 1e-6, 1e-9):
            e_ours, e_exact = ours.get_epsilon_for_delta(delta), exact.get_epsilon_for_delta(delta)
            assert e_exact <= e_ours <= e_exact * 1.005, (q, delta, e_ours, e_exact)


def test_fixed_size_bound_grows_with_q_so_rounding_up_is_safe():
    """A smaller sample is a post-processing of a larger one; dp-accounting's bound for sampling
    without replacement must agree on the fine grid it is rounded up to."""
    z = 0.7
    points = [round_up(q) for q in (0.004, 0.0041, 0.02, 0.0201, 0.2)]
    for a, b in zip(points, [p * FINE_RATIO for p in points], strict=True):
        lo, hi = exact_rdp("fixed_size", a, z), exact_rdp("fixed_size", min(b, 1.0), z)
        assert np.all(hi[np.isfinite(lo)] >= lo[np.isfinite(lo)] - 1e-12)
    q = 0.0123
    ours = round_rdp(Release(0, "fixed_size", q, 0, 0, z))
    assert rdp_epsilon(ours, 1e-6) >= rdp_epsilon(exact_rdp("fixed_size", q, z), 1e-6)


@pytest.mark.parametrize("q, z, rounds", [(0.001, 1.0, 300), (0.02, 1.0, 200), (0.0026, 7.0, 300)])
def test_pld_discretisation_is_an_upper_bound_within_one_percent(q, z, rounds):
    """The run's interval (chosen by `pld_interval`) against dp-accounting at a 10x finer one."""
    delta = 1e-8
    interval = pld_interval(q, z, rounds, delta)
    acc = Accountant("pld", delta, interval)
    for r in range(rounds):
        acc.record(Release(r, "poisson", q, 1000, 10, z))
    fine = pld_lib.from_gaussian_mechanism(z, sampling_prob=q, value_discretization_interval=interval / 10)
    want = fine.self_compose(rounds).get_epsilon_for_delta(delta)
    assert want <= acc.epsilon() <= want * 1.01, (interval, acc.epsilon(), want)


def test_look_ahead_does_not_record_and_a_snapshot_resumes_exactly(tmp_path):
    g = np.random.default_rng(2)
    releases = [
        Release(r, "poisson", float(q), 1000, 13, 1.1) for r, q in enumerate(g.uniform(0.01, 0.03, 40))
    ]
    for kind in ("pld", "rdp"):
        acc = Accountant(kind, 1e-6, 5e-4)
        for r in releases[:25]:
            acc.record(r)
        before = acc.epsilon()
        assert acc.epsilon_with(releases[25]) > before == acc.epsilon() and len(acc.releases) == 25
        snap = acc.snapshot()
        for r in releases[25:]:
            acc.record(r)
        resumed = Accountant(kind, 1e-6, 5e-4)
        resumed.load(releases, snap)
        rebuilt = Accountant(kind, 1e-6, 5e-4, list(releases))
        assert resumed.epsilon() == pytest.approx(acc.epsilon(), rel=1e-12)
        assert rebuilt.epsilon() == pytest.approx(acc.epsilon(), rel=1e-9)
    parse = GaussianFedAvg.parse
    ledger = Ledger(tmp_path / "ledger.jsonl", parse)
    for r in releases[:5]:
        ledger.append(r)
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"round": 5, "sampl')  # a crash while writing
    assert read(tmp_path / "ledger.jsonl", parse) == releases[:5]


def test_zero_noise_is_infinite_and_stays_so():
    acc = Accountant("pld", 1e-6, 1e-3)
    acc.record(Release(0, "poisson", 0.01, 100, 1, 1.0))
    acc.record(Release(1, "poisson", 0.01, 100, 1, 0.0))
    acc.record(Release(2, "poisson", 0.01, 100, 1, 1.0))
    assert acc.epsilon() == math.inf


def test_a_torn_ledger_line_is_cut_before_the_next_release_and_damage_is_refused(tmp_path):
    """A crash while a release is written leaves a torn last line: it is not a release, and it is cut
    when the ledger is opened again, so the releases appended after it are read back too. A bad
    line with releases after it is a damaged ledger, refused rather than silently shortened."""
    from fleet.privacy.ledger import Ledger, read

    parse = GaussianFedAvg.parse
    path = tmp_path / "ledger.jsonl"
    rel = [Release(r, "poisson", 0.01, 1000, 10, 1.0) for r in range(8)]
    ledger = Ledger(path, parse)
    for r in rel[:3]:
        ledger.append(r)
    with open(path, "a") as f:
        f.write('{"available": 1000, "coh')  # the crash
    ledger = Ledger(path, parse)  # the resume
    for r in rel[3:]:
        ledger.append(r)
    assert read(path, parse) == rel == Ledger(path, parse).releases
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="ledger .* line 3 is damaged and releases follow it"):
        read(path, parse)
